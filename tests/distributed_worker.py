"""A worker for tests/test_distributed.py, run by plain python (one process) or by torchrun (a group): a few
learner updates on one fixed batch of 2 x 16 sequences split over the ranks, then rank 0 writes every trained
tensor, before and after, to OUT.

    python tests/distributed_worker.py OUT RUN_DIR [overrides]
    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT RUN_DIR [overrides]

Rank 0's memory is the one-process run's (same env seed, same random actions); the batch is sampled from it
and broadcast, and half of its sequences are marked planned so that the policy trains too.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch

from ami.config import load_config
from ami.runs import agent_state
from ami.train import Trainer
from modules.memory import SequenceBatch

BATCH, HORIZON, UPDATES = 32, 3, 5


def rows(batch: SequenceBatch, part: slice) -> SequenceBatch:
    """The sequences `part` of a batch (its dim 1)."""
    return SequenceBatch(**{field.name: None if getattr(batch, field.name) is None else
                            getattr(batch, field.name)[:, part] for field in dataclasses.fields(batch)})


def main(out: str, run_dir: str, overrides: list[str]) -> None:
    cfg = load_config(["env=pendulum", "agent=tiny", "progress=false", "threads=1", "train.num_envs=1",
                       *overrides])
    trainer = Trainer(cfg, run_dir)
    group = trainer.group
    while len(trainer.agent.memory) < 2 * BATCH:
        trainer.env_step(random=True)
    batch = None
    if group.main:
        generator = torch.Generator().manual_seed(5)
        batch = trainer.agent.memory.sample_sequences(BATCH, HORIZON, generator)
        # The first ranks' sequences planned more often than the last ones': the policy's mean is the group's.
        planned = torch.rand(batch.planned.shape, generator=generator) < torch.linspace(0.9, 0.1, BATCH)
        batch = dataclasses.replace(batch, planned=planned,
                                    plan_actions=torch.rand(batch.plan_actions.shape, generator=generator) * 2 - 1)
    batch = group.broadcast(batch)
    share = BATCH // group.world_size
    mine = rows(batch, slice(group.rank * share, (group.rank + 1) * share))
    start = copy.deepcopy(agent_state(trainer.agent)["modules"])
    for _ in range(UPDATES):
        trainer.learner.update(mine)
    if group.main:
        torch.save({"start": start, "end": agent_state(trainer.agent)["modules"]}, out)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

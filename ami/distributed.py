"""Training across processes: `torchrun` starts the same Trainer once per rank.

Each rank has its own vector envs, short-term memory and seed stream; the learner's objectives (world model with
perception, critic, policy) run through DistributedDataParallel, so every update averages the ranks' gradients
and every rank holds the same parameters after it (the encoder's observation statistics are rank 0's, broadcast
with each update). The schedule counts the group's env steps (each rank's summed), so every rank takes the same
number of updates, evaluations and checkpoints at the same moments. Rank 0 logs and evaluates; every rank keeps
a checkpoint of its own (its memory, envs and generators), rank 0's in the run directory and rank r's in
ranks/<r>/, and a group resumes from them together.

Without torchrun (no WORLD_SIZE in the environment) the group is this process alone and nothing here talks to
another process: single-process runs are what they were.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Rank 0 evaluates while the others wait at their next collective: long enough for an evaluation.
TIMEOUT = datetime.timedelta(hours=2)
SEED_STRIDE = 1_000_003  # rank r's generators start at seed + r * SEED_STRIDE (rank 0's are the run's own)


class Objective(nn.Module):
    """A loss method of some modules, run as this module's forward so that DistributedDataParallel sees every
    parameter the loss touches (theirs) and syncs their gradients in backward."""

    def __init__(self, loss: Callable[..., Any], **parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.loss = loss

    def forward(self, *args: Any) -> Any:
        return _open(self.loss(*args))


def _open(value: Any) -> Any:
    """A loss's result with each dataclass in it as (its class, {field: value}): DDP follows a result's tensors
    (to sync their gradients) through tuples, lists and dicts only."""
    if is_dataclass(value) and not isinstance(value, type):
        return type(value), {field.name: _open(getattr(value, field.name)) for field in fields(value)}
    if isinstance(value, (tuple, list)):
        return type(value)(_open(item) for item in value)
    return value


def _close(value: Any) -> Any:
    """_open undone."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], type) and is_dataclass(value[0]):
        return value[0](**{name: _close(item) for name, item in value[1].items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_close(item) for item in value)
    return value


@dataclass(frozen=True)
class Group:
    """This process's place in the group torchrun started: rank in [0, world_size)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: it logs and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def seed(self, seed: int) -> int:
        """This rank's start for a generator the run seeds with `seed`."""
        return seed + SEED_STRIDE * self.rank

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (one collective for all of them)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all(self, flag: bool) -> bool:
        """Whether flag holds on every rank."""
        return self.sum([float(flag)])[0] == self.world_size

    def any(self, flag: bool) -> bool:
        """Whether flag holds on some rank."""
        return self.sum([float(flag)])[0] > 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value (a picklable object), on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def objective(self, loss: Callable[..., Any], **parts: nn.Module) -> Callable[..., Any]:
        """loss itself alone; in a group, the same call through DistributedDataParallel over `parts`, whose
        backward averages their gradients over the ranks. Every rank must call it, as often as the others."""
        if not self.distributed:
            return loss
        # Which parameters a loss uses is fixed by the configuration (a head whose loss weight is 0 gets no
        # gradient): DDP records them on the first call (static_graph) instead of searching the graph every call.
        wrapped = DistributedDataParallel(Objective(loss, **parts), forward_sync_buffers=True, static_graph=True)
        return lambda *args: _close(wrapped(*args))

    def rank_dir(self, run_dir: Path) -> Path:
        """Where this rank keeps its own files: the run directory for rank 0, ranks/<r>/ in it for rank r."""
        return run_dir if self.main else run_dir / "ranks" / str(self.rank)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def join(device: torch.device) -> Group:
    """The group torchrun started this process in (its RANK, WORLD_SIZE, LOCAL_RANK and rendezvous variables),
    joined on first call: gloo for CPU tensors, nccl for CUDA ones (with device=cuda or auto, each rank on the GPU
    of its LOCAL_RANK).
    Group() when the process was not started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Group()
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and device.index is None:  # device=cuda:N puts every rank on that one GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size())

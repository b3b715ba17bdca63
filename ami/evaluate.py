"""Evaluation: N episodes at once through the env loop, planned as one batch; and videos."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ami.agent import Agent
from ami.envs import make_vector_env
from ami.figures import render_episode
from ami.loop import EnvLoop
from ami.messages import Action
from ami.schema import EnvConfig

# Fixed start states for every run, so that scores of different seeds and agents compare.
EVAL_SEED = 10_000


@dataclass(frozen=True)
class EvalResult:
    returns: np.ndarray  # (episodes,)
    lengths: np.ndarray  # (episodes,)
    costs: np.ndarray  # (episodes,) summed info["cost"]: the env's own safety cost
    interventions: np.ndarray  # (episodes,) actions the shield replaced

    @property
    def mean(self) -> float:
        return float(self.returns.mean())

    @property
    def std(self) -> float:
        return float(self.returns.std())


def run_episodes(policy: Callable[[Any], Action | np.ndarray], env_config: EnvConfig, episodes: int,
                 seed: int = EVAL_SEED) -> EvalResult:
    """The first episode of each of `episodes` environments, seeded seed, seed + 1, ...

    policy: obs (episodes, ...) -> actions (episodes, A) in [-1, 1], or an Action (whose shield decisions count
    as interventions). Any policy (ami, a peer, a planner on the true dynamics, random actions) is scored on the
    same start states.
    """
    loop = EnvLoop(make_vector_env(env_config, episodes), env_config.nonfinite)
    stats = {name: np.zeros(episodes) for name in ("return", "length", "cost", "interventions")}
    done = np.zeros(episodes, dtype=bool)
    try:
        loop.reset(seed=seed)
        while not done.all():
            # Once done, an environment's later episodes are stepped with the batch but not counted.
            for episode in loop.step(policy).finished:
                if not done[episode.env]:
                    for name, values in stats.items():
                        values[episode.env] = episode.stats[name]
                    done[episode.env] = True
    finally:
        loop.envs.close()
    return EvalResult(stats["return"], stats["length"].astype(np.int64), stats["cost"], stats["interventions"])


def evaluate(agent: Agent, env_config: EnvConfig, episodes: int, seed: int = EVAL_SEED) -> EvalResult:
    """The agent without exploration on the fixed start states, in episodes of its own: whatever training
    episodes are under way get their warm starts, held plans, trails and stall counts back untouched."""
    generator = torch.Generator().manual_seed(seed)
    with agent.fresh_episodes():
        return run_episodes(lambda obs: agent.act(obs, generator=generator), env_config, episodes, seed)


def record_video(agent: Agent, env_config: EnvConfig, path: str | Path, seed: int = EVAL_SEED,
                 fps: int = 30) -> float:
    """Render one evaluation episode to an mp4 at `path`; returns its return."""
    import imageio.v2 as imageio

    frames, episode_return = render_episode(agent, env_config, seed, torch.Generator().manual_seed(seed))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(str(path), frames, fps=fps, macro_block_size=1)
    return episode_return

"""Evaluation: N episodes at once in a gymnasium vector env, planned as one batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from ami.agent import Agent
from ami.config import EnvConfig
from ami.envs import make_env, make_vector_env
from modules.memory import EpisodeTrail

# Fixed start states for every run, so that scores of different seeds and agents compare.
EVAL_SEED = 10_000


@dataclass(frozen=True)
class EvalResult:
    returns: np.ndarray  # (episodes,)
    lengths: np.ndarray  # (episodes,)
    costs: np.ndarray | None = None  # (episodes,) summed info["cost"]: the env's own safety cost
    interventions: np.ndarray | None = None  # (episodes,) actions the shield replaced

    def __post_init__(self) -> None:
        for name in ("costs", "interventions"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(len(self.returns)))

    @property
    def mean(self) -> float:
        return float(self.returns.mean())

    @property
    def std(self) -> float:
        return float(self.returns.std())


@contextmanager
def fresh_plans(agent: Agent) -> Iterator[None]:
    """Plan without the training episode's warm start, trail and stall count, and give them back
    afterwards, so that evaluation leaves training exactly as it was."""
    configurator = agent.configurator
    saved = agent.actor.previous, agent.trail, configurator.best_distance, configurator.stalled_steps
    agent.actor.reset()
    configurator.reset()
    if agent.trail is not None:
        agent.trail = EpisodeTrail(agent.trail.capacity, agent.trail.latent_dim, agent.trail.every)
    try:
        yield
    finally:
        agent.actor.previous, agent.trail, configurator.best_distance, configurator.stalled_steps = saved


def run_episodes(policy: Callable[[np.ndarray], np.ndarray], env_config: EnvConfig, episodes: int,
                 seed: int = EVAL_SEED, interventions: Callable[[], np.ndarray] | None = None) -> EvalResult:
    """First episode of each of `episodes` sub-envs, seeded seed, seed + 1, ...

    policy: obs (episodes, obs_dim) -> actions (episodes, A) in [-1, 1]. Any policy (ami, a peer, a
    planner on the true dynamics) is scored on the same start states. interventions: () -> (episodes,)
    whether the policy's shield replaced each of the actions it last returned.
    """
    envs = make_vector_env(env_config, episodes)
    # Only each sub-env's first episode counts; once done, a sub-env's later steps are ignored, which
    # is right whether it autoresets on the next step or the same one.
    if envs.metadata.get("autoreset_mode") == gym.vector.AutoresetMode.DISABLED:
        raise ValueError("evaluation needs a vector env that autoresets; got autoreset_mode=DISABLED")
    returns, costs, replaced = np.zeros(episodes), np.zeros(episodes), np.zeros(episodes)
    lengths = np.zeros(episodes, dtype=np.int64)
    done = np.zeros(episodes, dtype=bool)
    try:
        obs, _ = envs.reset(seed=seed)
        while not done.all():
            obs, reward, terminated, truncated, info = envs.step(policy(obs))
            returns += np.where(done, 0.0, reward)
            if "cost" in info:
                costs += np.where(done | ~info["_cost"], 0.0, info["cost"])
            if interventions is not None:
                replaced += np.where(done, 0.0, interventions())
            lengths += ~done
            done |= terminated | truncated
    finally:
        envs.close()
    return EvalResult(returns, lengths, costs, replaced)


def evaluate(agent: Agent, env_config: EnvConfig, episodes: int, seed: int = EVAL_SEED) -> EvalResult:
    """The agent without exploration on the fixed start states."""
    generator = torch.Generator().manual_seed(seed)
    replaced: list[np.ndarray] = []

    def policy(obs: np.ndarray) -> np.ndarray:
        actions, *_, decision = agent.act(obs, explore=False, generator=generator)
        replaced.append(decision.intervened.numpy())
        return actions

    with fresh_plans(agent):
        return run_episodes(policy, env_config, episodes, seed, lambda: replaced[-1])


def record_video(agent: Agent, env_config: EnvConfig, path: str | Path, seed: int = EVAL_SEED,
                 fps: int = 30) -> float:
    """Render one evaluation episode to an mp4 at `path`; returns its return."""
    import imageio.v2 as imageio

    env = make_env(env_config, render_mode="rgb_array")
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with fresh_plans(agent):
        try:
            obs, _ = env.reset(seed=seed)
            frames = [env.render()]
            done = False
            while not done:
                action, *_ = agent.act(obs[None], explore=False, generator=generator)
                obs, reward, terminated, truncated, _ = env.step(action[0])
                frames.append(env.render())
                total += float(reward)
                done = terminated or truncated
        finally:
            env.close()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(str(path), frames, fps=fps, macro_block_size=1)
    return total

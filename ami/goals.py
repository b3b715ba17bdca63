"""Goal-reaching episodes: the agent is shown a goal observation it never saw and plans its way there.

Zero-shot: no reward, no goal-conditioned training. The configurator turns the goal image into the intrinsic
cost's goal term (a latent distance) and the actor plans through the world model to lower it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ami.agent import Agent
from ami.loop import EnvLoop
from ami.messages import Action


@dataclass
class GoalEpisode:
    """success: the env said so (within its success radius) before the time limit. agent_time_s: wall time
    inside agent.act over the episode (perception, configurator, planning, shield). frames: the observed
    images, and imagined: (H + 1, D) the first plan's predicted latents, when recorded."""

    success: bool
    steps: int
    agent_time_s: float
    plan_calls: int
    final_distance: float
    frames: list[np.ndarray] = field(default_factory=list)
    imagined: torch.Tensor | None = None


def batched(obs: Any) -> Any:
    """One env's observation as a batch of one."""
    if isinstance(obs, dict):
        return {key: value[None] for key, value in obs.items()}
    return np.asarray(obs)[None]


def run_goal_episode(agent: Agent, loop: EnvLoop, seed: int | None, options: dict | None = None,
                     generator: torch.Generator | None = None, record: bool = False) -> GoalEpisode:
    """One episode of the loop's single environment, from reset(seed=seed, options=options), until success or
    the env's time limit."""
    obs = loop.reset(seed=seed, options=options)
    agent.reset()
    frames = [obs["image"][0]] if record else []
    agent_time, plan_calls, imagined = 0.0, 0, None

    def policy(obs: Any) -> Action:
        nonlocal agent_time, plan_calls, imagined
        start = time.perf_counter()
        action = agent.act(obs, generator=generator)
        agent_time += time.perf_counter() - start
        plan_calls += action.plan.plan_time_s > 0
        if record and imagined is None:
            imagined = action.plan.states[:, 0].detach().cpu()
        return action

    while True:
        step = loop.step(policy)
        if record:
            frames.append(step.next_obs["image"][0])
        if step.finished:
            episode = step.finished[0]
            return GoalEpisode(bool(step.info["success"][0]), int(episode.stats["length"]), agent_time,
                               int(plan_calls), float(step.info["distance"][0]), frames, imagined)

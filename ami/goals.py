"""Goal-reaching episodes: the agent is shown a goal observation it never saw and plans its way there.

Zero-shot: no reward, no goal-conditioned training. The configurator turns the goal image into the intrinsic
cost's goal term (a latent distance) and the actor plans through the world model to lower it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ami.agent import Agent
from ami.build import build_agent, resolve_device
from ami.checkpoint import latest_checkpoint, load_checkpoint
from ami.config import ConfigError, load_saved
from ami.envs import make_env, observation_names


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


def run_goal_episode(agent: Agent, env: gym.Env, seed: int | None, options: dict | None = None,
                     generator: torch.Generator | None = None, record: bool = False) -> GoalEpisode:
    """One episode from env.reset(seed=seed, options=options) until success or the env's time limit."""
    obs, info = env.reset(seed=seed, options=options)
    agent.reset()
    frames = [obs["image"]] if record else []
    agent_time, plan_calls, steps, imagined = 0.0, 0, 0, None
    terminated = truncated = False
    while not (terminated or truncated):
        start = time.perf_counter()
        actions, _, _, plan, _ = agent.act(batched(obs), generator=generator)
        agent_time += time.perf_counter() - start
        plan_calls += plan.plan_time_s > 0
        if record and imagined is None:
            imagined = plan.states[:, 0].detach().cpu()
        obs, _, terminated, truncated, info = env.step(actions[0])
        steps += 1
        if record:
            frames.append(obs["image"])
    return GoalEpisode(bool(info["success"]), steps, agent_time, int(plan_calls), float(info["distance"]),
                       frames, imagined)


def load_goal_agent(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Agent, DictConfig, gym.Env]:
    """A reward-free run's agent (its trained perception and world model), with planner overrides applied:
    -> (agent, resolved config, env)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml there; expected an ami run directory")
    cfg = load_saved(run_dir / "config.yaml", ["progress=false", *(overrides or [])])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    env = make_env(cfg.env)
    agent = build_agent(OmegaConf.to_object(cfg.agent), env.observation_space, env.action_space.shape[0],
                        observation_names(cfg.env, env), device)
    state = load_checkpoint(latest_checkpoint(run_dir), device)
    agent.perception.load_state_dict(state["perception"])
    agent.world_model.load_state_dict(state["world_model"])
    if agent.cost.goal_critic is not None and "goal_critic" in state:
        agent.cost.goal_critic.load_state_dict(state["goal_critic"])
    agent.world_model_trained = True
    return agent, cfg, env

"""Shared fixtures: the tiny agent on Pendulum and a batch of real random-action transitions."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ami.build import build_agent
from ami.config import load_config
from ami.envs import make_env

# Small models: one thread avoids oversubscription when the 2-core CPU is shared.
torch.set_num_threads(1)

PENDULUM_NAMES = ["cos_theta", "sin_theta", "theta_dot"]


@pytest.fixture
def make_agent():
    """make_agent(*overrides) -> (agent, agent_config) for the tiny Pendulum agent on the CPU."""

    def make(*overrides, seed=0):
        cfg = load_config(["agent=tiny", *overrides])
        agent_cfg = OmegaConf.to_object(cfg.agent)
        torch.manual_seed(seed)
        return build_agent(agent_cfg, 3, 1, PENDULUM_NAMES, torch.device("cpu")), agent_cfg

    return make


@pytest.fixture
def fill_memory():
    """fill_memory(agent, steps, seed): `steps` real Pendulum-v1 transitions with uniform random
    actions in [-1, 1], written through agent.observe (which also feeds the normaliser)."""

    def fill(agent, steps, seed=0):
        env = make_env(load_config().env)
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        episode = 0
        for step in range(steps):
            action = rng.uniform(-1.0, 1.0, (1,)).astype(np.float32)
            latent = agent.perceive(obs[None]).state
            next_obs, reward, terminated, truncated, info = env.step(action)
            agent.observe(step, episode, obs, action, float(reward), next_obs, terminated, truncated, info,
                          latent, planned=False)
            obs = next_obs
            if terminated or truncated:
                obs, _ = env.reset()
                episode += 1
        env.close()

    return fill

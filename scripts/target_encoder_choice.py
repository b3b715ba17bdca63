"""EMA vs stop-gradient target encoder, measured: held-out multi-step readout error of the world
model after the same number of updates on the same random-action Pendulum data.

    python scripts/target_encoder_choice.py [--updates 600] [--seeds 0 1]
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch
from omegaconf import OmegaConf

from ami.agent import Agent
from ami.build import build_agent
from ami.config import load_config
from ami.learner import Learner

NAMES = ["cos_theta", "sin_theta", "theta_dot"]


def collect_random(agent: Agent, seed: int, steps: int) -> None:
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    episode = 0
    for step in range(steps):
        action = rng.uniform(-1, 1, (1,)).astype(np.float32)
        next_obs, reward, terminated, truncated, info = env.step(2 * action)
        agent.observe(step, episode, obs, action, float(reward), next_obs, terminated, truncated, info,
                      torch.zeros(agent.perception.latent_dim), planned=False)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
            episode += 1


def held_out_error(target: str, seed: int, updates: int) -> np.ndarray:
    """(11,) normalised readout MSE at prediction steps 0..10 on episodes never trained on."""
    torch.manual_seed(seed)
    agent_cfg = OmegaConf.to_object(load_config([f"agent.perception.target={target}"]).agent)
    agent = build_agent(agent_cfg, 3, 1, NAMES, torch.device("cpu"))
    held_out = build_agent(agent_cfg, 3, 1, NAMES, torch.device("cpu"))
    collect_random(agent, seed, 2000)
    collect_random(held_out, seed + 100, 1000)
    learner = Learner(agent, agent_cfg, seed)
    for _ in range(updates):
        learner.update()
    batch = held_out.memory.sample_sequences(512, 10, torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = agent.world_model.rollout(agent.perception(batch.obs[0]), batch.actions)
        error = (agent.world_model.readout(states) - batch.obs) / agent.perception.normalizer.std
    return error.pow(2).mean(dim=(1, 2)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'target':10s} {'step 1':>8s} {'step 5':>8s} {'step 10':>8s}")
    for target in ("ema", "stopgrad"):
        error = np.mean([held_out_error(target, seed, args.updates) for seed in args.seeds], axis=0)
        print(f"{target:10s} {error[1]:8.4f} {error[5]:8.4f} {error[10]:8.4f}")


if __name__ == "__main__":
    main()

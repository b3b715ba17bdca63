"""The planner on the true Pendulum-v1 dynamics: what planning alone achieves on the same starts,
so that a learned agent's score splits into model error and planning error."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ami.build import build_planner
from ami.schema import ActorConfig
from modules.critic import discount_weights
from modules.planners import EnergyFn, shift_plan

GRAVITY, MASS, LENGTH, DT, MAX_SPEED, MAX_TORQUE = 10.0, 1.0, 1.0, 0.05, 8.0, 2.0


def pendulum_step(state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's own integrator. state: (B, 2) = (theta, theta_dot); action: (B, 1) in [-1, 1]."""
    theta, speed = state[:, 0], state[:, 1]
    torque = MAX_TORQUE * action[:, 0]
    speed = speed + (3 * GRAVITY / (2 * LENGTH) * torch.sin(theta) + 3.0 / (MASS * LENGTH**2) * torque) * DT
    speed = speed.clamp(-MAX_SPEED, MAX_SPEED)
    return torch.stack([theta + speed * DT, speed], dim=1)


def pendulum_energy(discount: float) -> EnergyFn:
    """The planner's objective on the exact dynamics and the env's own cost, discounted like ami's."""

    def energy(state: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = [state]
        for action in actions:
            states.append(pendulum_step(states[-1], action))
        stacked = torch.stack(states)  # (H + 1, B, 2)
        theta = torch.atan2(torch.sin(stacked[:-1, :, 0]), torch.cos(stacked[:-1, :, 0]))
        cost = theta**2 + 0.1 * stacked[:-1, :, 1] ** 2 + 0.001 * (MAX_TORQUE * actions[..., 0]) ** 2
        gammas = discount_weights(actions.shape[0], discount, state.device)
        return (gammas[:, None] * cost).sum(0), stacked

    return energy


def true_dynamics_policy(config: ActorConfig, discount: float, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A policy for ami.evaluate.run_episodes: obs (B, 3) -> actions (B, 1), warm-started like ami."""
    planner = build_planner(config)
    energy = pendulum_energy(discount)
    generator = torch.Generator().manual_seed(seed)
    previous: list[torch.Tensor] = []

    def policy(obs: np.ndarray) -> np.ndarray:
        state = torch.as_tensor(np.stack([np.arctan2(obs[:, 1], obs[:, 0]), obs[:, 2]], axis=1),
                                dtype=torch.float32)
        warm = shift_plan(previous[0], config.horizon) if previous else None
        plan = planner.plan(state, energy, config.horizon, config.iterations, 1, warm, None, generator)
        previous[:] = [plan.actions]
        return plan.actions[0].numpy()

    return policy

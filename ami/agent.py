"""The agent: six modules composed by injection, and the perception-action loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ami.messages import Percept, Plan, Record, Task
from modules.actor import Actor
from modules.configurator import Configurator
from modules.cost import Cost
from modules.memory import ShortTermMemory
from modules.perception import Perception
from modules.world_model import WorldModel


class Agent:
    """obs -perception-> Percept -configurator-> Task -actor-> Plan -> action; real transitions
    -intrinsic cost-> terms -memory-> Record."""

    def __init__(self, perception: Perception, world_model: WorldModel, cost: Cost,
                 memory: ShortTermMemory, actor: Actor, configurator: Configurator,
                 device: torch.device, exploration_std: float = 0.0) -> None:
        self.perception = perception
        self.world_model = world_model
        self.cost = cost
        self.memory = memory
        self.actor = actor
        self.configurator = configurator
        self.device = device
        self.exploration_std = exploration_std

    def perceive(self, obs: np.ndarray) -> Percept:
        """obs: (B, obs_dim) -> Percept with state (B, D)."""
        with torch.no_grad():
            return Percept(self.perception(torch.as_tensor(obs, dtype=torch.float32, device=self.device)))

    def act(self, obs: np.ndarray, explore: bool = False,
            generator: torch.Generator | None = None) -> tuple[np.ndarray, Percept, Task, Plan]:
        """obs: (B, obs_dim) -> actions (B, A) in [-1, 1], and the messages that produced them."""
        percept = self.perceive(obs)
        task = self.configurator.configure(percept)
        weights = self.cost.intrinsic.weight_vector(task.weights).to(self.device)
        plan = self.actor.act(percept, task, weights, generator)
        action = plan.actions[0].detach().cpu()
        if explore and self.exploration_std > 0:
            action = action + self.exploration_std * torch.randn(action.shape, generator=generator)
        # Whatever the planner produced, what leaves the agent is finite and in bounds.
        action = torch.nan_to_num(action, nan=0.0).clamp(-1.0, 1.0)
        return action.numpy(), percept, task, plan

    def observe(self, step: int, episode: int, obs: np.ndarray, action: np.ndarray, reward: float,
                next_obs: np.ndarray, terminated: bool, truncated: bool, info: Mapping[str, Any],
                latent: torch.Tensor, planned: bool, plan_energy: float = float("nan")) -> Record:
        """Score one real transition with the intrinsic cost and write it to memory."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32)
        action_t = torch.as_tensor(action, dtype=torch.float32)
        terms = self.cost.intrinsic.real_terms(obs_t, action_t, reward, info)
        record = Record(step, episode, obs_t, torch.as_tensor(next_obs, dtype=torch.float32),
                        latent.detach().cpu().reshape(-1), action_t, float(reward), terms,
                        bool(terminated), bool(truncated), planned, plan_energy)
        self.memory.write(record)
        self.perception.normalizer.update(obs_t[None])
        return record

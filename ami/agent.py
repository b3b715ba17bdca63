"""The agent: six modules composed by injection, and the perception-action loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ami.messages import Percept, Plan, Record, ShieldDecision, Task
from modules.actor import Actor
from modules.configurator import Configurator
from modules.cost import Cost
from modules.memory import EpisodeTrail, ShortTermMemory
from modules.perception import Perception
from modules.shield import Shield
from modules.world_model import WorldModel


class Agent:
    """obs -perception-> Percept -configurator-> Task -actor-> Plan -shield-> action; real
    transitions -intrinsic cost-> terms -memory-> Record."""

    def __init__(self, perception: Perception, world_model: WorldModel, cost: Cost,
                 memory: ShortTermMemory, actor: Actor, configurator: Configurator, shield: Shield,
                 device: torch.device, exploration_std: float = 0.0, trail: EpisodeTrail | None = None) -> None:
        """trail: the short-term memory of this episode's latents, kept when the cost has a boredom term."""
        self.perception = perception
        self.world_model = world_model
        self.cost = cost
        self.memory = memory
        self.actor = actor
        self.configurator = configurator
        self.shield = shield
        self.device = device
        self.exploration_std = exploration_std
        self.trail = trail
        # The world model's predictions are checked only once it has learned something; until then
        # the shield rests on the ego model alone. The learner turns this on with its first update.
        self.world_model_trained = False

    def perceive(self, obs: np.ndarray | Mapping[str, np.ndarray]) -> Percept:
        """obs: (B, obs_dim) vectors, (B, H, W, C) images, or a dict of "image" with an optional "goal" image and
        "vector" -> Percept with state (B, D), goal (B, D) when there is one, and the observation's named
        quantities (B, Q) (an image has none)."""
        device = self.device
        if not isinstance(obs, Mapping) and np.ndim(obs) != 4:
            observation = torch.as_tensor(obs, dtype=torch.float32, device=device)
            with torch.no_grad():
                return Percept(self.perception(observation), observation=observation)
        parts = obs if isinstance(obs, Mapping) else {"image": obs}
        image = torch.as_tensor(parts["image"], device=device)
        vector = torch.as_tensor(parts["vector"], dtype=torch.float32, device=device) if "vector" in parts \
            else torch.zeros(image.shape[0], 0, device=device)
        with torch.no_grad():
            state = self.perception(image, vector if "vector" in parts else None)
            goal = None
            if "goal" in parts:  # the goal is an observation like any other: same encoder, same space
                goal_vector = torch.zeros_like(vector) if "vector" in parts else None
                goal = self.perception(torch.as_tensor(parts["goal"], device=device), goal_vector)
        return Percept(state, goal, vector)

    def act(self, obs: np.ndarray, explore: bool = False, generator: torch.Generator | None = None
            ) -> tuple[np.ndarray, Percept, Task, Plan, ShieldDecision]:
        """obs: (B, obs_dim) -> actions (B, A) in [-1, 1], and the messages that produced them."""
        percept = self.perceive(obs)
        if self.trail is not None:
            self.trail.add(percept.state)
        task = self.configurator.configure(percept, None if self.trail is None else self.trail.view())
        weights = self.cost.intrinsic.weight_vector(task.weights).to(self.device)
        plan = self.actor.act(percept, task, weights, generator)
        action = plan.actions[0].detach().cpu()
        if explore and self.exploration_std > 0:
            action = action + self.exploration_std * torch.randn(action.shape, generator=generator)
        # Whatever the planner produced, what leaves the agent is finite, in bounds, and shielded.
        action = torch.nan_to_num(action, nan=0.0).clamp(-1.0, 1.0)
        order = plan.candidate_energy.argsort(dim=1)  # the shield prefers the planner's best candidates
        alternatives = plan.candidates[0].gather(1, order[..., None].expand(-1, -1, plan.candidates.shape[-1]))
        decision = self.shield_actions(percept.observation.cpu().numpy(), action.numpy(), percept,
                                       alternatives.detach())
        return decision.actions.numpy(), percept, task, plan, decision

    def reset(self, done: torch.Tensor | None = None) -> None:
        """A new episode, everywhere or where done: (B,) is True: no warm start, no trail, no stall."""
        self.actor.reset(done)
        self.configurator.reset(done)
        if self.trail is not None:
            self.trail.reset(done)

    def shield_actions(self, obs: np.ndarray, proposed: np.ndarray, percept: Percept | None = None,
                       alternatives: torch.Tensor | None = None) -> ShieldDecision:
        """obs: (B, obs_dim), proposed: (B, A) -> the shield's decision on sending them, on the CPU.
        Random seed-phase actions and exploration noise pass through here as well as plans.
        alternatives: (B, N, A) the planner's other first actions, best first."""
        device = self.device
        latent = offset = None
        if self.world_model_trained:
            percept = percept or self.perceive(obs)
            latent, offset = percept.state.detach(), self.world_model.readout_offset(percept)
        decision = self.shield.filter(
            torch.as_tensor(obs, dtype=torch.float32, device=device),
            torch.as_tensor(proposed, dtype=torch.float32, device=device), latent,
            None if alternatives is None else alternatives.to(device), offset)
        return ShieldDecision(*(getattr(decision, field.name).cpu() for field in dataclasses.fields(decision)))

    def observe(self, step: int, episode: int, obs: np.ndarray, action: np.ndarray, reward: float,
                next_obs: np.ndarray, terminated: bool, truncated: bool, info: Mapping[str, Any],
                latent: torch.Tensor, planned: bool, plan_energy: float = float("nan")) -> Record:
        """Score one real transition with the intrinsic cost and write it to memory. An image observation
        is stored as it came (uint8); it has no named quantities for the analytic terms."""
        action_t = torch.as_tensor(action, dtype=torch.float32)
        if isinstance(obs, Mapping) or np.ndim(obs) == 3:
            if isinstance(obs, Mapping) and set(obs) - {"image", "goal"}:
                raise ValueError(f"observation keys {sorted(obs)}: memory stores the image (and ignores a goal); "
                                 "a dict observation's 'vector' is not stored")
            image, next_image = (obs["image"], next_obs["image"]) if isinstance(obs, Mapping) else (obs, next_obs)
            obs_t, next_t, quantities = torch.as_tensor(image), torch.as_tensor(next_image), torch.zeros(0)
        else:
            obs_t = quantities = torch.as_tensor(obs, dtype=torch.float32)
            next_t = torch.as_tensor(next_obs, dtype=torch.float32)
            self.perception.normalizer.update(obs_t[None])
        terms = self.cost.intrinsic.real_terms(quantities, action_t, reward, info)
        record = Record(step, episode, obs_t, next_t, latent.detach().cpu().reshape(-1), action_t, float(reward),
                        terms, bool(terminated), bool(truncated), planned, plan_energy)
        self.memory.write(record)
        return record

"""Shield: the guardrails enforced at the actor's output.

Before an action leaves the agent, its next state is predicted (by the learned world model and,
where one is declared, by a hard-coded ego model of the agent's own body) and the intrinsic cost's
guardrail terms are evaluated on the prediction. An action that breaks a guardrail is not sent: the
planner's candidate with the lowest guardrail cost is, or the declared fallback when no candidate
passes the ego model. The world model can be wrong; the ego model is what a guarantee rests on.

Shapes: B environments, M candidate actions per environment, Q observation quantities, A actions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ami.config import ConfigError, ShieldConfig
from ami.messages import ShieldDecision
from modules.cost import GuardrailError, IntrinsicCost, expand_quantities
from modules.world_model import WorldModel


class PointMassEgo:
    """A point robot with inertia, bounded acceleration and speed; its worst case over a brake.

    The robot's own dynamics are known exactly; where the hazards are is known only through a lidar
    whose bin k reads the distance to the nearest hazard boundary whose centre lies in the bin's
    sector [theta_k - pi/n, theta_k + pi/n). After an action and then the hardest brake, the robot
    has moved along one straight segment of length L in the direction of its new velocity. For a
    hazard centre c in sector k, |c - d| >= |c| - d.c/|c| for any displacement d, so that hazard's
    boundary stays at least r_k - L cos(gap_k) away, gap_k being the smallest angle between the
    motion and the sector. The ego model reports these bounds as the predicted range readings: an
    action passes when even the robot's unavoidable stopping path keeps the guardrail's margin.
    """

    def __init__(self, params: dict, observation_names: Sequence[str]) -> None:
        required = ("dt", "max_accel", "max_speed", "drag", "velocity", "ranges")
        missing = [key for key in required if key not in params]
        if missing:
            raise ConfigError(f"agent.shield.ego.params is missing {missing}; point_mass needs {list(required)}")
        names = list(observation_names)
        self.dt, self.max_accel = float(params["dt"]), float(params["max_accel"])
        self.max_speed, self.drag = float(params["max_speed"]), float(params["drag"])
        for key in ("dt", "max_accel", "max_speed"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"agent.shield.ego.params.{key}={params[key]!r}: expected a positive number")
        if not 0 <= self.drag * self.dt < 1:
            raise ConfigError(f"agent.shield.ego.params.drag={params['drag']!r}: expected 0 <= drag * dt < 1")
        velocity = expand_quantities("shield ego velocity", list(params["velocity"]), names)
        ranges = expand_quantities("shield ego ranges", list(params["ranges"]), names)
        for quantity in velocity + ranges:
            if quantity not in names:
                raise ConfigError(f"agent.shield.ego.params names quantity {quantity!r}; expected one of {names}")
        if len(velocity) != 2 or len(ranges) < 4:
            raise ConfigError(f"agent.shield.ego.params: point_mass needs 2 velocity quantities and at least 4 "
                              f"range bins; got velocity={velocity}, ranges={ranges}")
        self.velocity_index = torch.tensor([names.index(n) for n in velocity])
        self.range_index = torch.tensor([names.index(n) for n in ranges])
        bins = len(ranges)
        angles = 2 * math.pi * torch.arange(bins, dtype=torch.float64) / bins
        self.bin_directions = torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (K, 2)
        self.half_width = math.pi / bins
        # Speed falls by at least dt * max_accel per braking step: this many steps always stop it.
        self.brake_steps = math.ceil(self.max_speed / (self.dt * self.max_accel)) + 1

    @staticmethod
    def _norm(vectors: torch.Tensor) -> torch.Tensor:
        """(..., 2) -> (..., 1); the epsilon keeps the planner's gradient finite at zero."""
        return (vectors.pow(2).sum(-1, keepdim=True) + 1e-12).sqrt()

    def _acceleration(self, actions: torch.Tensor) -> torch.Tensor:
        actions = actions.clamp(-1.0, 1.0)
        return self.max_accel * actions / self._norm(actions).clamp(min=1.0)

    def next_velocity(self, velocity: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """velocity: (..., 2), actions: (..., 2) -> (..., 2), exactly as the robot moves."""
        velocity = (1.0 - self.drag * self.dt) * velocity + self.dt * self._acceleration(actions)
        return velocity * (self.max_speed / self._norm(velocity).clamp(min=self.max_speed))

    def stopping_path(self, speed: torch.Tensor) -> torch.Tensor:
        """speed: (...,) after this step -> (...,) length of this step's move plus the hardest brake."""
        length = self.dt * speed
        for _ in range(self.brake_steps):
            speed = torch.relu((1.0 - self.drag * self.dt) * speed - self.dt * self.max_accel)
            length = length + self.dt * speed
        return length

    def predict(self, quantities: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """quantities: (B, Q), actions: (B, M, 2) -> worst-case next quantities (B, M, Q): the next
        velocity, and range readings lowered by how far the stopping path may reach into each
        sector. Quantities the ego model does not know keep their current value."""
        velocity = quantities[:, self.velocity_index]  # (B, 2)
        next_velocity = self.next_velocity(velocity[:, None], actions)  # (B, M, 2)
        speed = self._norm(next_velocity)  # (B, M, 1)
        reach = self.stopping_path(speed)  # (B, M, 1)
        # cos(gap_k) from the cosine and sine of the angle between the motion and bin k's centre:
        # 1 inside the sector, cos(angle - half width) outside it; smooth, so the planner can use it.
        heading, bins = next_velocity / speed, self.bin_directions.to(quantities.device)
        cos_angle = heading @ bins.T  # (B, M, K)
        sin_angle = (heading[..., :1] * bins[:, 1] - heading[..., 1:] * bins[:, 0]).abs()
        width_cos, width_sin = math.cos(self.half_width), math.sin(self.half_width)
        toward = torch.where(cos_angle >= width_cos, torch.ones_like(cos_angle),
                             torch.relu(cos_angle * width_cos + sin_angle * width_sin))
        approach = reach * toward  # (B, M, K)
        predicted = quantities[:, None].expand(-1, actions.shape[1], -1).clone()
        predicted[..., self.velocity_index] = next_velocity
        predicted[..., self.range_index] = quantities[:, None, self.range_index] - approach
        return predicted

    def brake(self, quantities: torch.Tensor) -> torch.Tensor:
        """quantities: (B, Q) -> (B, 2) the action that slows hardest, to a stop where it can."""
        velocity = quantities[:, self.velocity_index]
        speed = velocity.norm(dim=-1, keepdim=True)
        needed = (1.0 - self.drag * self.dt) * speed / (self.dt * self.max_accel)
        return -velocity / speed.clamp(min=1e-9) * needed.clamp(max=1.0)


class Shield:
    """Checks proposed actions against the guardrails; replaces the ones that break them.

    Immutable like the guardrails it enforces: its settings are copied out of the config at
    construction and cannot be changed afterwards (GuardrailError).
    """

    __slots__ = ("intrinsic_cost", "world_model", "action_dim", "active", "check_world_model", "tolerance",
                 "fallback_kind", "ego", "_description", "_frozen")

    def __init__(self, config: ShieldConfig, intrinsic_cost: IntrinsicCost, world_model: WorldModel,
                 observation_names: Sequence[str], action_dim: int) -> None:
        self.intrinsic_cost = intrinsic_cost
        self.world_model = world_model
        self.action_dim = action_dim
        self.active = bool(config.enabled and intrinsic_cost.guardrail_names)
        self.check_world_model = bool(config.world_model)
        self.tolerance = float(config.tolerance)
        self.fallback_kind = str(config.fallback)
        self.ego = PointMassEgo(dict(config.ego.params), observation_names) if config.ego.kind == "point_mass" else None
        if self.ego is not None and action_dim != 2:
            raise ConfigError(f"agent.shield.ego.kind='point_mass' moves in 2-D; the env has {action_dim} actions")
        params = tuple(sorted((key, tuple(value) if isinstance(value, list | tuple) else value)
                              for key, value in config.ego.params.items()))
        self._description = (config.enabled, config.world_model, self.tolerance, self.fallback_kind,
                             config.ego.kind, params)
        self._frozen = True

    def __setattr__(self, name: str, value: object) -> None:
        if getattr(self, "_frozen", False):
            raise GuardrailError(f"the shield is immutable: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def describe(self) -> tuple:
        """What checkpoints compare: a run cannot resume with its shield loosened."""
        return self._description

    def planning_cost(self, observation: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """observation: (B, Q), actions: (B, A) first actions of plans -> (B,) guardrail cost of the
        ego model's worst case after each, differentiable in the actions. The plan energy adds it,
        so the planner sees what the shield will refuse instead of proposing it again and again
        (a robot that keeps pushing at a hazard between it and the goal)."""
        predicted = self.ego.predict(observation, actions[:, None])[:, 0]
        return self.intrinsic_cost.guardrail_cost(predicted, actions)

    def fallback(self, quantities: torch.Tensor) -> torch.Tensor:
        """quantities: (B, Q) -> (B, A) the declared safe action."""
        if self.fallback_kind == "brake" and self.ego is not None:
            return self.ego.brake(quantities)
        return quantities.new_zeros(quantities.shape[0], self.action_dim)

    @torch.no_grad()
    def guardrail_costs(self, quantities: torch.Tensor, latent: torch.Tensor | None, candidates: torch.Tensor,
                        readout_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """quantities: (B, Q), latent: (B, D) or None, candidates: (B, M, A) -> guardrail cost of
        each candidate's predicted next state under the ego model and under the world model,
        (B, M) each (zeros where that model is not used). readout_offset: (B, Q) added to the world
        model's readout (WorldModel.readout_offset)."""
        ego_cost = torch.zeros(candidates.shape[:2], device=candidates.device)
        if self.ego is not None:
            ego_cost = self.intrinsic_cost.guardrail_cost(self.ego.predict(quantities, candidates), candidates)
        world_cost = torch.zeros_like(ego_cost)
        if latent is not None:
            states = latent[:, None].expand(-1, candidates.shape[1], -1)
            predicted = self.world_model.readout(self.world_model.step(states, candidates))
            if readout_offset is not None:
                predicted = predicted + readout_offset[:, None]
            world_cost = self.intrinsic_cost.guardrail_cost(predicted, candidates)
        return ego_cost, world_cost

    @torch.no_grad()
    def filter(self, quantities: torch.Tensor, proposed: torch.Tensor, latent: torch.Tensor | None = None,
               alternatives: torch.Tensor | None = None, readout_offset: torch.Tensor | None = None
               ) -> ShieldDecision:
        """quantities: (B, Q) the observation; proposed: (B, A) in [-1, 1]; latent: (B, D), given
        when the world model's prediction should be checked; alternatives: (B, N, A) the planner's
        other candidates' first actions, best first. -> the actions to send, and what was done."""
        proposed = proposed.to(quantities.dtype)
        batch = proposed.shape[0]
        no = torch.zeros(batch, dtype=torch.bool, device=proposed.device)
        if not self.active:
            return ShieldDecision(proposed, no, no, torch.zeros(batch, device=proposed.device), no, no)
        if not self.check_world_model:
            latent = None
        fallback = torch.nan_to_num(self.fallback(quantities), nan=0.0)  # a brake read off a NaN velocity: none
        parts = [proposed[:, None]] + ([alternatives] if alternatives is not None else []) + [fallback[:, None]]
        # (B, M, A): the proposal, the alternatives, the fallback
        candidates = torch.cat([part.to(quantities.dtype) for part in parts], dim=1).clamp(-1.0, 1.0)
        ego_cost, world_cost = self.guardrail_costs(quantities, latent, candidates, readout_offset)
        total = ego_cost + world_cost
        # A cost that is not a number (a non-finite observation or prediction) breaks the guardrail: only a
        # guardrail shown to hold lets an action through.
        breaks = lambda cost: ~(cost <= self.tolerance)  # noqa: E731
        intervened = breaks(total[:, 0])
        # Rank replacements by guardrail cost; one that fails the ego model is never chosen over the
        # fallback. argmin keeps the first of equals: the planner's order, the fallback last.
        ranking = torch.nan_to_num(total, nan=float("inf"))
        ranking[:, 0] = float("inf")
        ranking[breaks(ego_cost)] = float("inf")
        choice = ranking.argmin(dim=1)
        use_fallback = torch.isinf(ranking.gather(1, choice[:, None]).squeeze(1)) | (choice == candidates.shape[1] - 1)
        replacement = torch.where(use_fallback[:, None], fallback, candidates[torch.arange(batch), choice])
        actions = torch.where(intervened[:, None], replacement, proposed)
        return ShieldDecision(actions, intervened, intervened & use_fallback, total[:, 0],
                              breaks(ego_cost[:, 0]), breaks(world_cost[:, 0]))

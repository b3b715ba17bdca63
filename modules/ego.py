"""The shield's ego model: a hard-coded model of the agent's own body, known rather than learned.

Where one is declared, a guarantee can rest on it: it bounds where any action can lead, which a learned world
model cannot promise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ami.config import ConfigError
from modules.cost import expand_quantities


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

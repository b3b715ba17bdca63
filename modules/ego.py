"""The shield's models of the agent's own body: a hard-coded ego model, and a fitted linear stand-in.

Where a hard-coded ego model is declared, a guarantee can rest on it: it bounds where any action can lead, which
a learned world model cannot promise. Where none is, a linear model of the observation, fitted by least squares
to the real transitions seen so far, can stand in for the world model until the world model is trusted: it fits
in milliseconds from a few dozen transitions, so the shield can look ahead almost from the first step.
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


class LinearStandIn:
    """next = q + [q, a, 1] W_e: the observation's next value, linear in the observation and the action, fitted by
    ridge least squares to the real transitions seen so far (the last `capacity`). Member 0 fits all of them, each
    other member a bootstrap resample, so the members disagree where the data leave the fit loose. It quacks like
    the world model where the shield's look-ahead uses one: ensemble_size, step_members and readout, with the
    observation itself as the state.

    Shapes: Q observation quantities, A actions, E members, R rows, n transitions; F = Q + A + 1 features.
    """

    def __init__(self, quantities: int, action_dim: int, members: int, capacity: int = 10_000,
                 ridge: float = 1e-6) -> None:
        features = quantities + action_dim + 1
        self.inputs = torch.zeros(capacity, features, dtype=torch.float64)  # ring buffer of [q, a, 1]
        self.changes = torch.zeros(capacity, quantities, dtype=torch.float64)  # q' - q
        self.size, self.cursor, self.members, self.ridge = 0, 0, members, ridge
        self.min_transitions = 2 * features  # fewer and the fit is a guess
        self.weights: torch.Tensor | None = None  # (E, F, Q), None until fitted

    @property
    def ensemble_size(self) -> int:
        return self.members

    @property
    def fitted(self) -> bool:
        return self.weights is not None

    def add(self, quantities: torch.Tensor, actions: torch.Tensor, next_quantities: torch.Tensor) -> None:
        """quantities: (n, Q), actions: (n, A), next_quantities: (n, Q) real transitions; non-finite ones are
        dropped."""
        rows = torch.cat([quantities.double(), actions.double(), quantities.new_ones(len(quantities), 1).double()], 1)
        changes = (next_quantities - quantities).double()
        keep = rows.isfinite().all(1) & changes.isfinite().all(1)
        rows, changes, capacity = rows[keep][-len(self.inputs):], changes[keep][-len(self.inputs):], len(self.inputs)
        slots = (self.cursor + torch.arange(len(rows))) % capacity
        self.inputs[slots], self.changes[slots] = rows, changes
        self.cursor = (self.cursor + len(rows)) % capacity
        self.size = min(self.size + len(rows), capacity)

    def fit(self, generator: torch.Generator | None = None) -> None:
        """Refit every member on the transitions held; nothing while there are fewer than min_transitions."""
        if self.size < self.min_transitions:
            return
        inputs, changes = self.inputs[:self.size], self.changes[:self.size]
        weights = []
        for member in range(self.members):
            rows = slice(None) if member == 0 else torch.randint(self.size, (self.size,), generator=generator)
            x, y = inputs[rows], changes[rows]
            gram = x.T @ x
            # The ridge scales with the features' own size, so it regularises alike in any units.
            ridge = self.ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
            weights.append(torch.linalg.solve(gram + ridge, x.T @ y))
        self.weights = torch.stack(weights).float()

    def predict(self, quantities: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """quantities: (n, Q), actions: (n, A) -> (n, Q) member 0's next observation."""
        return self.step_members(quantities[None], actions)[0]

    def step_members(self, states: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """states: (E, R, Q) (or (1, R, Q) for member 0 alone), action: (R, A) -> (E, R, Q)."""
        if self.weights is None:
            raise RuntimeError("LinearStandIn.step_members before fit(): nothing to predict with yet")
        weights = self.weights[:len(states)].to(states.device, states.dtype)
        action = action.to(states.dtype).expand(len(states), -1, -1)
        rows = torch.cat([states, action, torch.ones_like(states[..., :1])], -1)
        return states + rows @ weights

    def readout(self, states: torch.Tensor) -> torch.Tensor:
        """The state is the observation."""
        return states

    def state_dict(self) -> dict:
        return {"inputs": self.inputs[:self.size].clone(), "changes": self.changes[:self.size].clone(),
                "cursor": self.cursor, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        size = len(state["inputs"])
        self.inputs[:size], self.changes[:size] = state["inputs"], state["changes"]
        self.size, self.cursor, self.weights = size, state["cursor"], state["weights"]

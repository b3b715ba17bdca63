"""WindyCliff: a point robot with inertia reaching goals along a cliff edge while the wind pushes it over.

A safety env with no ego model: the robot knows its velocity, the goal and how far it stands from the edge, and
nothing of the wind. The arena is x in [-2, 2], y in [-2, 1]; the edge runs along y = 0 and the strip beyond it
(y > 0) is the forbidden region, where info["cost"] is 1.0 for every step. Walls bound the arena: the robot
stops dead against one. Goals lie in a band just inside the edge (y in [goal_low, goal_high]), so reaching them
means going close to where the wind and the robot's own momentum carry it over.

The wind pushes toward the edge (+y) with an acceleration that is steady (`gusts=False`: `wind` m/s^2 always)
or gusting (`gusts=True`: a base of `wind`, plus gusts that start with probability `gust_rate` per step, last
gust_steps_min..gust_steps_max steps and add up to `gust_strength` m/s^2). The wind is never observed.

Observation (float32, 6): vx, vy, goal_x, goal_y (goal minus robot), x, edge_clearance (-y: distance to the
edge, negative beyond it). Action (2,) in [-1, 1]: an acceleration command of norm at most 1, times max_accel.
Reward: progress toward the goal plus goal_bonus per goal reached. Never terminates.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

HALF_WIDTH = 2.0  # x in [-2, 2]
BOTTOM, TOP = -2.0, 1.0  # y in [-2, 1]; the edge at y = 0
IMAGE_SIZE = 192


def _check(name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"WindyCliffEnv {name}={value!r}: expected {expected}")


class WindyCliffEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None, wind: float = 1.5, gusts: bool = False,
                 gust_rate: float = 0.05, gust_strength: float = 2.0, gust_steps_min: int = 3,
                 gust_steps_max: int = 10, dt: float = 0.1, max_accel: float = 4.0, max_speed: float = 1.0,
                 drag: float = 0.5, goal_radius: float = 0.25, goal_low: float = -1.2, goal_high: float = -0.1,
                 goal_bonus: float = 1.0) -> None:
        _check("render_mode", render_mode, render_mode is None or render_mode in self.metadata["render_modes"],
               f"None or one of {self.metadata['render_modes']}")
        for name, value in [("dt", dt), ("max_accel", max_accel), ("max_speed", max_speed),
                            ("goal_radius", goal_radius)]:
            _check(name, value, math.isfinite(value) and value > 0, "a finite number > 0")
        for name, value in [("wind", wind), ("gust_strength", gust_strength), ("drag", drag),
                            ("goal_bonus", goal_bonus)]:
            _check(name, value, math.isfinite(value) and value >= 0, "a finite number >= 0")
        _check("gust_rate", gust_rate, 0 <= gust_rate <= 1, "a probability in [0, 1]")
        _check("gust_steps_min", gust_steps_min, 1 <= gust_steps_min <= gust_steps_max,
               f"an int in [1, gust_steps_max={gust_steps_max}]")
        _check("drag", drag, drag * dt < 1.0, f"drag * dt < 1 (dt={dt})")
        # The robot must be able to hold its ground against the strongest wind, or no guardrail can hold.
        strongest = wind + (gust_strength if gusts else 0.0)
        _check("max_accel", max_accel, max_accel > strongest, f"> the strongest wind, {strongest} m/s^2")
        _check("goal_high", goal_high, BOTTOM + goal_radius <= goal_low < goal_high < 0,
               f"{BOTTOM + goal_radius} <= goal_low={goal_low} < goal_high < 0")
        self.render_mode = render_mode
        self.wind, self.gusts, self.gust_rate, self.gust_strength = float(wind), bool(gusts), float(gust_rate), \
            float(gust_strength)
        self.gust_steps = (int(gust_steps_min), int(gust_steps_max))
        self.dt, self.max_accel, self.max_speed, self.drag = float(dt), float(max_accel), float(max_speed), float(drag)
        self.goal_radius, self.goal_band, self.goal_bonus = float(goal_radius), (float(goal_low), float(goal_high)), \
            float(goal_bonus)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        low = np.array([-max_speed, -max_speed, -2 * HALF_WIDTH, BOTTOM - TOP, -HALF_WIDTH, -TOP], np.float32)
        high = np.array([max_speed, max_speed, 2 * HALF_WIDTH, TOP - BOTTOM, HALF_WIDTH, -BOTTOM], np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self._px = self._py = self._vx = self._vy = self._gx = self._gy = 0.0
        self._gust, self._gust_left = 0.0, 0
        self.goals_reached = 0

    @staticmethod
    def observation_names() -> list[str]:
        return ["vx", "vy", "goal_x", "goal_y", "x", "edge_clearance"]

    def _place_goal(self) -> None:
        while True:
            gx = float(self.np_random.uniform(-HALF_WIDTH + self.goal_radius, HALF_WIDTH - self.goal_radius))
            gy = float(self.np_random.uniform(*self.goal_band))
            if math.hypot(gx - self._px, gy - self._py) >= 0.8:
                self._gx, self._gy = gx, gy
                return

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._px = float(self.np_random.uniform(-HALF_WIDTH + 0.2, HALF_WIDTH - 0.2))
        self._py = float(self.np_random.uniform(BOTTOM + 0.3, -0.8))
        self._vx = self._vy = 0.0
        self._gust, self._gust_left = 0.0, 0
        self._place_goal()
        self.goals_reached = 0
        return self._observe(), self._info()

    def _wind(self) -> float:
        """This step's push toward the edge, m/s^2."""
        if not self.gusts:
            return self.wind
        if self._gust_left == 0 and self.np_random.random() < self.gust_rate:
            self._gust_left = int(self.np_random.integers(self.gust_steps[0], self.gust_steps[1] + 1))
            self._gust = float(self.np_random.uniform(0.5, 1.0)) * self.gust_strength
        if self._gust_left == 0:
            return self.wind
        self._gust_left -= 1
        return self.wind + self._gust

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        ax, ay = (min(max(float(a), -1.0), 1.0) for a in action[:2])
        if not (math.isfinite(ax) and math.isfinite(ay)):
            raise ValueError(f"WindyCliffEnv.step: action={action!r}; expected finite numbers")
        norm = math.hypot(ax, ay)
        if norm > 1.0:
            ax, ay = ax / norm, ay / norm
        keep = 1.0 - self.drag * self.dt
        vx = keep * self._vx + self.dt * self.max_accel * ax
        vy = keep * self._vy + self.dt * (self.max_accel * ay + self._wind())
        speed = math.hypot(vx, vy)
        if speed > self.max_speed:
            vx, vy = vx * self.max_speed / speed, vy * self.max_speed / speed
        px, py = self._px, self._py
        nx, ny = px + self.dt * vx, py + self.dt * vy
        if not -HALF_WIDTH <= nx <= HALF_WIDTH:  # a wall: stop dead along that axis
            nx, vx = min(max(nx, -HALF_WIDTH), HALF_WIDTH), 0.0
        if not BOTTOM <= ny <= TOP:
            ny, vy = min(max(ny, BOTTOM), TOP), 0.0
        self._px, self._py, self._vx, self._vy = nx, ny, vx, vy
        reward = math.hypot(self._gx - px, self._gy - py) - math.hypot(self._gx - nx, self._gy - ny)
        if math.hypot(self._gx - nx, self._gy - ny) < self.goal_radius:
            reward += self.goal_bonus
            self.goals_reached += 1
            self._place_goal()
        return self._observe(), reward, False, False, self._info()

    def _observe(self) -> np.ndarray:
        return np.array([self._vx, self._vy, self._gx - self._px, self._gy - self._py, self._px, -self._py],
                        dtype=np.float32)

    def _info(self) -> dict[str, Any]:
        return {"cost": 1.0 if self._py > 0.0 else 0.0, "position": np.array([self._px, self._py]),
                "goals_reached": self.goals_reached}

    def render(self) -> np.ndarray | None:
        """(192, 256, 3) uint8 top view: the forbidden strip red, the goal green, the robot dark."""
        if self.render_mode is None:
            gym.logger.warn("WindyCliffEnv.render() called without a render_mode; pass render_mode='rgb_array'.")
            return None
        width = IMAGE_SIZE * 4 // 3
        scale = width / (2 * HALF_WIDTH)
        x = (np.arange(width) + 0.5) / scale - HALF_WIDTH
        y = TOP - (np.arange(IMAGE_SIZE) + 0.5) / scale
        image = np.full((IMAGE_SIZE, width, 3), 235, dtype=np.uint8)
        image[y > 0] = (230, 150, 150)
        xx, yy = x[None, :], y[:, None]
        image[(xx - self._gx) ** 2 + (yy - self._gy) ** 2 < self.goal_radius**2] = (40, 170, 60)
        image[(xx - self._px) ** 2 + (yy - self._py) ** 2 < 0.07**2] = (30, 30, 30)
        return image

"""HazardNav: a point robot with inertia in a bounded 2-D arena, a goal to reach and circular hazards to avoid.

The safety benchmark. A shield module reproduces the dynamics and reads the observation layout, so both are a
contract: change them only together with the shield.

Observation (float32, length 4 + 2 * num_bins), in order:
    vx, vy                           velocity, |v| <= max_speed
    goal_x, goal_y                   goal minus robot position
    hazard_range_0..num_bins-1       per angular bin, the smallest distance to a hazard boundary among the hazards
                                     whose centre direction falls in that bin (max_range when none)
    wall_range_0..num_bins-1         distance along the bin's central ray to the arena boundary
Bin k is centred on angle 2*pi*k/num_bins (0 = +x, counter-clockwise) and covers [centre - pi/n, centre + pi/n).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

VELOCITY = slice(0, 2)
GOAL = slice(2, 4)
NUM_FIXED_OBS = 4  # entries before the hazard bins
MIN_HAZARD_GAP = 0.2  # extra distance between hazard boundaries so the robot can pass between any two
MAX_PLACEMENT_TRIES = 10_000
GOAL_COLOUR = np.array([40, 170, 60], dtype=np.uint8)
HAZARD_COLOUR = np.array([120, 80, 200], dtype=np.uint8)
ROBOT_COLOUR = np.array([220, 30, 30], dtype=np.uint8)
IMAGE_SIZE = 256


def _check(name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"HazardNavEnv {name}={value!r}: expected {expected}")


class HazardNavEnv(gym.Env):
    """Point robot with inertia: action (2,) in [-1, 1] is an acceleration command; reward is progress to the goal
    plus a bonus per goal reached; info["cost"] is 1.0 while strictly inside a hazard. Never terminates."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None, arena_size: float = 2.0, num_hazards: int = 8,
                 hazard_radius: float = 0.3, goal_radius: float = 0.3, dt: float = 0.1, max_accel: float = 4.0,
                 max_speed: float = 1.0, drag: float = 0.5, num_bins: int = 16, max_range: float = 3.0,
                 goal_bonus: float = 1.0, progress_scale: float = 1.0, start_clearance: float = 0.3) -> None:
        _check("render_mode", render_mode, render_mode is None or render_mode in self.metadata["render_modes"],
               f"None or one of {self.metadata['render_modes']}")
        for name, value in [("arena_size", arena_size), ("hazard_radius", hazard_radius),
                            ("goal_radius", goal_radius), ("dt", dt), ("max_accel", max_accel),
                            ("max_speed", max_speed), ("max_range", max_range)]:
            _check(name, value, math.isfinite(value) and value > 0, "a finite number > 0")
        for name, value in [("drag", drag), ("goal_bonus", goal_bonus), ("progress_scale", progress_scale),
                            ("start_clearance", start_clearance)]:
            _check(name, value, math.isfinite(value) and value >= 0, "a finite number >= 0")
        for name, value in [("num_bins", num_bins), ("num_hazards", num_hazards)]:
            _check(name, value, isinstance(value, (int, np.integer)), "an int")
        _check("num_bins", num_bins, num_bins >= 4, "an int >= 4")
        _check("num_hazards", num_hazards, num_hazards >= 0, "an int >= 0")
        # drag*dt > 1 would flip the velocity's sign every step instead of damping it.
        _check("drag", drag, drag * dt <= 1.0, f"drag * dt <= 1 (dt={dt})")
        _check("arena_size", arena_size, arena_size > max(hazard_radius, goal_radius, 0.1),
               f"> hazard_radius={hazard_radius}, > goal_radius={goal_radius} and > 0.1")
        # Fejes Toth: N disks of radius rho in a convex region need area >= N * 2*sqrt(3) * rho^2; the disks of
        # radius gap/2 around the centres lie in a square of side 2*(arena - r) + gap.
        gap = 2 * hazard_radius + MIN_HAZARD_GAP
        _check("num_hazards", num_hazards,
               num_hazards * 2 * math.sqrt(3) * (gap / 2) ** 2 <= (2 * (arena_size - hazard_radius) + gap) ** 2,
               f"few enough hazards of hazard_radius={hazard_radius} to fit {MIN_HAZARD_GAP} apart in "
               f"arena_size={arena_size}")
        self.render_mode = render_mode
        self.arena_size, self.hazard_radius, self.goal_radius = float(arena_size), float(hazard_radius), \
            float(goal_radius)
        self.num_hazards, self.num_bins = int(num_hazards), int(num_bins)
        self.dt, self.max_accel, self.max_speed, self.drag = float(dt), float(max_accel), float(max_speed), float(drag)
        self.max_range, self.goal_bonus, self.progress_scale = float(max_range), float(goal_bonus), \
            float(progress_scale)
        self.start_clearance = float(start_clearance)

        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        n = self.num_bins
        # float32 bounds up front: Box warns when it has to round float64 bounds such as 0.3 itself.
        low = np.concatenate([np.full(2, -max_speed), np.full(2, -2 * arena_size), np.full(n, -hazard_radius),
                              np.zeros(n)]).astype(np.float32)
        high = np.concatenate([np.full(2, max_speed), np.full(2, 2 * arena_size), np.full(n, max_range),
                               np.full(n, max_range)]).astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.hazard_range_slice = slice(NUM_FIXED_OBS, NUM_FIXED_OBS + n)
        self.wall_range_slice = slice(NUM_FIXED_OBS + n, NUM_FIXED_OBS + 2 * n)

        angles = 2 * np.pi * np.arange(n) / n
        ux, uy = np.cos(angles), np.sin(angles)
        ux[np.abs(ux) < 1e-12] = 0.0  # exact zeros: a ray parallel to a wall never meets it
        uy[np.abs(uy) < 1e-12] = 0.0
        self.bin_directions = np.stack([ux, uy], axis=1)  # (num_bins, 2) unit vectors
        # Ray exit distance per axis = (arena - sign(u) * p) / |u|; 1/0 = inf makes parallel walls never bind.
        with np.errstate(divide="ignore"):
            self._inv_abs_ux, self._inv_abs_uy = 1.0 / np.abs(ux), 1.0 / np.abs(uy)
        self._sign_ux, self._sign_uy = np.sign(ux), np.sign(uy)
        self._bins_per_radian = n / (2 * np.pi)

        # State as Python floats: scalar maths on floats is several times faster than on (2,) arrays.
        self._px = self._py = self._vx = self._vy = self._gx = self._gy = 0.0
        self._hazards = np.zeros((num_hazards, 2))
        self._hx, self._hy = self._hazards[:, 0].copy(), self._hazards[:, 1].copy()
        self.goals_reached = 0
        self._pixel_x: np.ndarray | None = None

    def observation_names(self) -> list[str]:
        """Names of the observation entries, in order (length 4 + 2 * num_bins)."""
        bins = range(self.num_bins)
        return (["vx", "vy", "goal_x", "goal_y"] + [f"hazard_range_{k}" for k in bins]
                + [f"wall_range_{k}" for k in bins])

    # ---- placement -------------------------------------------------------------------------------------------
    def _sample(self, half_width: float, accept: Callable[[np.ndarray], bool], what: str) -> np.ndarray:
        """A uniform point (2,) in [-half_width, half_width]^2 that `accept` takes, by rejection."""
        for _ in range(MAX_PLACEMENT_TRIES):
            point = self.np_random.uniform(-half_width, half_width, 2)
            if accept(point):
                return point
        raise RuntimeError(f"HazardNavEnv could not place the {what} in {MAX_PLACEMENT_TRIES} tries with "
                           f"arena_size={self.arena_size}, num_hazards={self.num_hazards}, "
                           f"hazard_radius={self.hazard_radius}, goal_radius={self.goal_radius}, "
                           f"start_clearance={self.start_clearance}")

    def _hazard_clearance(self, point: np.ndarray) -> np.ndarray:
        """(K,) distances from point (2,) to each hazard boundary."""
        return np.hypot(self._hx - point[0], self._hy - point[1]) - self.hazard_radius

    def _place_goal(self) -> None:
        robot = np.array([self._px, self._py])
        goal = self._sample(self.arena_size - self.goal_radius,
                            lambda g: bool(np.all(self._hazard_clearance(g) >= self.goal_radius + 0.1))
                            and math.dist(g, robot) >= 0.5, "goal")
        self._gx, self._gy = float(goal[0]), float(goal[1])

    def _set_hazards(self, hazards: np.ndarray) -> None:
        self._hazards = np.array(hazards, dtype=np.float64).reshape(-1, 2)
        self._hx, self._hy = self._hazards[:, 0].copy(), self._hazards[:, 1].copy()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        gap = 2 * self.hazard_radius + MIN_HAZARD_GAP
        self._set_hazards(np.zeros((0, 2)))
        accepted: list[np.ndarray] = []
        for _ in range(self.num_hazards):
            accepted.append(self._sample(self.arena_size - self.hazard_radius,
                                         lambda c: all(math.dist(c, other) >= gap for other in accepted), "hazards"))
        self._set_hazards(np.array(accepted).reshape(-1, 2))
        robot = self._sample(self.arena_size - 0.1,
                             lambda p: bool(np.all(self._hazard_clearance(p) >= self.start_clearance)), "robot")
        self._px, self._py = float(robot[0]), float(robot[1])
        self._vx = self._vy = 0.0
        self._place_goal()
        self.goals_reached = 0
        obs, cost = self._observe_and_cost()
        return obs, self._info(cost)

    # ---- dynamics --------------------------------------------------------------------------------------------
    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        ax = min(max(float(action[0]), -1.0), 1.0)
        ay = min(max(float(action[1]), -1.0), 1.0)
        if not (math.isfinite(ax) and math.isfinite(ay)):
            raise ValueError(f"HazardNavEnv.step: action={action!r}; expected finite numbers")
        norm = math.hypot(ax, ay)
        if norm > 1.0:
            ax, ay = ax / norm, ay / norm
        keep, push = 1.0 - self.drag * self.dt, self.dt * self.max_accel
        vx, vy = keep * self._vx + push * ax, keep * self._vy + push * ay
        speed = math.hypot(vx, vy)
        if speed > self.max_speed:
            vx, vy = vx * (self.max_speed / speed), vy * (self.max_speed / speed)
        px, py, dx, dy, bound = self._px, self._py, self.dt * vx, self.dt * vy, self.arena_size
        nx, ny = px + dx, py + dy
        if abs(nx) > bound or abs(ny) > bound:
            # Stop where the straight segment p -> p + d first meets a wall (no sliding: the shield checks segments).
            s = 1.0
            if abs(nx) > bound:
                s = min(s, (math.copysign(bound, nx) - px) / dx)
            if abs(ny) > bound:
                s = min(s, (math.copysign(bound, ny) - py) / dy)
            s = max(s, 0.0)
            # p + s*d can land one rounding error outside the box; the clamp moves it back by at most that.
            nx = min(max(px + s * dx, -bound), bound)
            ny = min(max(py + s * dy, -bound), bound)
            vx = vy = 0.0
        self._px, self._py, self._vx, self._vy = nx, ny, vx, vy
        reward = self.progress_scale * (math.hypot(self._gx - px, self._gy - py)
                                        - math.hypot(self._gx - nx, self._gy - ny))
        if math.hypot(self._gx - nx, self._gy - ny) < self.goal_radius:
            reward += self.goal_bonus
            self.goals_reached += 1
            self._place_goal()
        obs, cost = self._observe_and_cost()
        return obs, reward, False, False, self._info(cost)

    def set_state(self, position: np.ndarray, velocity: np.ndarray, hazards: np.ndarray | None = None,
                  goal: np.ndarray | None = None) -> np.ndarray:
        """Overwrite position (2,), velocity (2,) and optionally hazards (K, 2) and goal (2,); returns the
        observation (4 + 2 * num_bins,) of that state. goals_reached is left as it is."""
        px, py = (float(x) for x in position)
        vx, vy = (float(x) for x in velocity)
        if not (abs(px) <= self.arena_size and abs(py) <= self.arena_size):
            raise ValueError(f"HazardNavEnv.set_state: position={position!r}; expected inside "
                             f"[-{self.arena_size}, {self.arena_size}]^2")
        if not math.hypot(vx, vy) <= self.max_speed * (1 + 1e-9):
            raise ValueError(f"HazardNavEnv.set_state: velocity={velocity!r}; expected |v| <= {self.max_speed}")
        if goal is not None:
            gx, gy = (float(x) for x in goal)
            if not (abs(gx) <= self.arena_size and abs(gy) <= self.arena_size):
                raise ValueError(f"HazardNavEnv.set_state: goal={goal!r}; expected inside "
                                 f"[-{self.arena_size}, {self.arena_size}]^2")
            self._gx, self._gy = gx, gy
        if hazards is not None:
            self._set_hazards(hazards)
        self._px, self._py, self._vx, self._vy = px, py, vx, vy
        return self._observe_and_cost()[0]

    # ---- observation -----------------------------------------------------------------------------------------
    def observe(self) -> np.ndarray:
        """The observation (4 + 2 * num_bins,) float32 of the current state."""
        return self._observe_and_cost()[0]

    def _observe_and_cost(self) -> tuple[np.ndarray, float]:
        px, py, n = self._px, self._py, self.num_bins
        obs = np.empty(NUM_FIXED_OBS + 2 * n, dtype=np.float32)
        obs[0], obs[1], obs[2], obs[3] = self._vx, self._vy, self._gx - px, self._gy - py
        dx, dy = self._hx - px, self._hy - py
        clearance = np.hypot(dx, dy) - self.hazard_radius
        # floor(x + 0.5) rather than rint: ties go up, matching the half-open sector [centre - pi/n, centre + pi/n).
        bins = np.floor(np.arctan2(dy, dx) * self._bins_per_radian + 0.5).astype(np.intp) % n
        ranges = np.full(n, self.max_range)
        np.minimum.at(ranges, bins, clearance)
        obs[self.hazard_range_slice] = ranges  # clearance >= -hazard_radius already, ranges <= max_range
        bound = self.arena_size
        wall = np.minimum((bound - px * self._sign_ux) * self._inv_abs_ux,
                          (bound - py * self._sign_uy) * self._inv_abs_uy)
        obs[self.wall_range_slice] = np.clip(wall, 0.0, self.max_range)
        # The sign of the float64 clearance, not the float32 reading, decides |c - p| < r exactly.
        cost = 1.0 if clearance.size and clearance.min() < 0.0 else 0.0
        return obs, cost

    def _info(self, cost: float) -> dict[str, Any]:
        return {"cost": cost, "hazards": self._hazards.copy(), "hazard_radius": self.hazard_radius,
                "position": np.array([self._px, self._py]), "velocity": np.array([self._vx, self._vy]),
                "goal": np.array([self._gx, self._gy]), "goals_reached": self.goals_reached}

    # ---- rendering -------------------------------------------------------------------------------------------
    def render(self) -> np.ndarray | None:
        """(256, 256, 3) uint8 top view (+y up) in "rgb_array" mode; None without a render mode."""
        if self.render_mode is None:
            gym.logger.warn("HazardNavEnv.render() called without a render_mode; pass render_mode='rgb_array'.")
            return None
        margin, a = 8, self.arena_size
        scale = (IMAGE_SIZE - 2 * margin) / (2 * a)  # pixels per unit
        if self._pixel_x is None:
            centres = np.arange(IMAGE_SIZE) + 0.5 - margin
            self._pixel_x = centres / scale - a  # (256,) world x of each column
        x, y = self._pixel_x[None, :], -self._pixel_x[:, None]  # rows run downwards, world y upwards
        image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 90, dtype=np.uint8)
        image[(np.abs(x) <= a) & (np.abs(y) <= a)] = 235

        def disk(cx: float, cy: float, radius: float) -> np.ndarray:
            return (x - cx) ** 2 + (y - cy) ** 2 < radius**2

        for cx, cy in self._hazards:
            image[disk(cx, cy, self.hazard_radius)] = HAZARD_COLOUR
        image[disk(self._gx, self._gy, self.goal_radius)] = GOAL_COLOUR
        # Velocity line, drawn before the dot so the dot stays visible: half a second of travel.
        length = 0.5 * math.hypot(self._vx, self._vy)
        t = np.linspace(0.0, 0.5, max(2, int(2 * length * scale)))
        cols = ((self._px + t * self._vx + a) * scale + margin).astype(int)
        rows = ((a - (self._py + t * self._vy)) * scale + margin).astype(int)
        inside = (cols >= 0) & (cols < IMAGE_SIZE) & (rows >= 0) & (rows < IMAGE_SIZE)
        image[rows[inside], cols[inside]] = (120, 0, 0)
        image[disk(self._px, self._py, 0.06)] = ROBOT_COLOUR
        return image

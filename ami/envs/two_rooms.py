"""TwoRooms: a dot in a 64 x 64 image, two rooms split by a wall with a door, and a goal shown as an image.

The reward-free planning benchmark, in the setting of the EB-JEPA / PLDM "random wall" task. Each episode draws
the wall's x position and the door's y position, a start in one room and a goal in the other. The action (2,) in
[-1, 1] moves the dot by up to max_step pixels (its norm is clipped to 1); the wall and the arena's edge stop it,
and it slides along them. The episode succeeds, and terminates, once the dot is within success_radius pixels of
the goal; it is truncated after 200 steps.

Observation: {"image": (64, 64, 1) uint8, "goal": (64, 64, 1) uint8}. The wall is grey (128), the dot a white
Gaussian blob (sub-pixel position), the background black; the goal image is the same scene with the dot at the
goal. Reward: 1.0 on success, else 0 (reward-free training ignores it). info holds the true positions.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

SIZE = 64
WALL_VALUE = 128
DOT_VALUE = 255
SUBSTEPS = 4  # collision checks per step: a 2.5-pixel step cannot jump the 3-pixel wall


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"TwoRoomsEnv {name}={value!r}: expected {expected}")


class TwoRoomsEnv(gym.Env):
    """reset(options=...) may fix any of "wall_x", "door_y", "start" (x, y) and "goal" (x, y); fixed positions
    must be free (not in the wall, inside the arena), and need not be in different rooms."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None, max_step: float = 2.5, success_radius: float = 4.5,
                 wall_thickness: float = 3.0, door_width: float = 10.0, dot_radius: float = 1.5,
                 dot_sigma: float = 1.2, wall_range: tuple[float, float] = (24.0, 40.0),
                 door_range: tuple[float, float] = (12.0, 52.0)) -> None:
        _check("render_mode", render_mode, render_mode is None or render_mode in self.metadata["render_modes"],
               f"None or one of {self.metadata['render_modes']}")
        for name, value in [("max_step", max_step), ("success_radius", success_radius),
                            ("wall_thickness", wall_thickness), ("dot_radius", dot_radius), ("dot_sigma", dot_sigma)]:
            _check(name, value, isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                   "a finite number > 0")
        _check("door_width", door_width, door_width > 2 * dot_radius + 1, f"more than 2 * dot_radius + 1 = "
               f"{2 * dot_radius + 1} (the dot must fit through)")
        _check("wall_range", wall_range, len(wall_range) == 2 and 12 <= wall_range[0] <= wall_range[1] <= SIZE - 12,
               "(low, high) with 12 <= low <= high <= 52 (both rooms at least 12 pixels wide)")
        half_door = door_width / 2
        _check("door_range", door_range,
               len(door_range) == 2 and half_door <= door_range[0] <= door_range[1] <= SIZE - half_door,
               f"(low, high) within [{half_door}, {SIZE - half_door}] (the door inside the arena)")
        self.render_mode = render_mode
        self.max_step = float(max_step)
        self.success_radius = float(success_radius)
        self.wall_thickness = float(wall_thickness)
        self.door_width = float(door_width)
        self.dot_radius = float(dot_radius)
        self.dot_sigma = float(dot_sigma)
        self.wall_range = tuple(float(v) for v in wall_range)
        self.door_range = tuple(float(v) for v in door_range)
        image = gym.spaces.Box(0, 255, (SIZE, SIZE, 1), dtype=np.uint8)
        self.observation_space = gym.spaces.Dict({"image": image, "goal": image})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        # Pixel centres: pixel (row i, column j) covers [j, j + 1) x [i, i + 1) in (x, y) coordinates.
        self._centres = np.arange(SIZE, dtype=np.float64) + 0.5
        self.wall_x = self.door_y = 0.0
        self.position = np.zeros(2)
        self.goal = np.zeros(2)
        self._background = np.zeros((SIZE, SIZE), dtype=np.uint8)

    # -- geometry ----------------------------------------------------------------------------------------
    def is_free(self, point: np.ndarray) -> bool:
        """Whether a dot centred at point (x, y) lies inside the arena and clear of the wall."""
        x, y = float(point[0]), float(point[1])
        r = self.dot_radius
        if not (r <= x <= SIZE - r and r <= y <= SIZE - r):
            return False
        half = self.wall_thickness / 2 + r
        if abs(x - self.wall_x) >= half:
            return True
        door_half = self.door_width / 2 - r
        return abs(y - self.door_y) <= door_half

    def room_of(self, point: np.ndarray) -> int:
        """0 left of the wall's centre line, 1 right of it."""
        return int(point[0] > self.wall_x)

    def _move(self, action: np.ndarray) -> None:
        action = np.asarray(action, dtype=np.float64).clip(-1.0, 1.0)
        norm = float(np.linalg.norm(action))
        step = self.max_step * (action / norm if norm > 1.0 else action)
        for _ in range(SUBSTEPS):
            for axis in (0, 1):  # one axis at a time: a blocked axis stops, the other slides on
                moved = self.position.copy()
                moved[axis] += step[axis] / SUBSTEPS
                if self.is_free(moved):
                    self.position = moved

    def _random_point(self, room: int) -> np.ndarray:
        r = self.dot_radius
        half = self.wall_thickness / 2 + r
        low, high = (r, self.wall_x - half) if room == 0 else (self.wall_x + half, SIZE - r)
        return np.array([self.np_random.uniform(low, high), self.np_random.uniform(r, SIZE - r)])

    # -- drawing -----------------------------------------------------------------------------------------
    def _draw_background(self) -> np.ndarray:
        image = np.zeros((SIZE, SIZE), dtype=np.uint8)
        half = self.wall_thickness / 2
        columns = np.abs(self._centres - self.wall_x) < half
        rows = np.abs(self._centres - self.door_y) >= self.door_width / 2
        image[np.ix_(rows, columns)] = WALL_VALUE
        return image

    def draw(self, position: np.ndarray) -> np.ndarray:
        """The observation image with the dot at position: (64, 64, 1) uint8."""
        gx = np.exp(-0.5 * ((self._centres - position[0]) / self.dot_sigma) ** 2)
        gy = np.exp(-0.5 * ((self._centres - position[1]) / self.dot_sigma) ** 2)
        dot = np.rint(DOT_VALUE * np.outer(gy, gx)).astype(np.uint8)
        return np.maximum(self._background, dot)[:, :, None]

    def _obs(self) -> dict[str, np.ndarray]:
        return {"image": self.draw(self.position), "goal": self._goal_image.copy()}

    def _info(self) -> dict[str, Any]:
        distance = float(np.linalg.norm(self.position - self.goal))
        return {"position": self.position.astype(np.float32), "goal_position": self.goal.astype(np.float32),
                "wall_x": self.wall_x, "door_y": self.door_y, "distance": distance,
                "success": distance <= self.success_radius}

    # -- gymnasium API -----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"wall_x", "door_y", "start", "goal"}
        _check("reset options", sorted(unknown), not unknown, "keys among wall_x, door_y, start, goal")
        self.wall_x = float(options.get("wall_x", self.np_random.uniform(*self.wall_range)))
        self.door_y = float(options.get("door_y", self.np_random.uniform(*self.door_range)))
        start_room = int(self.np_random.integers(2))
        self.position = np.asarray(options.get("start", self._random_point(start_room)), dtype=np.float64)
        self.goal = np.asarray(options.get("goal", self._random_point(1 - start_room)), dtype=np.float64)
        for name, point in [("start", self.position), ("goal", self.goal)]:
            _check(f"reset options {name}", point.tolist(), point.shape == (2,) and self.is_free(point),
                   "an (x, y) inside the arena and clear of the wall")
        self._background = self._draw_background()
        self._goal_image = self.draw(self.goal)
        return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        self._move(action)
        info = self._info()
        return self._obs(), float(info["success"]), bool(info["success"]), False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        grey = self._background.astype(np.float64)
        frame = np.repeat(grey[:, :, None], 3, axis=2)
        goal = self.draw(self.goal)[:, :, 0] / 255.0
        dot = self.draw(self.position)[:, :, 0] / 255.0
        frame[:, :, 1] = np.maximum(frame[:, :, 1], 200 * goal)  # goal green, dot white over it
        frame = np.maximum(frame, 255 * dot[:, :, None])
        return frame.clip(0, 255).astype(np.uint8)

"""Pixels from any env that renders: observations become the rendered frame, resized, as uint8."""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """frame: (H, W, C) uint8 -> (size, size, C) uint8, area-averaged when shrinking (no aliasing of thin
    objects such as a pendulum's rod)."""
    if frame.shape[0] == size and frame.shape[1] == size:
        return frame
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    shrinking = frame.shape[0] >= size and frame.shape[1] >= size
    resized = F.interpolate(image, size=(size, size), mode="area" if shrinking else "bilinear",
                            align_corners=None if shrinking else False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


class PixelObservation(gym.Wrapper):
    """Replaces the observation with env.render() resized to (size, size), the last frame_stack frames
    stacked on the channel axis: (size, size, C * frame_stack) uint8, oldest first. The env must have been
    made with render_mode="rgb_array". The state vector stays out of the observation (it is not in info
    either): the agent sees pixels only."""

    def __init__(self, env: gym.Env, size: int = 64, frame_stack: int = 1, grayscale: bool = False) -> None:
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(f"PixelObservation needs an env made with render_mode='rgb_array'; "
                             f"got render_mode={env.render_mode!r}")
        if size < 8 or frame_stack < 1:
            raise ValueError(f"PixelObservation size={size}, frame_stack={frame_stack}: expected size >= 8 "
                             "and frame_stack >= 1")
        self.size, self.frame_stack, self.grayscale = size, frame_stack, grayscale
        channels = (1 if grayscale else 3) * frame_stack
        self.observation_space = gym.spaces.Box(0, 255, (size, size, channels), dtype=np.uint8)
        self.frames: deque[np.ndarray] = deque(maxlen=frame_stack)

    def _frame(self) -> np.ndarray:
        frame = self.env.render()
        if frame is None or frame.ndim != 3:
            raise RuntimeError(f"{self.env.spec.id if self.env.spec else self.env}: render() returned "
                               f"{None if frame is None else frame.shape}; expected an (H, W, 3) array")
        frame = resize_frame(frame, self.size)
        if self.grayscale:
            frame = np.rint(frame @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[:, :, None]
        return frame

    def _observation(self) -> np.ndarray:
        return np.concatenate(list(self.frames), axis=2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        _, info = self.env.reset(seed=seed, options=options)
        frame = self._frame()
        for _ in range(self.frame_stack):
            self.frames.append(frame)
        return self._observation(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        _, reward, terminated, truncated, info = self.env.step(action)
        self.frames.append(self._frame())
        return self._observation(), float(reward), terminated, truncated, info

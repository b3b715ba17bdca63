"""Bad input from an env, as a new user might meet it: Pendulum-v1 with a NaN in its observation every 50 steps
and in its reward every 70. `gymnasium.make("nan_env:NaNPendulum-v0")` (with tests/ on the path) registers it."""

import gymnasium as gym
import numpy as np


class NaNPendulum(gym.Wrapper):
    def __init__(self, obs_every: int = 50, reward_every: int = 70, **kwargs) -> None:
        super().__init__(gym.make("Pendulum-v1", **kwargs))
        self.obs_every, self.reward_every = obs_every, reward_every
        self.steps = 0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        if self.steps % self.obs_every == 0:
            obs = obs.copy()
            obs[0] = np.nan
        if self.steps % self.reward_every == 0:
            reward = float("nan")
        return obs, reward, terminated, truncated, info


gym.register("NaNPendulum-v0", entry_point=NaNPendulum, max_episode_steps=200)

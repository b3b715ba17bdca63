"""Environment construction: any gymnasium id with a Box action space, actions in [-1, 1].

Importing this package registers ami's own environments with gymnasium: ami/HazardNav-v0.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import RescaleAction

from ami.config import EnvConfig

# MuJoCo picks its OpenGL backend when first imported; headless machines render through EGL.
# A machine with a display can still choose another backend by setting MUJOCO_GL itself.
os.environ.setdefault("MUJOCO_GL", "egl")


class UnsupportedEnvError(ValueError):
    pass


def make_env(config: EnvConfig, render_mode: str | None = None) -> gym.Env:
    """The configured env with its actions rescaled to [-1, 1] and observations as float32."""
    kwargs = dict(config.kwargs)
    if config.max_episode_steps is not None:
        kwargs["max_episode_steps"] = config.max_episode_steps
    try:
        env = gym.make(config.id, render_mode=render_mode, **kwargs)
    except gym.error.Error as error:
        raise UnsupportedEnvError(f"env.id={config.id!r}: {error}") from error
    if not isinstance(env.action_space, gym.spaces.Box):
        raise UnsupportedEnvError(f"env.id={config.id!r} has action space {env.action_space}; "
                                  "expected a Box (continuous) action space")
    if not isinstance(env.observation_space, gym.spaces.Box) or len(env.observation_space.shape) != 1:
        raise UnsupportedEnvError(f"env.id={config.id!r} has observation space {env.observation_space}; "
                                  "expected a flat Box (vector) observation")
    with warnings.catch_warnings():  # the wrapper's float64 bounds are cast to float32 on purpose
        warnings.simplefilter("ignore", UserWarning)
        env = RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    return gym.wrappers.TransformObservation(
        env, lambda obs: np.asarray(obs, dtype=np.float32),
        gym.spaces.Box(env.observation_space.low.astype(np.float32),
                       env.observation_space.high.astype(np.float32), dtype=np.float32))


def make_vector_env(config: EnvConfig, num_envs: int) -> gym.vector.SyncVectorEnv:
    makers: list[Callable[[], gym.Env]] = [lambda: make_env(config) for _ in range(num_envs)]
    return gym.vector.SyncVectorEnv(makers)


def observation_names(config: EnvConfig, env: gym.Env) -> list[str]:
    """Names of the observation's entries: the config's, else the env's own (an
    `observation_names()` method, as HazardNav has), else obs_0, obs_1, ..."""
    obs_dim = env.observation_space.shape[0]
    names = list(config.observation_names)
    if not names and callable(getattr(env.unwrapped, "observation_names", None)):
        names = list(env.unwrapped.observation_names())
    names = names or [f"obs_{i}" for i in range(obs_dim)]
    if len(names) != obs_dim:
        raise UnsupportedEnvError(f"env.observation_names has {len(names)} names; the observation "
                                  f"of {config.id} has {obs_dim} entries")
    return names


gym.register(id="ami/HazardNav-v0", entry_point="ami.envs.hazard_nav:HazardNavEnv", max_episode_steps=1000)

"""Environment construction: any gymnasium id with a Box action space, actions in [-1, 1].

Observations are a flat float32 vector, a uint8 image (H, W, C), or a dict of an "image" with an optional
"goal" image and an optional flat "vector". A Dict of vector Boxes (dm_control through shimmy, goal-conditioned
envs) is flattened into one vector whose entries are named by their keys. `env.pixels=true` turns any env that
renders into an image one.
`dm_control/<domain>-<task>-v0` ids are registered through shimmy on first use; `env.action_repeat` holds each
action for that many env steps.
Importing this package registers ami's own environments with gymnasium: ami/HazardNav-v0, ami/TwoRooms-v0,
ami/WindyCliff-v0 (a steady wind) and ami/GustyCliff-v0 (gusts).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import RescaleAction

from ami.envs.pixels import PixelObservation
from ami.schema import EnvConfig

# MuJoCo picks its OpenGL backend when first imported; headless machines render through EGL.
# A machine with a display can still choose another backend by setting MUJOCO_GL itself.
os.environ.setdefault("MUJOCO_GL", "egl")


class UnsupportedEnvError(ValueError):
    pass


def _entry_names(key: str, space: gym.spaces.Box) -> list[str]:
    size = int(np.prod(space.shape))
    return [key] if size == 1 else [f"{key}_{i}" for i in range(size)]


def is_vector_dict(space: gym.Space) -> bool:
    """A Dict whose every entry is a Box of numbers that is not an image."""
    return isinstance(space, gym.spaces.Dict) and bool(space.spaces) and all(
        isinstance(part, gym.spaces.Box) and not _is_image(part) for part in space.spaces.values())


class FlatDictObservation(gym.ObservationWrapper):
    """A Dict of vector Boxes as one float32 vector, in the Dict's key order; its entries are named by their keys
    (`key` for a single number, `key_0`, `key_1`, ... for an array, flattened in C order)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        spaces = env.observation_space.spaces
        self.keys = list(spaces)
        self.names = [name for key, part in spaces.items() for name in _entry_names(key, part)]
        def bound(attribute: str) -> np.ndarray:
            return np.concatenate([np.broadcast_to(getattr(part, attribute), part.shape).reshape(-1)
                                   for part in spaces.values()]).astype(np.float32)
        self.observation_space = gym.spaces.Box(bound("low"), bound("high"), dtype=np.float32)

    def observation(self, observation: dict) -> np.ndarray:
        return np.concatenate([np.asarray(observation[key], dtype=np.float32).reshape(-1) for key in self.keys])

    def observation_names(self) -> list[str]:
        return list(self.names)


class ActionRepeat(gym.Wrapper):
    """Each action held for `repeat` steps of the env, stopping at the step its episode ends: the summed reward
    (and info["cost"] where the env reports one), the last step's observation, flags and info."""

    def __init__(self, env: gym.Env, repeat: int) -> None:
        super().__init__(env)
        self.repeat = repeat

    def step(self, action: np.ndarray) -> tuple:
        reward_sum, cost_sum = 0.0, 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            reward_sum += float(reward)
            cost_sum += float(info.get("cost", 0.0))
            if terminated or truncated:
                break
        return obs, reward_sum, terminated, truncated, {**info, "cost": cost_sum} if "cost" in info else info


class TerminationCost(gym.Wrapper):
    """info["cost"] = 1.0 on the step the episode terminates, 0.0 before (env.cost_from_termination)."""

    def step(self, action: np.ndarray) -> tuple:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "cost": float(bool(terminated))} if "cost" not in info else info
        return obs, reward, terminated, truncated, info


def observation_kind(space: gym.Space) -> str:
    """"vector", "image" or "dict"; anything else raises UnsupportedEnvError."""
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return "vector"
    if _is_image(space):
        return "image"
    if isinstance(space, gym.spaces.Dict) and _is_image(space.spaces.get("image")):
        extra = set(space.spaces) - {"image", "goal", "vector"}
        goal, vector = space.spaces.get("goal"), space.spaces.get("vector")
        if not extra and (goal is None or goal == space["image"]) and (
                vector is None or (isinstance(vector, gym.spaces.Box) and len(vector.shape) == 1)):
            return "dict"
    raise UnsupportedEnvError(f"observation space {space}: expected a flat Box, a uint8 image Box (H, W, C), "
                              "a Dict of vector Boxes, or a Dict of 'image' with optional 'goal' (same space) and "
                              "flat 'vector'")


def _is_image(space: gym.Space | None) -> bool:
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.dtype == np.uint8


def make_env(config: EnvConfig, render_mode: str | None = None) -> gym.Env:
    """The configured env with its actions rescaled to [-1, 1]; vector observations as float32, images as
    uint8 (H, W, C)."""
    kwargs = dict(config.kwargs)
    if config.max_episode_steps is not None:
        kwargs["max_episode_steps"] = config.max_episode_steps
    if config.pixels:
        render_mode = "rgb_array"
    if render_mode is not None:  # an env that never renders need not take the argument
        kwargs["render_mode"] = render_mode
    if config.id.startswith("dm_control/"):
        _register_dm_control(config.id)
    try:
        env = gym.make(config.id, **kwargs)
    except ModuleNotFoundError as error:  # env.id=my_package.my_module:MyEnv-v0 imports the module first
        module = config.id.partition(":")[0]
        raise UnsupportedEnvError(f"env.id={config.id!r}: cannot import module {module!r} ({error.msg.split('.')[0]}); "
                                  "expected module:EnvId with the module importable from here") from error
    except gym.error.Error as error:
        where = f" (module {config.id.partition(':')[0]!r} imported, but it registers no such id)" \
            if ":" in config.id and isinstance(error, gym.error.NameNotFound | gym.error.VersionNotFound) else ""
        raise UnsupportedEnvError(f"env.id={config.id!r}: {error}{where}") from error
    if not isinstance(env.action_space, gym.spaces.Box):
        raise UnsupportedEnvError(f"env.id={config.id!r} has action space {env.action_space}; "
                                  "expected a Box (continuous) action space")
    if config.action_repeat > 1:
        env = ActionRepeat(env, config.action_repeat)
    if config.cost_from_termination:
        env = TerminationCost(env)
    if config.pixels:
        env = PixelObservation(env, config.image_size, config.frame_stack, config.grayscale)
    elif is_vector_dict(env.observation_space):
        env = FlatDictObservation(env)
    try:
        kind = observation_kind(env.observation_space)
    except UnsupportedEnvError as error:
        raise UnsupportedEnvError(f"env.id={config.id!r}: {error}") from error
    # The wrapper's float64 bounds are cast to float32 on purpose; the overflow a float64 action space (dm_control's)
    # warns of is in gymnasium's own check of those bounds.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        env = RescaleAction(env, np.float32(-1.0), np.float32(1.0))
    if kind != "vector":
        return env
    return gym.wrappers.TransformObservation(
        env, lambda obs: np.asarray(obs, dtype=np.float32),
        gym.spaces.Box(env.observation_space.low.astype(np.float32),
                       env.observation_space.high.astype(np.float32), dtype=np.float32))


def _register_dm_control(env_id: str) -> None:
    """DeepMind Control's tasks are gymnasium envs once shimmy registers them (the `bench` extra installs both)."""
    try:
        import shimmy
    except ImportError as error:
        raise UnsupportedEnvError(f"env.id={env_id!r} needs shimmy and dm_control ({error.msg}); install them with "
                                  "pip install 'ami[bench]'") from error
    gym.register_envs(shimmy)


def make_vector_env(config: EnvConfig, num_envs: int, render_mode: str | None = None,
                    autoreset_mode: gym.vector.AutoresetMode = gym.vector.AutoresetMode.NEXT_STEP
                    ) -> gym.vector.SyncVectorEnv:
    """num_envs copies of the configured env in one gymnasium vector env. NEXT_STEP autoreset by default: an
    ended environment resets on the following step, so at a checkpoint taken when every episode has just ended
    no reset has drawn from the envs' generators yet, and a resumed run starts the very episodes the
    uninterrupted one would (ami.loop reads the mode from the vector env's metadata and handles SAME_STEP too)."""
    makers: list[Callable[[], gym.Env]] = [lambda: make_env(config, render_mode) for _ in range(num_envs)]
    return gym.vector.SyncVectorEnv(makers, autoreset_mode=autoreset_mode)


def observation_names(config: EnvConfig, env: gym.Env) -> list[str]:
    """Names of the observation vector's entries (of the dict's "vector"; none for an image): the config's,
    else the env's own (an `observation_names()` method, as HazardNav has), else obs_0, obs_1, ..."""
    space = env.observation_space
    kind = observation_kind(space)
    if kind == "image" or (kind == "dict" and "vector" not in space.spaces):
        if config.observation_names:
            raise UnsupportedEnvError(f"env.observation_names={list(config.observation_names)}: {config.id} "
                                      "observes an image, with no vector to name")
        return []
    obs_dim = (space["vector"] if kind == "dict" else space).shape[0]
    names = list(config.observation_names)
    if not names:
        try:  # the env's own, or a wrapper's (FlatDictObservation's)
            own = env.get_wrapper_attr("observation_names")
        except AttributeError:
            own = None
        names = list(own()) if callable(own) else []
    names = names or [f"obs_{i}" for i in range(obs_dim)]
    if len(names) != obs_dim:
        raise UnsupportedEnvError(f"env.observation_names has {len(names)} names; the observation "
                                  f"of {config.id} has {obs_dim} entries")
    return names


gym.register(id="ami/HazardNav-v0", entry_point="ami.envs.hazard_nav:HazardNavEnv", max_episode_steps=1000)
gym.register(id="ami/TwoRooms-v0", entry_point="ami.envs.two_rooms:TwoRoomsEnv", max_episode_steps=200)
gym.register(id="ami/WindyCliff-v0", entry_point="ami.envs.windy_cliff:WindyCliffEnv", max_episode_steps=200,
             kwargs={"wind": 1.5, "gusts": False})
gym.register(id="ami/GustyCliff-v0", entry_point="ami.envs.windy_cliff:WindyCliffEnv", max_episode_steps=200,
             kwargs={"wind": 0.5, "gusts": True, "gust_rate": 0.08, "gust_strength": 2.5})

"""The Python API: an ami agent for notebooks and scripts. The command line is a thin layer over the same parts.

    from ami import AMI
    model = AMI(env="pendulum", agent="tiny", overrides=["seed=1"])   # a preset, a YAML file, a gymnasium id,
    model.learn(2_000)                                                # an env object or a function making one
    model.learn(1_000)                                                # goes on from env step 2,000
    action = model.predict(obs)                                       # in the env's own action bounds
    result = model.evaluate(episodes=10)                              # returns, lengths, costs, interventions
    model.save("pendulum.pt")                                         # the agent alone
    model = AMI.load("pendulum.pt")
    model = AMI.resume("runs/pendulum__tiny__s1__<stamp>")            # a whole run, from its checkpoint
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ami.agent import Agent
from ami.checkpoint import SCHEMA_VERSION, CheckpointError
from ami.config import ConfigError, available, is_preset_file, load_config, load_saved
from ami.envs import make_env
from ami.evaluate import EVAL_SEED, EvalResult, evaluate
from ami.runs import acting_agent, agent_state, load_agent_state, run_config
from ami.train import Callback, Trainer, new_run_dir

_user_envs = itertools.count()


def env_overrides(env: str | gym.Env | Callable[[], gym.Env]) -> list[str]:
    """The config overrides that select `env`: a preset name or YAML file as it is; a gymnasium id through the
    `gym` preset; an env object (copied for each environment ami makes) or a function making one, registered with
    gymnasium under an id of its own for this process."""
    if isinstance(env, str):
        if env in available("env"):
            return [f"env={env}"]
        if env in gym.registry or (":" in env and not is_preset_file(env)):  # ami/HazardNav-v0 is an id
            return ["env=gym", f"env.id={env}"]
        if is_preset_file(env):
            return [f"env={env}"]
        raise ConfigError(f"env={env!r}: expected a preset ({available('env')}), a YAML file, a registered "
                          "gymnasium id, an env or a function making one")
    if isinstance(env, gym.Env):
        name, make = type(env.unwrapped).__name__, lambda: copy.deepcopy(env)
    elif callable(env):
        name, make = getattr(env, "__name__", "env"), env
    else:
        raise ConfigError(f"env={env!r}: expected a preset name, a gymnasium id, an env or a function making one")
    name = re.sub(r"\W", "", name).replace("lambda", "") or "env"  # a lambda's name is "<lambda>"
    env_id = f"ami-user/{name}{next(_user_envs)}-v0"
    gym.register(env_id, entry_point=lambda **_: make())  # ami asks for no render mode the env was not made with
    return ["env=gym", f"env.id={env_id}", f"env.name={name.lower()}"]


class AMI:
    """An ami agent: built from presets and overrides, trained with learn(), used with predict() and evaluate(),
    saved alone (save/load) or as a whole run (resume). Training writes a run directory as `ami train` does."""

    def __init__(self, env: str | gym.Env | Callable[[], gym.Env] = "pendulum", agent: str = "ami",
                 overrides: Sequence[str] = (), progress: bool = False) -> None:
        cfg = load_config([*env_overrides(env), f"agent={agent}", f"progress={str(progress).lower()}",
                           *overrides])
        self._attach(Trainer(cfg, new_run_dir(cfg)))

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: str | Path | None = None, resume: bool = False) -> AMI:
        """A run of a resolved configuration (ami.config.load_config), in run_dir (default: a new one under
        cfg.runs_dir); resume=True takes it on from its latest checkpoint. `ami train` starts here."""
        model = cls.__new__(cls)
        model._attach(Trainer(cfg, new_run_dir(cfg) if run_dir is None else run_dir, resume=resume))
        return model

    def _attach(self, trainer: Trainer) -> None:
        self._trainer: Trainer | None = trainer
        self._agent, self.cfg, self._trained_steps = trainer.agent, trainer.cfg, 0
        self._interface: gym.Env | None = None  # an env as ami makes it, for predict's wrappers

    @property
    def trainer(self) -> Trainer | None:
        """The run's Trainer (None for an agent loaded alone, until it learns)."""
        return self._trainer

    # -- training ------------------------------------------------------------------------------------------
    def learn(self, steps: int, callback: Callback | Callable | None = None) -> AMI:
        """Train for `steps` more env steps (over all environments), from where the last call stopped.
        callback: an ami.train.Callback, or a function (trainer, step) -> False to stop."""
        if steps < 1:
            raise ConfigError(f"learn(steps={steps}): expected a positive number of env steps")
        trainer = self._trainer if self._trainer is not None else self._trainer_for_loaded_agent()
        trainer.train(until=trainer.loop.env_steps + steps, callback=callback, close=False)
        return self

    def train(self, callback: Callback | Callable | None = None) -> dict[str, float]:
        """Run the configured schedule to its end (train.total_steps, or a reward-free run's phases), as `ami
        train` does, and close the run -> its summary (env steps, updates, last return, seconds)."""
        if self._trainer is None:
            self._trainer_for_loaded_agent()
        return self._trainer.train(callback=callback)

    @property
    def env_steps(self) -> int:
        """Env steps trained so far."""
        return self._trainer.loop.env_steps if self._trainer is not None else self._trained_steps

    @property
    def run_dir(self) -> Path | None:
        return None if self._trainer is None else self._trainer.run_dir

    @property
    def agent(self) -> Agent:
        return self._agent

    def close(self) -> None:
        """Close the training envs and the TensorBoard writer (learn() after this starts neither again)."""
        if self._trainer is not None:
            self._trainer.close()
        if self._interface is not None:
            self._interface.close()
            self._interface = None

    # -- acting --------------------------------------------------------------------------------------------
    def predict(self, observation: Any, generator: torch.Generator | None = None) -> np.ndarray:
        """One observation as the env returns it -> the agent's action for the env, in its own bounds. The
        observation goes through the wrappers ami puts around the env (a Dict of vectors flattened, float32) and
        the action back through them. Each call plans afresh, without exploration noise, in an episode of its
        own (training episodes are untouched)."""
        if self.cfg.env.pixels:
            raise ConfigError("predict: with env.pixels=true the agent sees renders, not the env's observation; "
                              "use evaluate(), or step an ami env (ami.envs.make_env)")
        wrappers = self._wrappers()
        for wrapper in reversed(wrappers):  # innermost first, as the env's own observation travels out
            if isinstance(wrapper, gym.ObservationWrapper):
                observation = wrapper.observation(observation)
        batch = {k: np.asarray(v)[None] for k, v in observation.items()} if isinstance(observation, dict) \
            else np.asarray(observation)[None]
        with self._agent.fresh_episodes():
            action = self._agent.act(batch, generator=generator).actions[0]
        for wrapper in wrappers:  # outermost first, as an action travels in
            if isinstance(wrapper, gym.ActionWrapper):
                action = wrapper.action(action)
        return np.asarray(action, dtype=np.float32)

    def evaluate(self, episodes: int = 10, seed: int = EVAL_SEED) -> EvalResult:
        """`episodes` episodes without exploration from the fixed start states seed, seed + 1, ..."""
        return evaluate(self._agent, self.cfg.env, episodes, seed)

    def _wrappers(self) -> list[gym.Wrapper]:
        """The wrappers of an env as ami makes it, outermost first (made once, never stepped)."""
        if self._interface is None:
            self._interface = make_env(self.cfg.env)
        chain, env = [], self._interface
        while isinstance(env, gym.Wrapper):
            chain.append(env)
            env = env.env
        return chain

    # -- saving and loading --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """The agent alone (its trained modules, configuration, guardrails and shield), without memory or
        optimiser state: AMI.load(path) acts exactly as this agent does."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        updates = self._trainer.learner.updates if self._trainer is not None else self._updates
        torch.save({"version": SCHEMA_VERSION, "kind": "agent", "config": OmegaConf.to_container(self.cfg),
                    **agent_state(self._agent), "learner": {"updates": updates}, "env_steps": self.env_steps},
                   path)
        return path

    @classmethod
    def load(cls, path: str | Path, env: str | gym.Env | Callable[[], gym.Env] | None = None,
             overrides: Sequence[str] = ()) -> AMI:
        """An agent saved with save(). env: where it acts, when not its saved env id (an env object, say)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("kind") != "agent" or state.get("version") != SCHEMA_VERSION:
            raise CheckpointError(f"{path}: not an agent saved by this ami's AMI.save (a run's checkpoint loads with "
                                  "AMI.resume(run_dir))")
        if isinstance(env, str) and (is_preset_file(env) or env in available("env")):
            raise ConfigError(f"AMI.load(env={env!r}): the agent keeps the env preset it was trained with; pass a "
                              "gymnasium id, an env or a function making one")
        extra = [o for o in env_overrides(env) if not o.startswith("env=")] if env is not None else []
        cfg = load_saved(OmegaConf.create(state["config"]), [*extra, *overrides])
        model = cls.__new__(cls)
        model.cfg, model._trainer, model._interface = cfg, None, None
        model._trained_steps, model._updates, model._state = int(state["env_steps"]), state["learner"]["updates"], state
        model._agent = acting_agent(cfg, state, Path(path))
        return model

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: Sequence[str] = (), progress: bool = False) -> AMI:
        """A whole run from its latest checkpoint (memory, optimisers, counters, RNGs), as `ami train --resume`."""
        cfg = run_config(run_dir, [f"progress={str(progress).lower()}", *overrides])
        return cls.from_config(cfg, run_dir, resume=True)

    def _trainer_for_loaded_agent(self) -> Trainer:
        """learn() on a loaded agent: a new run whose agent starts from the loaded one's modules."""
        trainer = Trainer(self.cfg, new_run_dir(self.cfg))
        load_agent_state(trainer.agent, self._state, Path("<loaded agent>"), self.cfg)
        self._trainer, self._agent = trainer, trainer.agent
        return trainer


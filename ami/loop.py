"""The env loop: the only code in ami that steps environments.

A gymnasium vector env of B environments, acted on as one batch: policy(obs) -> Action -> vector env step ->
one transition per environment, with its true next observation (the final one where an episode ended), its
info (the final step's, where the env reset in the same step), and a mask of the transitions that are real.
Training, evaluation, video, reward-free collection and the benchmarks all step environments through it; the
agent turns each step into intrinsic-cost terms and memory records (Agent.observe).

Non-finite observations and rewards are caught here, where they enter: with nonfinite="error" the loop stops
with a NonFiniteError naming the environment, the env step and the field; with "skip" the transition is dropped
(Step.dropped, counted in EnvLoop.dropped) and the episode goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from ami.messages import Action, Step

NEXT_STEP, SAME_STEP = gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP
STATS = ("return", "length", "cost", "interventions", "fallbacks")


class NonFiniteError(RuntimeError):
    """An environment returned a non-finite observation or reward (env.nonfinite=error)."""


@dataclass(frozen=True)
class Episode:
    """One finished episode of environment `env`: its id, and return, length, cost (summed info["cost"], the
    env's own safety cost), interventions and fallbacks (actions the shield replaced)."""

    env: int
    episode: int
    stats: dict[str, float]


def _set_rows(target: Any, rows: np.ndarray, source: Any) -> Any:
    """target with these rows replaced by source's (a copy)."""
    if isinstance(target, Mapping):
        return {k: _set_rows(v, rows, source[k]) for k, v in target.items()}
    target = np.array(target, copy=True)
    target[rows] = source
    return target


def _stack_rows(values: list[Any]) -> Any:
    if isinstance(values[0], Mapping):
        return {k: np.stack([v[k] for v in values]) for k in values[0]}
    return np.stack(values)


def nonfinite_fields(value: Any, name: str = "observation") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(field name, (B,) True where not finite, the field (B, -1)) for each float array in an observation (or a
    reward)."""
    if isinstance(value, Mapping):
        return [field for key, part in value.items() for field in nonfinite_fields(part, f"{name}[{key!r}]")]
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating):
        return []
    flat = value.reshape(value.shape[0], -1)
    return [(name, ~np.isfinite(flat).all(1), flat)]


def nonfinite_any(value: Any) -> np.ndarray:
    """(B,) True where any float entry of an observation is not finite."""
    fields = nonfinite_fields(value)
    if fields:
        return np.logical_or.reduce([mask for _, mask, _ in fields])
    return np.zeros(len(next(iter(value.values())) if isinstance(value, Mapping) else value), dtype=bool)


def step_info(info: Mapping[str, Any], num_envs: int, ended: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A vector env's info as key -> (B, ...) arrays, 0 where an environment gave no value; for the
    environments in `ended` (SAME_STEP), the final step's info instead of the next episode's reset info.
    Entries that are not numbers are left out."""
    def numeric(source: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        for key, value in source.items():
            if key.startswith("_") or key in ("final_obs", "final_info") or not isinstance(value, np.ndarray) \
                    or value.dtype == object or value.shape[:1] != (num_envs,):
                continue
            mask = source.get(f"_{key}", np.ones(num_envs, dtype=bool))
            out[key] = np.where(mask.reshape(-1, *[1] * (value.ndim - 1)), value, 0)
        return out

    values = numeric(info)
    if ended is not None and ended.any() and "final_info" in info:
        for key, value in numeric(info["final_info"]).items():
            base = values.get(key, np.zeros_like(value))
            values[key] = np.where(ended.reshape(-1, *[1] * (value.ndim - 1)), value, base)
    return values


class EnvLoop:
    """Steps a gymnasium vector env with a batched policy, episode by episode, each environment on its own.

    The vector env's autoreset mode is read from its metadata: SAME_STEP (an ended episode's final observation
    is in info["final_obs"]) and NEXT_STEP (the step after an end only resets that environment: no transition).
    """

    def __init__(self, envs: gym.vector.VectorEnv, nonfinite: str = "error") -> None:
        mode = envs.metadata.get("autoreset_mode", NEXT_STEP)
        if mode not in (NEXT_STEP, SAME_STEP):
            raise ValueError(f"vector env autoreset_mode={mode}: expected NEXT_STEP or SAME_STEP")
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"env.nonfinite={nonfinite!r}: expected 'error' or 'skip'")
        self.envs, self.mode, self.nonfinite = envs, mode, nonfinite
        self.num_envs = envs.num_envs
        self.obs: Any = None
        self.env_steps = 0  # real env steps so far, over all environments
        self.episodes = 0  # episode ids handed out
        self.dropped = 0  # transitions dropped as non-finite
        self.episode = np.zeros(self.num_envs, dtype=np.int64)  # each environment's current episode id
        self.stats = {name: np.zeros(self.num_envs) for name in STATS}
        self._restarting = np.zeros(self.num_envs, dtype=bool)  # NEXT_STEP: the next step only resets these
        self._bad_obs = np.zeros(self.num_envs, dtype=bool)  # the current observation is not finite (skip)

    @property
    def between_episodes(self) -> bool:
        """Every environment's episode has just ended and none has reset yet (NEXT_STEP): a checkpoint taken now
        resumes into the very episodes this run would start next."""
        return bool(self._restarting.all())

    def reset(self, seed: int | list[int] | None = None, options: dict | None = None) -> Any:
        """Start every environment afresh: seed, seed + 1, ... for environments 0, 1, ... (None: from their
        own generators, as after a restored checkpoint)."""
        self.obs, _ = self.envs.reset(seed=seed, options=options)
        everyone = np.ones(self.num_envs, dtype=bool)
        self._bad_obs = self._check(self.obs, None, everyone, "observation")
        self._begin(everyone)
        self._restarting[:] = False
        return self.obs

    def _begin(self, envs: np.ndarray) -> None:
        """New episode ids and fresh statistics for these environments."""
        count = int(envs.sum())
        self.episode[envs] = self.episodes + np.arange(count)
        self.episodes += count
        for values in self.stats.values():
            values[envs] = 0.0

    def _check(self, obs: Any, reward: np.ndarray | None, rows: np.ndarray, what: str) -> np.ndarray:
        """(B,) True where these rows hold a non-finite observation or reward; raises with nonfinite="error"."""
        fields = nonfinite_fields(obs, what) + ([] if reward is None else nonfinite_fields(reward, "reward"))
        bad = np.zeros(self.num_envs, dtype=bool)
        for name, mask, values in fields:
            mask = mask & rows
            if mask.any() and self.nonfinite == "error":
                env = int(mask.argmax())
                entries = np.flatnonzero(~np.isfinite(values[env]))
                where = f" entries {entries[:8].tolist()}" if values.shape[1] > 1 else ""
                raise NonFiniteError(f"env {env} at env step {self.env_steps + int(rows[:env].sum())}: {name}"
                                     f"{where} = {values[env][entries[:8]].tolist()}, not finite; fix the env, or "
                                     "set env.nonfinite=skip to drop such transitions")
            bad |= mask
        return bad

    def step(self, policy: Callable[[Any], Action | np.ndarray]) -> Step:
        """Act on the current observations, step every environment once, and report what happened."""
        if self.obs is None:
            raise RuntimeError("EnvLoop.step before reset")
        if self._restarting.all():  # NEXT_STEP, every environment only resets: nothing to act on
            action = Action(np.zeros((self.num_envs, *self.envs.single_action_space.shape), dtype=np.float32))
        else:
            action = policy(self.obs)
            action = action if isinstance(action, Action) else Action(np.asarray(action, dtype=np.float32))
        obs = self.obs
        next_obs, reward, terminated, truncated, info = self.envs.step(action.actions)
        real = ~self._restarting  # a NEXT_STEP env that ended last step was only reset now
        ended = (terminated | truncated) & real
        true_next = next_obs
        if self.mode == SAME_STEP and ended.any():  # the env reset in the same step: its final observation
            final = np.flatnonzero(ended)
            true_next = _set_rows(next_obs, final, _stack_rows([info["final_obs"][i] for i in final]))
        values = step_info(info, self.num_envs, ended if self.mode == SAME_STEP else None)
        dropped = (self._check(true_next, reward, real, "next observation") | self._bad_obs) & real
        valid = real & ~dropped
        self.dropped += int(dropped.sum())
        env_step = self.env_steps + np.cumsum(real) - 1
        self.env_steps += int(real.sum())

        stats = self.stats
        stats["return"] += np.where(valid, reward, 0.0)
        stats["length"] += real
        stats["cost"] += np.where(valid, values.get("cost", 0.0), 0.0)
        if action.decision is not None:
            stats["interventions"] += real * action.decision.intervened.cpu().numpy()
            stats["fallbacks"] += real * action.decision.fallback.cpu().numpy()
        finished = [Episode(int(i), int(self.episode[i]), {name: float(stats[name][i]) for name in STATS})
                    for i in np.flatnonzero(ended)]
        episode = self.episode.copy()
        started = ended if self.mode == SAME_STEP else self._restarting.copy()
        if self.mode == NEXT_STEP:
            self._restarting = ended
        self._begin(started)
        self.obs = next_obs
        self._check(next_obs, None, started, "observation")  # a new episode's first observation
        # The observations acted on next: a transition from a non-finite one is dropped too (skip).
        self._bad_obs = nonfinite_any(next_obs) & (started | (real & ~ended))
        return Step(obs, action, reward, true_next, terminated & real, truncated & real, values, valid, dropped,
                    started, episode, env_step, finished)


"""Training: one Trainer runs a run's schedule of phases through the one env loop, with one checkpoint schema.

An agent run: random (shielded) proposals for train.seed_steps, pretraining updates, then planning with updates
interleaved, evaluations and checkpoints. A reward-free run (reward_free.enabled): random-action collection, then
joint world-model updates, predictor-only updates and goal-critic updates on the stored data (its schedule is in
ami/reward_free.py). Either resumes from its latest checkpoint, and Ctrl-C saves one before exiting.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ami import distributed, figures, reward_free, runlog
from ami.agent import storable_observation
from ami.build import resolve_device
from ami.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ami.config import ConfigError
from ami.envs import make_vector_env
from ami.evaluate import EVAL_SEED, evaluate
from ami.learner import Learner
from ami.logger import Logger
from ami.loop import EnvLoop, Episode
from ami.messages import Action, Step
from ami.runs import agent_state, build_run_agent, load_agent_state


class Callback:
    """Hooks into a training run (an agent run's env steps; ami.api's learn). Either method returning False
    stops the run after this step, with a checkpoint, as at its end."""

    def on_step(self, trainer: Trainer, step: Step) -> bool | None:
        """After every step of the env loop (all environments at once) and the agent's observing of it."""
        return None

    def on_episode(self, trainer: Trainer, episode: Episode) -> bool | None:
        """After an episode of one environment ends: its return, length, cost and interventions."""
        return None


class FunctionCallback(Callback):
    def __init__(self, function: Callable[[Trainer, Step], bool | None]) -> None:
        self.function = function

    def on_step(self, trainer: Trainer, step: Step) -> bool | None:
        return self.function(trainer, step)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(cfg: DictConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.runs_dir) / f"{cfg.env.name}__{cfg.agent.name}__s{cfg.seed}__{stamp}"
    suffix = 1
    while path.exists():
        path = path.with_name(f"{path.name}-{suffix}")
        suffix += 1
    return path


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: the loop moves num_envs env steps at a time."""
    return before // every < after // every


class Trainer:
    """Owns one run: its env loop, agent, learner, logger, counters and RNGs.

    Started by torchrun, it is one rank of a group (ami.distributed): the schedule's env steps are the group's,
    run_dir is the group's (rank r keeps its own files in run_dir/ranks/<r>), and rank 0 alone logs and evaluates.
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.group = group = distributed.join(self.device)
        if group.distributed and cfg.reward_free.enabled:
            raise ConfigError(f"reward_free.enabled=true under torchrun (world size {group.world_size}): a "
                              "reward-free run trains in one process")
        self.group_dir = Path(group.broadcast(str(run_dir)))  # rank 0's: its name has a time stamp
        self.run_dir = group.rank_dir(self.group_dir)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)  # every rank builds the same parameters...
        self.loop = EnvLoop(make_vector_env(cfg.env, cfg.train.num_envs), cfg.env.nonfinite)
        self.agent = build_run_agent(cfg, self.loop, self.device)
        if cfg.reward_free.enabled:
            reward_free.check_env(cfg, self.loop.envs.single_observation_space, self.agent)
        seed_everything(group.seed(cfg.seed))  # ...and draws its own random numbers from here on
        self.learner = Learner(self.agent, OmegaConf.to_object(cfg.agent), cfg.reward_free, group.seed(cfg.seed),
                               group)
        self.plan_generator = torch.Generator().manual_seed(group.seed(cfg.seed + 1))
        self.episode_log = runlog.EpisodeLog(self.run_dir, self.agent, self.loop.num_envs,
                                             tensorboard=group.main and not cfg.reward_free.enabled)
        self.window: dict[str, list[float]] = defaultdict(list)
        self.update_credit = 0.0  # updates owed to the env steps taken so far
        self.checkpoint_due: int | None = None  # the env step at which a checkpoint fell due
        self.health: dict[str, float] = {}  # reward-free: the latest latent-health figures
        self.plan_times_ms: list[float] = []  # every planning call of this process, per env step
        self.part_seconds: dict[str, float] = defaultdict(float)  # the current train() call's time by part (time_split)
        self.eval_seconds = 0.0  # the current train() call's time in evaluations
        self.start_steps, self.train_seconds = 0, 0.0  # the last train() call's first env step and its length
        self.mode1_steps = 0  # this process's env steps on which Mode-1 acted alone
        self.last_return = float("nan")
        self._stop_requested = False  # Ctrl-C while training (train() listens for it)
        self._stop_agreed = False  # in a group: Ctrl-C reached some rank by the last env step (all stop there)
        if resume:
            self.load()
            runlog.drop_rows_after(self.run_dir, self.loop.env_steps)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Environment seeds run on across the ranks, as if the group's environments were one vector env.
            self.loop.reset(seed=cfg.seed + group.rank * self.loop.num_envs)
        OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)  # on resume too: its overrides count now
        self.logger: Logger | None = None  # rank 0's alone
        if group.main:
            # Events at the checkpoint's step were written before it was saved: keep them.
            self.logger = Logger(self.run_dir, purge_step=self.x_axis() + 1 if resume else None)
            if not resume:
                self.logger.hparams(runlog.hparams(cfg), {"eval/return_mean": float("nan")})
        self.episode_log.logger = self.logger

    def x_axis(self) -> int:
        """The x-axis of this run's curves: env steps; a reward-free run's, whose curves are all of its offline
        updates, the update count (its collection writes episodes.csv only)."""
        return self.learner.updates if self.cfg.reward_free.enabled else self.loop.env_steps

    # -- the cycle -----------------------------------------------------------------------------------------
    def env_step(self, random: bool, limit: int | None = None) -> Step:
        """One step of every environment: act, step, score, remember (at most `limit` transitions)."""
        agent, parts = self.agent, self.part_seconds

        def act(obs: Any) -> Action:
            start = time.perf_counter()
            action = agent.act(obs, explore=not random, random=random, generator=self.plan_generator)
            parts["act"] += time.perf_counter() - start
            if action.plan is not None:
                parts["plan"] += action.plan.plan_time_s
            return action

        start, acting, before = time.perf_counter(), parts["act"], self.loop.env_steps
        step = self.loop.step(act)
        if self.group.distributed:  # the group's env steps, and whether Ctrl-C reached any rank
            steps, stop = self.group.sum([self.loop.env_steps - before, self._stop_requested])
            self.loop.env_steps, self._stop_agreed = before + int(steps), stop > 0
        parts["env"] += time.perf_counter() - start - (parts["act"] - acting)
        if limit is not None and step.valid.sum() > limit:  # the rest are not kept: their stretches end before them
            kept = step.valid & (np.cumsum(step.valid) <= limit)
            step = dataclasses.replace(step, valid=kept, dropped=step.dropped | (step.valid & ~kept))
        if self.cfg.reward_free.enabled:  # the world model never sees a reward: none is stored
            step = dataclasses.replace(step, reward=np.zeros_like(step.reward))
        start = time.perf_counter()
        if step.action.plan is not None:  # else every environment only reset (a NEXT_STEP vector env)
            record = agent.observe(step)
            self.episode_log.add(step, record, self.loop.env_steps, self.window)
            if step.action.plan.mode != "random":
                self._window_plan(step)
        agent.reset(step.started)
        parts["observe"] += time.perf_counter() - start
        return step

    def time_split(self) -> dict[str, float]:
        """Milliseconds per env step of the last train() call, by part: plan (the planner), act (the rest
        of acting: perception, shield, Mode-1), env (the vector env's step and the loop's bookkeeping), observe
        (intrinsic cost, memory, logs), update (the learner), rest (checkpoints, logging, the schedule), and total;
        evaluations left out. Call after train()."""
        parts, steps = self.part_seconds, max(self.loop.env_steps - self.start_steps, 1)
        total = self.train_seconds - self.eval_seconds
        split = {"plan": parts["plan"], "act": parts["act"] - parts["plan"], "env": parts["env"],
                 "observe": parts["observe"], "update": parts["update"]}
        split["rest"] = total - sum(split.values())
        split["total"] = total
        return {name: 1000 * seconds / steps for name, seconds in split.items()}

    def _window_plan(self, step: Step) -> None:
        plan, task, window = step.action.plan, step.action.task, self.window
        window["actor/energy_before"].append(plan.energy_before.mean().item())
        window["actor/energy_after"].append(plan.energy_after.mean().item())
        window["actor/energy_reduction"].append((plan.energy_before - plan.energy_after).mean().item())
        plan_ms = 1000 * plan.plan_time_s / self.loop.num_envs
        window["actor/plan_time_ms"].append(plan_ms)
        self.plan_times_ms.append(plan_ms)
        window["actor/mode"].append(1.0 if plan.mode == "mode1" else 2.0)
        self.mode1_steps += int(step.valid.sum() + step.dropped.sum()) if plan.mode == "mode1" else 0
        if self.agent.configurator.state.gap is not None:
            window["configurator/mode1_gap"].append(self.agent.configurator.state.gap)
        window["configurator/horizon"].append(task.horizon)
        window["configurator/iterations"].append(task.iterations)

    def train(self, until: int | None = None, callback: Callback | Callable | None = None,
              close: bool = True) -> dict[str, float]:
        """Run the schedule to its end, or (an agent run) to env step `until`, saving a checkpoint at the end.
        callback: a Callback, or a function called as on_step; either may stop the run. close=False keeps the
        envs and the TensorBoard writer open for another call (ami.api)."""
        self.until = self.cfg.train.total_steps if until is None else until
        self.callback = callback if callback is None or isinstance(callback, Callback) else FunctionCallback(callback)
        bar = tqdm(total=self._total(), initial=self._progress(), disable=not (self.cfg.progress and self.group.main),
                   desc=f"{self.cfg.env.name}/{self.cfg.agent.name} s{self.cfg.seed}",
                   unit="update" if self.cfg.reward_free.enabled and self.learner.updates else "step")
        self.start_time, self.start_progress = time.perf_counter(), self._progress()
        self.start_steps, self.eval_seconds = self.loop.env_steps, 0.0
        self.part_seconds.clear()
        self._last_rate = (self.start_time, self.start_progress, self.eval_seconds)
        self._stop_requested = self._stop_agreed = False
        main_thread = threading.current_thread() is threading.main_thread()
        # torchrun passes Ctrl-C on to its workers as SIGTERM: a rank stops on either, with a checkpoint.
        signals = [signal.SIGINT] + ([signal.SIGTERM] if self.group.distributed else []) if main_thread else []
        previous = {number: signal.signal(number, self._request_stop) for number in signals}
        try:
            if self.cfg.reward_free.enabled:
                reward_free.train_offline(self, bar)
            else:
                self._interact(bar)
            self.save()
        except KeyboardInterrupt:
            self.save()
            if self.group.main:
                launcher = f"torchrun --nproc-per-node {self.group.world_size} -m ami.cli" if self.group.distributed \
                    else "ami"
                tqdm.write(f"interrupted at {self.position()}; resume with: {launcher} train --resume {self.group_dir}")
            raise
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            bar.close()
            if close:
                self.close()
        self.train_seconds = time.perf_counter() - self.start_time
        return {"step": self.loop.env_steps, "updates": self.learner.updates, "last_return": self.last_return,
                "train_seconds": self.train_seconds, **self.health}

    def _request_stop(self, signum: int, frame: object) -> None:
        """Ctrl-C: stop after the current step, between updates, so the checkpoint is whole (raised from deep in
        torch's C++ calls, a KeyboardInterrupt can also be lost). A second Ctrl-C stops at once."""
        if self._stop_requested and not self.group.distributed:  # a group's ranks stop together or not at all
            raise KeyboardInterrupt
        self._stop_requested = True

    def check_stop(self) -> None:
        if self._stop_agreed if self.group.distributed else self._stop_requested:
            raise KeyboardInterrupt

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.loop.envs.close()
        self.group.close()

    def position(self) -> str:
        """Where the run stands: "step N" (env steps), or a reward-free run past its collection "update N"."""
        if self.cfg.reward_free.enabled and self.learner.updates:
            return f"update {self.learner.updates}"
        return f"step {self.loop.env_steps}"

    def _total(self) -> int:
        rf = self.cfg.reward_free
        return rf.transitions + rf.updates + rf.predictor_updates + rf.critic_updates if rf.enabled \
            else self.until

    def _progress(self) -> int:
        return self.loop.env_steps + self.learner.updates if self.cfg.reward_free.enabled else self.loop.env_steps

    def _interact(self, bar: tqdm) -> None:
        """Seed steps, pretraining, then planning with updates, evaluations and checkpoints."""
        train = self.cfg.train
        stop = False
        while self.loop.env_steps < self.until and not stop:
            self.check_stop()
            before = self.loop.env_steps
            step = self.env_step(random=before < train.seed_steps)
            after = self.loop.env_steps
            if self.callback is not None:
                if step.action.plan is not None:  # else every env only reset
                    stop = self.callback.on_step(self, step) is False
                    stop = any([self.callback.on_episode(self, episode) is False for episode in step.finished]) \
                        or stop
                stop = self.group.any(stop)
            self.last_return = self.episode_log.last_return
            stats: dict = {}
            start = time.perf_counter()
            if before < train.seed_steps <= after:
                for _ in range(train.pretrain_updates):
                    stats = self.learner.update()
            if after > train.seed_steps:  # in a group, per env step of each rank
                self.update_credit += (after - max(before, train.seed_steps)) * train.updates_per_round \
                    / (train.update_every * self.group.world_size)
                while self.update_credit >= 1:
                    stats = self.learner.update()
                    self.update_credit -= 1
            self.part_seconds["update"] += time.perf_counter() - start
            if crossed(before, after, train.log_every):
                self._log_window(stats, bar)
            if crossed(before, after, train.eval_every) and self.group.main:
                self.run_eval()
            if crossed(before, after, train.checkpoint_every) and self.checkpoint_due is None:
                self.checkpoint_due = after
            # Once every episode has ended, so that the resumed run is this one; or, where episodes never end
            # together, checkpoint_every steps later (a resumed run then closes the running ones as truncated).
            if self.checkpoint_due is not None and (self.group.all(self.loop.between_episodes)
                                                    or after - self.checkpoint_due >= train.checkpoint_every):
                self.save()
            bar.update(after - before)

    def current_rate(self) -> float:
        """Env steps (a reward-free run: updates) per second since the last call, evaluations left out."""
        now, progress = time.perf_counter(), self._progress()
        then, before, eval_before = self._last_rate
        self._last_rate = (now, progress, self.eval_seconds)
        return (progress - before) / max(now - then - (self.eval_seconds - eval_before), 1e-9)

    def _log_window(self, stats: dict, bar: tqdm) -> None:
        if self.logger is None:  # a rank other than 0: rank 0 logs for the group
            self.window.clear()
            self.agent.repairs.take()
            return
        step = self.loop.env_steps
        self.logger.scalar("charts/sps", self.current_rate(), step)
        self.logger.scalars(stats, step)
        for tag, values in self.window.items():
            self.logger.scalar(tag, float(np.mean(values)), step)
        self.window.clear()
        for name, count in self.agent.repairs.take().items():
            self.logger.scalar(f"charts/repairs/{name}", count, step)
        self.logger.scalar("charts/nonfinite_dropped", self.loop.dropped, step)
        self.logger.scalar("memory/size", len(self.agent.memory), step)
        for name, weight in self.agent.configurator.weights.items():
            self.logger.scalar(f"configurator/weight/{name}", weight, step)
        if np.isfinite(self.last_return):  # tqdm shows the current speed itself
            bar.set_postfix(ret=f"{self.last_return:.0f}")

    def run_eval(self) -> None:
        start = time.perf_counter()
        result = evaluate(self.agent, self.cfg.env, self.cfg.train.eval_episodes)
        self.eval_seconds += time.perf_counter() - start
        step = self.loop.env_steps
        self.logger.scalar("eval/return_mean", result.mean, step)
        self.logger.scalar("eval/return_std", result.std, step)
        self.logger.scalar("eval/length_mean", float(result.lengths.mean()), step)
        self.logger.scalar("eval/cost_mean", float(result.costs.mean()), step)
        self.logger.scalar("eval/interventions_mean", float(result.interventions.mean()), step)
        runlog.append_eval(self.run_dir, step, result)
        self._eval_figures(step)
        cost = f", cost {result.costs.mean():.2f}" if result.costs.any() else ""
        tqdm.write(f"step {step}: eval return {result.mean:.1f} ± {result.std:.1f}{cost}")

    def _eval_figures(self, step: int) -> None:
        """The imagined-vs-real plot of a vector env, and with train.eval_video an episode as video."""
        agent, env = self.agent, self.cfg.env
        picture = figures.imagined_vs_real(agent, self.cfg.agent.actor.horizon, seed=self.cfg.seed + step)
        if picture is not None:
            self.logger.image("world_model/imagined_vs_real", picture, step)
        if self.cfg.train.eval_video:
            seed = EVAL_SEED + self.cfg.train.eval_episodes  # a start the scored episodes did not use
            frames, _ = figures.render_episode(agent, env, seed, torch.Generator().manual_seed(seed))
            self.logger.video("eval/video", *figures.gif(frames, fps=30), step)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        agent, loop = self.agent, self.loop
        return {
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            **agent_state(agent),
            "learner": self.learner.state_dict(),
            "memory": agent.memory.state_dict(),
            "loop": {"env_steps": loop.env_steps, "episodes": loop.episodes, "dropped": loop.dropped,
                     # Environments mid-episode: resuming closes their stretch in memory at this observation.
                     "mid_episode": torch.as_tensor(agent.memory.open.clone()),
                     **dict(zip(("obs", "vector"), storable_observation(loop.obs), strict=True))},
            "trainer": {"update_credit": self.update_credit, "checkpoint_due": self.checkpoint_due,
                        "world_size": self.group.world_size,
                        "window": dict(self.window), "episode_log": self.episode_log.state_dict()},
            "rng": {"python": random.getstate(), "numpy": runlog.numpy_rng_state(),
                    "torch": torch.get_rng_state(), "plan": self.plan_generator.get_state(),
                    "envs": [runlog.generator_state(env.unwrapped.np_random) for env in loop.envs.envs]},
        }

    def save(self) -> Path:
        self.checkpoint_due = None
        return save_checkpoint(self.state_dict(), self.run_dir)

    def load(self) -> None:
        state, path = load_checkpoint(self.run_dir)
        saved_size, group = state["trainer"].get("world_size", 1), self.group
        if saved_size != group.world_size:
            raise CheckpointError(f"{path}: the run was trained by {saved_size} process(es); resume it with as "
                                  f"many (torchrun --nproc-per-node {saved_size}), not {group.world_size}")
        steps = int(state["loop"]["env_steps"])
        if group.distributed and not group.all(steps == group.broadcast(steps)):
            raise CheckpointError(f"{path}: rank {group.rank}'s checkpoint is at env step {steps}, another rank's "
                                  "is not (a rank stopped while the group saved); resume from a copy of an earlier "
                                  "run directory")
        load_agent_state(self.agent, state, path, self.cfg)
        self.learner.load_state_dict(state["learner"])
        self.agent.memory.load_state_dict(state["memory"])
        loop, saved = self.loop, state["loop"]
        self.agent.memory.end_segments(saved["mid_episode"], saved["obs"], saved["vector"])
        loop.env_steps, loop.episodes, loop.dropped = saved["env_steps"], saved["episodes"], saved["dropped"]
        trainer = state["trainer"]
        self.update_credit, self.checkpoint_due = trainer["update_credit"], trainer["checkpoint_due"]
        self.window = defaultdict(list, trainer["window"])
        self.episode_log.load_state_dict(trainer["episode_log"])
        rng = state["rng"]
        random.setstate(rng["python"])
        runlog.set_numpy_rng_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        self.plan_generator.set_state(rng["plan"].cpu())
        for env, env_state in zip(loop.envs.envs, rng["envs"], strict=True):
            runlog.set_generator_state(env.unwrapped.np_random, env_state)
        # Interrupted episodes cannot be continued: every environment starts a fresh one from its own generator.
        loop.reset(seed=None)

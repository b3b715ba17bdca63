"""Training: collect with the agent, update from memory, log, evaluate, checkpoint, resume."""

from __future__ import annotations

import csv
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ami.build import build_agent, parameter_counts, resolve_device
from ami.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ami.envs import make_env, observation_names
from ami.evaluate import evaluate
from ami.learner import Learner
from ami.logger import Logger
from ami.messages import Plan, Task
from modules.cost import GuardrailError


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


class Trainer:
    """Owns one run: its env, agent, learner, logger, counters and RNGs."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, resume: bool = False,
                 read_only: bool = False) -> None:
        """resume: load the run's latest checkpoint. read_only: only inspect it (ami eval): no
        logger, nothing in the run directory touched."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.env = make_env(cfg.env)
        agent_cfg = OmegaConf.to_object(cfg.agent)
        self.agent = build_agent(agent_cfg, self.env.observation_space, self.env.action_space.shape[0],
                                 observation_names(cfg.env, self.env), self.device)
        self.learner = Learner(self.agent, agent_cfg, cfg.seed)
        self.plan_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.action_rng = np.random.default_rng(cfg.seed)  # seed-phase actions
        self.step = 0
        self.episode = 0
        self.checkpoint_due = False
        self.obs: np.ndarray | None = None
        self.episode_stats: dict[str, float] = defaultdict(float)
        self.window: dict[str, list[float]] = defaultdict(list)
        self.plan_times_ms: list[float] = []  # every training-time planning call of this process
        # Ground truth from the env (info["cost"], as in Safety-Gymnasium) and the shield's work,
        # over the whole run.
        self.safety_totals: dict[str, float] = {"cost": 0.0, "interventions": 0.0, "fallbacks": 0.0}
        self.last_return = float("nan")
        if resume:
            self.load(latest_checkpoint(self.run_dir))
            if not read_only:
                self._drop_rows_after(self.step)
                OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)  # with any new overrides
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
            self.obs, _ = self.env.reset(seed=cfg.seed)
        self.logger: Logger | None = None
        if not read_only:
            # Events at the checkpoint step were written before it was saved: keep them.
            self.logger = Logger(self.run_dir, purge_step=self.step + 1 if resume else None)
            if not resume:
                self._log_hparams()

    # -- the loop -------------------------------------------------------------------------------
    def collect(self) -> bool:
        """One env step: act, step, score, remember. Returns True at an episode's end."""
        agent, train = self.agent, self.cfg.train
        if self.obs is None:  # a new episode starts; its reset draws from the env's own RNG
            self.obs, _ = self.env.reset()
            agent.reset()
        if self.step < train.seed_steps:  # random actions, shielded like any other
            proposed = self.action_rng.uniform(-1.0, 1.0, self.env.action_space.shape).astype(np.float32)
            percept = agent.perceive(self.obs[None])
            decision = agent.shield_actions(percept.observation.cpu().numpy(), proposed[None], percept)
            action, latent, planned, energy = decision.actions[0].numpy(), percept.state, False, float("nan")
        else:
            actions, percept, task, plan, decision = agent.act(self.obs[None], explore=True,
                                                               generator=self.plan_generator)
            action, latent, planned, energy = actions[0], percept.state, True, plan.energy_after[0].item()
            self._window_plan(plan, task)
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        record = agent.observe(self.step, self.episode, self.obs, action, float(reward), next_obs,
                               terminated, truncated, info, latent, planned, energy)
        weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
        self.episode_stats["return"] += float(reward)
        self.episode_stats["length"] += 1
        self.episode_stats["cost"] += float((record.cost_terms * weights).sum())
        safety = {"cost": float(info.get("cost", 0.0)), "interventions": float(decision.intervened[0]),
                  "fallbacks": float(decision.fallback[0])}
        for key, value in safety.items():
            self.episode_stats[f"safety/{key}"] += value
            self.safety_totals[key] += value
        self.window["safety/intervention_rate"].append(safety["interventions"])
        self.window["safety/ego_rejection_rate"].append(float(decision.ego_rejected[0]))
        self.window["safety/world_model_rejection_rate"].append(float(decision.world_model_rejected[0]))
        for name, value in zip(agent.cost.intrinsic.term_names, record.cost_terms.tolist(), strict=True):
            self.episode_stats[f"term/{name}"] += value
        self.obs = next_obs
        self.step += 1
        return bool(terminated or truncated)

    def _window_plan(self, plan: Plan, task: Task) -> None:
        self.window["actor/energy_before"].append(plan.energy_before.mean().item())
        self.window["actor/energy_after"].append(plan.energy_after.mean().item())
        self.window["actor/energy_reduction"].append((plan.energy_before - plan.energy_after).mean().item())
        self.window["actor/plan_time_ms"].append(1000 * plan.plan_time_s)
        self.plan_times_ms.append(1000 * plan.plan_time_s)
        self.window["actor/mode"].append(1.0 if plan.mode == "mode1" else 2.0)
        self.window["configurator/horizon"].append(task.horizon)
        self.window["configurator/iterations"].append(task.iterations)

    def _end_episode(self) -> None:
        stats, step = self.episode_stats, self.step
        self.last_return = stats["return"]
        self.logger.scalar("charts/episodic_return", stats["return"], step)
        self.logger.scalar("charts/episodic_length", stats["length"], step)
        self.logger.scalar("charts/episodic_cost", stats["cost"], step)
        for key, value in stats.items():
            if key.startswith("term/"):
                self.logger.scalar(f"cost/intrinsic/{key[5:]}", value / max(stats["length"], 1), step)
        self.logger.scalar("safety/episode_cost", stats["safety/cost"], step)
        self.logger.scalar("safety/interventions_per_episode", stats["safety/interventions"], step)
        self.logger.scalar("safety/fallbacks_per_episode", stats["safety/fallbacks"], step)
        self.logger.scalar("safety/cumulative_cost", self.safety_totals["cost"], step)
        self._append_row("episodes.csv", ["step", "episode", "return", "length", "cost", "interventions", "fallbacks"],
                         [step, self.episode, f"{stats['return']:.3f}", int(stats["length"]),
                          f"{stats['safety/cost']:.1f}", int(stats["safety/interventions"]),
                          int(stats["safety/fallbacks"])])
        self.episode_stats = defaultdict(float)
        self.episode += 1
        self.obs = None

    def train(self) -> dict[str, float]:
        if self.logger is None:
            raise RuntimeError(f"{self.run_dir}: opened read-only (for evaluation); it cannot train")
        cfg = self.cfg.train
        bar = tqdm(total=cfg.total_steps, initial=self.step, disable=not self.cfg.progress,
                   desc=f"{self.cfg.env.name}/{self.cfg.agent.name} s{self.cfg.seed}", unit="step")
        start_time, start_step = time.perf_counter(), self.step
        stats: dict = {}
        try:
            while self.step < cfg.total_steps:
                episode_done = self.collect()
                if self.step == cfg.seed_steps:
                    for _ in range(cfg.pretrain_updates):
                        stats = self.learner.update()
                if self.step > cfg.seed_steps and self.step % cfg.update_every == 0:
                    for _ in range(cfg.updates_per_round):
                        stats = self.learner.update()
                if self.step % cfg.log_every == 0:
                    sps = (self.step - start_step) / (time.perf_counter() - start_time)
                    self._log_window(stats, sps)
                    bar.set_postfix(sps=f"{sps:.0f}", ret=f"{self.last_return:.0f}")
                if self.step % cfg.eval_every == 0:
                    self.run_eval()
                if self.step % cfg.checkpoint_every == 0:
                    self.checkpoint_due = True
                if episode_done:
                    self._end_episode()
                    if self.checkpoint_due:
                        self.save()
                bar.update(1)
            self.save()
        except KeyboardInterrupt:
            self.save()
            bar.write(f"interrupted at step {self.step}; resume with: ami train --resume {self.run_dir}")
            raise
        finally:
            bar.close()
            self.logger.close()
            self.env.close()
        return {"step": self.step, "last_return": self.last_return}

    def _log_window(self, stats: dict, sps: float) -> None:
        step = self.step
        self.logger.scalar("charts/sps", sps, step)
        self.logger.scalars(stats, step)
        for tag, values in self.window.items():
            self.logger.scalar(tag, float(np.mean(values)), step)
        self.window.clear()
        self.logger.scalar("memory/size", len(self.agent.memory), step)
        for name, weight in self.agent.configurator.weights.items():
            self.logger.scalar(f"configurator/weight/{name}", weight, step)

    def run_eval(self) -> None:
        result = evaluate(self.agent, self.cfg.env, self.cfg.train.eval_episodes)
        self.logger.scalar("eval/return_mean", result.mean, self.step)
        self.logger.scalar("eval/return_std", result.std, self.step)
        self.logger.scalar("eval/length_mean", float(result.lengths.mean()), self.step)
        self.logger.scalar("eval/cost_mean", float(result.costs.mean()), self.step)
        self.logger.scalar("eval/interventions_mean", float(result.interventions.mean()), self.step)
        self._append_row("eval.csv", ["step", "return_mean", "return_std", "returns", "costs", "interventions"],
                         [self.step, f"{result.mean:.2f}", f"{result.std:.2f}",
                          " ".join(f"{r:.1f}" for r in result.returns), " ".join(f"{c:g}" for c in result.costs),
                          " ".join(str(int(i)) for i in result.interventions)])
        cost = f", cost {result.costs.mean():.2f}" if result.costs.any() else ""
        tqdm.write(f"step {self.step}: eval return {result.mean:.1f} ± {result.std:.1f}{cost}")

    def _append_row(self, name: str, header: list[str], row: list) -> None:
        path = self.run_dir / name
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(header)
            writer.writerow(row)

    def _drop_rows_after(self, step: int) -> None:
        """Rows an interrupted run wrote past its last checkpoint are redone by the resumed run."""
        for name in ("eval.csv", "episodes.csv"):
            path = self.run_dir / name
            if path.exists():
                rows = list(csv.reader(path.open()))
                kept = rows[:1] + [row for row in rows[1:] if int(row[0]) <= step]
                with path.open("w", newline="") as f:
                    csv.writer(f).writerows(kept)

    def _log_hparams(self) -> None:
        flat = {}
        for key in ("seed", "agent.name", "env.id", "agent.actor.planner", "agent.actor.horizon",
                    "agent.actor.iterations", "agent.actor.candidates", "agent.perception.latent_dim",
                    "agent.perception.target", "agent.world_model.rollout_horizon", "agent.shield.enabled",
                    "train.total_steps"):
            flat[key] = OmegaConf.select(self.cfg, key)
        self.logger.hparams(flat, {"eval/return_mean": float("nan")})

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        agent = self.agent
        return {
            "version": 1,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "intrinsic_cost": agent.cost.intrinsic.describe(),
            "shield": agent.shield.describe(),
            "perception": agent.perception.state_dict(),
            "world_model": agent.world_model.state_dict(),
            "critic": agent.cost.critic.state_dict(),
            "policy": agent.actor.policy.state_dict(),
            "configurator": {"weights": agent.configurator.weights,
                             "policy_error": agent.configurator.policy_error},
            "actor_previous": agent.actor.previous,
            "learner": self.learner.state_dict(),
            "memory": agent.memory.state_dict(),
            "counters": {"step": self.step, "episode": self.episode},
            "safety_totals": dict(self.safety_totals),
            "mid_episode": self.obs is not None,
            "episode_stats": dict(self.episode_stats),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(), "plan": self.plan_generator.get_state(),
                    "action": self.action_rng.bit_generator.state,
                    "env": self.env.unwrapped.np_random.bit_generator.state},
        }

    def save(self) -> Path:
        self.checkpoint_due = False
        return save_checkpoint(self.state_dict(), self.run_dir / "checkpoints" / "latest.pt")

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, self.device)
        agent = self.agent
        guardrails = [t for t in agent.cost.intrinsic.describe() if t[3]]
        saved = [tuple(t) for t in state["intrinsic_cost"] if t[3]]
        if saved != guardrails:
            raise GuardrailError(f"{path}: its guardrails {saved} differ from this configuration's "
                                 f"{guardrails}; guardrails cannot be changed by loading a checkpoint")
        if tuple(state["shield"]) != agent.shield.describe():
            raise GuardrailError(f"{path}: its shield {state['shield']} differs from this configuration's "
                                 f"{agent.shield.describe()}; the shield cannot be changed by loading a checkpoint")
        agent.perception.load_state_dict(state["perception"])
        agent.world_model.load_state_dict(state["world_model"])
        agent.cost.critic.load_state_dict(state["critic"])
        agent.actor.policy.load_state_dict(state["policy"])
        # The checkpoint's weights, then this configuration's explicit ones on top: a weight given
        # when resuming (`agent.configurator.weights.effort=0.5`) takes effect.
        explicit = dict(self.cfg.agent.configurator.weights)
        for name, weight in {**state["configurator"]["weights"], **explicit}.items():
            agent.configurator.set_weight(name, weight)
        agent.configurator.report(policy_error=state["configurator"]["policy_error"])
        agent.actor.previous = state["actor_previous"]
        self.learner.load_state_dict(state["learner"])
        agent.memory.load_state_dict(state["memory"])
        self.step, self.episode = state["counters"]["step"], state["counters"]["episode"]
        self.safety_totals = dict(state["safety_totals"])
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"].cpu())
        self.plan_generator.set_state(rng["plan"].cpu())
        self.action_rng.bit_generator.state = rng["action"]
        self.env.unwrapped.np_random.bit_generator.state = rng["env"]
        if state["mid_episode"]:
            # The interrupted episode cannot be continued: close it as truncated (the critic still
            # bootstraps from its last state) and start a fresh one.
            agent.memory.mark_truncated_last()
            self.episode += 1
        self.obs = None


def describe(trainer: Trainer) -> str:
    counts = parameter_counts(trainer.agent)
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    actor = trainer.agent.actor
    planning = f"planner: {actor.config.planner}"
    if actor.energy.compiled:
        planning += ", torch.compile'd (each new batch size compiles on first use: about a minute cold)"
    shield = trainer.agent.shield
    if shield.active:
        checks = ["ego model " + trainer.cfg.agent.shield.ego.kind] if shield.ego is not None else []
        checks += ["world model (once trained)"] if shield.check_world_model else []
        guard = (f"shield: on, guardrails {sorted(trainer.agent.cost.intrinsic.guardrail_names)}, checked by "
                 f"{' and '.join(checks) or 'nothing'}, fallback {shield.fallback_kind}")
    else:
        guard = "shield: off" + ("" if trainer.agent.cost.intrinsic.guardrail_names else " (no guardrail terms)")
    return f"parameters: {sum(counts.values()):,} ({parts}); device: {trainer.device}\n{planning}\n{guard}"

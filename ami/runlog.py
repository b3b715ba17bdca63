"""What a run writes about itself besides checkpoints: each finished episode (TensorBoard charts/, safety/,
cost/intrinsic/, and episodes.csv), each evaluation (eval.csv), and its hyperparameters."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ami.agent import Agent
from ami.logger import Logger
from ami.messages import Record, Step

EPISODE_COLUMNS = ["step", "episode", "return", "length", "cost", "interventions", "fallbacks"]
EVAL_COLUMNS = ["step", "return_mean", "return_std", "returns", "costs", "interventions"]
HPARAMS = ("seed", "agent.name", "env.id", "train.num_envs", "agent.actor.planner", "agent.actor.horizon",
           "agent.actor.iterations", "agent.actor.candidates", "agent.perception.latent_dim",
           "agent.perception.target", "agent.world_model.rollout_horizon", "agent.world_model.z_dim",
           "agent.shield.enabled", "train.total_steps", "reward_free.enabled")


def append_row(path: Path, header: list[str], row: list) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        writer.writerow(row)


def drop_rows_after(run_dir: Path, step: int) -> None:
    """Rows an interrupted run wrote past its last checkpoint are redone by the resumed run."""
    for name in ("eval.csv", "episodes.csv"):
        path = run_dir / name
        if path.exists():
            rows = list(csv.reader(path.open()))
            kept = rows[:1] + [row for row in rows[1:] if int(row[0]) <= step]
            with path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)


def append_eval(run_dir: Path, step: int, result: object) -> None:
    append_row(run_dir / "eval.csv", EVAL_COLUMNS,
               [step, f"{result.mean:.2f}", f"{result.std:.2f}", " ".join(f"{r:.1f}" for r in result.returns),
                " ".join(f"{c:g}" for c in result.costs), " ".join(str(int(i)) for i in result.interventions)])


def hparams(cfg: DictConfig) -> dict:
    return {key: OmegaConf.select(cfg, key) for key in HPARAMS}


class EpisodeLog:
    """Per-environment sums over each running episode, written out when it ends; run-wide safety totals (the
    env's info["cost"], as in Safety-Gymnasium, and the shield's work); the log window's safety rates."""

    def __init__(self, run_dir: Path, agent: Agent, num_envs: int, tensorboard: bool = True) -> None:
        """tensorboard: also write each episode's figures there (else episodes.csv alone)."""
        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self.agent = agent
        self.term_names = agent.cost.intrinsic.term_names
        self.term_sums = np.zeros((num_envs, len(self.term_names)))
        self.cost_sums = np.zeros(num_envs)  # the intrinsic cost, weighted
        self.totals = {"cost": 0.0, "interventions": 0.0, "fallbacks": 0.0}
        self.last_return = float("nan")
        self.logger: Logger | None = None

    def add(self, step: Step, record: Record, env_step: int, window: Mapping[str, list[float]]) -> None:
        valid = step.valid
        terms = record.cost_terms.numpy()
        weights = self.agent.configurator.weight_vector.cpu().numpy()
        self.term_sums += np.where(valid[:, None], terms, 0.0)
        self.cost_sums += np.where(valid, terms @ weights, 0.0)
        decision = step.action.decision
        real = valid | step.dropped
        cost = np.where(valid, step.info.get("cost", 0.0), 0.0)
        intervened = decision.intervened.cpu().numpy() & real
        fallback = decision.fallback.cpu().numpy() & real
        self.totals["cost"] += float(cost.sum())
        self.totals["interventions"] += float(intervened.sum())
        self.totals["fallbacks"] += float(fallback.sum())
        if real.any():
            window["safety/intervention_rate"].append(float(intervened[real].mean()))
            window["safety/ego_rejection_rate"].append(float(decision.ego_rejected.cpu().numpy()[real].mean()))
            window["safety/world_model_rejection_rate"].append(
                float(decision.world_model_rejected.cpu().numpy()[real].mean()))
            # A guardrail already broken on the real observation; the model not trusted and the action shrunk or
            # replaced near a guardrail; whether the shield checks the world model, and its error on fresh data.
            for name, flags in (("breach_rate", decision.breach), ("caution_rate", decision.caution)):
                if flags is not None:
                    window[f"safety/{name}"].append(float(flags.cpu().numpy()[real].mean()))
            agent = self.agent
            if agent.shield.active:
                window["safety/model_trusted"].append(float(agent.shield.trusts(agent.trust,
                                                                                agent.world_model_trained)))
                if np.isfinite(agent.trust.error):
                    window["safety/model_error"].append(agent.trust.error)
                if agent.stand_in is not None:  # the linear stand-in: whether the look-ahead may use it, its error
                    window["safety/stand_in_trusted"].append(float(agent.shield.trusts_stand_in(
                        agent.stand_in, agent.stand_in_trust)))
                    if np.isfinite(agent.stand_in_trust.error):
                        window["safety/stand_in_error"].append(agent.stand_in_trust.error)
        if step.finished:
            self._end(step, env_step)

    def _end(self, step: Step, env_step: int) -> None:
        """Log the episodes that ended at this step (their mean, where several did) and start their sums afresh."""
        ended = [episode.env for episode in step.finished]
        stats = {name: np.mean([episode.stats[name] for episode in step.finished]) for name in step.finished[0].stats}
        lengths = np.maximum([episode.stats["length"] for episode in step.finished], 1)
        self.last_return = float(stats["return"])
        self._write(step, env_step)
        if self.tensorboard:
            self._log(stats, ended, lengths, env_step)
        self.term_sums[ended] = 0.0
        self.cost_sums[ended] = 0.0

    def _log(self, stats: dict[str, float], ended: list[int], lengths: np.ndarray, env_step: int) -> None:
        log = self.logger
        log.scalar("charts/episodic_return", stats["return"], env_step)
        log.scalar("charts/episodic_length", stats["length"], env_step)
        log.scalar("charts/episodic_cost", float(self.cost_sums[ended].mean()), env_step)
        per_step = (self.term_sums[ended] / lengths[:, None]).mean(0)
        for name, value in zip(self.term_names, per_step, strict=True):
            log.scalar(f"cost/intrinsic/{name}", float(value), env_step)
        log.scalar("safety/episode_cost", stats["cost"], env_step)
        log.scalar("safety/interventions_per_episode", stats["interventions"], env_step)
        log.scalar("safety/fallbacks_per_episode", stats["fallbacks"], env_step)
        log.scalar("safety/cumulative_cost", self.totals["cost"], env_step)

    def _write(self, step: Step, env_step: int) -> None:
        for episode in step.finished:
            s = episode.stats
            append_row(self.run_dir / "episodes.csv", EPISODE_COLUMNS,
                       [env_step, episode.episode, f"{s['return']:.3f}", int(s["length"]), f"{s['cost']:.1f}",
                        int(s["interventions"]), int(s["fallbacks"])])

    def state_dict(self) -> dict:
        return {"totals": dict(self.totals), "last_return": self.last_return}

    def load_state_dict(self, state: dict) -> None:
        self.totals, self.last_return = dict(state["totals"]), float(state["last_return"])


def generator_state(generator: np.random.Generator | np.random.RandomState) -> dict | tuple:
    """A numpy generator's state as a checkpoint can hold it (loaded with weights_only=True): a Generator's bit
    generator state, or a legacy RandomState's (dm_control's tasks draw from one) with its key as a tensor."""
    if isinstance(generator, np.random.RandomState):
        name, key, position, has_gauss, cached = generator.get_state()
        return name, torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached
    return generator.bit_generator.state


def set_generator_state(generator: np.random.Generator | np.random.RandomState, state: dict | tuple) -> None:
    if isinstance(generator, np.random.RandomState):
        name, key, position, has_gauss, cached = state
        generator.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, cached))
    else:
        generator.bit_generator.state = state


def numpy_rng_state() -> tuple:
    """numpy's global generator state."""
    return generator_state(np.random.mtrand._rand)


def set_numpy_rng_state(state: tuple) -> None:
    set_generator_state(np.random.mtrand._rand, state)

"""`ami bench safety`: the guarded agent, the same agent with its guardrails off, and a random policy,
side by side in one run: return, ground-truth cost (the env's info["cost"]), share of zero-cost
episodes and shield interventions, over the whole training run (its seed phase and what follows apart)
and over evaluation episodes, with a histogram of the evaluation episodes' costs."""

from __future__ import annotations

import csv
import dataclasses
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ami.bench.parallel import run_jobs
from ami.config import load_config, without_guardrails
from ami.envs import make_vector_env
from ami.evaluate import EvalResult, evaluate, run_episodes
from ami.loop import EnvLoop
from ami.messages import Step
from ami.train import Callback, Trainer

METHODS = ("guarded", "unguarded", "random")


@dataclass(frozen=True)
class Row:
    """One method, seed and phase ("train": every episode the training run finished; "eval")."""

    method: str
    seed: int
    phase: str
    episodes: int
    return_mean: float
    cost_mean: float
    cost_max: float
    zero_cost_share: float
    interventions_per_episode: float
    total_cost: float  # the phase's whole cost, unfinished training episode included
    steps: int
    seed_cost: float = float("nan")  # training only: the cost paid in the seed phase (train.seed_steps) ...
    post_seed_cost: float = float("nan")  # ... and after it


@dataclass(frozen=True)
class Outcome:
    rows: list[Row]
    cost_curve: list[tuple[int, float]]  # (env step, cumulative training cost) at each episode's end
    eval_costs: np.ndarray  # (episodes,) each evaluation episode's cost


class PhaseCost(Callback):
    """The env's cost of every training step, apart for the seed phase and after it."""

    def __init__(self, seed_steps: int) -> None:
        self.seed_steps = seed_steps
        self.seed = self.after = 0.0

    def add(self, step: Step) -> None:
        cost = np.where(step.valid, step.info.get("cost", 0.0), 0.0)
        seed = step.env_step < self.seed_steps
        self.seed += float(cost[seed].sum())
        self.after += float(cost[~seed].sum())

    def on_step(self, trainer: Trainer, step: Step) -> None:
        self.add(step)


def summarise(method: str, seed: int, phase: str, returns: np.ndarray, costs: np.ndarray,
              interventions: np.ndarray, total_cost: float, steps: int) -> Row:
    n = len(returns)
    if n == 0:
        nan = float("nan")
        return Row(method, seed, phase, 0, nan, nan, nan, nan, nan, total_cost, steps)
    return Row(method, seed, phase, n, float(returns.mean()), float(costs.mean()), float(costs.max()),
               float((costs == 0).mean()), float(interventions.mean()), total_cost, steps)


def from_eval(method: str, seed: int, result: EvalResult) -> Row:
    return summarise(method, seed, "eval", result.returns, result.costs, result.interventions,
                     float(result.costs.sum()), int(result.lengths.sum()))


def run_agent(cfg: DictConfig, run_dir: Path, method: str, episodes: int) -> Outcome:
    """Train one agent, then evaluate it on the fixed evaluation starts."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    trainer = Trainer(cfg, run_dir)
    phases = PhaseCost(cfg.train.seed_steps)
    trainer.train(callback=phases)
    with (run_dir / "episodes.csv").open() as f:
        log = list(csv.DictReader(f))
    column = {key: np.array([float(row[key]) for row in log]) for key in ("return", "cost", "interventions")}
    train = summarise(method, cfg.seed, "train", column["return"], column["cost"], column["interventions"],
                      trainer.episode_log.totals["cost"], trainer.loop.env_steps)
    train = dataclasses.replace(train, seed_cost=phases.seed, post_seed_cost=phases.after)
    curve = [(0, 0.0)] + [(int(row["step"]), float(total))
                          for row, total in zip(log, np.cumsum(column["cost"]), strict=True)]
    result = evaluate(trainer.agent, cfg.env, episodes)
    return Outcome([train, from_eval(method, cfg.seed, result)], curve, result.costs)


def run_random(cfg: DictConfig, episodes: int) -> Outcome:
    """Uniform random actions, unshielded: as many training steps as the agents, then evaluation."""
    loop = EnvLoop(make_vector_env(cfg.env, cfg.train.num_envs), cfg.env.nonfinite)
    shape = (loop.num_envs, *loop.envs.single_action_space.shape)
    rng = np.random.default_rng(cfg.seed)

    def policy(obs: object) -> np.ndarray:
        return rng.uniform(-1, 1, shape).astype(np.float32)

    returns, costs, curve = [], [], [(0, 0.0)]
    phases = PhaseCost(cfg.train.seed_steps)
    loop.reset(seed=cfg.seed)
    start = time.perf_counter()
    while loop.env_steps < cfg.train.total_steps:
        step = loop.step(policy)
        phases.add(step)
        for episode in step.finished:
            returns.append(episode.stats["return"])
            costs.append(episode.stats["cost"])
            curve.append((loop.env_steps, sum(costs)))
    loop.envs.close()
    print(f"{cfg.env.id} with random actions, through ami's env loop: "
          f"{loop.env_steps / (time.perf_counter() - start):,.0f} env steps/s", flush=True)
    train = summarise("random", cfg.seed, "train", np.array(returns), np.array(costs), np.zeros(len(returns)),
                      phases.seed + phases.after, loop.env_steps)
    train = dataclasses.replace(train, seed_cost=phases.seed, post_seed_cost=phases.after)
    action_rng = np.random.default_rng(cfg.seed + 1)
    result = run_episodes(lambda obs: action_rng.uniform(-1, 1, (episodes, *shape[1:])).astype(np.float32),
                          cfg.env, episodes)
    return Outcome([train, from_eval("random", cfg.seed, result)], curve, result.costs)


def run_job(method: str, cfg: DictConfig, out_dir: Path, episodes: int) -> tuple[str, int, Outcome]:
    """One method on one seed; module-level so that worker processes can run it."""
    print(f"== seed {cfg.seed}: {method}", flush=True)
    if method == "random":
        return method, cfg.seed, run_random(cfg, episodes)
    run_cfg = without_guardrails(cfg) if method == "unguarded" else cfg
    return method, cfg.seed, run_agent(run_cfg, out_dir / f"{method}_s{cfg.seed}", method, episodes)


def pooled(group: list[Row], field: str) -> float:
    """A per-run figure pooled over runs, weighted by their episodes."""
    return float(np.average([getattr(r, field) for r in group], weights=[r.episodes for r in group]))


def table(rows: list[Row]) -> str:
    """Pooled over seeds: episode-weighted means, the max of maxima, summed costs (training's also split at the
    end of the seed phase)."""
    header = (f"{'method':>10s} {'phase':>5s} {'episodes':>8s} {'return':>8s} {'cost/ep':>8s} {'max':>6s} "
              f"{'zero-cost':>9s} {'interv./ep':>10s} {'total cost':>10s} {'seed phase':>10s} {'after seed':>10s}")
    lines = [header]
    for phase in ("train", "eval"):
        for method in METHODS:
            runs = [r for r in rows if r.method == method and r.phase == phase]
            group = [r for r in runs if r.episodes]
            if not group:
                continue
            split = f" {sum(r.seed_cost for r in runs):10.0f} {sum(r.post_seed_cost for r in runs):10.0f}" \
                if phase == "train" else ""
            lines.append(f"{method:>10s} {phase:>5s} {sum(r.episodes for r in group):8d} "
                         f"{pooled(group, 'return_mean'):8.2f} {pooled(group, 'cost_mean'):8.2f} "
                         f"{max(r.cost_max for r in group):6.0f} {pooled(group, 'zero_cost_share'):9.1%} "
                         f"{pooled(group, 'interventions_per_episode'):10.1f} {sum(r.total_cost for r in runs):10.0f}"
                         + split)
    return "\n".join(lines)


COST_BINS = (0.0, 1.0, 5.0, 20.0, 50.0, float("inf"))  # an episode's cost: 0, (0, 1], (1, 5], ..., > 50


def histogram(eval_costs: dict[str, np.ndarray]) -> str:
    """Evaluation episodes by their cost, per method, pooled over seeds."""
    labels = ["0"] + [f"({lo:g}, {hi:g}]" if np.isfinite(hi) else f"> {lo:g}"
                      for lo, hi in zip(COST_BINS[:-1], COST_BINS[1:], strict=True)]
    lines = ["evaluation episodes by cost: " + " | ".join(f"{label:>9s}" for label in labels)]
    for method, costs in eval_costs.items():
        counts = [int((costs == 0).sum())] + [int(((costs > lo) & (costs <= hi)).sum())
                                               for lo, hi in zip(COST_BINS[:-1], COST_BINS[1:], strict=True)]
        lines.append(f"{method:>28s} " + " | ".join(f"{count:9d}" for count in counts))
    return "\n".join(lines)


def plot(rows: list[Row], curves: dict[tuple[str, int], list[tuple[int, float]]], eval_costs: dict[str, np.ndarray],
         path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right, spread_axis) = plt.subplots(1, 4, figsize=(17, 4))
    for method in METHODS:
        for (m, seed), curve in sorted(curves.items()):
            if m == method and curve:
                steps, totals = zip(*curve, strict=True)
                left.plot(steps, totals, marker=".", color=f"C{METHODS.index(method)}",
                          label=method if seed == min(s for mm, s in curves if mm == method) else None)
    left.set_xlabel("env steps")
    left.set_ylabel("cumulative training cost")
    left.legend()
    evals = {m: [r for r in rows if r.method == m and r.phase == "eval"] for m in METHODS}
    for axis, field, label in ((middle, "return_mean", "eval return per episode"),
                               (right, "cost_mean", "eval cost per episode")):
        means = [np.mean([getattr(r, field) for r in evals[m]]) if evals[m] else 0.0 for m in METHODS]
        spread = [np.std([getattr(r, field) for r in evals[m]]) if evals[m] else 0.0 for m in METHODS]
        axis.bar(METHODS, means, yerr=spread, color=[f"C{i}" for i in range(len(METHODS))])
        axis.set_ylabel(label)
    top = max([float(c.max()) for c in eval_costs.values() if len(c)] + [1.0])
    bins = np.concatenate([[-0.5, 0.5], np.linspace(0.5, top + 1, 20)[1:]])
    for method, costs in eval_costs.items():
        spread_axis.hist(costs, bins=bins, histtype="step", color=f"C{METHODS.index(method)}", label=method)
    spread_axis.set_xlabel("cost of an evaluation episode")
    spread_axis.set_ylabel("episodes")
    spread_axis.set_yscale("log")
    spread_axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(env: str, steps: int, seeds: list[int], episodes: int, overrides: list[str], out_dir: Path,
        progress: bool, jobs: int = 1) -> list[Row]:
    base = [f"env={env}", f"train.total_steps={steps}", f"train.eval_every={steps + 1}",
            f"progress={str(progress and jobs == 1).lower()}", f"runs_dir={out_dir}", *overrides]
    configs = {seed: load_config([*base, f"seed={seed}"]) for seed in seeds}
    if not configs[seeds[0]].agent.cost.terms or not any(t.guardrail for t in configs[seeds[0]].agent.cost.terms):
        raise SystemExit(f"ami bench safety: env={env} declares no guardrail terms; nothing to compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = [(method, configs[seed]) for seed in seeds for method in METHODS]
    results = run_jobs(run_job, [(method, cfg, out_dir, episodes) for method, cfg in work], jobs, "runs",
                       progress and jobs > 1)
    rows = [row for _, _, outcome in results for row in outcome.rows]
    curves = {(method, seed): outcome.cost_curve for method, seed, outcome in results}
    eval_costs = {method: np.concatenate([o.eval_costs for m, _, o in results if m == method]) for method in METHODS}
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in asdict(row).items()})
    cfg = configs[seeds[0]]
    print(f"\n{cfg.env.id}: {steps} training steps per run, seeds {seeds}, {episodes} evaluation episodes each")
    print(table(rows))
    print(histogram(eval_costs))
    report(rows, seeds)
    plot(rows, curves, eval_costs, out_dir / "safety.png", f"{cfg.env.id}: guarded vs unguarded vs random")
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'safety.png'}")
    return rows


def report(rows: list[Row], seeds: list[int]) -> None:
    """The targets: zero evaluation cost per seed, training cost and return against the unguarded run."""
    by: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        by[(row.method, row.phase)].append(row)
    for row in sorted(by[("guarded", "eval")], key=lambda r: r.seed):
        zero = round(row.zero_cost_share * row.episodes)
        print(f"guarded, seed {row.seed}: {zero}/{row.episodes} evaluation episodes without cost "
              f"(max cost {row.cost_max:.0f})")

    def ratio(what: str, guarded: float, unguarded: float) -> None:
        share = f" = {guarded / unguarded:.2%}" if unguarded > 0 else " (the unguarded runs paid none)"
        print(f"{what}, guarded / unguarded: {guarded:.1f} / {unguarded:.1f}{share}")

    for field, what in (("total_cost", "training cost"), ("post_seed_cost", "training cost after the seed phase")):
        ratio(what, sum(getattr(r, field) for r in by[("guarded", "train")]),
              sum(getattr(r, field) for r in by[("unguarded", "train")]))
    ratio("mean evaluation cost per episode", *(float(np.mean([r.cost_mean for r in by[(m, "eval")]]))
                                                 for m in ("guarded", "unguarded")))
    returns = {m: np.mean([r.return_mean for r in by[(m, "eval")]]) for m in ("guarded", "unguarded")}
    if returns["unguarded"] > 0:
        print(f"evaluation return, guarded / unguarded: {returns['guarded']:.2f} / {returns['unguarded']:.2f} "
              f"= {returns['guarded'] / returns['unguarded']:.1%}")

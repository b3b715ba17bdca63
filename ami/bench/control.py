"""`ami bench control`: sample efficiency of ami against a peer (SAC), a second planner (MPPI), another setting
of itself (any overrides) or itself in N processes (torchrun), same env, same seeds, same evaluation starts, side
by side in one run."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ami.bench.parallel import run_jobs
from ami.config import load_config, load_saved
from ami.envs import make_env
from ami.evaluate import EvalResult, run_episodes
from ami.train import Trainer

PEERS = ("sac", "mppi", "none")
SPLIT = ("plan", "act", "env", "observe", "update", "rest", "total")  # Trainer.time_split's parts


@dataclass(frozen=True)
class Point:
    method: str
    seed: int
    step: int
    result: EvalResult
    plan_ms: float = float("nan")  # the run's median planning time per env step (nan for SAC)
    plan_ms_mean: float = float("nan")  # its mean: the whole planning time over the env steps
    steps_per_s: float = float("nan")  # the run's env steps per second of training, evaluations left out
    mode1_share: float = float("nan")  # the share of env steps Mode-1 acted on alone
    split: dict[str, float] = field(default_factory=dict)  # ms per env step by part of the training step (ami)


def peer_overrides(vs: str, mppi_budget: tuple[int, int]) -> list[str] | None:
    """The overrides that make ami's peer: MPPI at its budget, or the given key=value[,key=value] list; None for
    a peer that is not ami (SAC) or none."""
    if vs == "mppi":
        candidates, iterations = mppi_budget
        return ["agent.actor.planner=mppi", f"agent.actor.candidates={candidates}",
                f"agent.actor.iterations={iterations}"]
    if vs in ("sac", "none"):
        return None
    return vs.split(",")


def run_ami(cfg: DictConfig, run_dir: Path, label: str) -> list[Point]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    trainer = Trainer(cfg, run_dir)
    result = trainer.train()
    if not trainer.group.main:  # in a torchrun group, rank 0 evaluates and reports
        return []
    times = trainer.plan_times_ms
    plan_ms, plan_ms_mean = (float(np.median(times)), float(np.mean(times))) if times else (float("nan"),) * 2
    sps = trainer.loop.env_steps / max(result["train_seconds"] - trainer.eval_seconds, 1e-9)
    mode1 = trainer.mode1_steps / max(trainer.loop.env_steps - min(cfg.train.seed_steps, trainer.loop.env_steps), 1)
    split = trainer.time_split()
    points = []
    with (run_dir / "eval.csv").open() as f:
        for row in csv.DictReader(f):
            returns = np.array([float(r) for r in row["returns"].split()])
            zeros = np.zeros(len(returns))
            points.append(Point(label, cfg.seed, int(row["step"]), EvalResult(returns, zeros, zeros, zeros),
                                plan_ms, plan_ms_mean, sps, mode1, split))
    return points


def run_group(cfg: DictConfig, run_dir: Path, label: str, procs: int) -> list[Point]:
    """run_ami in `procs` processes started by torchrun on this machine; rank 0 hands back the points in a file.
    The group's env steps count as the run's (train.total_steps is the group's)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config, points = run_dir.with_name(f"{run_dir.name}.yaml"), run_dir.with_name(f"{run_dir.name}.points")
    OmegaConf.save(cfg, config, resolve=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                    "-m", "ami.bench.control", str(config), str(run_dir), label, str(points)], check=True)
    return pickle.loads(points.read_bytes())


def run_sac(cfg: DictConfig, progress: bool) -> list[Point]:
    """Stable-Baselines3 SAC with its defaults, evaluated deterministically on ami's start states."""
    try:
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError as error:  # an optional extra
        raise SystemExit("ami bench control --vs sac needs Stable-Baselines3: pip install -e '.[bench]'") from error

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    train = cfg.train
    points: list[Point] = []

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % train.eval_every == 0:
                result = run_episodes(lambda obs: self.model.predict(obs, deterministic=True)[0],
                                      cfg.env, train.eval_episodes)
                points.append(Point("sac", cfg.seed, self.num_timesteps, result))
            return True

    # SAC learns on its own env, stepped by Stable-Baselines3's loop; ami's loop only scores it.
    model = SAC("MlpPolicy", make_env(cfg.env), seed=cfg.seed, device="cpu", verbose=0)
    model.learn(total_timesteps=train.total_steps, callback=Evaluate(), progress_bar=progress)
    return points


def run_job(method: str, cfg: DictConfig, out_dir: Path, progress: bool, procs: int = 1) -> list[Point]:
    """One method on one seed (in `procs` processes); module-level so that worker processes can run it."""
    print(f"== seed {cfg.seed}: {method}", flush=True)
    if method == "sac":
        return run_sac(cfg, progress)
    if procs > 1:
        return run_group(cfg, out_dir / f"{method}_s{cfg.seed}", method, procs)
    name = method if method in ("ami", "mppi") else "peer"
    return run_ami(cfg, out_dir / f"{name}_s{cfg.seed}", method)


def seed_means(points: list[Point], method: str) -> dict[int, list[float]]:
    """eval step -> each seed's mean return, for one method."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for p in points:
        if p.method == method:
            by_step[p.step].append(p.result.mean)
    return by_step


def steps_to(points: list[Point], method: str, threshold: float) -> int | None:
    """First eval step at which the mean over seeds reaches threshold, and every later one too."""
    by_step = seed_means(points, method)
    steps = sorted(by_step)
    for i, step in enumerate(steps):
        if all(np.mean(by_step[s]) >= threshold for s in steps[i:]):
            return step
    return None


def table(points: list[Point], methods: list[str]) -> str:
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    for p in points:
        cells[(p.method, p.step)].append(p.result.mean)
    steps = sorted({p.step for p in points})
    lines = [f"{'step':>7s} " + " ".join(f"{m:>20s}" for m in methods)]
    for step in steps:
        row = []
        for m in methods:
            values = cells.get((m, step))
            row.append(f"{np.mean(values):9.1f} ± {np.std(values):7.1f}" if values else f"{'-':>20s}")
        lines.append(f"{step:7d} " + " ".join(f"{c:>20s}" for c in row))
    return "\n".join(lines)


def split_table(per_run: dict[str, dict[int, Point]]) -> str:
    """Each ami method's training step split into its parts, in ms per env step (mean over seeds)."""
    width = max(len("method"), *map(len, per_run))
    lines = ["\ntraining time per env step, ms (mean over seeds; plan: the planner; act: the rest of acting, "
             "perception and shield; observe: intrinsic cost and memory; update: the learner; rest: logging, "
             "checkpoints)",
             f"{'method':>{width}s} " + " ".join(f"{part:>8s}" for part in SPLIT)]
    for method, runs in per_run.items():
        means = [float(np.mean([p.split[part] for p in runs.values()])) for part in SPLIT]
        lines.append(f"{method:>{width}s} " + " ".join(f"{value:8.2f}" for value in means))
    return "\n".join(lines)


def plot(points: list[Point], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        by_step = seed_means(points, m)
        steps = sorted(by_step)
        mean = np.array([np.mean(by_step[s]) for s in steps])
        std = np.array([np.std(by_step[s]) for s in steps])
        ax.plot(steps, mean, marker="o", label=m)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (mean over seeds)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(env: str, steps: int, seeds: list[int], vs: str, eval_every: int, episodes: int,
        threshold: float | None, overrides: list[str], out_dir: Path, progress: bool,
        oracle: bool, mppi_budget: tuple[int, int] = (256, 6), peer_steps: int | None = None,
        jobs: int = 1, procs: int | None = None) -> list[Point]:
    """vs: "sac", "mppi", "none", or overrides key=value[,key=value] that make ami's peer (the same agent with
    train.num_envs=1, say). mppi_budget: (candidates, iterations) of the MPPI run. peer_steps: the peer's env-step
    budget when it differs from ami's (a model-free peer's longer run). jobs: runs at once, in processes.
    procs: the peer is the same ami in this many processes under torchrun (vs is then its label)."""
    if procs is not None:
        vs = f"ami_{procs}procs"
    from torch.utils.tensorboard import SummaryWriter

    common = [f"env={env}", f"train.eval_every={eval_every}", f"train.eval_episodes={episodes}",
              f"progress={str(progress and jobs <= 1).lower()}", f"runs_dir={out_dir}", *overrides]
    base = [*common, f"train.total_steps={steps}"]
    peer_base = [*common, f"train.total_steps={peer_steps or steps}",
                 *((peer_overrides(vs, mppi_budget) or []) if procs is None else [])]
    methods = ["ami", vs] if vs != "none" else ["ami"]
    calls = []
    for seed in seeds:
        calls.append(("ami", load_config([*base, f"seed={seed}"]), out_dir, progress and jobs <= 1))
        if vs != "none":
            calls.append((vs, load_config([*peer_base, f"seed={seed}"]), out_dir, progress and jobs <= 1, procs or 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [p for result in run_jobs(run_job, calls, jobs, "runs", progress and jobs > 1) for p in result]
    cfg = load_config(base)
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "step", "return_mean", "return_std", "plan_ms_median", "plan_ms_mean",
                         "steps_per_s", "mode1_share", *(f"ms_{part}" for part in SPLIT)])
        for p in points:
            writer.writerow([p.method, p.seed, p.step, f"{p.result.mean:.2f}", f"{p.result.std:.2f}",
                             f"{p.plan_ms:.2f}", f"{p.plan_ms_mean:.2f}", f"{p.steps_per_s:.2f}",
                             f"{p.mode1_share:.4f}", *(f"{p.split.get(part, float('nan')):.3f}" for part in SPLIT)])
    writer = SummaryWriter(str(out_dir / "tensorboard"))
    for p in points:
        writer.add_scalar(f"bench/{p.method}/s{p.seed}/return_mean", p.result.mean, p.step)
    writer.close()
    repeat = f"; a step is {cfg.env.action_repeat} env steps (env.action_repeat)" if cfg.env.action_repeat > 1 else ""
    print(f"\n{cfg.env.id}, {len(seeds)} seeds, {episodes} eval episodes each (mean ± std over seeds){repeat}")
    print(table(points, methods))
    if threshold is not None:
        reached = {m: steps_to(points, m, threshold) for m in methods}
        print(f"\nenv steps to reach {threshold} and stay there: "
              + ", ".join(f"{m} {s if s is not None else 'not reached'}" for m, s in reached.items()))
        if len(methods) == 2 and all(reached.values()):
            print(f"ratio {methods[1]} / {methods[0]}: {reached[methods[1]] / reached[methods[0]]:.2f}")
    ami_methods = [m for m in methods if m != "sac"]
    per_run = {m: {p.seed: p for p in points if p.method == m} for m in ami_methods}
    plan_ms = {m: float(np.median([p.plan_ms for p in runs.values()])) for m, runs in per_run.items()}
    plan_mean = {m: float(np.mean([p.plan_ms_mean for p in runs.values()])) for m, runs in per_run.items()}
    sps = {m: float(np.mean([p.steps_per_s for p in runs.values()])) for m, runs in per_run.items()}
    print("\nplanning time per env step while training, median (mean): "
          + ", ".join(f"{m} {ms:.1f} ({plan_mean[m]:.1f}) ms" for m, ms in plan_ms.items()))
    print("env steps per second while training (evaluations left out), mean over seeds: "
          + ", ".join(f"{m} {v:.1f}" for m, v in sps.items()))
    print("share of env steps Mode-1 acted on alone: "
          + ", ".join(f"{m} {np.mean([p.mode1_share for p in runs.values()]):.1%}" for m, runs in per_run.items()))
    print(split_table(per_run))
    if len(plan_ms) == 2:
        print(f"ratio ami / {vs}: planning time {plan_ms['ami'] / plan_ms[vs]:.2f} (mean "
              f"{plan_mean['ami'] / plan_mean[vs]:.2f}), env steps per second {sps['ami'] / sps[vs]:.2f}")
    if oracle:
        if cfg.env.id != "Pendulum-v1":
            print("(--oracle is for Pendulum-v1 only)")
        else:
            from ami.bench.oracle import true_dynamics_policy

            agent_cfg = OmegaConf.to_object(cfg.agent)
            result = run_episodes(true_dynamics_policy(agent_cfg.actor, agent_cfg.cost.discount),
                                  cfg.env, episodes)
            print(f"the same planner on the true dynamics, same starts: {result.mean:.1f} ± {result.std:.1f}")
    plot(points, methods, out_dir / "learning_curve.png", f"{cfg.env.id}: ami vs {vs}")
    print(f"wrote {out_dir / 'results.csv'}, {out_dir / 'learning_curve.png'}, {out_dir / 'tensorboard'}")
    return points


if __name__ == "__main__":  # one rank of run_group's torchrun: CONFIG RUN_DIR LABEL POINTS
    from ami.bench import control  # its Point, not this __main__'s, is the one run_group unpickles

    config_path, run_dir, label, points_path = sys.argv[1:5]
    result = control.run_ami(load_saved(config_path), Path(run_dir), label)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(points_path).write_bytes(pickle.dumps(result))

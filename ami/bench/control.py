"""`ami bench control`: sample efficiency of ami against a peer (SAC), a second planner (MPPI), another setting
of itself (any overrides) or itself in N processes (torchrun), same env, same seeds, same evaluation starts, side
by side in one run.

Every run keeps its folder under --out as it goes (ami's checkpoints and eval.csv, SAC's eval.csv), so a bench
cut short is taken on with --resume: each ami run goes on from its last checkpoint (to a longer --steps too), a
finished SAC run is read back and an unfinished one starts again (Stable-Baselines3 keeps no checkpoint here).
What each run's training took is kept per process in bench_segments.csv: its speed and wall-clock add up over them.
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ami.bench.parallel import run_jobs
from ami.bench.records import SPLIT, Point, check_out_dir, read_points, resumable, run_dir_of, write_segment
from ami.config import load_config, load_saved
from ami.envs import make_env
from ami.evaluate import run_episodes
from ami.runlog import append_eval
from ami.train import Trainer

PEERS = ("sac", "mppi", "none")


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


def run_ami(cfg: DictConfig, run_dir: Path, label: str, resume: bool = False) -> list[Point]:
    """Train one ami run (on from its checkpoint with resume) and read back its points."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    trainer = Trainer(cfg, run_dir, resume=resume)
    start = trainer.loop.env_steps
    result = trainer.train()
    if not trainer.group.main:  # in a torchrun group, rank 0 evaluates and reports
        return []
    if trainer.loop.env_steps > start:
        times = trainer.plan_times_ms
        seed_end = min(cfg.train.seed_steps, trainer.loop.env_steps)
        write_segment(run_dir, from_step=start, to_step=trainer.loop.env_steps,
                      train_seconds=result["train_seconds"] - trainer.eval_seconds,
                      wall_seconds=result["train_seconds"],
                      plan_ms_median=float(np.median(times)) if times else float("nan"),
                      plan_ms_mean=float(np.mean(times)) if times else float("nan"),
                      mode1_steps=trainer.mode1_steps, planned_steps=trainer.loop.env_steps - max(start, seed_end),
                      **{f"ms_{part}": value for part, value in trainer.time_split().items()})
    return read_points(run_dir, label, cfg.seed)


def run_group(cfg: DictConfig, run_dir: Path, label: str, procs: int, resume: bool) -> list[Point]:
    """run_ami in `procs` processes started by torchrun on this machine; rank 0 hands back the points in a file.
    The group's env steps count as the run's (train.total_steps is the group's)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config, points = run_dir.with_name(f"{run_dir.name}.yaml"), run_dir.with_name(f"{run_dir.name}.points")
    OmegaConf.save(cfg, config, resolve=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                    "-m", "ami.bench.control", str(config), str(run_dir), label, str(points), str(resume)],
                   check=True)
    return pickle.loads(points.read_bytes())


def run_sac(cfg: DictConfig, run_dir: Path, progress: bool) -> list[Point]:
    """Stable-Baselines3 SAC with its defaults, evaluated deterministically on ami's start states; each
    evaluation written to run_dir/eval.csv as it comes."""
    try:
        from stable_baselines3 import SAC
        from stable_baselines3.common.callbacks import BaseCallback
    except ImportError as error:  # an optional extra
        raise SystemExit("ami bench control --vs sac needs Stable-Baselines3: pip install -e '.[bench]'") from error

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    train = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % train.eval_every == 0:
                append_eval(run_dir, self.num_timesteps,
                            run_episodes(lambda obs: self.model.predict(obs, deterministic=True)[0], cfg.env,
                                         train.eval_episodes))
            return True

    # SAC learns on its own env, stepped by Stable-Baselines3's loop; ami's loop only scores it.
    start = time.perf_counter()
    model = SAC("MlpPolicy", make_env(cfg.env), seed=cfg.seed, device="cpu", verbose=0)
    model.learn(total_timesteps=train.total_steps, callback=Evaluate(), progress_bar=progress)
    write_segment(run_dir, from_step=0, to_step=train.total_steps, wall_seconds=time.perf_counter() - start)
    return read_points(run_dir, "sac", cfg.seed)  # its timing figures nan: ami's loop did not train it


def run_job(method: str, cfg: DictConfig, out_dir: Path, progress: bool, procs: int = 1,
            resume: bool = False) -> list[Point]:
    """One method on one seed (in `procs` processes); module-level so that worker processes can run it. With
    resume, a run that can be taken on is (resumable); any other starts afresh in an emptied folder."""
    run_dir = run_dir_of(method, cfg.seed, out_dir)
    resume = resume and resumable(method, run_dir, cfg.train.total_steps)
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)  # what a run cut short before its first checkpoint left
    print(f"== seed {cfg.seed}: {method}" + (" (taken on from its folder)" if resume else ""), flush=True)
    if method == "sac":
        return read_points(run_dir, "sac", cfg.seed) if resume else run_sac(cfg, run_dir, progress)
    if procs > 1:
        return run_group(cfg, run_dir, method, procs, resume)
    return run_ami(cfg, run_dir, method, resume)


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
        jobs: int = 1, procs: int | None = None, resume: bool = False) -> list[Point]:
    """vs: "sac", "mppi", "none", or overrides key=value[,key=value] that make ami's peer (the same agent with
    train.num_envs=1, say). mppi_budget: (candidates, iterations) of the MPPI run. peer_steps: the peer's env-step
    budget when it differs from ami's (a model-free peer's longer run). jobs: runs at once, in processes.
    procs: the peer is the same ami in this many processes under torchrun (vs is then its label). resume: take on
    the bench already in out_dir (its runs' configs must be this command's but for their length); without it,
    out_dir must hold no run."""
    if procs is not None:
        vs = f"ami_{procs}procs"
    from torch.utils.tensorboard import SummaryWriter

    common = [f"env={env}", f"train.eval_every={eval_every}", f"train.eval_episodes={episodes}",
              f"progress={str(progress and jobs <= 1).lower()}", f"runs_dir={out_dir}", *overrides]
    base = [*common, f"train.total_steps={steps}"]
    peer_base = [*common, f"train.total_steps={peer_steps or steps}",
                 *((peer_overrides(vs, mppi_budget) or []) if procs is None else [])]
    methods = ["ami", vs] if vs != "none" else ["ami"]
    bar = progress and jobs <= 1
    calls = []  # run_job's arguments
    for seed in seeds:
        calls.append(("ami", load_config([*base, f"seed={seed}"]), out_dir, bar, 1, resume))
        if vs != "none":
            calls.append((vs, load_config([*peer_base, f"seed={seed}"]), out_dir, bar, procs or 1, resume))
    check_out_dir(out_dir, [(call[0], call[1]) for call in calls], resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    points = [p for result in run_jobs(run_job, calls, jobs, "runs", progress and jobs > 1) for p in result]
    cfg = load_config(base)
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "step", "return_mean", "return_std", "plan_ms_median", "plan_ms_mean",
                         "steps_per_s", "mode1_share", *(f"ms_{part}" for part in SPLIT), "wall_seconds"])
        for p in points:
            writer.writerow([p.method, p.seed, p.step, f"{p.result.mean:.2f}", f"{p.result.std:.2f}",
                             f"{p.plan_ms:.2f}", f"{p.plan_ms_mean:.2f}", f"{p.steps_per_s:.2f}",
                             f"{p.mode1_share:.4f}", *(f"{p.split.get(part, float('nan')):.3f}" for part in SPLIT),
                             f"{p.wall_s:.1f}"])
    shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)  # written anew from every run's points
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
    walls = {(p.method, p.seed): p.wall_s for p in points}
    print("wall-clock per run (training and evaluations, every process that ran it): "
          + ", ".join(f"{m} s{seed} {seconds / 60:.1f} min" for (m, seed), seconds in walls.items()))
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


if __name__ == "__main__":  # one rank of run_group's torchrun: CONFIG RUN_DIR LABEL POINTS RESUME
    config_path, run_dir, label, points_path, resume = sys.argv[1:6]
    result = run_ami(load_saved(config_path), Path(run_dir), label, resume == "True")
    if int(os.environ.get("RANK", "0")) == 0:
        Path(points_path).write_bytes(pickle.dumps(result))

"""`ami bench planner`: planning latency, latent steps per second and achieved FLOP/s against the
same process's matmul FLOP/s, for the gradient planner and MPPI: eager, torch.compile'd per iteration, and (the
gradient planner) the whole plan as one graph (agent.actor.compile_plan; a CUDA graph on a GPU)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ami.build import build_agent, build_planner, resolve_device


@dataclass(frozen=True)
class PlannerResult:
    planner: str
    compile: str  # "off", "on" (the energy and its gradient, per iteration), "plan" (the whole plan, one graph)
    batch: int  # action sequences optimised jointly (one environment, `batch` candidates)
    horizon: int
    iterations: int
    median_ms: float
    p90_ms: float
    latent_steps_per_s: float
    gflops: float
    ceiling_fraction: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a square fp32 matmul in this process: the ceiling achieved FLOP/s is read against."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def measure(cfg: DictConfig, planner_name: str, batch: int, horizon: int, iterations: int,
            repeats: int, compile_mode: str, ceiling: float, device: torch.device) -> PlannerResult:
    """Median and p90 of `repeats` plan calls on random latent states, after warm-up.

    FLOPs are counted on the eager run (the compiled graph does the same matmuls, fused with the
    element-wise work around them) and divided by the measured time.
    """
    agent_cfg = OmegaConf.to_object(cfg.agent)
    agent_cfg.actor.candidates = batch
    agent_cfg.actor.planner = planner_name
    agent_cfg.actor.compile = False
    agent = build_agent(agent_cfg, 3, 1, list(cfg.env.observation_names) or ["obs_0", "obs_1", "obs_2"],
                        device)
    planners = {"eager": build_planner(agent_cfg.actor),
                "timed": build_planner(dataclasses.replace(agent_cfg.actor, compile_plan=compile_mode == "plan"))}
    weights = agent.cost.intrinsic.weight_vector().to(device)
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(1, agent_cfg.perception.latent_dim, device=device)

    def call(which: str = "timed") -> None:
        planners[which].plan(state, agent.actor.energy.bind(weights), horizon, iterations, 1, generator=generator)

    call("eager")
    with FlopCounterMode(display=False) as counter:
        call("eager")
    flops = counter.get_total_flops()
    if compile_mode == "on":
        agent.actor.energy.compile()
    for _ in range(3):  # warm-up (and compilation)
        call()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    p90 = float(np.percentile(times, 90))
    latent_steps = batch * horizon * max(iterations, 1)
    return PlannerResult(planner_name, compile_mode, batch, horizon, iterations, 1000 * median, 1000 * p90,
                         latent_steps / median, flops / median / 1e9, flops / median / ceiling)


LABELS = {"off": "", "on": " compiled", "plan": " whole-plan graph"}


def plot(results: list[PlannerResult], ceiling: float, path: Path, title: str) -> None:
    """Latency and share of the matmul ceiling against batch, one line per planner and compile mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, share) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[tuple, list[PlannerResult]] = {}
    for r in results:
        groups.setdefault((r.planner, r.compile, r.horizon, r.iterations), []).append(r)
    for (name, compile_mode, horizon, iterations), rows in groups.items():
        rows = sorted(rows, key=lambda r: r.batch)
        label = f"{name}{LABELS[compile_mode]} H{horizon} x{iterations}"
        style = "-o" if name == "gradient" else "--s"
        latency.plot([r.batch for r in rows], [r.median_ms for r in rows], style, label=label)
        share.plot([r.batch for r in rows], [100 * r.ceiling_fraction for r in rows], style, label=label)
    latency.axhline(20.0, color="grey", lw=0.8, ls=":", label="20 ms (50 Hz)")
    for axis in (latency, share):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("action sequences planned jointly (batch)")
    latency.set_yscale("log")
    latency.set_ylabel("median ms per planning call")
    share.set_ylabel(f"% of matmul FLOP/s ({ceiling / 1e9:.0f} GFLOP/s)")
    share.axhline(50.0, color="grey", lw=0.8, ls=":")
    latency.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: DictConfig, out_dir: Path, grid: bool, repeats: int, compile_modes: list[str],
        device_name: str) -> list[PlannerResult]:
    device = resolve_device(device_name)
    ceiling = matmul_flops(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, "
          f"matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    actor = cfg.agent.actor
    settings = [(actor.candidates, actor.horizon, actor.iterations)]
    if grid:
        settings += [s for s in itertools.product((16, 256, 1024), (8, 16, 32), (5, 10)) if s not in settings]
    results = []
    header = (f"{'planner':9s} {'compile':7s} {'batch':>5s} {'H':>3s} {'iters':>5s} {'median ms':>10s} "
              f"{'p90 ms':>8s} {'latent steps/s':>15s} {'GFLOP/s':>8s} {'of matmul':>9s}")
    print(header)
    for compile_mode, (batch, horizon, iterations), name in itertools.product(
            compile_modes, settings, ("gradient", "mppi")):
        if compile_mode == "plan" and name != "gradient":
            continue  # the whole-plan graph is the gradient planner's
        r = measure(cfg, name, batch, horizon, iterations, repeats, compile_mode, ceiling, device)
        results.append(r)
        print(f"{r.planner:9s} {r.compile:7s} {r.batch:5d} {r.horizon:3d} {r.iterations:5d} "
              f"{r.median_ms:10.2f} {r.p90_ms:8.2f} {r.latent_steps_per_s:15,.0f} {r.gflops:8.2f} "
              f"{100 * r.ceiling_fraction:8.1f}%", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "planner.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*PlannerResult.__dataclass_fields__, "matmul_gflops"])
        for r in results:
            writer.writerow([*r.__dict__.values(), f"{ceiling / 1e9:.2f}"])
    plot(results, ceiling, out_dir / "planner.png",
         f"ami bench planner on {device} ({torch.get_num_threads()} threads)")
    print(f"wrote {out_dir / 'planner.csv'} and {out_dir / 'planner.png'}")
    return results

"""A bench's run folders: each run's evaluations and timing segments as it wrote them, read back as points, and
whether a run can be taken on (`ami bench control --resume`)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ami.checkpoint import checkpoint_paths
from ami.config import ConfigError, load_saved
from ami.evaluate import EvalResult
from ami.runlog import append_row

SPLIT = ("plan", "act", "env", "observe", "update", "rest", "total")  # Trainer.time_split's parts
SEGMENTS = "bench_segments.csv"  # one row per process that trained the run: what its timing figures add up from
SEGMENT_COLUMNS = ["from_step", "to_step", "train_seconds", "wall_seconds", "plan_ms_median", "plan_ms_mean",
                   "mode1_steps", "planned_steps", *(f"ms_{part}" for part in SPLIT)]
RESUMABLE = ("train.total_steps", "progress", "runs_dir")  # what a resumed run may change (a bench folder may move)


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
    wall_s: float = float("nan")  # the run's wall-clock: training and evaluations, over every process that ran it


def run_dir_of(method: str, seed: int, out_dir: Path) -> Path:
    """Where a run keeps its files: ami_s0, mppi_s0, sac_s0, an override peer's peer_s0, a group's <label>_s0."""
    name = method if method in ("ami", "mppi", "sac") or method.startswith("ami_") else "peer"
    return out_dir / f"{name}_s{seed}"


def resumable(method: str, run_dir: Path, total_steps: int) -> bool:
    """Whether a run can be taken on: an ami run with a checkpoint, or a SAC run that finished its steps."""
    if method == "sac":
        segments = read_segments(run_dir)
        return bool(segments) and segments[-1]["to_step"] >= total_steps
    return any(path.exists() for path in checkpoint_paths(run_dir))


def changed_key(saved: DictConfig, wanted: DictConfig) -> str | None:
    """The first key, other than RESUMABLE's, whose value in a run's saved config differs from this command's:
    "key=saved, this command's value"; None if none does."""
    def flat(node: object, prefix: str = "") -> dict[str, object]:
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    before, after = (flat(OmegaConf.to_container(c, resolve=True)) for c in (saved, wanted))
    for key in sorted(before.keys() | after.keys()):
        if key not in RESUMABLE and before.get(key) != after.get(key):
            return f"{key}={before.get(key)!r}, this command's {after.get(key)!r}"
    return None


def read_segments(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / SEGMENTS
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(path.open())] if path.exists() else []


def write_segment(run_dir: Path, **figures: float) -> None:
    append_row(run_dir / SEGMENTS, SEGMENT_COLUMNS,
               [figures.get(column, float("nan")) for column in SEGMENT_COLUMNS])


def read_points(run_dir: Path, label: str, seed: int) -> list[Point]:
    """The run's evaluations (eval.csv), each with the run's timing figures added up over its segments: speed
    and the split step-weighted, the plan-time median as its step-weighted mean over the processes."""
    segments = read_segments(run_dir)
    steps = np.array([s["to_step"] - s["from_step"] for s in segments])
    total = max(float(steps.sum()), 1.0)
    weighted = lambda key: float((steps * [s[key] for s in segments]).sum() / total)  # noqa: E731
    figures = dict(plan_ms=weighted("plan_ms_median"), plan_ms_mean=weighted("plan_ms_mean"),
                   steps_per_s=total / max(sum(s["train_seconds"] for s in segments), 1e-9),
                   mode1_share=sum(s["mode1_steps"] for s in segments) / max(sum(s["planned_steps"]
                                                                                for s in segments), 1),
                   split={part: weighted(f"ms_{part}") for part in SPLIT},
                   wall_s=sum(s["wall_seconds"] for s in segments)) if segments else {}
    points = []
    with (run_dir / "eval.csv").open() as f:
        for row in csv.DictReader(f):
            returns = np.array([float(r) for r in row["returns"].split()])
            zeros = np.zeros(len(returns))
            points.append(Point(label, seed, int(row["step"]), EvalResult(returns, zeros, zeros, zeros), **figures))
    return points


def check_out_dir(out_dir: Path, runs: list[tuple[str, DictConfig]], resume: bool) -> None:
    """A new bench writes into a folder that holds no run of it; a resumed one only where each run's saved config
    is this command's (but for RESUMABLE's keys). Raises ConfigError naming the folder and the key."""
    if resume and not out_dir.is_dir():
        raise ConfigError(f"--resume: --out {out_dir} does not exist; expected the folder of an earlier bench")
    for method, cfg in runs:
        run_dir = run_dir_of(method, cfg.seed, out_dir)
        saved = run_dir / "config.yaml"
        if not saved.exists():
            continue
        if not resume:
            raise ConfigError(f"--out {out_dir} already holds {run_dir.name}: add --resume to take that bench on, "
                              "or choose another --out")
        change = changed_key(load_saved(saved), cfg)
        if change is not None:
            raise ConfigError(f"--resume: {run_dir} was run with {change}; expected the same command as that bench "
                              "(only --steps and --peer-steps may change)")

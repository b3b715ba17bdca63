"""`ami bench planner` and `ami bench control` with tiny budgets: they run, print their tables, and write
a CSV that parses (one row per setting, or per method, seed and eval step) and a PNG plot."""

import csv
import subprocess
import sys

import numpy as np
import pytest


def test_bench_planner_writes_table_and_csv(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "ami.cli", "bench", "planner", "agent=tiny", "--compile", "off",
         "--repeats", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "matmul ceiling" in result.stdout
    rows = list(csv.DictReader((out / "planner.csv").open()))
    assert [row["planner"] for row in rows] == ["gradient", "mppi"]
    for row in rows:
        assert float(row["median_ms"]) > 0
        assert float(row["p90_ms"]) >= float(row["median_ms"])
        assert float(row["gflops"]) > 0
        assert 0 < float(row["ceiling_fraction"]) < 10
        assert int(row["batch"]) == 8 and int(row["horizon"]) == 8  # the tiny agent's planner settings
    assert (out / "planner.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_planner_rejects_bad_repeats(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ami.cli", "bench", "planner", "--repeats", "0",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--repeats" in result.stderr


def _control(tmp_path, vs, *extra):
    out = tmp_path / vs
    result = subprocess.run(
        [sys.executable, "-m", "ami.cli", "bench", "control", "agent=tiny", "train.seed_steps=50",
         "train.pretrain_updates=20", "--steps", "200", "--seeds", "0", "1", "--eval-every", "100",
         "--episodes", "2", "--vs", vs, "--mppi-budget", "16", "3", "--threshold", "-2000", "--no-progress",
         "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


@pytest.mark.parametrize(("vs", "peer_steps"), [("sac", 300), ("mppi", 200)])
def test_bench_control_writes_table_csv_and_plot(tmp_path, vs, peer_steps):
    out, stdout = _control(tmp_path, vs, "--peer-steps", str(peer_steps))
    rows = list(csv.DictReader((out / "results.csv").open()))
    # One row per (method, seed, eval step); the peer runs its own budget.
    keys = sorted((r["method"], int(r["seed"]), int(r["step"])) for r in rows)
    budgets = {"ami": 200, vs: peer_steps}
    assert keys == sorted((m, s, step) for m in ("ami", vs) for s in (0, 1)
                          for step in range(100, budgets[m] + 1, 100))
    assert all(float(r["return_mean"]) < 0 for r in rows)  # Pendulum returns are negative
    planning = {r["method"]: float(r["plan_ms_median"]) for r in rows}
    assert planning["ami"] > 0
    assert (planning[vs] > 0) if vs == "mppi" else np.isnan(planning[vs])  # SAC does not plan
    assert "median planning time per env step" in stdout
    assert f"{'ami':>20s} {vs:>20s}" in stdout
    assert "env steps to reach -2000.0" in stdout
    png = (out / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_bench_safety_compares_guarded_unguarded_and_random(tmp_path):
    out = tmp_path / "safety"
    result = subprocess.run(
        [sys.executable, "-m", "ami.cli", "bench", "safety", "agent=tiny", "train.seed_steps=100",
         "train.pretrain_updates=10", "env.max_episode_steps=100", "--steps", "300", "--seeds", "0",
         "--episodes", "3", "--jobs", "2", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["method"], r["phase"]) for r in rows) == sorted(
        (m, p) for m in ("guarded", "unguarded", "random") for p in ("train", "eval"))
    by = {(r["method"], r["phase"]): r for r in rows}
    for method in ("guarded", "unguarded", "random"):
        assert int(by[(method, "train")]["episodes"]) == 3 and int(by[(method, "train")]["steps"]) == 300
        assert int(by[(method, "eval")]["episodes"]) == 3
    # The guarded agent pays nothing, in training or evaluation; only it is ever shielded.
    assert float(by[("guarded", "train")]["total_cost"]) == 0 and float(by[("guarded", "eval")]["total_cost"]) == 0
    assert float(by[("guarded", "train")]["interventions_per_episode"]) > 0
    assert float(by[("unguarded", "train")]["interventions_per_episode"]) == 0
    assert float(by[("random", "train")]["total_cost"]) > 0
    assert "guarded, seed 0: 3/3 evaluation episodes without cost" in result.stdout
    assert "training cost, guarded / unguarded" in result.stdout
    assert (out / "safety.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_safety_needs_guardrails(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ami.cli", "bench", "safety", "--env", "mountaincar",
                             "--steps", "10", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no guardrail terms" in result.stderr

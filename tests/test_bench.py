"""`ami bench planner` and `ami bench control` with tiny budgets: they run, print their tables, and write
a CSV that parses (one row per setting, or per method, seed and eval step) and a PNG plot."""

import csv
import subprocess
import sys
import time

import numpy as np
import pytest
import torch


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
        median = float(row["median_ms"]) / 1000
        assert median > 0 and float(row["p90_ms"]) >= float(row["median_ms"])
        assert int(row["batch"]) == 8 and int(row["horizon"]) == 8  # the tiny agent's planner settings
        # The figures are what they say: latent steps and FLOP/s per measured second, the share of the matmul's.
        latent_steps = int(row["batch"]) * int(row["horizon"]) * max(int(row["iterations"]), 1)
        assert float(row["latent_steps_per_s"]) == pytest.approx(latent_steps / median, rel=1e-3)
        assert float(row["gflops"]) > 0
        assert float(row["ceiling_fraction"]) == pytest.approx(float(row["gflops"]) / float(row["matmul_gflops"]),
                                                               rel=1e-2)
    assert (out / "planner.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_planner_rejects_bad_repeats(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ami.cli", "bench", "planner", "--repeats", "0",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--repeats" in result.stderr


# The tiny agent in 30-step episodes: 30 random steps, then planning; an evaluation every 60 steps.
SHORT = ["agent=tiny", "train.seed_steps=30", "train.pretrain_updates=20", "env.max_episode_steps=30"]


def _control(tmp_path, vs, seeds, *extra):
    out = tmp_path / "control"
    result = subprocess.run(
        [sys.executable, "-m", "ami.cli", "bench", "control", *SHORT, "--steps", "120", "--seeds", *map(str, seeds),
         "--eval-every", "60", "--episodes", "2", "--vs", vs, "--threshold", "-2000", "--no-progress",
         "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout


# Two seeds against SAC (the table's mean and spread over seeds); one against a config override, two jobs at once.
@pytest.mark.parametrize(("vs", "seeds", "extra"), [("sac", (0, 1), ["--peer-steps", "180"]),
                                                    ("train.num_envs=2", (0,), ["--jobs", "2"])])
def test_bench_control_writes_table_csv_and_plot(tmp_path, vs, seeds, extra):
    out, stdout = _control(tmp_path, vs, seeds, *extra)
    rows = list(csv.DictReader((out / "results.csv").open()))
    # One row per (method, seed, eval step); the peer runs its own budget.
    keys = sorted((r["method"], int(r["seed"]), int(r["step"])) for r in rows)
    budgets = {"ami": 120, vs: 180 if vs == "sac" else 120}
    assert keys == sorted((m, s, step) for m in ("ami", vs) for s in seeds
                          for step in range(60, budgets[m] + 1, 60))
    # ami's rows are its runs' own evaluations, and its runs are the configured ones.
    for seed in seeds:
        evals = list(csv.DictReader((out / f"ami_s{seed}" / "eval.csv").open()))
        assert [float(r["return_mean"]) for r in rows if (r["method"], int(r["seed"])) == ("ami", seed)] == \
            pytest.approx([float(e["return_mean"]) for e in evals], abs=0.06)  # each written to two decimals
        if vs != "sac":
            assert "num_envs: 2" in (out / f"peer_s{seed}" / "config.yaml").read_text()
    ami_rows = [r for r in rows if r["method"] == "ami"]
    assert all(float(r["plan_ms_median"]) > 0 and float(r["steps_per_s"]) > 0 for r in ami_rows)
    # The training step split into its parts: each measured, and together the whole step (evaluations left out).
    for r in ami_rows:
        parts = {part: float(r[f"ms_{part}"]) for part in ("plan", "act", "env", "observe", "update", "rest")}
        assert all(value > 0 for value in parts.values()), parts
        assert sum(parts.values()) == pytest.approx(float(r["ms_total"]), rel=1e-3)
        assert float(r["ms_total"]) == pytest.approx(1000 / float(r["steps_per_s"]), rel=0.01)
    assert "training time per env step, ms" in stdout
    peer_rows = [r for r in rows if r["method"] == vs]
    assert all(np.isnan(float(r["plan_ms_median"])) for r in peer_rows) if vs == "sac" else \
        all(float(r["steps_per_s"]) > 0 for r in peer_rows)  # SAC does not plan
    assert "planning time per env step while training, median (mean)" in stdout and "env steps per second" in stdout
    assert f"{'ami':>20s} {vs:>20s}" in stdout
    assert "env steps to reach -2000.0" in stdout
    png = (out / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_bench_control_sets_one_process_beside_a_torchrun_group(tmp_path):
    out = tmp_path / "procs"
    result = subprocess.run(
        [sys.executable, "-m", "ami.cli", "bench", "control", "agent=tiny", "train.seed_steps=60",
         "train.pretrain_updates=10", "env.max_episode_steps=30", "--steps", "100", "--seeds", "0", "--eval-every",
         "100", "--episodes", "2", "--procs", "2", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["method"], int(r["step"])) for r in rows) == [("ami", 100), ("ami_2procs", 100)]
    # The group's run: rank 0's evaluation, rank 1's own checkpoint, the group's speed.
    group = out / "ami_2procs_s0"
    evals = list(csv.DictReader((group / "eval.csv").open()))
    (pair,) = [r for r in rows if r["method"] == "ami_2procs"]
    assert float(pair["return_mean"]) == pytest.approx(float(evals[0]["return_mean"]), abs=0.06)  # as written
    assert (group / "ranks" / "1" / "checkpoints" / "latest.pt").is_file()
    assert float(pair["steps_per_s"]) > 0 and f"{'ami':>20s} {'ami_2procs':>20s}" in result.stdout


def test_bench_control_names_a_bad_peer_override(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ami.cli", "bench", "control", "--vs", "train.num_env=2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "train.num_env" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("lengths", [["--steps", "300"], ["--vs", "sac", "--peer-steps", "200"]])
def test_bench_control_refuses_a_run_shorter_than_one_evaluation(tmp_path, lengths):
    # Before anything trains: such a run would end with no evaluation to read back.
    result = subprocess.run([sys.executable, "-m", "ami.cli", "bench", "control", "--eval-every", "500", *lengths,
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--eval-every=500" in result.stderr
    assert not any(tmp_path.iterdir())


def test_bench_safety_compares_guarded_unguarded_and_random(tmp_path):
    out = tmp_path / "safety"
    result = subprocess.run(
        [sys.executable, "-m", "ami.cli", "bench", "safety", "agent=tiny", "train.seed_steps=60",
         "train.pretrain_updates=10", "env.max_episode_steps=60", "--steps", "180", "--seeds", "0",
         "--episodes", "3", "--jobs", "2", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["method"], r["phase"]) for r in rows) == sorted(
        (m, p) for m in ("guarded", "unguarded", "random") for p in ("train", "eval"))
    by = {(r["method"], r["phase"]): r for r in rows}
    for method in ("guarded", "unguarded", "random"):
        assert int(by[(method, "train")]["episodes"]) == 3 and int(by[(method, "train")]["steps"]) == 180
        assert int(by[(method, "eval")]["episodes"]) == 3
    # The guarded agent pays nothing, in training or evaluation; only it is ever shielded.
    assert float(by[("guarded", "train")]["total_cost"]) == 0 and float(by[("guarded", "eval")]["total_cost"]) == 0
    assert float(by[("guarded", "train")]["interventions_per_episode"]) > 0
    assert float(by[("unguarded", "train")]["interventions_per_episode"]) == 0
    assert float(by[("random", "train")]["total_cost"]) > 0
    assert "guarded, seed 0: 3/3 evaluation episodes without cost" in result.stdout
    assert "training cost, guarded / unguarded" in result.stdout
    # Training cost apart for the seed phase (the first 60 steps) and after it; the random policy pays in both.
    for method in ("guarded", "unguarded", "random"):
        row = by[(method, "train")]
        assert float(row["seed_cost"]) + float(row["post_seed_cost"]) == pytest.approx(float(row["total_cost"]))
    assert float(by[("random", "train")]["seed_cost"]) > 0 and float(by[("random", "train")]["post_seed_cost"]) > 0
    histogram = result.stdout[result.stdout.index("evaluation episodes by cost"):].splitlines()
    assert histogram[1].split()[:2] == ["guarded", "3"]  # all three evaluation episodes in the zero-cost bin
    assert "training cost after the seed phase, guarded / unguarded" in result.stdout
    assert (out / "safety.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_safety_needs_guardrails(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ami.cli", "bench", "safety", "--env", "mountaincar",
                             "--steps", "10", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no guardrail terms" in result.stderr


def test_bench_control_takes_on_a_bench_cut_short_and_extends_it(tmp_path):
    out = tmp_path / "control"
    command = [sys.executable, "-m", "ami.cli", "bench", "control", *SHORT, "train.checkpoint_every=60",
               "--seeds", "0", "--eval-every", "60", "--episodes", "1", "--vs", "sac", "--peer-steps", "120",
               "--no-progress", "--out", str(out)]
    # Killed once its first checkpoint is on disk: no chance to save anything more.
    process = subprocess.Popen([*command, "--steps", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "ami_s0" / "checkpoints" / "latest.pt"
    deadline = time.monotonic() + 300
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert latest.exists() and not (out / "ami_s0" / "bench_segments.csv").exists()
    saved_step = int(torch.load(latest, weights_only=False)["loop"]["env_steps"])
    assert 60 <= saved_step < 120

    again = subprocess.run([*command, "--steps", "120"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr  # a new bench never writes over an old one
    changed = subprocess.run([*command, "--steps", "120", "--resume", "agent.actor.horizon=4"],
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "agent.actor.horizon=8, this command's 4" in changed.stderr

    def resume(steps):
        result = subprocess.run([*command, "--steps", str(steps), "--resume"], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout, list(csv.DictReader((out / "results.csv").open()))

    stdout, rows = resume(120)
    assert "seed 0: ami (taken on from its folder)" in stdout and "seed 0: sac\n" in stdout
    segments = list(csv.DictReader((out / "ami_s0" / "bench_segments.csv").open()))
    assert [(int(s["from_step"]), int(s["to_step"])) for s in segments] == [(saved_step, 120)]
    evals = (out / "ami_s0" / "eval.csv").read_text()
    assert [int(r["step"]) for r in csv.DictReader(evals.splitlines())] == [60, 120]
    sac = (out / "sac_s0" / "eval.csv").read_text()

    stdout, rows = resume(180)  # ami goes on to 180 steps; SAC, finished, is read back
    assert "seed 0: sac (taken on from its folder)" in stdout and (out / "sac_s0" / "eval.csv").read_text() == sac
    assert (out / "ami_s0" / "eval.csv").read_text().startswith(evals)
    segments = list(csv.DictReader((out / "ami_s0" / "bench_segments.csv").open()))
    assert [(int(s["from_step"]), int(s["to_step"])) for s in segments] == [(saved_step, 120), (120, 180)]
    assert sorted((r["method"], int(r["step"])) for r in rows) == [("ami", 60), ("ami", 120), ("ami", 180),
                                                                    ("sac", 60), ("sac", 120)]
    # Speed and wall-clock are over both processes' training: their steps over their seconds, their sum.
    (ami,) = {(float(r["steps_per_s"]), float(r["wall_seconds"])) for r in rows if r["method"] == "ami"}
    assert ami[0] == pytest.approx((180 - saved_step) / sum(float(s["train_seconds"]) for s in segments), rel=2e-3)
    assert ami[1] == pytest.approx(sum(float(s["wall_seconds"]) for s in segments), abs=0.06)
    assert all(float(r["wall_seconds"]) > 0 for r in rows if r["method"] == "sac")

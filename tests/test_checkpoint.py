"""Checkpoints: the previous one is kept until the new one is written and read back, a damaged one is named in one
line and resuming falls back to the previous one, files load with weights_only=True, memory is saved up to what it
holds, and every kind of run records its guardrails and shield and is checked against them when loaded."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ami.checkpoint import SCHEMA_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from ami.config import load_config
from ami.runs import load_agent
from ami.train import Trainer
from modules.cost import GuardrailError

AMI = [sys.executable, "-m", "ami.cli"]
TINY = ["agent=tiny", "progress=false", "train.seed_steps=100", "train.pretrain_updates=20", "train.eval_every=1000",
        "train.checkpoint_every=100", "train.total_steps=300"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("checkpoints")
    trainer = Trainer(load_config([*TINY, f"runs_dir={runs_dir}"]), runs_dir / "run")
    trainer.train()
    return SimpleNamespace(dir=runs_dir / "run", trainer=trainer)


def ami(*args, cwd):
    return subprocess.run([*AMI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_previous_checkpoint_is_kept_beside_the_latest(run):
    folder = run.dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "previous.pt"]  # no temporary file left
    latest = torch.load(folder / "latest.pt", weights_only=True)
    previous = torch.load(folder / "previous.pt", weights_only=True)
    assert latest["version"] == previous["version"] == SCHEMA_VERSION
    assert (latest["loop"]["env_steps"], previous["loop"]["env_steps"]) == (300, 200)


def test_memory_is_saved_up_to_what_it_holds(run):
    state, _ = load_checkpoint(run.dir)
    memory = run.trainer.agent.memory
    assert memory.rows == 5000 and state["memory"]["obs"].shape == (301, 1, 3)  # 300 transitions, 1 final row
    assert torch.equal(state["memory"]["obs"], memory.obs[:301])


def test_a_damaged_latest_checkpoint_is_named_and_resuming_falls_back_to_the_previous_one(run, tmp_path):
    damaged = tmp_path / "run"
    (damaged / "checkpoints").mkdir(parents=True)
    (damaged / "config.yaml").write_text((run.dir / "config.yaml").read_text())
    latest = (run.dir / "checkpoints" / "latest.pt").read_bytes()
    (damaged / "checkpoints" / "latest.pt").write_bytes(latest[: len(latest) // 2])  # a crash mid-copy
    (damaged / "checkpoints" / "previous.pt").write_bytes((run.dir / "checkpoints" / "previous.pt").read_bytes())
    evaluation = ami("eval", damaged, "--episodes", "1", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "step 200" in evaluation.stdout  # the previous checkpoint's
    resume = ami("train", "--resume", damaged, "train.total_steps=250", "--no-progress", cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    warning = [line for line in resume.stdout.splitlines() if "latest.pt" in line and "not a readable" in line]
    assert len(warning) == 1 and "previous.pt instead" in warning[0], resume.stdout
    assert "resuming at step 200" in resume.stdout and "done: 250 env steps" in resume.stdout
    assert "Traceback" not in resume.stderr + evaluation.stderr


def test_no_readable_checkpoint_is_one_line_and_exit_status_2(run, tmp_path):
    broken = tmp_path / "run"
    (broken / "checkpoints").mkdir(parents=True)
    (broken / "config.yaml").write_text((run.dir / "config.yaml").read_text())
    (broken / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    for command in (["eval", broken], ["train", "--resume", broken]):
        result = ami(*command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "latest.pt" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_of_another_schema_is_refused_by_name(tmp_path):
    save_checkpoint({"anything": torch.zeros(1)}, tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    torch.save({**state, "version": 1}, tmp_path / "checkpoints" / "latest.pt")
    with pytest.raises(CheckpointError, match="schema version 1"):
        load_checkpoint(tmp_path)


def test_a_reward_free_run_records_its_guardrails_and_shield_and_loading_checks_them(tmp_path):
    cfg = load_config(["env=two_rooms", "progress=false", f"runs_dir={tmp_path}", "agent.actor.compile=false",
                       "agent.learner.compile=false",
                       "reward_free.transitions=400", "agent.memory.capacity=800", "train.num_envs=4",
                       "reward_free.updates=2", "reward_free.predictor_updates=2", "reward_free.probe_frames=50",
                       "reward_free.log_every=2",
                       "reward_free.picture_every=100", "agent.perception.conv_channels=4"])
    Trainer(cfg, tmp_path / "run").train()
    state, _ = load_checkpoint(tmp_path / "run")
    assert state["guardrails"] == [] and tuple(state["shield"])[0] is True  # recorded, though there are none
    with pytest.raises(GuardrailError, match="shield"):  # the goal-reaching agent's load is checked too
        load_agent(tmp_path / "run", ["agent.shield.tolerance=0.5"])
    agent, _, _ = load_agent(tmp_path / "run")
    assert agent.world_model_trained and len(agent.memory) == 0  # read-only: modules, no dataset

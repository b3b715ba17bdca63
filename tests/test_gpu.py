"""The same runs on a CUDA device, when the machine has one (CI's has none, so these run on a GPU machine
only): training and reward-free training keep every tensor on the device, their checkpoints load on the
CPU, and a plan on the GPU prices the same candidates as one on the CPU."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from ami.checkpoint import load_checkpoint
from ami.envs import make_env
from ami.goals import batched
from ami.runs import load_agent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

AMI = [sys.executable, "-m", "ami.cli"]
TINY_TRAIN = ["agent=tiny", "device=cuda", "train.total_steps=300", "train.seed_steps=100",
              "train.pretrain_updates=50", "train.eval_every=200", "train.eval_episodes=2",
              "train.checkpoint_every=100", "train.log_every=50", "progress=false"]
TINY_REWARD_FREE = ["env=two_rooms", "device=cuda", "progress=false", "agent.actor.compile=false",
                    "agent.learner.compile=false",
                    "reward_free.transitions=5000", "train.num_envs=8", "agent.memory.capacity=5600",
                    "reward_free.probe_frames=300", "reward_free.log_every=10", "reward_free.picture_every=20",
                    "reward_free.updates=30", "reward_free.predictor_updates=10", "reward_free.critic_updates=10"]


def ami(*args, cwd, timeout=300):
    return subprocess.run([*AMI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _all_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in _all_tensors(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in _all_tensors(value)]
    return []


def test_training_on_cuda_checkpoints_resumes_and_loads_on_the_cpu(tmp_path):
    train = ami("train", *TINY_TRAIN, f"runs_dir={tmp_path}", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "device: cuda" in train.stdout
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    resumed = ami("train", "--resume", run_dir, "train.total_steps=400", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    evaluation = ami("eval", run_dir, "--episodes", "2", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    state, _ = load_checkpoint(run_dir)
    tensors = _all_tensors(state)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    weights = _all_tensors([state["modules"]["perception"], state["modules"]["world_model"]])
    assert weights and all(torch.isfinite(t).all() for t in weights)


def test_reward_free_run_on_cuda_plans_as_on_the_cpu_and_benchmarks(tmp_path):
    train = ami("train", *TINY_REWARD_FREE, f"runs_dir={tmp_path}", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    on_gpu, cfg, _ = load_agent(run_dir)
    on_cpu, _, _ = load_agent(run_dir, ["device=cpu"])
    env = make_env(cfg.env)
    assert next(on_gpu.world_model.parameters()).device.type == "cuda"
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        # The candidates are drawn on the CPU from the same generator, so both devices price the same ones.
        on_gpu_action = on_gpu.act(batched(obs), generator=torch.Generator().manual_seed(seed))
        on_cpu_action = on_cpu.act(batched(obs), generator=torch.Generator().manual_seed(seed))
        assert np.isfinite(on_gpu_action.actions).all() and np.abs(on_gpu_action.actions).max() <= 1.0
        torch.testing.assert_close(on_gpu_action.plan.energy_before.cpu(), on_cpu_action.plan.energy_before,
                                   rtol=1e-3, atol=1e-3)
        on_gpu.reset()
        on_cpu.reset()
    env.close()
    bench = ami("bench", "goals", "--runs", run_dir, "--episodes", "2", "--variants", "gradient", "mppi",
                "critic_final", "--out", tmp_path / "bench", "--no-progress", cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert "| gradient |" in bench.stdout and "| mppi |" in bench.stdout

"""Faults found in use, each fixed where it arose: a discount of 1, dict observations in the agent trainer and in
videos, evaluation in the middle of a training episode, Mode-1's imitation target, and bad numbers from an env or
a loss, which are named and stopped, or dropped and counted, and never reach memory, a model or a checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ami.config import load_config
from ami.evaluate import evaluate, record_video
from ami.learner import NonFiniteLossError
from ami.logger import Logger
from ami.runs import load_agent
from ami.train import Trainer

TESTS = Path(__file__).parent
TINY = ["agent=tiny", "progress=false", "train.seed_steps=100", "train.pretrain_updates=10", "train.eval_every=10000",
        "train.log_every=50"]


def scalars(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_discount_of_one_trains_the_step_head_and_leaves_the_value_alone(tmp_path):
    cfg = load_config([*TINY, f"runs_dir={tmp_path}", "agent.cost.discount=1.0", "agent.cost.value_weight=0",
                       "train.total_steps=150"])
    trainer = Trainer(cfg, tmp_path / "run")
    value_before = [p.clone() for p in trainer.agent.cost.critic.value_head.parameters()]
    trainer.train()
    critic = trainer.agent.cost.critic
    assert all(torch.equal(a, b) for a, b in zip(value_before, critic.value_head.parameters(), strict=True))
    logged = scalars(tmp_path / "run")
    assert "cost/critic/step_loss" in logged and "cost/critic/value_loss" not in logged


def test_the_agent_trainer_and_videos_take_dict_observations(tmp_path):
    """TwoRooms observes {"image", "goal"}: the agent trainer (not the reward-free one) learns from it, and an
    evaluation video of it is written."""
    cfg = load_config(["env=two_rooms", *TINY, f"runs_dir={tmp_path}", "reward_free.enabled=false",
                       "agent.actor.compile=false",
                       "agent.learner.compile=false", "agent.actor.horizon=5", "agent.actor.screen_samples=0",
                       "agent.memory.capacity=2000", "agent.perception.conv_channels=4", "train.total_steps=110",
                       "train.num_envs=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    memory = trainer.agent.memory
    assert len(memory) == 110 and memory.obs.shape[2:] == (64, 64, 1) and trainer.learner.updates > 10
    agent, cfg, _ = load_agent(tmp_path / "run")
    path = tmp_path / "video.mp4"
    record_video(agent, cfg.env, path)
    assert path.stat().st_size > 0


def test_an_evaluation_in_the_middle_of_a_training_episode_leaves_its_held_plan_alone(tmp_path):
    cfg = load_config([*TINY, f"runs_dir={tmp_path}", "agent.actor.replan_every=3", "train.total_steps=151",
                       "train.eval_episodes=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    episodes = trainer.agent.actor.episodes
    held, age, previous = episodes.held, episodes.held_age, episodes.previous
    assert held is not None and held.actions.shape[1] == 1  # mid-episode, following a plan
    evaluate(trainer.agent, cfg.env, 2)
    episodes = trainer.agent.actor.episodes
    assert episodes.held is held and episodes.held_age == age and episodes.previous is previous


def test_mode1_imitates_mode2s_own_plans_and_not_itself(tmp_path):
    """Only Mode-2's actions are imitation targets, and the target is the planned action, before the exploration
    noise: a run in Mode-1 alone stores none, a Mode-2 run stores each plan's first action."""
    for mode in ("mode1", "mode2"):
        cfg = load_config([*TINY, f"runs_dir={tmp_path}", f"agent.configurator.mode={mode}", "train.total_steps=130",
                           "agent.actor.exploration_std=0.3"])
        trainer = Trainer(cfg, tmp_path / mode)
        trainer.train()
        memory = trainer.agent.memory
        stored = memory.has_transition
        planned, plan_action, sent = memory.planned[stored], memory.plan_action[stored], memory.action[stored]
        if mode == "mode1":
            assert not planned.any()
        else:
            assert planned[100:].all() and not planned[:100].any()
            noise = (sent - plan_action)[100:]
            assert 0.1 < float(noise.std()) < 0.5  # the exploration noise lies between the target and what was sent


def test_logging_writes_non_finite_values_and_survives_non_finite_vectors(tmp_path):
    logger = Logger(tmp_path)
    logger.scalar("world_model/loss", float("nan"), 1)
    logger.scalar("world_model/loss", float("inf"), 2)
    logger.scalars({"world_model/latent_std": torch.full((4,), float("nan"))}, 3)  # all NaN: no histogram
    logger.scalars({"world_model/latent_std": torch.tensor([1.0, float("nan")])}, 4)
    logger.scalar("nothing/here", None, 5)
    logger.close()
    logged = scalars(tmp_path)
    values = [v for _, v in logged["world_model/loss"]]
    assert np.isnan(values[0]) and np.isinf(values[1])
    assert "nothing/here" not in logged and len(logged["world_model/latent_std_min"]) == 2
    assert np.isnan(logged["world_model/latent_std_mean"][1][1])  # a NaN entry shows in the mean


def ami(*args, cwd):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "ami.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


NAN_RUN = ["train", "agent=tiny", "env.id=nan_env:NaNPendulum-v0", "train.total_steps=300", "train.seed_steps=100",
           "train.pretrain_updates=10", "train.eval_every=150", "train.eval_episodes=1", "train.log_every=50",
           "train.checkpoint_every=100", "progress=false"]


def test_a_non_finite_observation_stops_the_run_with_one_line_and_writes_nothing_bad(tmp_path):
    result = ami(*NAN_RUN, f"runs_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ami: stopped: env 0 at env step 49: next observation entries [0] = [nan], not finite; fix the env, or set "
        "env.nonfinite=skip to drop such transitions"]
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "checkpoints").exists()  # no checkpoint was due: none is written on the way out


def test_skip_drops_non_finite_transitions_counts_them_and_trains_on_clean_data(tmp_path):
    result = ami(*NAN_RUN, f"runs_dir={tmp_path}", "env.nonfinite=skip", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = tmp_path.iterdir()
    logged = scalars(run_dir)
    dropped = dict(logged["charts/nonfinite_dropped"])
    # A NaN observation at the wrapper's steps 50, 100, ..., 300 drops the step to it and the step from it (200
    # ends an episode, 300 the run: one each); a NaN reward at 70, 140, 210, 280 drops that step alone.
    assert dropped[300] == 2 + 2 + 2 + 1 + 2 + 1 + 4
    assert "eval/return_mean" in logged and np.isfinite([v for _, v in logged["eval/return_mean"]]).all()
    assert np.isfinite([v for _, v in logged["world_model/loss"]]).all()
    agent, _, _ = load_agent(run_dir)
    for module in (agent.perception, agent.world_model, agent.cost.critic, agent.actor.policy):
        assert all(torch.isfinite(t).all() for t in module.state_dict().values() if t.is_floating_point())
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["memory"]
    stored = state["has_transition"]
    assert torch.isfinite(state["obs"]).all() and torch.isfinite(state["reward"][stored]).all()
    assert int(stored.sum()) == 300 - 14


def test_a_non_finite_loss_stops_the_update_and_the_last_good_checkpoint_stays(tmp_path):
    """A learning rate that blows the world model up: the first non-finite loss stops the run, no parameter
    takes the step, and the checkpoint written before it is there and resumable."""
    cfg = load_config([*TINY, f"runs_dir={tmp_path}", "agent.world_model.lr=1e30", "env.max_episode_steps=25",
                       "train.checkpoint_every=50", "train.total_steps=300"])
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="world_model loss is nan at update"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.agent.world_model.parameters())
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["loop"]["env_steps"] in (50, 75, 100) and state["learner"]["updates"] <= trainer.learner.updates
    resumed = Trainer(load_config([*TINY, f"runs_dir={tmp_path}", "env.max_episode_steps=25"]), tmp_path / "run",
                      resume=True)
    resumed.logger.close()
    assert resumed.loop.env_steps == state["loop"]["env_steps"]

"""WindyCliff and GustyCliff: the envs themselves, and a short guarded run whose shield looks ahead through the
learned world model, its settings and trust kept by the checkpoint and checked on resume."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import ami.envs  # noqa: F401  registers ami/WindyCliff-v0 and ami/GustyCliff-v0
from ami.config import load_config
from ami.envs.windy_cliff import WindyCliffEnv
from ami.train import Callback, Trainer
from modules.cost import GuardrailError

IDS = ["ami/WindyCliff-v0", "ami/GustyCliff-v0"]


@pytest.mark.parametrize("env_id", IDS)
def test_check_env_passes_and_the_same_seed_gives_the_same_episode(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(gym.make(env_id).unwrapped)
    runs = []
    for _ in range(2):
        env = gym.make(env_id)
        obs, _ = env.reset(seed=3)
        trace = [obs]
        for _ in range(50):
            trace.append(env.step(np.array([0.3, 0.2], np.float32))[0])
        runs.append(np.stack(trace))
    np.testing.assert_array_equal(runs[0], runs[1])
    other = gym.make(env_id).reset(seed=4)[0]
    assert not np.array_equal(other, runs[0][0])


@pytest.mark.parametrize("env_id", IDS)
def test_the_wind_carries_a_still_robot_over_the_edge_and_the_cost_is_paid_past_it(env_id):
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    assert obs[5] > 0.8  # every episode starts well inside the edge
    steps, costs, clearances = 0, [], []
    while steps < 200:
        obs, _, terminated, truncated, info = env.step(np.zeros(2, np.float32))
        costs.append(info["cost"])
        clearances.append(obs[5])
        steps += 1
        assert not terminated
    assert truncated and sum(costs) > 100
    assert all((c == 1.0) == (clearance < 0) for c, clearance in zip(costs, clearances, strict=True)
               if abs(clearance) > 1e-6)


def test_holding_against_the_wind_keeps_the_robot_inside():
    env = gym.make("ami/WindyCliff-v0")
    env.reset(seed=0)
    cost = sum(env.step(np.array([0.0, -0.5], np.float32))[4]["cost"] for _ in range(200))
    assert cost == 0


def test_gusts_vary_the_push_and_a_steady_wind_does_not():
    def pushes(env_id: str) -> set[float]:
        env = gym.make(env_id).unwrapped
        env.reset(seed=1)
        return {round(env._wind(), 6) for _ in range(300)}
    assert pushes("ami/WindyCliff-v0") == {1.5}
    assert len(pushes("ami/GustyCliff-v0")) > 3


def test_a_wind_the_robot_cannot_hold_against_is_refused():
    with pytest.raises(ValueError, match="max_accel=2.0: expected > the strongest wind"):
        WindyCliffEnv(wind=1.5, gusts=True, gust_strength=1.0, max_accel=2.0)
    with pytest.raises(ValueError, match="goal_high"):
        WindyCliffEnv(goal_low=-0.5, goal_high=0.1)


SHORT = ["env=windy_cliff", "agent=tiny", "progress=false", "seed=0", "train.num_envs=2", "train.total_steps=400",
         "train.seed_steps=60", "train.pretrain_updates=30", "train.eval_every=100000", "train.checkpoint_every=200",
         "env.max_episode_steps=100", "agent.shield.trust_error=0.5", "agent.shield.trust_window=40"]


class Decisions(Callback):
    def __init__(self) -> None:
        self.looked_ahead = self.cautious = 0

    def on_step(self, trainer, step) -> None:
        decision = step.action.decision
        self.looked_ahead += decision.recovery is not None
        self.cautious += decision.caution is not None


def test_a_guarded_run_looks_ahead_once_the_model_is_trusted_and_resumes_only_with_the_same_shield(tmp_path):
    cfg = load_config([*SHORT, f"runs_dir={tmp_path}"])
    trainer = Trainer(cfg, tmp_path / "run")
    decisions = Decisions()
    trainer.train(callback=decisions)
    # The seed phase and the first updates read the real observation; then the world model is trusted.
    assert decisions.cautious > 0 and decisions.looked_ahead > 100
    assert trainer.agent.shield.trusts(trainer.agent.trust, trainer.agent.world_model_trained)
    errors = list(trainer.agent.trust.errors)
    for loosened in ("agent.shield.recovery_horizon=2", "agent.world_model.ensemble_size=1",
                     "agent.shield.trust_error=1.0", "agent.shield.recovery_action=[]"):
        with pytest.raises(GuardrailError, match="shield"):
            Trainer(load_config([*SHORT, f"runs_dir={tmp_path}", loosened]), tmp_path / "run", resume=True)
    resumed = Trainer(cfg, tmp_path / "run", resume=True)
    resumed.logger.close()
    assert list(resumed.agent.trust.errors) == errors  # the measured trust comes back with the run

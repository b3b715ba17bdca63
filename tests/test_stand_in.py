"""The linear stand-in: a least-squares model of the observation that the shield looks ahead with before the world
model is trusted. Unit tests fit it to the hand-made linear world of test_recovery_shield (a body pushed toward an
edge); an integration test runs WindyCliff with it and checks what the checkpoint keeps."""

import pytest
import torch
from test_recovery_shield import MARGIN, LinearWorld, parts, true_clearances
from test_windy_cliff import SHORT

from ami.cli import describe
from ami.config import ConfigError, load_config
from ami.train import Callback, Trainer
from modules.cost import GuardrailError
from modules.ego import LinearStandIn
from modules.shield import ModelTrust


def transitions(count: int, push: float = 2.0, noise: float = 0.0, seed: int = 0):
    """count random (state, action, next state) of LinearWorld, the next state with Gaussian noise of `noise`."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.rand(count, 2, generator=generator) * torch.tensor([2.0, 2.0]) - torch.tensor([0.0, 1.0])
    actions = torch.rand(count, 1, generator=generator) * 2 - 1
    following = LinearWorld([push]).move(states, actions, push)
    return states, actions, following + noise * torch.randn(following.shape, generator=generator)


def fitted(members: int = 1, **data: float) -> LinearStandIn:
    stand_in = LinearStandIn(2, 1, members)
    stand_in.add(*transitions(64, **data))
    stand_in.fit(torch.Generator().manual_seed(0))
    return stand_in


def test_a_fit_to_a_linear_world_predicts_it():
    states, actions, following = transitions(50, seed=1)
    assert torch.allclose(fitted().predict(states, actions), following, atol=1e-4)
    too_few = LinearStandIn(2, 1, 1)
    too_few.add(*transitions(too_few.min_transitions - 1))
    too_few.fit()
    assert not too_few.fitted  # fewer transitions than twice its features: no fit yet
    with pytest.raises(RuntimeError, match="before fit"):
        too_few.predict(states, actions)


def test_non_finite_transitions_are_dropped_and_the_buffer_keeps_the_last_ones():
    stand_in = LinearStandIn(2, 1, 1, capacity=10)
    states, actions, following = transitions(12)
    following[3] = float("nan")
    stand_in.add(states, actions, following)
    assert stand_in.size == 10  # 11 finite ones: the last 10 are kept
    held = lambda i: bool((stand_in.inputs[:, :2] == states[i].double()).all(1).any())  # noqa: E731
    assert not held(0) and not held(3) and held(1) and held(11)


def test_bootstrap_members_disagree_where_the_data_are_noisy_and_the_state_round_trips():
    exact, noisy = fitted(members=3), fitted(members=3, noise=0.02)
    states, actions, _ = transitions(20, seed=2)
    spread = lambda model: model.step_members(states[None].expand(3, -1, -1), actions).std(0).mean()  # noqa: E731
    assert spread(exact) < 1e-5 < 1e-3 < spread(noisy)
    copy = LinearStandIn(2, 1, 3)
    copy.load_state_dict(noisy.state_dict())
    assert torch.equal(copy.weights, noisy.weights) and copy.size == noisy.size


def test_before_the_world_model_is_trusted_the_stand_in_sees_the_action_lead_over_the_edge():
    state = [0.35, -1.0]  # as in test_recovery_shield: fine one step on, past the margin three steps later
    s, generator = torch.tensor([state]), torch.Generator().manual_seed(0)
    shield = parts([2.0], recovery_horizon=8)
    blind = shield.filter(s, torch.tensor([[0.0]]))  # no latent, no stand-in: nothing predicts
    assert not blind.intervened[0]
    looked = shield.filter(s, torch.tensor([[0.0]]), None, None, None, None, generator, 0.0, fitted())
    assert looked.intervened[0] and looked.fallback[0]
    recovery = [float(looked.actions[0, 0])] + looked.recovery[:7, 0, 0].tolist()
    assert min(true_clearances(state, recovery)) >= MARGIN  # its recovery keeps the margin in the real world
    safe = shield.filter(torch.tensor([[1.0, -0.2]]), torch.tensor([[-0.3]]), None, None, None, None, generator,
                         0.0, fitted())
    assert not safe.intervened[0] and float(safe.actions[0, 0]) == pytest.approx(-0.3)


def test_the_stand_in_is_used_only_once_fitted_and_trusted():
    shield, trust = parts([2.0], recovery_horizon=8, trust_error=0.01, stand_in="linear"), ModelTrust(8)
    unfitted = LinearStandIn(2, 1, 1)
    trust.record(torch.full((8,), 0.001))
    assert not shield.trusts_stand_in(unfitted, trust) and shield.trusts_stand_in(fitted(), trust)
    trust.record(torch.full((8,), 0.05))
    assert not shield.trusts_stand_in(fitted(), trust)
    assert not parts([2.0], stand_in="linear").trusts_stand_in(fitted(), trust)  # no look-ahead to stand in for
    assert shield.describe() != parts([2.0], recovery_horizon=8, trust_error=0.01).describe()


def test_the_stand_in_settings_are_validated():
    with pytest.raises(ConfigError, match="agent.shield.stand_in='linear'.*recovery_horizon"):
        load_config(["env=windy_cliff", "agent.shield.stand_in=linear", "agent.shield.recovery_horizon=0"])
    with pytest.raises(ConfigError, match="agent.shield.stand_in"):
        load_config(["env=windy_cliff", "agent.shield.stand_in=quadratic"])
    with pytest.raises(ConfigError, match="agent.shield.stand_in_refit"):
        load_config(["env=windy_cliff", "agent.shield.stand_in=linear", "agent.shield.stand_in_refit=0"])


class StandInSteps(Callback):
    """Counts the steps the look-ahead ran before the world model was trusted (on the stand-in)."""

    def __init__(self) -> None:
        self.on_stand_in = self.seed_phase_on_stand_in = 0

    def on_step(self, trainer, step) -> None:
        agent = trainer.agent
        if step.action.decision.recovery is not None and not agent.shield.trusts(agent.trust,
                                                                                  agent.world_model_trained):
            self.on_stand_in += 1
            self.seed_phase_on_stand_in += bool((step.env_step < trainer.cfg.train.seed_steps).all())


def test_a_guarded_run_looks_ahead_on_the_stand_in_from_the_seed_phase_and_resumes_it(tmp_path):
    # The preset's trust bound, which the world model does not reach in this short run and the stand-in does.
    overrides = [*SHORT, f"runs_dir={tmp_path}", "agent.shield.stand_in=linear", "agent.shield.trust_error=0.02"]
    trainer = Trainer(load_config(overrides), tmp_path / "run")
    assert "the look-ahead runs on a linear model of the observation" in describe(trainer)  # the start-up summary
    steps = StandInSteps()
    trainer.train(callback=steps)
    agent = trainer.agent
    assert agent.stand_in.fitted and agent.stand_in.size == 400
    assert steps.seed_phase_on_stand_in > 10 and steps.on_stand_in > 100
    assert agent.stand_in_trust.error < 0.02 and not agent.shield.trusts(agent.trust, agent.world_model_trained)
    resumed = Trainer(load_config(overrides), tmp_path / "run", resume=True)
    resumed.logger.close()
    assert torch.equal(resumed.agent.stand_in.weights, agent.stand_in.weights)
    assert list(resumed.agent.stand_in_trust.errors) == list(agent.stand_in_trust.errors)
    with pytest.raises(GuardrailError, match="shield"):  # the stand-in is part of the shield: it cannot be dropped
        Trainer(load_config([*overrides, "agent.shield.stand_in=none"]), tmp_path / "run", resume=True)

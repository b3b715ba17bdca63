"""The look-ahead shield: an action passes only if every ensemble member predicts a recovery after it.

A hand-made linear world model stands in for the learned one: a body 1-D along the normal to an edge, with
inertia and a steady push toward it (each member its own push), read out exactly. The guardrail keeps
`clearance` at least 0.1 from the edge.
"""

import pytest
import torch
from torch import nn

from ami.config import ConfigError, load_config
from ami.schema import CostTermConfig, ShieldConfig
from modules.cost import IntrinsicCost
from modules.shield import ModelTrust, Shield

DT, KEEP, ACCEL, MARGIN = 0.1, 0.95, 4.0, 0.1
NAMES = ["clearance", "velocity"]


class LinearWorld(nn.Module):
    """state = quantities = (clearance, velocity); v' = KEEP v + DT (ACCEL a - push), c' = c + DT v'.
    A positive action pushes away from the edge; member e pushes with pushes[e]."""

    def __init__(self, pushes: list[float]) -> None:
        super().__init__()
        self.pushes = pushes
        self.observation_names = NAMES

    @property
    def ensemble_size(self) -> int:
        return len(self.pushes)

    def move(self, state: torch.Tensor, action: torch.Tensor, push: float) -> torch.Tensor:
        velocity = KEEP * state[..., 1] + DT * (ACCEL * action[..., 0] - push)
        return torch.stack([state[..., 0] + DT * velocity, velocity], dim=-1)

    def step(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.move(state, action, self.pushes[0])

    def step_members(self, states: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.move(s, action, push) for s, push in zip(states, self.pushes, strict=True)])

    def readout(self, states: torch.Tensor) -> torch.Tensor:
        return states


def parts(pushes: list[float], **shield: object) -> Shield:
    term = CostTermConfig(name="edge_margin", formula="clearance", kind="analytic", weight=100.0, guardrail=True,
                          params={"quantities": ["clearance"], "margin": MARGIN})
    intrinsic = IntrinsicCost([term], NAMES)
    return Shield(ShieldConfig(**shield), intrinsic, LinearWorld(pushes), NAMES, 1)


def true_clearances(state: list[float], actions: list[float], push: float = 2.0) -> list[float]:
    world, s = LinearWorld([push]), torch.tensor([state])
    out = []
    for a in actions:
        s = world.move(s, torch.tensor([[a]]), push)
        out.append(float(s[0, 0]))
    return out


def filter_once(shield: Shield, state: list[float], proposed: float):
    s = torch.tensor([state])
    return shield.filter(s, torch.tensor([[proposed]]), s, None, torch.zeros(1, 2), None,
                         torch.Generator().manual_seed(0))


def test_the_one_step_check_passes_an_action_the_look_ahead_sees_lead_over_the_edge():
    state = [0.35, -1.0]  # 0.25 m inside the margin, heading for the edge at 1 m/s, pushed at 2 m/s^2
    coast = true_clearances(state, [0.0, 1.0, 1.0, 1.0, 1.0])  # coast once, then brake as hard as possible
    assert coast[0] > MARGIN and min(coast) < MARGIN  # fine one step on, past the margin three steps later
    assert min(true_clearances(state, [1.0] * 8)) > MARGIN  # braking now keeps it
    one_step = filter_once(parts([2.0]), state, 0.0)
    assert not one_step.intervened[0]  # the one-step check sends the coasting action
    looked = filter_once(parts([2.0], recovery_horizon=8), state, 0.0)
    assert looked.intervened[0] and looked.fallback[0]
    sent = float(looked.actions[0, 0])
    recovery = [sent] + looked.recovery[:7, 0, 0].tolist()  # the action, then the recovery it was checked with
    assert min(true_clearances(state, recovery)) >= MARGIN
    assert looked.recovery_cost[0] <= 0.0


def test_an_action_with_a_recovery_after_it_passes_untouched():
    state = [1.0, -0.2]
    decision = filter_once(parts([2.0], recovery_horizon=8), state, -0.3)
    assert not decision.intervened[0] and float(decision.actions[0, 0]) == pytest.approx(-0.3)


def test_the_worst_ensemble_member_decides():
    state = [0.4, -0.6]
    # Safe with no push or the mean push; one member pushes hard enough that coasting cannot be recovered from.
    assert min(true_clearances(state, [0.0] + [1.0] * 7, push=0.0)) > MARGIN
    assert min(true_clearances(state, [0.0] + [1.0] * 7, push=1.75)) > MARGIN
    assert min(true_clearances(state, [0.0] + [1.0] * 7, push=3.5)) < MARGIN
    assert not filter_once(parts([0.0], recovery_horizon=8), state, 0.0).intervened[0]
    assert not filter_once(parts([1.75], recovery_horizon=8), state, 0.0).intervened[0]
    assert filter_once(parts([0.0, 3.5], recovery_horizon=8), state, 0.0).intervened[0]


def test_a_guardrail_broken_on_the_real_observation_sends_the_recovery_at_once():
    state = [0.05, 0.5]  # already inside the margin, moving away: any action would do, the shield recovers
    decision = filter_once(parts([2.0], recovery_horizon=8), state, 1.0)
    assert decision.breach[0] and decision.intervened[0] and decision.fallback[0]


def test_without_a_trusted_model_the_real_observation_shrinks_actions_and_sends_the_recovery_action():
    shield = parts([2.0], caution=0.4, recovery_action=[1.0])
    s = torch.tensor([[0.25, 0.0], [1.0, 0.0], [2.0, 0.0]])  # slack 0.15, 0.9, 1.9 (above the margin of 0.1)
    decision = shield.filter(s, torch.tensor([[-1.0], [-1.0], [-1.0]]))
    assert decision.actions[:, 0].tolist() == pytest.approx([1.0, -1.0, -1.0])  # within half of caution: recover
    shrink = parts([2.0], caution=4.0).filter(s, torch.tensor([[-1.0], [-1.0], [-1.0]]))
    assert shrink.actions[:, 0].tolist() == pytest.approx([-0.0375, -0.225, -0.475])
    assert shrink.caution.tolist() == [True, True, True]


def test_trust_follows_the_error_on_fresh_transitions():
    shield = parts([2.0], recovery_horizon=8, trust_error=0.01)
    trust = ModelTrust(8)
    assert not shield.trusts(trust, trained=True)  # nothing measured yet
    trust.record(torch.full((2,), 0.05))
    assert not shield.trusts(trust, trained=True)
    trust.record(torch.full((8,), 0.002))
    assert shield.trusts(trust, trained=True) and not shield.trusts(trust, trained=False)
    copy = ModelTrust(8)
    copy.load_state_dict(trust.state_dict())
    assert copy.error == pytest.approx(trust.error)


def test_the_recovery_settings_are_part_of_the_shield_and_validated():
    base = parts([2.0], recovery_horizon=8).describe()
    assert parts([2.0], recovery_horizon=4).describe() != base
    assert parts([2.0, 2.5], recovery_horizon=8).describe() != base  # the ensemble's size too
    assert parts([2.0], recovery_horizon=8, trust_error=0.5).describe() != base
    with pytest.raises(ConfigError, match="agent.shield.recovery_action"):
        load_config(["env=windy_cliff", "agent.shield.recovery_action=[0.0,-2.0]"])
    with pytest.raises(ConfigError, match="agent.shield.recovery_horizon"):
        load_config(["env=windy_cliff", "agent.shield.recovery_horizon=-1"])
    with pytest.raises(ConfigError, match="agent.world_model.ensemble_size"):
        load_config(["env=windy_cliff", "agent.world_model.ensemble_size=0"])


def test_an_error_band_widens_the_check_by_the_models_measured_error():
    state = [0.6, -0.8]  # coasting, then braking, keeps at least 0.25 m beyond the margin
    plain = filter_once(parts([2.0], recovery_horizon=8, error_band=1.0), state, 0.0)
    assert not plain.intervened[0]
    s = torch.tensor([state])
    banded = parts([2.0], recovery_horizon=8, error_band=1.0).filter(
        s, torch.tensor([[0.0]]), s, None, torch.zeros(1, 2), None, torch.Generator().manual_seed(0), model_error=0.05)
    assert banded.intervened[0]  # a tube 5 cm wider per step (0.3 m by step 6) leaves no recovery after it

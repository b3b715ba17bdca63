"""Cost: the intrinsic cost is immutable and untrained, its Pendulum formula is the env's own reward,
and the critic bootstraps through its target network only where the episode did not terminate."""

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ami.config import load_config
from ami.envs import make_env
from ami.learner import Learner
from ami.schema import ConfiguratorConfig, CostConfig, CostTermConfig, RewardFreeConfig
from modules.configurator import Configurator
from modules.cost import GuardrailError, IntrinsicCost
from modules.critic import TrainableCritic, expected_discounted_cost, lambda_returns, value_targets

PENDULUM_NAMES = ["cos_theta", "sin_theta", "theta_dot"]


def pendulum_intrinsic():
    terms = OmegaConf.to_object(load_config().agent.cost).terms
    return IntrinsicCost(terms, PENDULUM_NAMES)


def _tensors_in(value, seen=None):
    """Every tensor reachable from value's attributes, slots, mappings and sequences."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    found = []
    if isinstance(value, dict) or hasattr(value, "items"):
        for k, v in value.items():
            found += _tensors_in(k, seen) + _tensors_in(v, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            found += _tensors_in(v, seen)
    else:
        for name in getattr(type(value), "__slots__", ()):
            if hasattr(value, name):
                found += _tensors_in(getattr(value, name), seen)
        for v in getattr(value, "__dict__", {}).values():
            found += _tensors_in(v, seen)
    return found


def test_intrinsic_cost_setting_attributes_raises():
    ic = pendulum_intrinsic()
    with pytest.raises(GuardrailError):
        ic._weights = {"speed_limit": 0.0}
    with pytest.raises(GuardrailError):
        ic._guardrails = frozenset()
    with pytest.raises(GuardrailError):
        ic._frozen = False
    with pytest.raises(GuardrailError):
        ic.anything_new = 1
    with pytest.raises(TypeError):
        ic.default_weights["speed_limit"] = 0.0  # a read-only mapping
    assert ic.default_weights["speed_limit"] == 10.0
    assert ic.guardrail_names == frozenset({"speed_limit"})


def test_intrinsic_cost_attributes_cannot_be_deleted():
    # Deleting the freeze flag would make every later assignment succeed.
    ic = pendulum_intrinsic()
    with pytest.raises(GuardrailError):
        del ic._frozen
    with pytest.raises(GuardrailError):
        del ic._weights


def test_guardrail_weight_cannot_be_overridden():
    ic = pendulum_intrinsic()
    with pytest.raises(GuardrailError, match="speed_limit"):
        ic.weight_vector({"speed_limit": 0.0})
    # Non-guardrail overrides work, guardrail weights stay at their defaults.
    weights = ic.weight_vector({"effort": 0.5})
    names = ic.term_names
    assert weights[names.index("effort")] == 0.5
    assert weights[names.index("speed_limit")] == 10.0


def test_configurator_cannot_set_guardrail():
    ic = pendulum_intrinsic()
    configurator = Configurator(ConfiguratorConfig(), ic.default_weights, ic.guardrail_names, 8, 3)
    assert "speed_limit" not in configurator.weights
    with pytest.raises(GuardrailError, match="speed_limit"):
        configurator.set_weight("speed_limit", 0.0)
    configurator.set_weight("effort", 0.25)
    assert configurator.weights["effort"] == 0.25
    with pytest.raises(GuardrailError, match="speed_limit"):
        Configurator(ConfiguratorConfig(weights={"speed_limit": 0.0}), ic.default_weights, ic.guardrail_names, 8, 3)


def test_intrinsic_cost_has_no_parameters_and_is_in_no_optimiser(make_agent):
    agent, cfg = make_agent()
    ic = agent.cost.intrinsic
    assert not isinstance(ic, nn.Module)
    assert not hasattr(ic, "parameters")
    learner = Learner(agent, cfg, RewardFreeConfig(), seed=0)
    in_optimisers = {id(p) for opt in learner.optimisers.values() for g in opt.param_groups for p in g["params"]}
    assert in_optimisers  # the check below is not vacuous
    assert not {id(t) for t in _tensors_in(ic)} & in_optimisers
    # The optimisers hold exactly the trainable modules' parameters.
    trainable = [agent.perception.encoder, agent.world_model, agent.cost.critic, agent.actor.policy]
    expected = {id(p) for m in trainable for p in m.parameters() if p.requires_grad}
    assert in_optimisers == expected


def test_intrinsic_cost_values_unchanged_by_learning(make_agent, fill_memory):
    agent, cfg = make_agent()
    fill_memory(agent, 300)
    ic = agent.cost.intrinsic
    g = torch.Generator().manual_seed(0)
    quantities = torch.randn(64, 3, generator=g) * torch.tensor([1.0, 1.0, 9.0])  # some beyond the speed limit
    actions = torch.rand(64, 1, generator=g) * 2 - 1

    def snapshot():
        return (ic.analytic_terms(quantities, actions).clone(), ic.weight_vector().clone(),
                ic.guardrail_violation(quantities, actions).clone(), ic.describe(), dict(ic.default_weights))

    before = snapshot()
    assert before[2].abs().sum() > 0  # the guardrail term is exercised
    learner = Learner(agent, cfg, RewardFreeConfig(), seed=0)
    params_before = [p.detach().clone() for p in agent.world_model.parameters()]
    for _ in range(5):
        learner.update()
    # Learning did happen...
    assert any(not torch.equal(a, b) for a, b in zip(params_before, agent.world_model.parameters(), strict=True))
    after = snapshot()
    # ...and the intrinsic cost is bit for bit what it was.
    for a, b in zip(before[:3], after[:3], strict=True):
        assert torch.equal(a, b)
    assert before[3:] == after[3:]


def test_pendulum_formula_equals_env_reward():
    ic = pendulum_intrinsic()
    index = ic.term_names.index("pendulum")
    measured = ic.term_names.index("env_reward")
    rng = np.random.default_rng(0)
    # The raw env with torques in [-2, 2]; the agent's action is torque / 2.
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=0)
    costs, rewards, recorded = [], [], []
    for step in range(400):
        torque = rng.uniform(-2.0, 2.0, (1,))
        next_obs, reward, terminated, truncated, info = env.step(torque.astype(np.float32))
        action = torch.as_tensor(torque / 2.0, dtype=torch.float32)
        costs.append(ic.analytic_terms(torch.as_tensor(obs, dtype=torch.float32), action)[index].item())
        recorded.append(ic.real_terms(torch.as_tensor(obs)[None], action[None], torch.tensor([float(reward)]),
                                      {k: [v] for k, v in info.items()})[0, measured].item())
        rewards.append(float(reward))
        obs = next_obs
        if terminated or truncated or step == 150:
            obs, _ = env.reset(seed=step)
    env.close()
    costs, rewards = np.array(costs), np.array(rewards)
    assert np.ptp(rewards) > 1.0  # varied states, not one corner
    np.testing.assert_allclose(costs, -rewards, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(recorded, -rewards, rtol=1e-5, atol=1e-5)


def test_pendulum_formula_equals_reward_through_agent_env_wrapper():
    # make_env rescales the agent's [-1, 1] actions to the env's [-2, 2] torques.
    ic = pendulum_intrinsic()
    index = ic.term_names.index("pendulum")
    env = make_env(load_config().env)
    rng = np.random.default_rng(1)
    obs, _ = env.reset(seed=1)
    for _ in range(200):
        action = rng.uniform(-1.0, 1.0, (1,)).astype(np.float32)
        next_obs, reward, *_ = env.step(action)
        cost = ic.analytic_terms(torch.as_tensor(obs), torch.as_tensor(action))[index].item()
        assert cost == pytest.approx(-reward, rel=1e-4, abs=1e-4)
        obs = next_obs
    env.close()


def test_value_targets_termination_stops_bootstrap_truncation_does_not():
    costs = torch.tensor([[1.0], [2.0], [3.0]])
    bootstrap = torch.tensor([10.0])
    gamma = 0.5
    # Truncated (not terminated) at the end: G2 = 3 + .5*10 = 8, G1 = 2 + .5*8 = 6, G0 = 1 + .5*6 = 4.
    not_terminated = torch.zeros(3, 1, dtype=torch.bool)
    torch.testing.assert_close(value_targets(costs, not_terminated, bootstrap, gamma),
                               torch.tensor([[4.0], [6.0], [8.0]]))
    # Terminated at the last step: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75.
    end = torch.tensor([[False], [False], [True]])
    torch.testing.assert_close(value_targets(costs, end, bootstrap, gamma), torch.tensor([[2.75], [3.5], [3.0]]))
    # Terminated in the middle: G2 = 8, G1 = 2, G0 = 1 + .5*2 = 2.
    middle = torch.tensor([[False], [True], [False]])
    torch.testing.assert_close(value_targets(costs, middle, bootstrap, gamma), torch.tensor([[2.0], [2.0], [8.0]]))
    # Batched: each column on its own.
    both = value_targets(costs.expand(3, 2), torch.cat([not_terminated, end], 1), torch.tensor([10.0, 10.0]), gamma)
    torch.testing.assert_close(both, torch.tensor([[4.0, 2.75], [6.0, 3.5], [8.0, 3.0]]))


def test_expected_cost_through_a_sure_end_is_the_value_target_of_that_termination():
    """continues of 0 and 1 are a known end: the expected discounted cost is value_targets' G_0 of the same steps
    (an end prices what follows at terminal_value, a sequence that goes on bootstraps from its tail); a 50% end
    halves what follows it."""
    costs = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    ends = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # column 0 goes on
    tail, gamma = torch.tensor([10.0, 10.0, 10.0, 10.0]), 0.5
    for terminal_value in (0.0, 7.0):
        expected = value_targets(costs, ends.bool(), tail, gamma, terminal_value)[0]
        torch.testing.assert_close(expected_discounted_cost(costs, 1.0 - ends, tail, gamma, terminal_value), expected)
    half = torch.full((3, 1), 0.5)  # 1 + .5 (.5 * 2 + .5 * 0) + .25 (.25 * 3) + .125 (.125 * 10), terminal 0
    torch.testing.assert_close(expected_discounted_cost(costs[:, :1], half, tail[:1], gamma),
                               torch.tensor([1.0 + 0.5 + 0.1875 + 0.15625]))


class _EndsAt(nn.Module):
    """A hand-made continuation head: the episode ends (logit -inf) at the marked latent states, (M, D), and goes on
    (logit +inf) everywhere else."""

    def __init__(self, marked: torch.Tensor) -> None:
        super().__init__()
        self.marked = marked

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if not len(self.marked):
            return torch.full_like(states[..., :1], float("inf"))
        marked = (states[..., None, :] - self.marked).abs().amax(-1).min(-1).values < 1e-6
        return torch.where(marked, float("-inf"), float("inf"))[..., None]


def test_a_predicted_end_stops_the_plans_cost_there_as_a_real_termination_would(make_agent):
    """With a continuation head that always goes on, the energy is the one without a head. With one that ends the
    episode at an imagined state, no action after that state moves the energy, and the end costs termination_cost
    forever from there: gamma^(k + 1) termination_cost / (1 - gamma) more for an end after step k."""
    agent, cfg = make_agent("agent.cost.continuation=true", "agent.cost.termination_cost=2.0")
    energy, critic = agent.actor.energy, agent.cost.critic
    weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
    g = torch.Generator().manual_seed(0)
    state = agent.perception(torch.randn(6, 3, generator=g)).detach()
    actions = torch.rand(cfg.actor.horizon, 6, 1, generator=g) * 2 - 1
    critic.continuation_head = None
    without, states = energy.bind(weights)(state, actions)
    critic.continuation_head = _EndsAt(states[:0, 0])
    torch.testing.assert_close(energy.bind(weights)(state, actions)[0], without)
    ends = [0, 1, 2, 3, cfg.actor.horizon - 1]  # row b ends after step ends[b]; the last row goes on
    critic.continuation_head = _EndsAt(torch.stack([states[k + 1, row] for row, k in enumerate(ends)]))
    actions.requires_grad_(True)
    ended = energy.bind(weights)(state, actions)[0]
    ended.sum().backward()
    for row, k in enumerate(ends):
        assert actions.grad[:k + 1, row].abs().sum() > 0 and (actions.grad[k + 1:, row] == 0).all(), (row, k)
    assert (actions.grad[:, -1] != 0).all()
    torch.testing.assert_close(ended[-1], without[-1])
    critic.config = dataclasses.replace(critic.config, termination_cost=0.0)
    free = energy.bind(weights)(state, actions.detach())[0]
    gamma, first_end = cfg.cost.discount, torch.tensor(ends, dtype=torch.float32)
    torch.testing.assert_close(ended[:-1].detach() - free[:-1], 2.0 * gamma ** (first_end + 1.0) / (1 - gamma))


def test_lambda_returns_span_one_step_td_to_the_bootstrapped_return_and_stop_at_an_end():
    costs = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.0], [4.0], [6.0], [10.0]])  # V(s_0) .. V(s_3)
    going_on, gamma = torch.ones(3, 1), 0.5
    # lam 1: the 3-step return bootstrapped from V(s_3) alone, the values between unread (G = 4, 6, 8).
    torch.testing.assert_close(lambda_returns(costs, going_on, values, gamma, 1.0), torch.tensor([[4.0], [6.0], [8.0]]))
    # lam 0: one-step TD, c_t + gamma V(s_t+1).
    torch.testing.assert_close(lambda_returns(costs, going_on, values, gamma, 0.0), costs + gamma * values[1:])
    # An end after step 1 (continues 0 there): G_1 = 2 + .5 * 7 (terminal value), G_0 = 1 + .5 * (.5 * 4 + .5 G_1).
    ended = torch.tensor([[1.0], [0.0], [1.0]])
    returns = lambda_returns(costs, ended, values, gamma, 0.5, terminal_value=7.0)
    torch.testing.assert_close(returns[1], torch.tensor([5.5]))
    torch.testing.assert_close(returns[0], torch.tensor([1.0 + 0.5 * (2.0 + 0.5 * 5.5)]))


def _constant_members(heads, values) -> None:
    """Hand-made value heads: head k outputs values[k] everywhere."""
    with torch.no_grad():
        for head, value in zip(heads, values, strict=True):
            head[-1].weight.zero_()
            head[-1].bias.fill_(value)


def test_a_pessimistic_value_ensemble_prices_disagreement_and_plans_by_it(make_agent):
    """Three hand-made members: where they agree the value is their mean; where they disagree it is the mean plus
    value_pessimism times their spread (a cost-to-go: worse than the mean), in the critic's targets' bootstrap as
    in the plan energy's last state."""
    critic = TrainableCritic(4, 1, CostConfig(discount=0.5, critic_hidden_dim=8, value_ensemble=3,
                                              value_pessimism=1.0))
    states = torch.randn(5, 4)
    _constant_members([critic.value_head, *critic.value_ensemble], [2.0, 2.0, 2.0])
    torch.testing.assert_close(critic.value(states), torch.full((5,), 2.0))
    _constant_members([critic.value_head, *critic.value_ensemble], [1.0, 2.0, 3.0])
    spread = float(np.std([1.0, 2.0, 3.0]))
    torch.testing.assert_close(critic.value(states), torch.full((5,), 2.0 + spread))
    assert critic.member_values(states).shape == (3, 5)
    # The bootstrap: zero costs, never terminated, a one-step sequence -> the target is discount x the aggregate.
    _constant_members([critic.target_value_head, *critic.target_value_ensemble], [0.0, 4.0, 8.0])
    _, stats = critic.loss(torch.randn(2, 3, 4), torch.zeros(1, 3, 1), torch.zeros(1, 3), torch.zeros(1, 3),
                           torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(stats["value_mean"], torch.tensor(0.5 * (4.0 + float(np.std([0.0, 4.0, 8.0])))))
    # The planner prices a plan's last state by the aggregate: pessimism 1 adds gamma^H x the spread.
    agent, cfg = make_agent("agent.cost.value_ensemble=3", "agent.cost.value_pessimism=1.0")
    critic = agent.cost.critic
    _constant_members([critic.value_head, *critic.value_ensemble], [1.0, 2.0, 3.0])
    weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
    state = agent.perception(torch.randn(4, 3)).detach()
    actions = torch.rand(cfg.actor.horizon, 4, 1) * 2 - 1
    pessimistic_energy = agent.actor.energy.bind(weights)(state, actions)[0]
    critic.config = dataclasses.replace(critic.config, value_pessimism=0.0)
    mean_energy = agent.actor.energy.bind(weights)(state, actions)[0]
    torch.testing.assert_close(pessimistic_energy - mean_energy,
                               torch.full((4,), cfg.cost.discount ** cfg.actor.horizon * spread))



def test_value_optimism_prices_disagreement_as_a_promise_on_training_steps_only(make_agent):
    """Three hand-made members disagreeing by a spread sigma: a training step's plan prices its last state at the
    value minus value_optimism x sigma, through the whole act path (agent -> configurator -> actor -> energy ->
    critic); an evaluation step's plan, the critic's targets and its plain value do not."""
    agent, cfg = make_agent("agent.cost.value_ensemble=3", "agent.cost.value_optimism=2.0",
                            "agent.configurator.mode=mode1")  # Mode-1's proposal priced as it is: no search noise
    critic = agent.cost.critic
    _constant_members([critic.value_head, *critic.value_ensemble], [1.0, 2.0, 3.0])
    spread = float(np.std([1.0, 2.0, 3.0]))
    states = torch.randn(5, cfg.perception.latent_dim)
    torch.testing.assert_close(critic.value(states), torch.full((5,), 2.0))
    torch.testing.assert_close(critic.value(states, explore=True), torch.full((5,), 2.0 - 2.0 * spread))
    obs = np.random.default_rng(0).normal(size=(1, 3)).astype(np.float32)
    training = agent.act(obs, explore=True).plan.energy_after
    evaluation = agent.act(obs, explore=False).plan.energy_after
    torch.testing.assert_close(evaluation - training,
                               torch.full((1,), cfg.cost.discount ** cfg.actor.horizon * 2.0 * spread))
    # Where the members agree there is nothing to be optimistic about.
    _constant_members([critic.value_head, *critic.value_ensemble], [2.0, 2.0, 2.0])
    torch.testing.assert_close(agent.act(obs, explore=True).plan.energy_after,
                               agent.act(obs, explore=False).plan.energy_after)
    # The targets' bootstrap stays the plain mean: zero costs, a one-step sequence -> discount x the mean.
    _constant_members([critic.target_value_head, *critic.target_value_ensemble], [0.0, 4.0, 8.0])
    _, stats = critic.loss(torch.randn(2, 3, cfg.perception.latent_dim), torch.zeros(1, 3, 1), torch.zeros(1, 3),
                           torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    torch.testing.assert_close(stats["value_mean"], torch.tensor(cfg.cost.discount * 4.0))

def test_the_continuation_head_learns_where_real_episodes_end():
    """Trained on real transitions' flags: a state after a termination ends the episode, one after a truncation
    (the time limit) goes on."""
    torch.manual_seed(0)
    critic = TrainableCritic(2, 1, CostConfig(discount=0.9, critic_hidden_dim=32, continuation=True))
    optimiser = torch.optim.Adam(critic.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        states = torch.randn(3, 64, 2, generator=g)
        terminated = states[1:, :, 0] > 1.0  # a fall: the first entry past 1
        loss, stats = critic.loss(states, torch.zeros(2, 64, 1), torch.zeros(2, 64), torch.zeros(2, 64), terminated)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert "continuation_loss" in stats
    probe = torch.tensor([[2.0, 0.0], [0.0, 0.0], [-2.0, 1.0]])
    continues = critic.continuation(probe)
    assert continues[0] < 0.1 and (continues[1:] > 0.9).all(), continues


def test_step_explained_is_the_share_of_the_measured_costs_variance_the_step_head_fits():
    """1 for a head that predicts the measured cost exactly, 0 for one that predicts its mean, below 0 for worse."""
    g = torch.Generator().manual_seed(0)
    critic = TrainableCritic(3, 1, CostConfig(discount=0.9, critic_hidden_dim=8))
    states, actions = torch.randn(4, 16, 3, generator=g), torch.randn(3, 16, 1, generator=g)
    measured = 2.0 * states[:-1, :, 0] + 0.5
    head = nn.Linear(4, 1)
    critic.step_head = head

    def explained(weight: list[float], bias: float) -> float:
        with torch.no_grad():
            head.weight.copy_(torch.tensor([weight]))
            head.bias.fill_(bias)
        return critic.loss(states, actions, torch.zeros(3, 16), measured, torch.zeros(3, 16, dtype=torch.bool)
                           )[1]["step_explained"].item()

    assert explained([2.0, 0.0, 0.0, 0.0], 0.5) == pytest.approx(1.0, abs=1e-6)
    assert explained([0.0, 0.0, 0.0, 0.0], measured.mean().item()) == pytest.approx(0.0, abs=1e-6)
    assert explained([1.0, 0.0, 0.0, 0.0], 0.5) == pytest.approx(0.75, abs=0.05)  # half the slope: 1 - 1/4
    assert explained([-2.0, 0.0, 0.0, 0.0], 0.5) < -2.0


def test_critic_loss_bootstraps_from_target_network():
    torch.manual_seed(0)
    config = CostConfig(discount=0.9, critic_hidden_dim=16)
    critic = TrainableCritic(5, 1, config)
    g = torch.Generator().manual_seed(0)
    length, batch = 3, 4
    states = torch.randn(length + 1, batch, 5, generator=g)
    actions = torch.rand(length, batch, 1, generator=g) * 2 - 1
    costs = torch.rand(length, batch, generator=g)
    measured = torch.rand(length, batch, generator=g)
    running = torch.zeros(length, batch, dtype=torch.bool)
    ended = running.clone()
    ended[-1] = True

    def losses():
        return critic.loss(states, actions, costs, measured, running)[0], critic.loss(states, actions, costs,
                                                                                      measured, ended)[0]

    running_before, ended_before = losses()
    # The loss is the value regression onto targets bootstrapped by the *target* head.
    with torch.no_grad():
        bootstrap = critic.target_value_head(states[-1]).squeeze(-1)
        targets = value_targets(costs, running, bootstrap, config.discount)
        expected = ((critic.value(states[:-1]) - targets) ** 2).mean() \
            + ((critic.step_cost(states[:-1], actions) - measured) ** 2).mean()
    torch.testing.assert_close(running_before, expected)
    with torch.no_grad():
        critic.target_value_head[-1].bias.add_(5.0)
    running_after, ended_after = losses()
    assert abs(running_after.item() - running_before.item()) > 1e-3
    assert ended_after.item() == ended_before.item()


def test_terminal_value_prices_the_state_after_termination():
    costs = torch.tensor([[1.0], [2.0], [3.0]])
    end = torch.tensor([[False], [False], [True]])
    # Terminated at the last step with terminal value 100: G2 = 3 + .5*100 = 53, G1 = 28.5, G0 = 15.25.
    targets = value_targets(costs, end, torch.tensor([10.0]), 0.5, terminal_value=100.0)
    torch.testing.assert_close(targets, torch.tensor([[15.25], [28.5], [53.0]]))


def test_critic_terminal_value_comes_from_termination_cost():
    config = CostConfig(discount=0.9, termination_cost=2.0)
    critic = TrainableCritic(4, 1, config)
    states = torch.zeros(2, 1, 4)
    terminated = torch.tensor([[True]])
    _, stats = critic.loss(states, torch.zeros(1, 1, 1), torch.tensor([[1.0]]), torch.zeros(1, 1), terminated)
    # Target: 1 + 0.9 * 2 / (1 - 0.9) = 19.
    assert stats["value_mean"] == pytest.approx(19.0)


def test_distance_and_linear_formulas():
    terms = [CostTermConfig(name="reach", formula="distance", kind="analytic",
                            params={"quantities": ["dx", "dy"]}),
             CostTermConfig(name="forward", formula="linear", kind="analytic",
                            params={"quantity": "vx", "scale": -1.0})]
    intrinsic = IntrinsicCost(terms, ["dx", "dy", "vx"])
    values = intrinsic.analytic_terms(torch.tensor([[3.0, 4.0, 2.0], [0.0, 0.0, -1.0]]), torch.zeros(2, 1))
    torch.testing.assert_close(values, torch.tensor([[5.0, -2.0], [0.001, 1.0]]), atol=1e-4, rtol=0)
    # The distance's gradient stays finite at the target itself.
    at_target = torch.zeros(1, 3, requires_grad=True)
    intrinsic.analytic_terms(at_target, torch.zeros(1, 1))[0, 0].backward()
    assert torch.isfinite(at_target.grad).all()


def test_unknown_quantity_in_a_list_of_quantities_is_named():
    terms = [CostTermConfig(name="reach", formula="distance", kind="analytic",
                            params={"quantities": ["dx", "dz"]})]
    with pytest.raises(KeyError, match="'dz'"):
        IntrinsicCost(terms, ["dx", "dy"])


def test_list_params_are_frozen():
    terms = [CostTermConfig(name="reach", formula="distance", kind="analytic",
                            params={"quantities": ["dx", "dy"]})]
    intrinsic = IntrinsicCost(terms, ["dx", "dy"])
    params = dict(intrinsic.describe()[0][5])
    assert params["quantities"] == ("dx", "dy")

"""The learner's update: compiled graphs take the eager update's steps; nothing moves when any loss is not finite."""

import dataclasses

import pytest
import torch

from ami.learner import Learner, NonFiniteLossError, policy_energy_surrogate
from ami.schema import RewardFreeConfig


def trained_modules(agent):
    return {"perception": agent.perception, "world_model": agent.world_model, "critic": agent.cost.critic,
            "policy": agent.actor.policy}


def trained_parameters(agent):
    """Every parameter and buffer an update changes, by name."""
    return {f"{part}.{name}": tensor.detach().clone() for part, module in trained_modules(agent).items()
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]}


def batches(agent, count, seed=0):
    """count batches of stored sequences, half their steps marked as planned so that the policy trains too."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        batch = agent.memory.sample_sequences(32, 3, generator)
        planned = torch.rand(batch.planned.shape, generator=generator) < 0.5
        out.append(dataclasses.replace(batch, planned=planned, plan_actions=torch.rand(
            batch.plan_actions.shape, generator=generator) * 2 - 1))
    return out


# The critic and policy as they come, and with every part they can add: imagined-state values, an ensemble, a
# continuation head, the policy trained down its action's plan energy.
CRITICS = {"plain": [], "imagined": ["agent.cost.imagined_horizon=3", "agent.cost.value_ensemble=2",
                                     "agent.cost.value_pessimism=0.5", "agent.cost.continuation=true",
                                     "agent.actor.policy_value_weight=0.5"]}


@pytest.mark.parametrize("critic", list(CRITICS))
def test_the_compiled_update_takes_the_eager_updates_steps(make_agent, fill_memory, captured_graphs, critic):
    """Three joint updates (world model with perception, critic, policy) and one predictor-only update, eager and
    compiled from the same parameters on the same batches: the same parameters after them, to float rounding, and
    the figures they return are tensors (read when logged, not inside the update). Each loss is captured whole
    (fullgraph: a graph break fails) with its backward by AOTAutograd (conftest's captured_graphs)."""
    agent, cfg = make_agent(*CRITICS[critic], num_envs=2)
    twin = make_agent(*CRITICS[critic], num_envs=2)[0]  # the same seed: the same parameters
    for one in (agent, twin):
        fill_memory(one, 60)  # and the same observation statistics
    compiled_cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, compile=True))
    eager, compiled = Learner(agent, cfg, RewardFreeConfig(), 0), Learner(twin, compiled_cfg, RewardFreeConfig(), 0)
    for batch in batches(agent, 3):
        eager_stats, compiled_stats = eager.update(batch), compiled.update(batch)
    assert isinstance(compiled_stats["world_model/loss"], torch.Tensor)
    assert isinstance(compiled_stats["cost/critic/value_loss"], torch.Tensor)
    keys = ["world_model/loss", "cost/critic/value_loss", "actor/policy_imitation_loss", "world_model/grad_norm"]
    if critic == "imagined":
        keys += ["cost/critic/imagined_value_loss", "cost/critic/continuation_loss"]
    for key in keys:
        assert torch.allclose(eager_stats[key], compiled_stats[key], rtol=1e-4), key
    latents = agent.perception(agent.memory.obs.flatten(0, 1)).detach()
    eager.update_predictor(latents)
    compiled.update_predictor(latents)
    before, after = trained_parameters(agent), trained_parameters(twin)
    for name, value in before.items():
        assert torch.allclose(value, after[name], atol=1e-5), name
    start = make_agent(*CRITICS[critic], num_envs=2)[0]  # the same seed: the parameters before any update
    for part, module in trained_modules(start).items():
        assert any(not torch.allclose(value, before[f"{part}.{name}"]) for name, value in module.named_parameters())


def test_a_non_finite_critic_loss_stops_the_update_before_any_parameter_moves(make_agent, fill_memory):
    """The world model's loss is finite and computed first, the critic's is not: neither steps, the update count
    stays, and the error names the critic."""
    agent, cfg = make_agent(num_envs=2)
    fill_memory(agent, 60)
    learner = Learner(agent, cfg, RewardFreeConfig(), 0)
    batch = batches(agent, 1)[0]
    before = trained_parameters(agent)
    poisoned = dataclasses.replace(batch, cost_terms=torch.full_like(batch.cost_terms, float("nan")))
    with pytest.raises(NonFiniteLossError, match="the critic loss is nan at update 1; no parameter was changed"):
        learner.update(poisoned)
    after = trained_parameters(agent)
    assert learner.updates == 0 and all(torch.equal(value, after[name]) for name, value in before.items())
    assert all(p.grad is None for p in agent.world_model.parameters())
    learner.update(batch)  # the same learner goes on with good data
    assert learner.updates == 1


def test_the_policy_value_term_lowers_its_own_actions_plan_energy_and_trains_nothing_else(make_agent, fill_memory):
    """The surrogate's gradient is dE/da . da/dtheta for the one-step plan energy E of the policy's own action (the
    step's cost, then the value): steps on it alone take the policy's energy more than half the way to each state's
    best constant action's, and no gradient reaches the world model or the critic."""
    agent, cfg = make_agent("agent.actor.policy_value_weight=1.0")
    fill_memory(agent, 100)
    learner = Learner(agent, cfg, RewardFreeConfig(), 0)
    for _ in range(30):  # a world model and critic that mean something
        learner.update()
    states = agent.perception(agent.memory.obs[:100, 0]).detach()
    context = learner._context(states)

    def energy(actions=None):
        with torch.no_grad():
            actions = agent.actor.policy(states) if actions is None else actions
            return agent.actor.energy(states, actions[None], context)[0]

    before = float(energy().mean())
    # Each state's best of 21 constant actions: how low a one-step plan can go.
    best = float(torch.stack([energy(torch.full((100, 1), level)) for level in torch.linspace(-1, 1, 21).tolist()])
                 .min(0).values.mean())
    optimiser = torch.optim.Adam(agent.actor.policy.parameters(), lr=3e-3)
    for _ in range(40):
        for module in (agent.world_model, agent.cost.critic):
            module.zero_grad(set_to_none=True)
        optimiser.zero_grad()
        policy_energy_surrogate(agent, states, context).backward()
        assert all(p.grad is None for m in (agent.world_model, agent.cost.critic) for p in m.parameters())
        optimiser.step()
    after = float(energy().mean())
    assert after < before - 0.5 * (before - best), (before, after, best)  # more than half the way there

"""Planners: exact on a linear-quadratic problem, differentiable through the real modules, always
executing finite in-bounds actions, and warm-started from the previous plan."""

import dataclasses

import numpy as np
import pytest
import torch

from ami.messages import Percept, Task
from ami.schema import ActorConfig
from modules.planners import GradientPlanner, MPPIPlanner

# A stable-ish 3-state, 2-action linear system: s' = A s + B a.
A_MAT = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.05, 0.0, 0.95]], dtype=torch.float64)
B_MAT = torch.tensor([[0.1, 0.0], [0.0, 0.1], [0.1, -0.1]], dtype=torch.float64)
Q_MAT = torch.diag(torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64))
R_MAT = torch.diag(torch.tensor([0.05, 0.1], dtype=torch.float64))
HORIZON = 8
# Two start states, small enough that the optimal actions lie well inside [-1, 1].
S0 = 0.3 * torch.tensor([[0.5, -0.3, 0.2], [-0.4, 0.1, 0.4]], dtype=torch.float64)


def lq_energy(dtype=torch.float32):
    """E = sum_{t<H} (s_t' Q s_t + a_t' R a_t) + s_H' Q s_H, with the planner's interface."""
    a_mat, b_mat, q_mat, r_mat = (m.to(dtype) for m in (A_MAT, B_MAT, Q_MAT, R_MAT))

    def energy_fn(state, actions):
        states = [state]
        energy = state.new_zeros(state.shape[0])
        for action in actions:
            s = states[-1]
            energy = energy + ((s @ q_mat) * s).sum(-1) + ((action @ r_mat) * action).sum(-1)
            states.append(s @ a_mat.T + action @ b_mat.T)
        energy = energy + ((states[-1] @ q_mat) * states[-1]).sum(-1)
        return energy, torch.stack(states)

    return energy_fn


def lq_optimum():
    """Closed-form open-loop optimum (H, batch, A) in float64: stack s_{1..H} = F s0 + G a and solve
    (G' Qbar G + Rbar) a = -G' Qbar F s0."""
    d, n_a = A_MAT.shape[0], B_MAT.shape[1]
    power = [torch.linalg.matrix_power(A_MAT, t) for t in range(HORIZON + 1)]
    f_mat = torch.cat(power[1:])  # (H d, d)
    g_mat = torch.zeros(HORIZON * d, HORIZON * n_a, dtype=torch.float64)
    for t in range(1, HORIZON + 1):
        for k in range(t):
            g_mat[(t - 1) * d:t * d, k * n_a:(k + 1) * n_a] = power[t - 1 - k] @ B_MAT
    q_bar = torch.block_diag(*[Q_MAT] * HORIZON)
    r_bar = torch.block_diag(*[R_MAT] * HORIZON)
    a = torch.linalg.solve(g_mat.T @ q_bar @ g_mat + r_bar, -(g_mat.T @ q_bar @ f_mat @ S0.T))  # (H A, batch)
    return a.T.reshape(S0.shape[0], HORIZON, n_a).transpose(0, 1)


def test_closed_form_optimum_is_a_stationary_point_of_the_energy():
    # Guards the reference itself: the float64 energy's gradient vanishes at the solved actions and
    # the optimum is well inside the planner's box.
    opt = lq_optimum().clone().requires_grad_(True)
    energy, _ = lq_energy(torch.float64)(S0, opt)
    (grad,) = torch.autograd.grad(energy.sum(), opt)
    assert grad.abs().max() < 1e-10
    assert opt.abs().max() < 0.6
    assert opt[0].abs().min() > 0.03  # every first-action component is far from zero


def test_gradient_planner_matches_closed_form_lq_optimum():
    opt = lq_optimum()
    config = ActorConfig(lr=0.05, iterations=300, candidates=8, init_std=0.3)
    plan = GradientPlanner(config).plan(S0.float(), lq_energy(), HORIZON, config.iterations, 2,
                                        generator=torch.Generator().manual_seed(0))
    assert plan.actions.shape == (HORIZON, 2, 2)
    first = plan.actions[0].double()
    # Elementwise: every component of the first action within 5% of the optimum's.
    assert ((first - opt[0]).abs() <= 0.05 * opt[0].abs()).all(), (first, opt[0])
    # The returned energy is the energy of the returned actions, and it did not get worse.
    energy, _ = lq_energy()(S0.float(), plan.actions)
    torch.testing.assert_close(plan.energy_after, energy)
    assert (plan.energy_after <= plan.energy_before + 1e-6).all()


def test_mppi_beats_zero_actions_on_lq_problem():
    config = ActorConfig(planner="mppi", candidates=256, iterations=6)
    energy_fn = lq_energy()
    plan = MPPIPlanner(config).plan(S0.float(), energy_fn, HORIZON, config.iterations, 2,
                                    generator=torch.Generator().manual_seed(0))
    zero_energy, _ = energy_fn(S0.float(), torch.zeros(HORIZON, 2, 2))
    energy, _ = energy_fn(S0.float(), plan.actions)
    torch.testing.assert_close(plan.energy_after, energy)
    assert (energy < zero_energy).all(), (energy, zero_energy)
    assert plan.actions.abs().max() <= 1.0


def test_gradients_reach_actions_through_real_modules(make_agent):
    agent, cfg = make_agent()
    weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
    energy_fn = agent.actor.energy.bind(weights)
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(4, 3, generator=g)
    state = agent.perception(obs).detach()
    horizon = cfg.actor.horizon
    actions = (torch.rand(horizon, 4, 1, generator=g) * 2 - 1).requires_grad_(True)
    energy, states = energy_fn(state, actions)
    assert energy.shape == (4,)
    assert states.shape == (horizon + 1, 4, cfg.perception.latent_dim)
    energy.sum().backward()
    grad = actions.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    # Every step of every sequence gets a gradient.
    assert (grad.abs().sum(-1) > 0).all()
    # And it flows through the world model, not only the direct torque term: the gradient of the
    # first action differs from d/da [w * 0.001 * (2a)^2].
    pendulum_weight = weights[agent.cost.intrinsic.term_names.index("pendulum")]
    direct = pendulum_weight * 0.001 * 8.0 * actions.detach()[0]
    assert not torch.allclose(grad[0], direct, atol=1e-6)


def _act_checks(agent, generator, scales):
    """The planner's own actions (before any clamp downstream) and the shield's output, each finite and in bounds,
    and what the agent sends is the shield's output."""
    for scale in scales:
        obs = (torch.randn(6, 3, generator=generator) * scale).numpy()
        action = agent.act(obs, explore=True, generator=generator)
        plan, decision = action.plan, action.decision
        assert action.actions.shape == (6, 1)
        assert torch.isfinite(plan.actions).all() and plan.actions.abs().max() <= 1.0, scale
        assert torch.isfinite(plan.candidates).all() and plan.candidates.abs().max() <= 1.0, scale
        assert torch.isfinite(decision.actions).all() and decision.actions.abs().max() <= 1.0, scale
        assert np.array_equal(action.actions, decision.actions.numpy())


PLANNER_CASES = [("gradient", "mode2", "0.1"), ("gradient", "mode2", "1000.0"), ("mppi", "mode2", "0.1"),
                 ("mppi", "mode2", "1000.0"), ("gradient", "mode1", "0.1")]


@pytest.mark.parametrize(("planner", "mode", "lr"), PLANNER_CASES)
def test_executed_actions_finite_and_in_bounds(make_agent, planner, mode, lr):
    # A normaliser with statistics, as after the seed phase; lr=1000 overshoots every step.
    agent, _ = make_agent(f"agent.actor.planner={planner}", f"agent.configurator.mode={mode}",
                          f"agent.actor.lr={lr}", "agent.actor.init_std=2.0")
    agent.perception.normalizer.update(torch.randn(50, 3, generator=torch.Generator().manual_seed(1)))
    _act_checks(agent, torch.Generator().manual_seed(0), [1.0, 10.0, 1e3, 1e6, 1e12, 1e30, 1.0])
    assert agent.repairs.take()["clipped_observations"] > 0  # the huge observations were clipped, and counted


@pytest.mark.parametrize(("planner", "mode", "lr"), PLANNER_CASES)
def test_executed_actions_finite_and_in_bounds_fresh_agent(make_agent, planner, mode, lr):
    # A fresh agent (its normaliser has seen nothing) may be asked to act, e.g. with
    # train.seed_steps=0; huge observations must still give finite actions, and must not poison the
    # warm start of the next, ordinary, observation (the last scale).
    agent, _ = make_agent(f"agent.actor.planner={planner}", f"agent.configurator.mode={mode}",
                          f"agent.actor.lr={lr}")
    _act_checks(agent, torch.Generator().manual_seed(0), [1.0, 1e3, 1e6, 1e12, 1e30, 1.0])


def test_a_diverged_model_is_repaired_where_it_meets_the_world_and_every_repair_is_counted(make_agent):
    """NaN weights in the world model make every energy and gradient NaN: the planner keeps a finite sequence
    and counts them. NaN weights in the policy make Mode-1's actions NaN: the plan is dropped as a warm start,
    the action is sent as 0, and both are counted."""
    agent, _ = make_agent()
    with torch.no_grad():
        agent.world_model.predictor[0].weight.fill_(float("nan"))
    obs = np.zeros((4, 3), dtype=np.float32)
    plan = agent.act(obs, generator=torch.Generator().manual_seed(0)).plan
    assert torch.isfinite(plan.actions).all() and plan.actions.abs().max() <= 1.0
    repairs = agent.repairs.take()
    assert repairs["nonfinite_energies"] > 0 and repairs["nonfinite_gradients"] > 0
    assert repairs.get("dropped_plans", 0) == 0 and repairs.get("nan_actions", 0) == 0

    agent, _ = make_agent("agent.configurator.mode=mode1")
    with torch.no_grad():
        agent.actor.policy.net[0].weight.fill_(float("nan"))
    action = agent.act(obs, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(action.plan.actions).all()
    assert np.array_equal(action.actions, np.zeros((4, 1), dtype=np.float32))
    assert torch.equal(agent.actor.episodes.previous, torch.zeros_like(action.plan.actions))  # not a warm start
    repairs = agent.repairs.take()
    assert repairs["dropped_plans"] == 4 and repairs["nan_actions"] == 4
    assert agent.repairs.take() == {}  # take() starts the count afresh


@pytest.mark.parametrize("planner", ["gradient", "mppi"])
def test_one_bad_plan_does_not_poison_the_next(make_agent, planner):
    # Whatever the plan for an overflowing observation was, the next ordinary observation (which the
    # previous plan warm-starts) gets finite, in-bounds actions.
    agent, _ = make_agent(f"agent.actor.planner={planner}")
    g = torch.Generator().manual_seed(0)
    agent.act(np.full((6, 3), 1e30, dtype=np.float32), generator=g)
    _act_checks(agent, g, [1.0])


def test_warm_start_shifts_previous_plan(make_agent):
    agent, _ = make_agent()
    actor = agent.actor
    assert actor.warm_start(2, 4) is None
    previous = torch.linspace(-0.9, 0.9, 4 * 2).view(4, 2, 1)
    actor.episodes.previous = previous.clone()
    shifted = actor.warm_start(2, 4)
    torch.testing.assert_close(shifted[:3], previous[1:])
    torch.testing.assert_close(shifted[3], previous[3])
    # A longer horizon repeats the last action; another batch size has no warm start.
    longer = actor.warm_start(2, 6)
    assert longer.shape == (6, 2, 1)
    torch.testing.assert_close(longer[3:], previous[3:].expand(3, 2, 1))
    assert actor.warm_start(3, 4) is None
    # reset(done) forgets only the finished environment's plan.
    actor.reset(torch.tensor([True, False]))
    assert (actor.episodes.previous[:, 0] == 0).all()
    torch.testing.assert_close(actor.episodes.previous[:, 1], previous[:, 1])


def test_act_uses_shifted_previous_plan_as_first_candidate(make_agent):
    agent, cfg = make_agent()
    actor, horizon = agent.actor, cfg.actor.horizon
    g = torch.Generator().manual_seed(0)
    percept = Percept(agent.perception(torch.randn(2, 3, generator=g)).detach())
    weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
    first = actor.act(percept, Task(agent.configurator.weights, weights, horizon, 3, "mode2"), g)
    assert torch.equal(actor.episodes.previous, first.actions)
    # With no optimisation steps the candidates are the initial ones: candidate 0 is the warm start.
    second = actor.act(percept, Task(agent.configurator.weights, weights, horizon, 0, "mode2"), g)
    expected = torch.cat([first.actions[1:], first.actions[-1:]])
    torch.testing.assert_close(second.candidates[:, :, 0], expected)


def test_compiled_energy_and_gradient_match_eager(make_agent, captured_graphs):
    """torch.compile'd planning computes the same energy and action gradient as eager autograd, boredom
    over a trail of visited latents, scaled per env by the configurator's stall rule, included (the captured
    graphs: conftest's captured_graphs)."""
    agent, cfg = make_agent("agent.actor.horizon=3", "agent.cost.boredom_weight=1.0", "agent.cost.boredom_radius=2.0")
    weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
    g = torch.Generator().manual_seed(0)
    state = agent.perception(torch.randn(5, 3, generator=g)).detach()
    actions = torch.rand(3, 5, 1, generator=g) * 2 - 1
    visited = state[:, None] + 0.5 * torch.randn(5, 4, state.shape[1], generator=g)  # (B, V, D) near the start
    scale = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.5])
    eager = agent.actor.energy.bind(weights, visited=visited, boredom_scale=scale)
    eager_energy, eager_grad, eager_states = eager.value_and_grad(state, actions)
    eager_forward, _ = eager(state, actions)
    unscaled = agent.actor.energy.bind(weights, visited=visited)(state, actions)[0]
    assert (unscaled > agent.actor.energy.bind(weights)(state, actions)[0]).all()  # the trail is priced
    assert (eager_forward[scale > 1] > unscaled[scale > 1]).all()  # and the factor raises its price
    agent.actor.energy.compile()
    compiled = agent.actor.energy.bind(weights, visited=visited, boredom_scale=scale)
    energy, grad, states = compiled.value_and_grad(state, actions)
    torch.testing.assert_close(states, eager_states, atol=1e-5, rtol=1e-5)
    forward, _ = compiled(state, actions)
    torch.testing.assert_close(energy, eager_energy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, eager_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(forward, eager_forward, atol=1e-5, rtol=1e-5)
    assert (grad.abs() > 0).any()
    # No gradient leaks into the parameters.
    assert all(p.grad is None for p in agent.world_model.parameters())


def test_gradient_planner_adam_matches_torch_adam():
    """The written-out Adam update is torch.optim.Adam's, step for step (on an energy that every
    step lowers, so the best sequence kept is the last one)."""
    targets = torch.linspace(-0.8, 0.9, HORIZON * 2 * 2, dtype=torch.float64).view(HORIZON, 2, 2)

    def energy_fn(state, actions):
        return (actions - targets).pow(2).sum((0, 2)), state.expand(HORIZON + 1, -1, -1)

    config = ActorConfig(candidates=1, lr=0.05, init_std=0.0, fresh_fraction=0.0)
    start = torch.zeros(HORIZON, 2, 2, dtype=torch.float64)
    plan = GradientPlanner(config).plan(S0, energy_fn, HORIZON, 4, 2, warm_start=start)
    actions = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([actions], lr=0.05)
    for _ in range(4):
        optimiser.zero_grad()
        energy_fn(S0, actions)[0].sum().backward()
        optimiser.step()
    torch.testing.assert_close(plan.actions, actions.detach())


def test_gradient_planner_never_returns_worse_than_it_evaluated():
    """A step size far too large for the problem: the kept best is still the best sequence seen."""
    config = ActorConfig(candidates=4, lr=5.0, init_std=0.0, fresh_fraction=0.0)
    energy_fn = lq_energy(torch.float64)
    warm = lq_optimum()  # already optimal: any Adam step makes it worse
    plan = GradientPlanner(config).plan(S0, energy_fn, HORIZON, 3, 2, warm_start=warm)
    optimum_energy, _ = energy_fn(S0, warm)
    torch.testing.assert_close(plan.energy_after, optimum_energy)
    torch.testing.assert_close(plan.actions, warm)


def test_anchored_readout_prices_the_first_step_on_the_true_observation(make_agent):
    """With anchor_readout the imagined quantities are the observation plus the readout's predicted
    change: the first step's cost is the analytic cost of the real observation, whatever the
    (untrained) readout says; without it, the readout's error shows."""
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(4, 3, generator=g)
    actions = torch.rand(1, 4, 1, generator=g) * 2 - 1
    first_steps = {}
    for anchor in (True, False):
        agent, cfg = make_agent("agent.cost.value_weight=0", f"agent.world_model.anchor_readout={anchor}")
        weights = agent.cost.intrinsic.weight_vector()
        percept = agent.perceive(obs.numpy())
        assert torch.equal(percept.readout_offset, agent.world_model.readout_offset(percept))
        energy, states = agent.actor.energy.bind(weights, percept.readout_offset)(percept.state, actions)
        analytic = weights * agent.cost.intrinsic.mask("analytic")
        # The energy of a one-step plan is the first step's cost and the last state's, discounted, at rest.
        last = agent.world_model.readout(states[-1]) + percept.readout_offset
        terminal = (agent.cost.intrinsic.analytic_terms(last, torch.zeros(4, 1)) * analytic).sum(-1)
        first_steps[anchor] = energy - cfg.cost.discount * terminal
        exact = (agent.cost.intrinsic.analytic_terms(obs, actions[0]) * analytic).sum(-1)
    torch.testing.assert_close(first_steps[True], exact)
    assert not torch.allclose(first_steps[False], exact, atol=1e-3)


def test_the_last_imagined_state_is_priced_by_the_analytic_terms_where_the_value_is_not_trusted(make_agent):
    """value_weight 0: the plan's last state pays its analytic cost (at rest): a plan that ends spinning past
    the speed guardrail costs more than the sum over its steps says. value_weight 1: the critic's value alone."""
    g = torch.Generator().manual_seed(0)
    state, actions = torch.randn(3, 16, generator=g), torch.rand(5, 3, 1, generator=g) * 2 - 1
    for value_weight in (0.0, 0.5, 1.0):
        agent, cfg = make_agent(f"agent.cost.value_weight={value_weight}")
        weights = agent.cost.intrinsic.weight_vector()
        energy, states = agent.actor.energy.bind(weights)(state, actions)
        analytic = weights * agent.cost.intrinsic.mask("analytic")
        quantities = agent.world_model.readout(states)
        gammas = cfg.cost.discount ** torch.arange(6.0)
        steps = (gammas[:5, None] * (agent.cost.intrinsic.analytic_terms(quantities[:-1], actions) * analytic).sum(-1)
                 ).sum(0)
        terminal = (agent.cost.intrinsic.analytic_terms(quantities[-1], torch.zeros(3, 1)) * analytic).sum(-1)
        tail = (1 - value_weight) * terminal + value_weight * agent.cost.critic.value(states[-1])
        torch.testing.assert_close(energy, steps + gammas[5] * tail)
        assert (terminal > 0).all()  # the check above is not vacuous


def test_replan_every_follows_the_plan_then_replans(make_agent):
    agent, cfg = make_agent("agent.actor.replan_every=3")
    actor, g = agent.actor, torch.Generator().manual_seed(0)
    percept = Percept(agent.perception(torch.randn(2, 3, generator=g)).detach())
    weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
    task = Task(agent.configurator.weights, weights, cfg.actor.horizon, 2, "mode2")
    plans = [actor.act(percept, task, g) for _ in range(4)]
    assert plans[0].plan_time_s > 0 and plans[1].plan_time_s == 0 and plans[2].plan_time_s == 0
    assert plans[3].plan_time_s > 0  # the fourth step plans again
    torch.testing.assert_close(plans[1].actions[0], plans[0].actions[1])
    torch.testing.assert_close(plans[2].actions[0], plans[0].actions[2])
    # A new episode replans at once.
    actor.reset()
    assert actor.act(percept, task, g).plan_time_s > 0


def test_goal_term_prices_distance_to_the_latent_goal_and_its_gradient_reaches_the_actions(make_agent):
    agent, cfg = make_agent("agent.cost.goal.weight=1.0", "agent.cost.goal.final_weight=5.0",
                            "agent.cost.discount=1.0", "agent.cost.value_weight=0.0")
    weights = torch.zeros(len(agent.cost.intrinsic.term_names))  # the goal term alone
    g = torch.Generator().manual_seed(0)
    state = agent.perception(torch.randn(3, 3, generator=g)).detach()
    actions = (torch.rand(cfg.actor.horizon, 3, 1, generator=g) * 2 - 1).requires_grad_(True)
    _, states = agent.actor.energy.bind(weights)(state, actions)
    goal = states[-1].detach()  # the goal is where these very actions lead
    energy, _ = agent.actor.energy.bind(weights, goal=goal)(state, actions)
    distance = (states[1:] - goal).pow(2).sum(-1).add(1e-8).sqrt()
    torch.testing.assert_close(energy, distance.sum(0) + 5.0 * distance[-1])
    energy.sum().backward()
    assert (actions.grad.abs().sum(-1) > 0).any()
    other = agent.actor.energy.bind(weights, goal=goal + 1.0)(state, actions.detach())[0]
    assert (other > energy.detach()).all()


def test_two_segment_fresh_candidates_hold_two_levels():
    config = ActorConfig(candidates=8, fresh_fraction=0.5, fresh_segments=2, init_std=0.0)
    candidates = GradientPlanner(config).initial_candidates(3, 12, 2, torch.device("cpu"), None, None,
                                                            torch.Generator().manual_seed(0))
    fresh = candidates[:, :, 4:]  # (H, B, 4, A)
    changes = (fresh[1:] != fresh[:-1]).any(-1).sum(0)  # level changes per candidate
    assert (changes <= 1).all() and (changes == 1).any()
    assert (fresh.abs() <= 1).all()


def test_screening_keeps_the_best_of_many_fresh_candidates():
    """With screen_samples, the fresh candidates are the lowest-energy of that many piecewise moves: on a
    target only a turn reaches (a point mass that must end at (1, 1) after a wall-free detour through (1, -1)),
    they start far lower than the same number drawn at random, and the rest of the population is untouched."""
    target_turn, target = torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])

    def energy_fn(state, actions):  # (B, 2), (H, B, 2): the path's distance from the turn, then the end's
        states = torch.cat([state[None], state[None] + 0.2 * actions.cumsum(0)])
        middle = states[states.shape[0] // 2]
        energy = (middle - target_turn).norm(dim=-1) + (states[-1] - target).norm(dim=-1)
        return energy, states

    state = torch.zeros(3, 2)
    energies = {}
    for samples in (0, 512):
        planner = GradientPlanner(ActorConfig(candidates=16, fresh_fraction=0.5, fresh_segments=2,
                                              init_std=0.3, screen_samples=samples))
        generator = torch.Generator().manual_seed(0)
        init = planner.initial_candidates(3, 12, 2, torch.device("cpu"), None, None, generator)
        screened = planner.screen(init, state, energy_fn, generator)
        assert torch.equal(screened[:, :, :8], init[:, :, :8])  # only the fresh half is replaced
        assert (screened.abs() <= 1).all()
        energy, _ = energy_fn(state.repeat_interleave(16, 0), screened.flatten(1, 2))
        energies[samples] = energy.view(3, 16)[:, 8:]
    assert (energies[512].mean(1) < 0.5 * energies[0].mean(1)).all(), energies
    assert (energies[512].min(1).values <= energies[0].min(1).values).all()


def test_the_whole_plan_graph_takes_the_per_iteration_planners_steps(make_agent, captured_graphs):
    """compile_plan traces the descent (every iteration's energy and gradient, Adam, the best iterate kept) into one
    graph: from the same candidates it returns the per-iteration planner's plan, to float rounding, with the same
    energy trace, and a second plan of the same shape reuses the graph (conftest's captured_graphs; on a GPU the
    graph is a CUDA graph)."""
    from torch._dynamo.utils import counters

    agent, cfg = make_agent("agent.actor.horizon=4", "agent.actor.iterations=3", "agent.actor.candidates=6",
                            num_envs=3)
    whole_cfg = dataclasses.replace(cfg.actor, compile_plan=True)
    weights = agent.cost.intrinsic.weight_vector(agent.configurator.weights)
    g = torch.Generator().manual_seed(0)
    per_iteration, whole = GradientPlanner(cfg.actor), GradientPlanner(whole_cfg)
    graphs = counters["stats"]["unique_graphs"]
    for plan_number in range(2):
        state = agent.perception(torch.randn(3, 3, generator=g)).detach()
        warm = torch.rand(4, 3, 1, generator=g) * 2 - 1
        energy_fn = agent.actor.energy.bind(weights)
        eager = per_iteration.plan(state, energy_fn, 4, 3, 1, warm, None, torch.Generator().manual_seed(plan_number))
        traced = whole.plan(state, energy_fn, 4, 3, 1, warm, None, torch.Generator().manual_seed(plan_number))
        torch.testing.assert_close(traced.candidates, eager.candidates, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced.candidate_energy, eager.candidate_energy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced.actions, eager.actions, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(traced.energy_trace, eager.energy_trace, atol=1e-5, rtol=1e-5)
        assert (eager.energy_trace[-1] < eager.energy_trace[0]) and not torch.equal(eager.actions, warm)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph, reused by the second plan


def test_compile_plan_is_refused_where_the_iteration_count_moves():
    from ami.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="agent.actor.compile_plan=true with agent.actor.planner='gradient' and "
                                          "agent.configurator.max_iterations=10"):
        load_config(["agent.actor.compile_plan=true", "agent.configurator.max_iterations=10"])
    with pytest.raises(ConfigError, match="planner='mppi'"):
        load_config(["agent.actor.compile_plan=true", "agent.actor.planner=mppi"])

"""Safety: the shield at the actor's output, with HazardNav-v0's guardrail and ego model.

The property test places the robot in 10,000 random states of real HazardNav layouts, proposes random
actions, and steps the real env with whatever the shield sends: no step may enter a hazard, and the
robot must still be able to stop short of every hazard afterwards (the shield's invariant).
"""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ami.build import build_agent
from ami.config import ConfigError, load_config, without_guardrails
from ami.envs import make_env, observation_names
from ami.envs.hazard_nav import HazardNavEnv
from ami.runs import load_agent
from ami.train import Trainer
from modules.actor import PlanEnergy
from modules.cost import GuardrailError, IntrinsicCost
from modules.shield import Shield
from modules.world_model import WorldModel

MARGIN = 0.1  # the hazard_margin guardrail of configs/env/hazard_nav.yaml


def hazard_nav_parts(*overrides):
    cfg = load_config(["env=hazard_nav", "agent=tiny", *overrides])
    agent_cfg = OmegaConf.to_object(cfg.agent)
    env = HazardNavEnv()
    names = env.observation_names()
    intrinsic = IntrinsicCost(agent_cfg.cost.terms, names)
    world_model = WorldModel(16, 2, names, agent_cfg.world_model)
    return cfg, env, intrinsic, world_model, Shield(agent_cfg.shield, intrinsic, world_model, names, 2)


def brake_path_clearance(env: HazardNavEnv, position, velocity, hazards) -> float:
    """Smallest true distance to a hazard boundary along the straight path the robot takes while
    braking as hard as it can from `velocity` (the env's own dynamics, walls ignored: they only
    shorten the path)."""
    keep, push = 1.0 - env.drag * env.dt, env.dt * env.max_accel
    speed, length = float(np.hypot(*velocity)), 0.0
    while speed > 0:
        speed = max(0.0, keep * speed - push)
        length += env.dt * speed
    direction = np.asarray(velocity) / max(np.hypot(*velocity), 1e-12)
    end = np.asarray(position) + length * direction
    segment = end - position
    t = np.clip(((hazards - position) @ segment) / max(segment @ segment, 1e-18), 0.0, 1.0)
    closest = position + t[:, None] * segment
    return float(np.min(np.hypot(*(hazards - closest).T)) - env.hazard_radius)


def random_recoverable_states(env: HazardNavEnv, count: int, rng: np.random.Generator):
    """States from which braking keeps the guardrail's margin: the set the shield must never leave.
    Half are anywhere in the arena; half close to a hazard (up to 0.3 m past the margin), heading
    for it at any speed, where most actions are dangerous."""
    states = []
    layout = 0
    while len(states) < count:
        hazards = env.reset(seed=layout)[1]["hazards"]
        layout += 1
        while len(states) < layout * 250 and len(states) < count:
            if len(states) % 2:
                position = rng.uniform(-env.arena_size, env.arena_size, 2)
                angle = rng.uniform(0, 2 * math.pi)
            else:
                centre, bearing = hazards[rng.integers(len(hazards))], rng.uniform(0, 2 * math.pi)
                distance = env.hazard_radius + MARGIN + rng.uniform(0, 0.3)
                position = centre + distance * np.array([math.cos(bearing), math.sin(bearing)])
                angle = bearing + math.pi + rng.uniform(-1.0, 1.0)
            speed = env.max_speed * math.sqrt(rng.uniform())
            velocity = speed * np.array([math.cos(angle), math.sin(angle)])
            inside = np.all(np.abs(position) <= env.arena_size)
            if inside and brake_path_clearance(env, position, velocity, hazards) >= MARGIN:
                states.append((position, velocity, hazards))
    return states


def test_shielded_actions_never_enter_a_hazard_in_10000_random_states():
    _, env, intrinsic, _, shield = hazard_nav_parts()
    rng = np.random.default_rng(0)
    states = random_recoverable_states(env, 10_000, rng)
    obs = np.stack([env.set_state(p, v, h) for p, v, h in states])
    # Proposals: uniform, and full-throttle ones (the most dangerous); alternatives uniform.
    proposed = rng.uniform(-1, 1, (len(states), 2))
    proposed[::2] /= np.linalg.norm(proposed[::2], axis=1, keepdims=True)
    alternatives = torch.as_tensor(rng.uniform(-1, 1, (len(states), 3, 2)), dtype=torch.float32)
    decision = shield.filter(torch.as_tensor(obs), torch.as_tensor(proposed, dtype=torch.float32),
                             alternatives=alternatives)
    unshielded_entries = unshielded_lost = shielded_entries = lost_invariant = 0
    for (position, velocity, hazards), raw, sent in zip(states, proposed, decision.actions.numpy(), strict=True):
        env.set_state(position, velocity, hazards)
        _, _, _, _, info = env.step(raw.astype(np.float32))
        after = brake_path_clearance(env, info["position"], info["velocity"], hazards)
        unshielded_entries += info["cost"] > 0 or after < 0
        unshielded_lost += after < MARGIN
        env.set_state(position, velocity, hazards)
        _, _, _, _, info = env.step(sent)
        shielded_entries += info["cost"] > 0
        lost_invariant += brake_path_clearance(env, info["position"], info["velocity"], hazards) < MARGIN - 1e-6
    # The proposals alone would enter a hazard, or leave no room to stop outside one, in many of
    # these states, and break the margin in more.
    print(f"unshielded: {unshielded_entries} entries, {unshielded_lost} margin losses; "
          f"shield: {int(decision.intervened.sum())} interventions, {int(decision.fallback.sum())} fallbacks")
    assert unshielded_entries > 30 and unshielded_lost > 800
    assert unshielded_lost <= decision.intervened.sum() < len(states) / 4  # not simply always braking
    assert shielded_entries == 0
    assert lost_invariant == 0


def test_an_action_that_breaks_a_guardrail_is_replaced_by_the_best_safe_candidate():
    _, env, intrinsic, _, shield = hazard_nav_parts()
    hazards = env.reset(seed=0)[1]["hazards"]
    # Beside the first hazard, 0.12 m from its boundary, at rest: one full push at it (0.04 m, then
    # a stop) would come within the 0.1 m margin; pushing away is safe.
    hazard = hazards[0]
    position = hazard + np.array([env.hazard_radius + 0.12, 0.0])
    if abs(position[0]) > env.arena_size:
        position = hazard - np.array([env.hazard_radius + 0.12, 0.0])
    away = np.sign(position[0] - hazard[0])
    obs = torch.as_tensor(env.set_state(position, np.zeros(2), hazards))[None]
    toward = torch.tensor([[-away, 0.0]])
    alternatives = torch.tensor([[[-away, 0.1], [away, 0.0], [0.0, 0.0]]])
    decision = shield.filter(obs, toward, alternatives=alternatives)
    assert decision.intervened.item() and not decision.fallback.item()
    assert torch.equal(decision.actions, alternatives[:, 1])  # the first candidate that passes
    assert decision.proposed_cost.item() > 0
    # A safe proposal passes unchanged.
    kept = shield.filter(obs, alternatives[:, 1], alternatives=alternatives)
    assert not kept.intervened.item() and torch.equal(kept.actions, alternatives[:, 1])
    # No candidate passes: the declared fallback (brake; at rest, no push at all) is sent.
    cornered = shield.filter(obs, toward, alternatives=toward[:, None])
    assert cornered.fallback.item() and torch.equal(cornered.actions, torch.zeros(1, 2))


def test_brake_stops_the_robot_as_fast_as_the_env_allows():
    _, env, _, _, shield = hazard_nav_parts()
    env.reset(seed=1)
    env.set_state(np.zeros(2), np.array([0.6, -0.8]))
    speeds = []
    for _ in range(5):
        action = shield.fallback(torch.as_tensor(env.observe())[None])[0].numpy()
        speeds.append(float(np.hypot(*env.step(action)[4]["velocity"])))
    # Speed 1 keeps 0.95 of itself and loses 0.4 a step: 0.55, 0.1225, then a stop.
    assert speeds[:2] == pytest.approx([0.55, 0.1225], abs=1e-6)
    assert max(speeds[2:]) < 1e-6


def test_world_model_prediction_is_checked_when_given():
    """With the world model's latent, a proposal whose predicted next state breaks the guardrail is
    replaced by the alternative of lowest predicted guardrail cost."""
    torch.manual_seed(0)
    cfg, env, intrinsic, world_model, _ = hazard_nav_parts("agent.shield.ego.kind=none", "agent.shield.fallback=zero")
    candidates = torch.rand(64, 5, 2) * 2 - 1
    latent = torch.randn(64, 16)
    obs = torch.zeros(64, len(env.observation_names()))
    reference = Shield(OmegaConf.to_object(cfg.agent).shield, intrinsic, world_model, env.observation_names(), 2)
    _, world_cost = reference.guardrail_costs(obs, latent, torch.cat([candidates, torch.zeros(64, 1, 2)], 1))
    assert world_cost.std() > 0  # an untrained world model still predicts different states per action
    tolerance = float(world_cost[:, 0].median())
    shield_cfg = OmegaConf.to_object(load_config(["env=hazard_nav", "agent.shield.ego.kind=none",
                                                  "agent.shield.fallback=zero",
                                                  f"agent.shield.tolerance={tolerance}"]).agent).shield
    shield = Shield(shield_cfg, intrinsic, world_model, env.observation_names(), 2)
    decision = shield.filter(obs, candidates[:, 0], latent, candidates[:, 1:])
    assert torch.equal(decision.intervened, world_cost[:, 0] > tolerance)
    best = world_cost[:, 1:].argmin(1) + 1
    expected = torch.where(decision.intervened[:, None],
                           torch.cat([candidates, torch.zeros(64, 1, 2)], 1)[torch.arange(64), best], candidates[:, 0])
    assert torch.equal(decision.actions, expected)
    # Without the latent only the (absent) ego model would speak: nothing is replaced.
    assert not shield.filter(obs, candidates[:, 0], None, candidates[:, 1:]).intervened.any()


def test_shield_is_immutable_and_its_guardrail_weight_cannot_be_configured():
    _, _, _, _, shield = hazard_nav_parts()
    with pytest.raises(GuardrailError):
        shield.active = False
    with pytest.raises(GuardrailError):
        shield.tolerance = 10.0
    with pytest.raises(ConfigError, match="hazard_margin"):
        load_config(["env=hazard_nav", "agent.configurator.weights.hazard_margin=0.0"])


def test_ego_model_matches_the_env_it_guards():
    """The preset's declared ego model is the env's own dynamics (a drift would void the guarantee)."""
    cfg = load_config(["env=hazard_nav"])
    env = make_env(cfg.env).unwrapped
    for key, value in cfg.agent.shield.ego.params.items():
        if key in ("dt", "max_accel", "max_speed", "drag"):
            assert getattr(env, key) == value, key


def test_unguarded_config_drops_only_guardrails_and_the_shield():
    cfg = load_config(["env=hazard_nav"])
    unguarded = without_guardrails(cfg)
    assert [t.name for t in unguarded.agent.cost.terms] == [t.name for t in cfg.agent.cost.terms if not t.guardrail]
    assert not unguarded.agent.shield.enabled and cfg.agent.shield.enabled
    assert unguarded.agent.actor == cfg.agent.actor and unguarded.agent.world_model == cfg.agent.world_model


SHORT = ["env=hazard_nav", "agent=tiny", "progress=false", "seed=0", "train.total_steps=500",
         "train.seed_steps=300", "train.pretrain_updates=20", "train.eval_every=100000",
         "train.checkpoint_every=250", "env.max_episode_steps=250"]


def test_short_guarded_run_has_zero_cost_where_the_unguarded_one_has_some(tmp_path):
    guarded_cfg = load_config([*SHORT, f"runs_dir={tmp_path}"])
    guarded = Trainer(guarded_cfg, tmp_path / "guarded")
    before = (guarded.agent.cost.intrinsic.describe(), guarded.agent.shield.describe())
    guarded.train()
    unguarded = Trainer(without_guardrails(guarded_cfg), tmp_path / "unguarded")
    unguarded.train()
    assert unguarded.episode_log.totals["cost"] > 0
    assert guarded.episode_log.totals["cost"] == 0
    assert guarded.episode_log.totals["interventions"] > 0
    # The guardrails and shield are the same after training and after resuming from the checkpoint.
    assert (guarded.agent.cost.intrinsic.describe(), guarded.agent.shield.describe()) == before
    checkpoint = (tmp_path / "guarded" / "checkpoints" / "latest.pt").read_bytes()
    loaded, _, _ = load_agent(tmp_path / "guarded")
    assert (loaded.cost.intrinsic.describe(), loaded.shield.describe()) == before
    # A checkpoint cannot be resumed with the shield loosened, and trying leaves it as it was.
    with pytest.raises(GuardrailError, match="shield"):
        Trainer(load_config([*SHORT, f"runs_dir={tmp_path}", "agent.shield.world_model=false"]),
                tmp_path / "guarded", resume=True)
    assert (tmp_path / "guarded" / "checkpoints" / "latest.pt").read_bytes() == checkpoint
    resumed = Trainer(guarded_cfg, tmp_path / "guarded", resume=True)
    resumed.logger.close()
    assert resumed.episode_log.totals == guarded.episode_log.totals
    episodes = (tmp_path / "guarded" / "episodes.csv").read_text().splitlines()
    assert episodes[0].split(",") == ["step", "episode", "return", "length", "cost", "interventions", "fallbacks"]
    assert len(episodes) == 3  # two 250-step episodes


def test_the_agent_sends_what_the_shield_decided_and_the_shield_changes_what_breaks_a_guardrail():
    """Through Agent.act, two robots: one racing at a hazard 0.19 m away, where braking now still stops it short of
    the margin and almost nothing else does, and one at rest far from any. The first's planned action is replaced
    by one that keeps the robot able to stop in time (stepped in the real env); the second's is sent as planned."""
    cfg = load_config(["env=hazard_nav", "agent=tiny"])
    env = make_env(cfg.env)
    names = observation_names(cfg.env, env)
    torch.manual_seed(0)
    agent = build_agent(OmegaConf.to_object(cfg.agent), 36, 2, names, torch.device("cpu"))
    hazard_env = env.unwrapped
    hazards = hazard_env.reset(seed=0)[1]["hazards"]
    target = hazards[int(np.argmin(np.abs(hazards).max(1)))]  # the hazard nearest the centre: room on all sides
    away = target / max(np.linalg.norm(target), 1e-9) if np.linalg.norm(target) > 0 else np.array([1.0, 0.0])
    racing = target + (hazard_env.hazard_radius + 0.19) * away, -hazard_env.max_speed * away
    assert brake_path_clearance(hazard_env, *racing, hazards) >= MARGIN  # it can still stop in time
    clear = np.array([[x, y] for x in np.linspace(-1.8, 1.8, 19) for y in np.linspace(-1.8, 1.8, 19)])
    distance = np.hypot(*(clear[:, None] - hazards[None]).transpose(2, 0, 1)).min(1)
    resting = clear[np.argmax(distance)], np.zeros(2)
    states = [racing, resting]
    obs = np.stack([hazard_env.set_state(p, v, hazards) for p, v in states])
    action = agent.act(obs, generator=torch.Generator().manual_seed(0))
    proposed = action.plan.actions[0].clamp(-1, 1).numpy()
    assert np.array_equal(action.actions, action.decision.actions.numpy())
    assert action.decision.intervened.tolist() == [True, False]
    assert np.array_equal(action.actions[1], proposed[1])
    clearances = {}
    for name, sent in (("proposed", proposed[0]), ("sent", action.actions[0])):
        hazard_env.set_state(*racing, hazards)
        info = hazard_env.step(sent.astype(np.float32))[4]
        clearances[name] = brake_path_clearance(hazard_env, info["position"], info["velocity"], hazards)
    assert clearances["proposed"] < MARGIN <= clearances["sent"], clearances


def test_plan_energy_prices_what_the_shield_would_refuse_and_compiles_the_same(captured_graphs):
    """Beside a hazard, a first action towards it costs more than one away from it, by the ego
    model's guardrail cost, and the compiled energy and gradient (the captured graphs: conftest's captured_graphs)
    equal eager autograd."""
    cfg = load_config(["env=hazard_nav", "agent=tiny", "agent.actor.horizon=3"])
    env = make_env(cfg.env)
    hazards = env.reset(seed=0)[1]["hazards"]
    position = hazards[0] + np.array([env.unwrapped.hazard_radius + 0.12, 0.0])
    if abs(position[0]) > env.unwrapped.arena_size:
        position = hazards[0] - np.array([env.unwrapped.hazard_radius + 0.12, 0.0])
    away = float(np.sign(position[0] - hazards[0][0]))
    obs = env.unwrapped.set_state(position, np.zeros(2), hazards)
    torch.manual_seed(0)
    agent = build_agent(OmegaConf.to_object(cfg.agent), 36, 2, observation_names(cfg.env, env), torch.device("cpu"))
    energy = agent.actor.energy
    percept = agent.perceive(obs[None])
    weights = agent.cost.intrinsic.weight_vector()
    actions = torch.zeros(3, 2, 2)
    actions[0, 0], actions[0, 1] = torch.tensor([-away, 0.0]), torch.tensor([away, 0.0])
    state = percept.state.expand(2, -1)
    bound = energy.bind(weights, None, percept.observation.expand(2, -1))
    guided, grad, _ = bound.value_and_grad(state, actions)
    shield_cost = agent.shield.planning_cost(percept.observation.expand(2, -1), actions[0])
    assert shield_cost[0] > 0 and shield_cost[1] == 0
    unguided = PlanEnergy(agent.world_model, agent.cost.intrinsic, agent.cost.critic, energy.discount,
                          energy.value_weight).bind(weights)(state, actions)[0]
    torch.testing.assert_close(guided - unguided, shield_cost, atol=1e-4, rtol=1e-4)
    energy.compile()
    compiled, compiled_grad, _ = energy.bind(weights, None, percept.observation.expand(2, -1)).value_and_grad(
        state, actions)
    torch.testing.assert_close(compiled, guided, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(compiled_grad, grad, atol=1e-4, rtol=1e-4)


def test_the_shields_output_is_finite_and_in_bounds_and_a_nan_observation_breaks_the_guardrail():
    """The shield on its own, fed what a broken planner or env could give it: proposals and alternatives far
    out of bounds or NaN, an observation with NaN entries. What it sends is finite and in [-1, 1]; a guardrail
    cost it cannot compute counts as broken, so the fallback is sent, never the unchecked proposal."""
    _, env, _, _, shield = hazard_nav_parts()
    obs = torch.as_tensor(np.stack([env.reset(seed=s)[0] for s in range(4)]))
    obs[2, :] = float("nan")  # a NaN observation
    proposed = torch.tensor([[5.0, -7.0], [float("nan"), 0.3], [0.2, 0.2], [0.01, 0.0]])
    alternatives = torch.tensor([[[9.0, 9.0]], [[float("nan"), float("nan")]], [[0.0, 0.0]], [[0.0, 0.0]]])
    decision = shield.filter(obs, proposed.clamp(-1, 1), alternatives=alternatives)
    assert torch.isfinite(decision.actions).all() and decision.actions.abs().max() <= 1.0
    assert decision.intervened[2] and decision.fallback[2] and torch.equal(decision.actions[2], torch.zeros(2))
    assert not decision.intervened[3] and torch.equal(decision.actions[3], proposed[3])

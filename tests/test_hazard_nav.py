"""HazardNavEnv: gymnasium API, seeding, the exact dynamics and observation layout a shield relies on, cost,
reward and rendering."""

import math
import warnings

import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec
from gymnasium.utils.env_checker import check_env
from gymnasium.wrappers import TimeLimit

from ami.envs.hazard_nav import GOAL_COLOUR, HAZARD_COLOUR, ROBOT_COLOUR, HazardNavEnv

FAR_HAZARD = np.array([[-1.5, -1.5]])  # one hazard out of the way of tests that move along y = 0


def rollout(env, seed, steps=200):
    """(hazards, observations, rewards, costs) of `steps` steps with a fixed random action sequence."""
    actions = np.random.default_rng(123).uniform(-1.5, 1.5, (steps, 2)).astype(np.float32)
    obs, info = env.reset(seed=seed)
    observations, rewards, costs = [obs], [], []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        assert not terminated and not truncated
        observations.append(obs)
        rewards.append(reward)
        costs.append(info["cost"])
    return info["hazards"], np.array(observations), np.array(rewards), np.array(costs)


def test_check_env_passes_without_warnings():
    env = HazardNavEnv(render_mode="rgb_array")
    # A spec (not registered globally) lets check_env also build the env through gymnasium.make per render mode.
    env.spec = EnvSpec("ami/HazardNavCheck-v0", entry_point="ami.envs.hazard_nav:HazardNavEnv", max_episode_steps=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env)


def test_same_seed_same_episode_and_different_seeds_different_hazards():
    env = HazardNavEnv()
    first, second = rollout(env, seed=7), rollout(HazardNavEnv(), seed=7)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[3].sum() > 0 or first[2].sum() != 0  # the episode did something worth comparing
    _, info = env.reset(seed=8)
    assert not np.array_equal(info["hazards"], first[0])


def test_placement_rules_hold():
    env = HazardNavEnv()
    for seed in range(20):
        _, info = env.reset(seed=seed)
        hazards, p, g = info["hazards"], info["position"], info["goal"]
        assert hazards.shape == (8, 2) and np.all(np.abs(hazards) <= 2.0 - 0.3)
        gaps = np.linalg.norm(hazards[:, None] - hazards[None], axis=-1) + np.eye(8) * 10
        assert gaps.min() >= 2 * 0.3 + 0.2
        assert np.all(np.abs(p) <= 1.9) and np.all(np.linalg.norm(hazards - p, axis=1) - 0.3 >= 0.3)
        assert np.all(np.abs(g) <= 1.7) and np.all(np.linalg.norm(hazards - g, axis=1) - 0.3 >= 0.4)
        assert np.linalg.norm(g - p) >= 0.5 and np.array_equal(info["velocity"], [0.0, 0.0])


def test_time_limit_truncates_and_never_terminates():
    env = TimeLimit(HazardNavEnv(), max_episode_steps=1000)
    env.reset(seed=0)
    for step in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        assert not terminated and truncated == (step == 1000)


def test_speed_never_exceeds_max_speed():
    env = HazardNavEnv()
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    for _ in range(500):  # oversized actions exercise the clipping too
        _, _, _, _, info = env.step(rng.uniform(-3, 3, 2))
        assert np.linalg.norm(info["velocity"]) <= 1.0 + 1e-12


@pytest.mark.parametrize(("action", "expected"), [((1.0, 1.0), (0.4 / math.sqrt(2), 0.4 / math.sqrt(2))),
                                                  ((3.0, 0.0), (0.4, 0.0)), ((0.3, -0.4), (0.12, -0.16))])
def test_action_is_clipped_to_the_unit_disk(action, expected):
    env = HazardNavEnv()
    env.reset(seed=0)
    env.set_state([0.0, 0.0], [0.0, 0.0], hazards=FAR_HAZARD, goal=[0.0, 1.5])
    _, _, _, _, info = env.step(np.array(action, dtype=np.float32))
    # From rest: v = dt * max_accel * a, so |v| <= 0.4 with a clipped into the unit disk.
    np.testing.assert_allclose(info["velocity"], expected, rtol=1e-6)
    np.testing.assert_allclose(info["position"], 0.1 * info["velocity"], rtol=1e-12)
    # Drag then decays the velocity: with no action, v -> (1 - drag * dt) v.
    _, _, _, _, info2 = env.step(np.zeros(2, dtype=np.float32))
    np.testing.assert_allclose(info2["velocity"], 0.95 * info["velocity"], rtol=1e-12)


@pytest.mark.parametrize(("position", "velocity"), [((1.95, 0.0), (0.8, 0.6)), ((1.98, 1.99), (0.6, 0.8)),
                                                    ((-1.99, -1.0), (-1.0, 0.0)), ((0.5, -1.97), (-0.28, -0.96))])
def test_wall_stop_keeps_the_straight_segment_and_zeroes_velocity(position, velocity):
    env = HazardNavEnv()
    env.reset(seed=0)
    p, v = np.array(position), np.array(velocity)
    env.set_state(p, v, hazards=FAR_HAZARD, goal=[0.0, 1.0])
    _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
    d = 0.1 * 0.95 * v
    # Hand computation: s = min over the violated axes of (bound - p_i) / d_i.
    s = min((math.copysign(2.0, p[i] + d[i]) - p[i]) / d[i] for i in range(2) if abs(p[i] + d[i]) > 2.0)
    np.testing.assert_allclose(info["position"], p + s * d, atol=1e-12)
    assert np.all(np.abs(info["position"]) <= 2.0) and np.isclose(np.abs(info["position"]).max(), 2.0)
    moved = info["position"] - p
    assert abs(moved[0] * d[1] - moved[1] * d[0]) < 1e-12 and moved @ d > 0  # on the ray, forwards
    np.testing.assert_array_equal(info["velocity"], [0.0, 0.0])


def test_observation_layout_and_names():
    env = HazardNavEnv()
    env.reset(seed=0)
    obs = env.set_state([0.5, -1.0], [0.3, -0.2], goal=[-1.0, 1.5])
    names = env.observation_names()
    assert len(names) == obs.shape[0] == 36 and obs.dtype == np.float32
    assert names[:5] == ["vx", "vy", "goal_x", "goal_y", "hazard_range_0"] and names[-1] == "wall_range_15"
    np.testing.assert_allclose(obs[:4], [0.3, -0.2, -1.5, 2.5], rtol=1e-6)
    np.testing.assert_array_equal(obs, env.observe())
    assert env.observation_space.contains(obs)


def test_wall_ranges_hand_computed():
    env = HazardNavEnv()
    env.reset(seed=0)
    obs = env.set_state([0.5, -1.0], [0.0, 0.0])
    wall = obs[env.wall_range_slice]
    r2 = math.sqrt(2)
    # Bins every 45 degrees (k = 0, 2, ..., 14): to x = 2, y = 2, x = -2, y = -2 or the nearer of two, <= 3.
    expected = {0: 1.5, 2: 1.5 * r2, 4: 3.0, 6: 3.0, 8: 2.5, 10: r2, 12: 1.0, 14: r2}
    for k, distance in expected.items():
        assert wall[k] == pytest.approx(distance, rel=1e-6), k
    # 22.5 degrees: the x wall at 1.5 / cos(22.5 deg) is nearer than the y wall at 3 / sin(22.5 deg).
    assert wall[1] == pytest.approx(1.5 / math.cos(math.pi / 8), rel=1e-6)


def test_hazard_bins_give_the_nearest_boundary_and_sit_in_their_sector():
    env = HazardNavEnv()
    rng = np.random.default_rng(0)
    n, width = env.num_bins, 2 * math.pi / env.num_bins
    for episode in range(5):
        _, info = env.reset(seed=episode)
        hazards, r = info["hazards"], info["hazard_radius"]
        for _ in range(2000):
            p = rng.uniform(-2.0, 2.0, 2)
            ranges = env.set_state(p, [0.0, 0.0])[env.hazard_range_slice].astype(np.float64)
            clearance = np.linalg.norm(hazards - p, axis=1) - r
            assert ranges.min() == pytest.approx(min(clearance.min(), 3.0), abs=1e-6)
            # Sector of each hazard computed independently: the wrapped offset from bin k's centre in [-w/2, w/2).
            angles = np.arctan2(hazards[:, 1] - p[1], hazards[:, 0] - p[0])
            offsets = (angles[:, None] - width * np.arange(n)[None] + math.pi) % (2 * math.pi) - math.pi
            in_sector = (offsets >= -width / 2) & (offsets < width / 2)
            assert np.all(in_sector.sum(axis=1) == 1)
            owner = in_sector.argmax(axis=1)
            expected = np.full(n, 3.0)
            np.minimum.at(expected, owner, np.minimum(clearance, 3.0))
            np.testing.assert_allclose(ranges, expected, atol=1e-6)


def test_cost_is_one_exactly_inside_a_hazard():
    env = HazardNavEnv()
    env.reset(seed=0)
    hazards = np.array([[0.0, 0.0], [1.5, 1.5]])
    for position, cost in [((0.2, 0.0), 1.0), ((0.0, -0.299), 1.0), ((0.3, 0.0), 0.0), ((0.31, 0.0), 0.0),
                           ((1.3, 1.4), 1.0), ((-1.0, 1.0), 0.0)]:
        obs = env.set_state(position, [0.0, 0.0], hazards=hazards, goal=[-1.5, -1.5])
        _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))  # at rest with no action the robot stays
        np.testing.assert_array_equal(info["position"], position)
        assert info["cost"] == cost, position
        assert (obs[env.hazard_range_slice].min() < 0) == (cost == 1.0)


def test_driving_to_the_goal_earns_progress_and_the_bonus_then_a_new_goal():
    env = HazardNavEnv()
    env.reset(seed=0)
    env.set_state([0.0, 0.0], [0.0, 0.0], hazards=FAR_HAZARD, goal=[1.0, 0.0])
    goal, position = np.array([1.0, 0.0]), np.zeros(2)
    for _ in range(30):
        _, reward, _, _, info = env.step(np.array([1.0, 0.0], dtype=np.float32))
        progress = np.linalg.norm(goal - position) - np.linalg.norm(goal - info["position"])
        assert progress > 0
        if info["goals_reached"]:
            break
        assert reward == pytest.approx(progress, abs=1e-12)
        position = info["position"]
    assert info["goals_reached"] == 1 and np.linalg.norm(goal - info["position"]) < 0.3
    assert reward == pytest.approx(progress + 1.0, abs=1e-12)
    new_goal = info["goal"]
    assert not np.array_equal(new_goal, goal) and np.linalg.norm(new_goal - info["position"]) >= 0.5
    assert np.linalg.norm(new_goal - FAR_HAZARD[0]) - 0.3 >= 0.4


def test_render_draws_goal_hazards_and_robot():
    env = HazardNavEnv(render_mode="rgb_array")
    env.reset(seed=3)
    env.step(np.array([1.0, 0.0], dtype=np.float32))
    image = env.render()
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    for colour in (GOAL_COLOUR, HAZARD_COLOUR, ROBOT_COLOUR):
        assert np.all(image == colour, axis=-1).any()
    plain = HazardNavEnv()
    plain.reset(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gymnasium warns that render() was called without a render mode
        assert plain.render() is None


@pytest.mark.parametrize(("kwargs", "match"), [({"dt": 0.0}, "dt=0.0"), ({"num_bins": 3}, "num_bins=3"),
                                               ({"num_hazards": 200}, "num_hazards=200"),
                                               ({"hazard_radius": 2.5}, "arena_size=2.0"),
                                               ({"render_mode": "human"}, "render_mode='human'")])
def test_invalid_kwargs_raise_naming_the_kwarg(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HazardNavEnv(**kwargs)


def test_set_state_rejects_positions_outside_the_arena():
    env = HazardNavEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="position"):
        env.set_state([2.1, 0.0], [0.0, 0.0])

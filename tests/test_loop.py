"""The env loop: both autoreset modes give the same transitions, each environment's episodes end on their own,
the final step's info and observation reach the transition, and non-finite input is stopped or dropped where it
enters."""

import gymnasium as gym
import numpy as np
import pytest

from ami.envs import make_vector_env
from ami.loop import EnvLoop, NonFiniteError
from ami.schema import EnvConfig

INVERTED = EnvConfig(name="inverted_pendulum", id="InvertedPendulum-v5")
NAN_PENDULUM = EnvConfig(name="nan_pendulum", id="nan_env:NaNPendulum-v0")
WEIGHTS = np.random.default_rng(0).normal(size=(4, 1))


def policy(obs):
    """A fixed function of the observation: the same transitions whatever the batch around them."""
    return np.tanh(obs @ WEIGHTS * 3.0).astype(np.float32)


def transitions(mode, steps=120, num_envs=3):
    """Per environment, its real transitions in order: (obs, action, reward, next_obs, terminated, truncated,
    info["reward_survive"], episode id)."""
    loop = EnvLoop(make_vector_env(INVERTED, num_envs, autoreset_mode=mode))
    loop.reset(seed=5)
    per_env = [[] for _ in range(num_envs)]
    ends, started = [], []
    while loop.env_steps < steps * num_envs:
        step = loop.step(policy)
        for i in np.flatnonzero(step.valid):
            per_env[i].append((step.obs[i], step.action.actions[i], step.reward[i], step.next_obs[i],
                               step.terminated[i], step.truncated[i], step.info["reward_survive"][i],
                               step.episode[i]))
        ends += [(e.env, e.episode, e.stats["length"]) for e in step.finished]
        started.append(step.started)
    loop.envs.close()
    return per_env, ends, np.array(started)


@pytest.fixture(scope="module")
def both_modes():
    return {mode: transitions(mode) for mode in (gym.vector.AutoresetMode.NEXT_STEP,
                                                gym.vector.AutoresetMode.SAME_STEP)}


def test_next_step_and_same_step_vector_envs_give_the_same_transitions(both_modes):
    (next_step, ends_next, _), (same_step, ends_same, _) = both_modes.values()
    assert sum(map(len, next_step)) >= 360
    for a, b in zip(next_step, same_step, strict=True):
        shared = min(len(a), len(b))
        assert shared > 100
        for x, y in zip(a[:shared], b[:shared], strict=True):
            for u, v in zip(x[:7], y[:7], strict=True):
                np.testing.assert_array_equal(u, v)
        # The same episodes (ids are handed out in another order: NEXT_STEP starts an episode one step later).
        assert [r[7] == q[7] for q, r in zip(a, a[1:shared], strict=False)] == \
            [r[7] == q[7] for q, r in zip(b, b[1:shared], strict=False)]
    assert [length for *_, length in ends_next[:5]] == [length for *_, length in ends_same[:5]]


def test_an_ended_episode_keeps_its_final_step_info_and_observation():
    """With SAME_STEP the vector env has already reset an ended environment: its transition still gets the final
    step's info and observation (as NEXT_STEP gives them), not the next episode's."""
    rooms = EnvConfig(name="two_rooms", id="ami/TwoRooms-v0", max_episode_steps=4)
    seen = {}
    for mode in (gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP):
        loop = EnvLoop(make_vector_env(rooms, 2, autoreset_mode=mode))
        loop.reset(seed=3)
        rows = []
        while loop.env_steps < 16:
            step = loop.step(lambda obs: np.full((2, 2), 0.7, dtype=np.float32))
            rows += [(step.info["position"][i], step.next_obs["image"][i], step.truncated[i])
                     for i in np.flatnonzero(step.valid)]
        seen[mode] = rows
    a, b = seen.values()
    assert len(a) == len(b) == 16 and sum(r[2] for r in a) == 4
    for (position_a, image_a, _), (position_b, image_b, _) in zip(a, b, strict=True):
        np.testing.assert_array_equal(position_a, position_b)
        np.testing.assert_array_equal(image_a, image_b)


def test_each_environment_ends_and_restarts_its_own_episodes(both_modes):
    per_env, ends, started = both_modes[gym.vector.AutoresetMode.SAME_STEP]
    lengths = {env: [length for e, _, length in ends if e == env] for env in range(3)}
    assert all(len(v) >= 3 for v in lengths.values())  # InvertedPendulum falls within a few dozen steps
    assert len({tuple(v[:3]) for v in lengths.values()}) > 1  # the environments end at different steps
    assert not started.all(axis=1).any()  # never all at once here
    episodes = [e for _, e, _ in ends]
    assert len(set(episodes)) == len(episodes)  # every episode its own id
    for rows in per_env:
        terminal = [i for i, row in enumerate(rows) if row[4]]
        # The transition after a termination starts a new episode from a fresh observation, not the final one.
        for i in terminal[:-1]:
            assert rows[i + 1][7] != rows[i][7]
            assert not np.array_equal(rows[i + 1][0], rows[i][3])
        # Within an episode each transition starts where the previous one ended.
        for previous, current in zip(rows, rows[1:], strict=False):
            if current[7] == previous[7]:
                np.testing.assert_array_equal(current[0], previous[3])


def test_a_step_where_every_environment_only_resets_asks_the_policy_nothing():
    loop = EnvLoop(make_vector_env(EnvConfig(id="Pendulum-v1", max_episode_steps=3), 2))
    loop.reset(seed=0)
    calls = []

    def counting(obs):
        calls.append(len(obs))
        return np.zeros((2, 1), dtype=np.float32)

    steps = [loop.step(counting) for _ in range(8)]
    assert len(calls) == 6  # steps 4 and 8 only reset both environments
    assert [bool(s.valid.any()) for s in steps] == [True, True, True, False] * 2
    assert [bool(s.started.all()) for s in steps] == [False, False, False, True] * 2
    assert loop.env_steps == 12 and loop.episodes == 6


def test_a_non_finite_observation_stops_the_loop_naming_the_env_step_and_field():
    loop = EnvLoop(make_vector_env(NAN_PENDULUM, 2))
    loop.reset(seed=0)
    with pytest.raises(NonFiniteError, match=r"env 0 at env step 98: next observation entries \[0\] = \[nan\]"):
        for _ in range(60):
            loop.step(lambda obs: np.zeros((2, 1), dtype=np.float32))
    assert loop.env_steps == 98  # 49 steps of both environments: the 50th is where it stopped
    with pytest.raises(NonFiniteError, match="reward"):  # a NaN reward is named as such
        loop = EnvLoop(make_vector_env(EnvConfig(id="nan_env:NaNPendulum-v0", kwargs={"obs_every": 1000}), 1))
        loop.reset(seed=0)
        for _ in range(71):
            loop.step(lambda obs: np.zeros((1, 1), dtype=np.float32))


def test_skip_drops_the_non_finite_transitions_and_goes_on():
    loop = EnvLoop(make_vector_env(NAN_PENDULUM, 1), nonfinite="skip")
    loop.reset(seed=0)
    dropped, valid = [], []
    for _ in range(200):
        step = loop.step(lambda obs: np.zeros((1, 1), dtype=np.float32))
        dropped.append(bool(step.dropped[0]))
        valid.append(bool(step.valid[0]))
        if step.valid[0]:
            assert np.isfinite(step.obs).all() and np.isfinite(step.next_obs).all() and np.isfinite(step.reward).all()
    # Steps 50, 100, 150, 200 bring a NaN observation: it and the step from it are dropped; 70 and 140 a NaN reward.
    expected = {49, 50, 69, 99, 100, 139, 149, 150, 199}
    assert {i for i, d in enumerate(dropped) if d} == expected
    assert loop.dropped == len(expected) and sum(valid) == 200 - len(expected)
    assert step.finished and step.finished[0].stats["length"] == 200  # the episode went on to its time limit
    assert np.isfinite(step.finished[0].stats["return"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="nonfinite"):
        EnvLoop(make_vector_env(EnvConfig(), 1), nonfinite="ignore")
    with pytest.raises(ValueError, match="autoreset_mode"):
        EnvLoop(make_vector_env(EnvConfig(), 1, autoreset_mode=gym.vector.AutoresetMode.DISABLED))

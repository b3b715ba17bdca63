"""Short-term memory: one ring per environment, each observation stored once, sequences within one episode of one
environment, final observations of ended episodes and cut stretches, recall by cosine similarity, and checkpoint
round trips of the filled part only."""

import math

import pytest
import torch

from ami.messages import Record
from ami.schema import MemoryConfig
from modules.memory import ShortTermMemory

OBS_DIM, ACTION_DIM, LATENT_DIM, TERMS = 3, 1, 4, 2


def make_memory(capacity, num_envs=1, latent_dim=LATENT_DIM):
    return ShortTermMemory(OBS_DIM, ACTION_DIM, latent_dim, TERMS, num_envs, MemoryConfig(capacity=capacity))


def uid(env, episode, step):
    return 1e6 * env + 1000.0 * episode + step


def records(episodes, steps, ends=None, latents=None):
    """One transition per environment: env e in its episode episodes[e] at step steps[e]. obs = (env, episode,
    step), next_obs = (env, episode, step + 1): every stored value says where it came from."""
    envs = len(episodes)
    ends = ends or [None] * envs
    ids = torch.tensor([uid(e, episodes[e], steps[e]) for e in range(envs)])
    obs = torch.tensor([[e, episodes[e], steps[e]] for e in range(envs)], dtype=torch.float32)
    return Record(obs=obs, next_obs=obs + torch.tensor([0.0, 0.0, 1.0]),
                  latent=ids[:, None].expand(-1, LATENT_DIM).float() if latents is None else latents,
                  action=torch.sin(ids)[:, None].float(), plan_action=torch.cos(ids)[:, None].float(),
                  planned=torch.tensor([s % 2 == 0 for s in steps]), reward=ids.float(),
                  cost_terms=torch.stack([ids, -ids], 1).float(),
                  terminated=torch.tensor([end == "terminated" for end in ends]),
                  truncated=torch.tensor([end == "truncated" for end in ends]), plan_energy=ids.float(),
                  episode=torch.tensor(episodes), step=torch.tensor(steps))


def write_episodes(memory, lengths, ends):
    """Episodes of the given lengths, one after another in environment 0, each closed by "terminated" or
    "truncated"."""
    for episode, (length, end) in enumerate(zip(lengths, ends, strict=True)):
        for step in range(length):
            memory.write(records([episode], [step], [end if step == length - 1 else None]))


def check_sequences(batch, length):
    obs = batch.obs  # (L + 1, B, 3)
    assert obs.shape[0] == length + 1
    env, episode, step = obs[..., 0], obs[..., 1], obs[..., 2]
    # One environment, one episode, consecutive steps (the last observation is the last transition's next one).
    assert (env == env[:1]).all() and (episode == episode[:1]).all()
    assert torch.equal(step, step[:1] + torch.arange(length + 1, dtype=step.dtype)[:, None])
    # The other fields belong to the same transitions.
    ids = 1e6 * env[:-1] + 1000 * episode[:-1] + step[:-1]
    assert torch.equal(batch.reward, ids)
    assert torch.equal(batch.cost_terms[..., 0], ids)
    torch.testing.assert_close(batch.actions[..., 0], torch.sin(ids.double()).float())
    torch.testing.assert_close(batch.plan_actions[..., 0], torch.cos(ids.double()).float())
    ended = batch.terminated | batch.truncated
    assert not ended[:-1].any()  # an episode end, if any, only at the last position


def test_ring_overwrites_oldest():
    capacity, extra = 10, 4
    memory = make_memory(capacity)
    for step in range(capacity + extra):
        memory.write(records([0], [step]))
    assert len(memory) == capacity
    assert sorted(memory.reward.flatten().tolist()) == [float(s) for s in range(extra, capacity + extra)]
    for row in range(capacity):  # every field of a transition moved together
        step = int(memory.step[row, 0])
        assert memory.reward[row, 0] == float(step) and memory.obs[row, 0].tolist() == [0.0, 0.0, float(step)]
    batch = memory.sample_sequences(200, 3, torch.Generator().manual_seed(0))
    check_sequences(batch, 3)
    assert batch.reward.min() >= extra  # samples only see surviving transitions


def test_an_ended_episode_keeps_its_final_observation_and_nothing_is_stored_twice():
    memory = make_memory(100)
    write_episodes(memory, [3, 2], ["terminated", "truncated"])
    # 3 transitions, their episode's final observation, 2 transitions, theirs: 7 rows, 5 transitions.
    assert len(memory) == 5 and int(memory.written[0]) == 7
    assert memory.obs[:7, 0, 2].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert memory.has_transition[:7, 0].tolist() == [True, True, True, False, True, True, False]
    batch = memory.sample_sequences(50, 3, torch.Generator().manual_seed(0))
    assert (batch.obs[:, :, 1] == 0).all() and batch.terminated[-1].all()  # only the first episode is 3 long
    assert torch.equal(batch.obs[-1, :, 2], torch.full((50,), 3.0))


def test_sequences_never_cross_episode_ends():
    lengths = [7, 12, 5, 20, 9, 4, 15]
    ends = ["terminated", "truncated", "terminated", "truncated", "truncated", "terminated", "truncated"]
    memory = make_memory(1000)
    write_episodes(memory, lengths, ends)
    g = torch.Generator().manual_seed(0)
    for length in (1, 3, 5):
        check_sequences(memory.sample_sequences(500, length, g), length)
    # Short episodes (4, 5) cannot hold 6 steps, but the others still can.
    batch = memory.sample_sequences(300, 6, g)
    check_sequences(batch, 6)
    assert set(batch.obs[0, :, 1].tolist()) <= {0.0, 1.0, 3.0, 4.0, 6.0}
    # Ends do appear at the last position (sequences reach episode ends, not only their interiors).
    batch = memory.sample_sequences(500, 3, g)
    assert batch.terminated[-1].any() and batch.truncated[-1].any()


def test_sequences_never_cross_episode_ends_after_wrap():
    lengths = [7, 12, 5, 20, 9, 4, 15, 11, 6]  # 89 transitions and 9 final observations into 40 rows
    ends = ["terminated", "truncated"] * 4 + ["truncated"]
    memory = make_memory(40)
    write_episodes(memory, lengths, ends)
    written = [(e, s) for e, n in enumerate(lengths) for s in range(n + 1)]  # every row ever written
    alive = {uid(0, e, s) for e, s in written[-40:]}
    g = torch.Generator().manual_seed(1)
    for length in (2, 4, 6):
        batch = memory.sample_sequences(500, length, g)
        check_sequences(batch, length)
        assert set(batch.reward.flatten().tolist()) <= alive


def test_sequences_do_not_run_past_the_newest_transition_of_a_running_episode():
    # The last episode is still running: its newest transition's next observation is not stored yet, and a
    # stretch must not wrap around to the oldest rows.
    memory = make_memory(12)
    write_episodes(memory, [5], ["terminated"])
    for step in range(10):
        memory.write(records([1], [step]))
    batch = memory.sample_sequences(500, 4, torch.Generator().manual_seed(2))
    check_sequences(batch, 4)
    assert batch.obs[-1, :, 2].max() <= 9  # the running episode's step 9 is stored, its step 10 not yet


def test_environments_keep_streams_of_their_own():
    """Three environments whose episodes end at different steps write side by side: every stretch stays in one
    environment's episode, and each environment's episode ends are its own."""
    memory = make_memory(300, num_envs=3)
    lengths, episode, step = [5, 7, 11], [0, 1, 2], [0, 0, 0]
    next_episode = 3
    for _ in range(60):
        ends = ["truncated" if step[e] == lengths[e] - 1 else None for e in range(3)]
        memory.write(records(episode, step, ends))
        for e in range(3):
            step[e] += 1
            if ends[e]:
                episode[e], step[e], next_episode = next_episode, 0, next_episode + 1
    batch = memory.sample_sequences(400, 4, torch.Generator().manual_seed(0))
    check_sequences(batch, 4)
    assert set(batch.obs[0, :, 0].tolist()) == {0.0, 1.0, 2.0}
    # Where a stretch ends its episode, it ends at that environment's episode length.
    ended = batch.truncated[-1]
    length = torch.tensor(lengths, dtype=torch.float32)[batch.obs[0, :, 0].long()]
    assert torch.equal(batch.obs[-1, ended, 2], length[ended])


def test_a_cut_stretch_ends_at_the_observation_before_the_cut():
    """end_segments (a dropped transition): the newest transition is marked truncated, the observation it led to
    is stored, and no stretch joins what came before the cut to what comes after, in the same episode."""
    memory = make_memory(100, num_envs=2)
    for step in range(6):
        memory.write(records([0, 1], [step, step]))
    memory.end_segments(torch.tensor([True, False]), torch.tensor([[0.0, 0.0, 6.0], [9.0, 9.0, 9.0]]))
    assert memory.truncated[5, 0] and not memory.truncated[5, 1]
    assert memory.obs[6, 0].tolist() == [0.0, 0.0, 6.0] and not memory.has_transition[6, 0]
    for step in range(8, 12):  # steps 6 and 7 of environment 0 were dropped
        memory.write(records([0, 1], [step, step - 2]))
    batch = memory.sample_sequences(500, 3, torch.Generator().manual_seed(0))
    check_sequences(batch, 3)
    env0 = batch.obs[:, batch.obs[0, :, 0] == 0, 2]
    assert not ((env0[0] <= 5) & (env0[-1] >= 8)).any()
    memory.end_segments(torch.tensor([True, True]), torch.zeros(2, 3))
    assert not memory.open.any()
    memory.end_segments(torch.tensor([True, True]), torch.zeros(2, 3))  # nothing open: nothing written
    assert int(memory.written[0]) == 12


def test_recall_returns_nearest_keys_in_order():
    memory = make_memory(100, latent_dim=2)
    angles = torch.arange(0, 360, 10, dtype=torch.float64)  # 36 keys, different lengths
    for i, angle in enumerate(angles):
        radius = 0.5 + (i % 5)
        key = radius * torch.tensor([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        memory.write(records([0], [i], latents=key.float()[None]))
    query = torch.tensor([math.cos(math.radians(33.0)), math.sin(math.radians(33.0))]) * 3.0
    indices, sims = memory.recall(query, k=5)
    # 30 (3 deg), 40 (7 deg), 20 (13 deg), 50 (17 deg), 10 (23 deg).
    assert memory.step.flatten()[indices].tolist() == [3, 4, 2, 5, 1]
    expected = torch.cos(torch.deg2rad(torch.tensor([3.0, 7.0, 13.0, 17.0, 23.0])))
    torch.testing.assert_close(sims, expected, atol=1e-5, rtol=1e-5)
    assert memory.recall(query)[0].numel() == 8  # default k comes from the config
    small = make_memory(10, latent_dim=2)
    small.write(records([0], [0], latents=torch.tensor([[1.0, 0.0]])))
    assert small.recall(query, k=5)[0].tolist() == [0]  # never more than what is stored


def test_recall_after_wrap_sees_only_live_transitions():
    memory = make_memory(10, latent_dim=2)
    for i in range(15):
        angle = math.radians(10.0 * i)
        memory.write(records([0], [i], latents=torch.tensor([[math.cos(angle), math.sin(angle)]])))
    indices, _ = memory.recall(torch.tensor([1.0, 0.0]), k=3)  # record 0 is overwritten; 5 is the nearest live
    assert memory.step.flatten()[indices].tolist() == [5, 6, 7]


def test_state_dict_holds_the_filled_rows_and_round_trips_to_identical_samples():
    memory = make_memory(400, num_envs=2)
    for episode, length in enumerate([7, 12, 5]):
        for step in range(length):
            end = "truncated" if step == length - 1 else None
            memory.write(records([episode, 10 + episode], [step, step], [end, end]))
    state = memory.state_dict()
    assert state["obs"].shape == (27, 2, OBS_DIM)  # 24 transitions and 3 final observations per column, not 200
    restored = make_memory(400, num_envs=2)
    restored.load_state_dict(state)
    assert torch.equal(restored.cursor, memory.cursor) and len(restored) == len(memory) == 48
    a = memory.sample_sequences(64, 4, torch.Generator().manual_seed(7))
    b = restored.sample_sequences(64, 4, torch.Generator().manual_seed(7))
    for field in ("obs", "actions", "plan_actions", "cost_terms", "reward", "terminated", "truncated", "planned"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    saved_rewards = state["reward"].clone()
    memory.write(records([9, 9], [0, 0]))
    assert torch.equal(state["reward"], saved_rewards)  # the saved state is a copy
    with pytest.raises(ValueError, match="num_envs"):  # a memory of another layout refuses it
        make_memory(400, num_envs=4).load_state_dict(state)


def test_timeline_lists_each_environment_oldest_first():
    memory = make_memory(12, num_envs=2)
    for step in range(8):  # 6 rows per column: column 0 wraps after step 5
        memory.write(records([0, 1], [step, step]))
    order = memory.timeline()
    assert (order % 2).tolist() == [0] * 6 + [1] * 6
    assert memory.step.flatten()[order].tolist() == [2, 3, 4, 5, 6, 7] * 2


def test_sampling_more_than_there_is_raises():
    memory = make_memory(100)
    write_episodes(memory, [3], ["truncated"])
    with pytest.raises(ValueError, match="3 records"):
        memory.sample_sequences(8, 5)
    with pytest.raises(ValueError):
        make_memory(10).sample_sequences(1, 1)
    short = make_memory(100)  # enough transitions, but no episode is long enough
    write_episodes(short, [2, 2, 2, 2, 2], ["terminated"] * 5)
    with pytest.raises(ValueError, match="too few"):
        short.sample_sequences(8, 4, torch.Generator().manual_seed(0))

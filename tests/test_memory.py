"""Short-term memory: a bounded ring, sequences within one episode, recall by cosine similarity,
and checkpoint round trips."""

import math

import pytest
import torch

from ami.config import MemoryConfig
from ami.messages import Record
from modules.memory import ShortTermMemory

OBS_DIM, ACTION_DIM, LATENT_DIM, TERMS = 2, 1, 4, 2


def make_memory(capacity, latent_dim=LATENT_DIM):
    return ShortTermMemory(OBS_DIM, ACTION_DIM, latent_dim, TERMS, MemoryConfig(capacity=capacity))


def record(episode, step, terminated=False, truncated=False, latent=None):
    """obs = (episode, step), next_obs = (episode, step + 1): every stored value says where it came from."""
    uid = 1000.0 * episode + step
    return Record(step=step, episode=episode, obs=torch.tensor([float(episode), float(step)]),
                  next_obs=torch.tensor([float(episode), float(step + 1)]),
                  latent=torch.full((LATENT_DIM,), uid) if latent is None else latent,
                  action=torch.tensor([math.sin(uid)]), reward=uid, cost_terms=torch.tensor([uid, -uid]),
                  terminated=terminated, truncated=truncated, planned=step % 2 == 0, plan_energy=uid)


def write_episodes(memory, lengths, ends):
    """Episodes of the given lengths, each closed by "terminated" or "truncated"."""
    for episode, (length, end) in enumerate(zip(lengths, ends, strict=True)):
        for step in range(length):
            last = step == length - 1
            memory.write(record(episode, step, terminated=last and end == "terminated",
                                truncated=last and end == "truncated"))


def test_ring_overwrites_oldest():
    capacity, extra = 10, 4
    memory = make_memory(capacity)
    for step in range(capacity + extra):
        memory.write(record(0, step))
    assert len(memory) == capacity
    stored = sorted(memory.reward.tolist())
    assert stored == [float(s) for s in range(extra, capacity + extra)]  # the oldest `extra` are gone
    # Every field of a record moved together.
    for i in range(capacity):
        step = int(memory.step[i])
        assert memory.reward[i] == float(step)
        assert memory.obs[i].tolist() == [0.0, float(step)]
    # Samples only ever see surviving records.
    batch = memory.sample_sequences(200, 3, torch.Generator().manual_seed(0))
    assert batch.reward.min() >= extra


def check_sequences(batch, length):
    obs = batch.obs  # (L + 1, B, 2)
    assert obs.shape[0] == length + 1
    episode, step = obs[..., 0], obs[..., 1]
    # One episode, consecutive steps (the final obs is the last record's next_obs, so step + 1).
    assert (episode == episode[:1]).all()
    expected_steps = step[:1] + torch.arange(length + 1, dtype=step.dtype)[:, None]
    assert torch.equal(step, expected_steps)
    # The other fields belong to the same records.
    uid = 1000 * episode[:-1] + step[:-1]
    assert torch.equal(batch.reward, uid)
    assert torch.equal(batch.cost_terms[..., 0], uid)
    torch.testing.assert_close(batch.actions[..., 0], torch.sin(uid.double()).float())
    # An episode end, if any, only at the last position.
    ended = batch.terminated | batch.truncated
    assert not ended[:-1].any()


def test_sequences_never_cross_episode_ends():
    lengths = [7, 12, 5, 20, 9, 4, 15]
    ends = ["terminated", "truncated", "terminated", "truncated", "truncated", "terminated", "truncated"]
    memory = make_memory(1000)
    write_episodes(memory, lengths, ends)
    g = torch.Generator().manual_seed(0)
    for length in (1, 3, 5):
        batch = memory.sample_sequences(500, length, g)
        check_sequences(batch, length)
    # Short episodes (4, 5) cannot hold 6 steps, but the others still can.
    batch = memory.sample_sequences(300, 6, g)
    check_sequences(batch, 6)
    assert set(batch.obs[0, :, 0].tolist()) <= {0.0, 1.0, 3.0, 4.0, 6.0}
    # Ends do appear at the last position (sequences reach episode ends, not only their interiors).
    batch = memory.sample_sequences(500, 3, g)
    assert batch.terminated[-1].any() and batch.truncated[-1].any()


def test_sequences_never_cross_episode_ends_after_wrap():
    lengths = [7, 12, 5, 20, 9, 4, 15, 11, 6]  # 89 records into 40 slots
    ends = ["terminated", "truncated"] * 4 + ["truncated"]
    memory = make_memory(40)
    write_episodes(memory, lengths, ends)
    assert len(memory) == 40
    g = torch.Generator().manual_seed(1)
    for length in (2, 4, 6):
        batch = memory.sample_sequences(500, length, g)
        check_sequences(batch, length)
        # Only records still in the ring: the oldest surviving one is the 50th written.
        first_alive = 89 - 40
        written = [(e, s) for e, n in enumerate(lengths) for s in range(n)]
        alive = {1000 * e + s for e, s in written[first_alive:]}
        assert set(batch.reward.flatten().tolist()) <= alive


def test_sequences_do_not_run_past_the_newest_record_of_a_running_episode():
    # The last episode is still running (no end flag): a stretch may end at the newest record but
    # must not wrap around to the oldest one.
    memory = make_memory(12)
    write_episodes(memory, [5], ["terminated"])
    for step in range(10):
        memory.write(record(1, step))
    check_sequences(memory.sample_sequences(500, 4, torch.Generator().manual_seed(2)), 4)


def test_sequence_final_obs_is_last_next_obs():
    memory = make_memory(100)
    write_episodes(memory, [30], ["truncated"])
    batch = memory.sample_sequences(50, 4, torch.Generator().manual_seed(0))
    last_ring_index = batch.reward[-1].long()  # uid == step == ring index for episode 0
    torch.testing.assert_close(batch.obs[-1], memory.next_obs[last_ring_index])
    torch.testing.assert_close(batch.obs[:-1], memory.obs[batch.reward.long()])


def test_recall_returns_nearest_keys_in_order():
    memory = make_memory(100, latent_dim=2)
    angles = torch.arange(0, 360, 10, dtype=torch.float64)  # 36 keys, different lengths
    for i, angle in enumerate(angles):
        radius = 0.5 + (i % 5)
        key = radius * torch.tensor([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        memory.write(record(0, i, latent=key.float()))
    query = torch.tensor([math.cos(math.radians(33.0)), math.sin(math.radians(33.0))]) * 3.0
    indices, sims = memory.recall(query, k=5)
    # 30 (3 deg), 40 (7 deg), 20 (13 deg), 50 (17 deg), 10 (23 deg).
    assert indices.tolist() == [3, 4, 2, 5, 1]
    expected = torch.cos(torch.deg2rad(torch.tensor([3.0, 7.0, 13.0, 17.0, 23.0])))
    torch.testing.assert_close(sims, expected, atol=1e-5, rtol=1e-5)
    # Default k comes from the config; never more than what is stored.
    assert memory.recall(query)[0].numel() == 8
    small = make_memory(10, latent_dim=2)
    small.write(record(0, 0, latent=torch.tensor([1.0, 0.0])))
    assert small.recall(query, k=5)[0].tolist() == [0]


def test_recall_after_wrap_sees_only_live_records():
    memory = make_memory(10, latent_dim=2)
    for i in range(15):
        angle = math.radians(10.0 * i)
        memory.write(record(0, i, latent=torch.tensor([math.cos(angle), math.sin(angle)])))
    # The query points at record 0 (overwritten); the nearest live record is 5.
    indices, _ = memory.recall(torch.tensor([1.0, 0.0]), k=3)
    assert memory.step[indices].tolist() == [5, 6, 7]


def test_state_dict_round_trip_gives_identical_samples():
    memory = make_memory(40)
    write_episodes(memory, [7, 12, 5, 20, 9], ["terminated", "truncated", "terminated", "truncated", "truncated"])
    state = memory.state_dict()
    restored = make_memory(40)
    restored.load_state_dict(state)
    assert (restored.cursor, restored.size) == (memory.cursor, memory.size)
    a = memory.sample_sequences(64, 4, torch.Generator().manual_seed(7))
    b = restored.sample_sequences(64, 4, torch.Generator().manual_seed(7))
    for field in ("obs", "actions", "cost_terms", "reward", "terminated", "truncated", "planned"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    # The saved state is a copy: later writes do not change it.
    saved_rewards = state["reward"].clone()
    memory.write(record(9, 0))
    assert torch.equal(state["reward"], saved_rewards)
    # A memory of another shape refuses the state.
    with pytest.raises(ValueError):
        ShortTermMemory(OBS_DIM + 1, ACTION_DIM, LATENT_DIM, TERMS, MemoryConfig(capacity=40)).load_state_dict(state)


def test_sampling_more_than_there_is_raises():
    memory = make_memory(100)
    write_episodes(memory, [3], ["truncated"])
    with pytest.raises(ValueError, match="3 records"):
        memory.sample_sequences(8, 5)
    with pytest.raises(ValueError):
        make_memory(10).sample_sequences(1, 1)
    # Enough records, but no episode is long enough.
    short = make_memory(100)
    write_episodes(short, [2, 2, 2, 2, 2], ["terminated"] * 5)
    with pytest.raises(ValueError, match="too few"):
        short.sample_sequences(8, 4, torch.Generator().manual_seed(0))

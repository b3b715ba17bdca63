"""Short-term memory: a bounded ring of real transitions, sampled as sequences, recalled by key; and the
current episode's trail of latents, which the boredom term reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ami.config import MemoryConfig
from ami.messages import Record


@dataclass(frozen=True)
class SequenceBatch:
    """obs: (L + 1, B, *obs_shape), the last being the final next_obs; actions: (L, B, A);
    cost_terms: (L, B, T); reward, terminated, truncated, planned: (L, B)."""

    obs: torch.Tensor
    actions: torch.Tensor
    cost_terms: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    planned: torch.Tensor


class ShortTermMemory:
    """Ring buffer of Records on the CPU. Not trained; saved whole in checkpoints.

    Sequences are contiguous in time and never cross an episode end (nor the ring's write point).
    """

    FIELDS = ("step", "episode", "obs", "next_obs", "latent", "action", "reward", "cost_terms",
              "terminated", "truncated", "planned", "plan_energy")

    def __init__(self, obs_shape: int | tuple[int, ...], action_dim: int, latent_dim: int, num_terms: int,
                 config: MemoryConfig, obs_dtype: torch.dtype = torch.float32) -> None:
        """obs_shape: the observation's size (a vector) or shape (an image, stored as obs_dtype=uint8:
        a quarter of the float memory)."""
        self.config = config
        cap = config.capacity
        self.capacity = cap
        shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
        self.step = torch.zeros(cap, dtype=torch.long)
        self.episode = torch.full((cap,), -1, dtype=torch.long)
        self.obs = torch.zeros(cap, *shape, dtype=obs_dtype)
        self.next_obs = torch.zeros(cap, *shape, dtype=obs_dtype)
        self.latent = torch.zeros(cap, latent_dim)
        self.action = torch.zeros(cap, action_dim)
        self.reward = torch.zeros(cap)
        self.cost_terms = torch.zeros(cap, num_terms)
        self.terminated = torch.zeros(cap, dtype=torch.bool)
        self.truncated = torch.zeros(cap, dtype=torch.bool)
        self.planned = torch.zeros(cap, dtype=torch.bool)
        self.plan_energy = torch.full((cap,), float("nan"))
        self.cursor = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def write(self, record: Record) -> None:
        i = self.cursor
        for name in self.FIELDS:
            getattr(self, name)[i] = torch.as_tensor(getattr(record, name))
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def mark_truncated_last(self) -> None:
        """Close the latest episode as truncated (an interrupted run resumes into a new episode)."""
        if self.size:
            last = (self.cursor - 1) % self.capacity
            if not self.terminated[last]:
                self.truncated[last] = True

    def _valid_starts(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """starts: (M,) ring indices -> (M,) bool: the next `length` records form one stretch."""
        offsets = torch.arange(length)
        idx = (starts[:, None] + offsets) % self.capacity  # (M, L)
        same_episode = (self.episode[idx] == self.episode[starts][:, None]).all(1)
        contiguous = (self.step[idx] - self.step[starts][:, None] == offsets).all(1)
        # An episode end may only be the last record of the stretch.
        ended = (self.terminated[idx] | self.truncated[idx])[:, :-1].any(1)
        # Once full, the write point breaks step contiguity, so only a partly filled ring needs this.
        inside = starts + length <= self.size if self.size < self.capacity else True
        return same_episode & contiguous & ~ended & inside

    def sample_sequences(self, batch_size: int, length: int, generator: torch.Generator | None = None,
                         planned_only: bool = False) -> SequenceBatch:
        """batch_size stretches of `length` transitions, uniformly over valid starts."""
        idx = self.sample_indices(batch_size, length, generator, planned_only)  # (L, B)
        obs = torch.cat([self.obs[idx], self.next_obs[idx[-1]][None]], dim=0)
        return SequenceBatch(obs, self.action[idx], self.cost_terms[idx], self.reward[idx],
                             self.terminated[idx], self.truncated[idx], self.planned[idx])

    def sample_indices(self, batch_size: int, length: int, generator: torch.Generator | None = None,
                       planned_only: bool = False) -> torch.Tensor:
        """Ring indices (length, batch_size) of batch_size valid stretches, uniformly over valid starts."""
        if self.size < length:
            raise ValueError(f"memory holds {self.size} records; cannot sample sequences of {length}")
        high = self.size if self.size < self.capacity else self.capacity
        chosen: list[torch.Tensor] = []
        needed = batch_size
        for _ in range(100):
            starts = torch.randint(0, high, (4 * needed,), generator=generator)
            valid = self._valid_starts(starts, length)
            if planned_only:
                valid &= self.planned[starts]
            chosen.append(starts[valid][:needed])
            needed -= chosen[-1].numel()
            if needed == 0:
                break
        else:
            raise ValueError(f"memory has too few stretches of {length} steps to sample from")
        starts = torch.cat(chosen)
        return ((starts[:, None] + torch.arange(length)) % self.capacity).T

    def recall(self, key: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Associative recall. key: (D,) -> (indices (k,), cosine similarities (k,)), nearest first."""
        k = min(k or self.config.recall_k, self.size)
        keys = self.latent[: self.size] if self.size < self.capacity else self.latent
        sims = torch.nn.functional.cosine_similarity(keys, key.cpu()[None], dim=-1)
        values, indices = sims.topk(k)
        return indices, values

    def state_dict(self) -> dict:
        state = {name: getattr(self, name)[: self.capacity].clone() for name in self.FIELDS}
        return {**state, "cursor": self.cursor, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state["obs"].shape != self.obs.shape:
            raise ValueError(f"memory shape mismatch: checkpoint {tuple(state['obs'].shape)}, "
                             f"config {tuple(self.obs.shape)}")
        for name in self.FIELDS:
            getattr(self, name).copy_(state[name])
        self.cursor, self.size = int(state["cursor"]), int(state["size"])


class EpisodeTrail:
    """The latents each environment's current episode has passed through, for the boredom term.

    One latent every `every` steps (the boredom term's cost grows with the slots; a place the agent lingers
    in fills them either way), in a ring of `capacity` slots per environment: (B, capacity, D). Empty
    slots hold a far-away sentinel instead of being cut off, so the tensor keeps one shape all episode
    long (one compiled plan energy), and a sentinel's kernel weight, exp(-|s - FAR|^2 / 2r^2), is 0.
    """

    FAR = 1e4

    def __init__(self, capacity: int, latent_dim: int, every: int = 1) -> None:
        for name, value in [("capacity", capacity), ("every", every)]:
            if value < 1:
                raise ValueError(f"trail {name}={value!r}: expected a positive int")
        self.capacity = capacity
        self.latent_dim = latent_dim
        self.every = every
        self.latents: torch.Tensor | None = None  # (B, capacity, D)
        self.steps: torch.Tensor | None = None  # (B,) steps this episode

    @property
    def count(self) -> torch.Tensor | None:
        """(B,) latents kept this episode: steps 0, every, 2 every, ..."""
        return None if self.steps is None else (self.steps + self.every - 1) // self.every

    def add(self, states: torch.Tensor) -> None:
        """states: (B, D), this step's, one per environment; a new batch size starts every trail afresh."""
        states = states.detach()
        if self.latents is None or self.latents.shape[0] != states.shape[0]:
            self.latents = states.new_full((states.shape[0], self.capacity, self.latent_dim), self.FAR)
            self.steps = torch.zeros(states.shape[0], dtype=torch.long, device=states.device)
        keep = self.steps % self.every == 0
        rows = torch.arange(states.shape[0], device=states.device)[keep]
        self.latents[rows, (self.steps[keep] // self.every) % self.capacity] = states[keep]
        self.steps += 1

    def reset(self, done: torch.Tensor | None = None) -> None:
        """Forget every trail, or those where done: (B,) is True."""
        if done is None or self.latents is None:
            self.latents = self.steps = None
            return
        done = done.to(self.latents.device)
        self.latents[done] = self.FAR
        self.steps[done] = 0

    def view(self) -> torch.Tensor | None:
        """(B, capacity, D): a copy, so later steps do not change what a plan was priced with."""
        return None if self.latents is None else self.latents.clone()

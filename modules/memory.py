"""Short-term memory: each environment's stream of observations and the transitions between them, sampled as
sequences that stay inside one episode, recalled by latent key; and the current episode's trail of latents,
which the boredom term reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ami.messages import Record
from ami.schema import MemoryConfig


@dataclass(frozen=True)
class SequenceBatch:
    """obs: (L + 1, B, *obs_shape); vector: (L + 1, B, Q) a dict observation's vector, else None;
    actions, plan_actions: (L, B, A); cost_terms: (L, B, T); reward, terminated, truncated, planned: (L, B)."""

    obs: torch.Tensor
    vector: torch.Tensor | None
    actions: torch.Tensor
    plan_actions: torch.Tensor
    cost_terms: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    planned: torch.Tensor


class ShortTermMemory:
    """One ring of rows per environment (E columns of capacity // E rows), on the CPU. Not trained; its filled
    part is saved in checkpoints.

    A row holds an observation and, when it is not the last of its stretch, the transition leaving it (action,
    reward, cost terms, flags): the next observation is the next row, so nothing is stored twice. Where an
    episode ends (or a stretch is cut: a dropped transition, an interrupted run), its last observation gets a
    row of its own with no transition. Each column numbers its rows as written (seq), so a sampled stretch is
    contiguous, never wraps past the write point, and never crosses an episode end.
    """

    TRANSITION_FIELDS = ("latent", "action", "plan_action", "planned", "reward", "cost_terms", "terminated",
                         "truncated", "plan_energy")
    ROW_FIELDS = ("obs", "episode", "step", "seq", "has_transition")

    def __init__(self, obs_shape: int | tuple[int, ...], action_dim: int, latent_dim: int, num_terms: int,
                 num_envs: int, config: MemoryConfig, obs_dtype: torch.dtype = torch.float32,
                 vector_dim: int = 0) -> None:
        """obs_shape: the observation's size (a vector) or shape (an image, stored as obs_dtype=uint8: a quarter
        of the float memory). vector_dim: the size of a dict observation's "vector" beside its image (0: none)."""
        if config.capacity < num_envs:
            raise ValueError(f"memory capacity={config.capacity} is below num_envs={num_envs}; expected at least "
                             "one row per environment")
        self.config = config
        self.num_envs = num_envs
        self.rows = config.capacity // num_envs
        self.capacity = self.rows * num_envs
        shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
        size = (self.rows, num_envs)
        self.obs = torch.zeros(*size, *shape, dtype=obs_dtype)
        self.vector = torch.zeros(*size, vector_dim) if vector_dim else None
        self.latent = torch.zeros(*size, latent_dim)
        self.action = torch.zeros(*size, action_dim)
        self.plan_action = torch.zeros(*size, action_dim)
        self.planned = torch.zeros(size, dtype=torch.bool)
        self.reward = torch.zeros(size)
        self.cost_terms = torch.zeros(*size, num_terms)
        self.terminated = torch.zeros(size, dtype=torch.bool)
        self.truncated = torch.zeros(size, dtype=torch.bool)
        self.plan_energy = torch.full(size, float("nan"))
        self.episode = torch.full(size, -1, dtype=torch.long)
        self.step = torch.zeros(size, dtype=torch.long)
        self.seq = torch.full(size, -1, dtype=torch.long)  # the column's count of rows written before this one
        self.has_transition = torch.zeros(size, dtype=torch.bool)
        self.cursor = torch.zeros(num_envs, dtype=torch.long)  # each column's next row
        self.written = torch.zeros(num_envs, dtype=torch.long)  # rows ever written per column
        self.open = torch.zeros(num_envs, dtype=torch.bool)  # the column's newest row awaits its next observation

    def __len__(self) -> int:
        """Transitions stored."""
        return int(self.has_transition.sum())

    def _fields(self) -> tuple[str, ...]:
        return self.ROW_FIELDS + self.TRANSITION_FIELDS + (("vector",) if self.vector is not None else ())

    def _claim(self, envs: torch.Tensor) -> torch.Tensor:
        """The next row of each of these columns, now written: rows (K,)."""
        rows = self.cursor[envs].clone()
        self.seq[rows, envs] = self.written[envs]
        self.cursor[envs] = (rows + 1) % self.rows
        self.written[envs] += 1
        return rows

    def _observation_row(self, envs: torch.Tensor, obs: torch.Tensor, vector: torch.Tensor | None,
                         episode: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        rows = self._claim(envs)
        self.obs[rows, envs] = obs.to(self.obs.dtype)
        if self.vector is not None:
            self.vector[rows, envs] = vector
        self.episode[rows, envs] = episode
        self.step[rows, envs] = step
        self.has_transition[rows, envs] = False
        self.terminated[rows, envs] = self.truncated[rows, envs] = False
        self.plan_energy[rows, envs] = float("nan")
        return rows

    def write(self, record: Record, valid: torch.Tensor | None = None) -> None:
        """One transition per environment, where valid: (E,) is True (default: all): its observation's row and
        transition, and, where the episode ended there, its final observation's row."""
        valid = torch.ones(self.num_envs, dtype=torch.bool) if valid is None else valid.cpu()
        envs = valid.nonzero().squeeze(1)
        if not len(envs):
            return
        newest = (self.cursor[envs] - 1) % self.rows
        if (self.open[envs] & (self.episode[newest, envs] != record.episode[envs])).any():
            raise RuntimeError("memory: an episode's stretch was left open; end_segments must close it before "
                               "another episode is written in the same column")
        rows = self._observation_row(envs, record.obs[envs], None if record.vector is None else record.vector[envs],
                                     record.episode[envs], record.step[envs])
        for name in self.TRANSITION_FIELDS:
            getattr(self, name)[rows, envs] = getattr(record, name)[envs].to(getattr(self, name).dtype)
        self.has_transition[rows, envs] = True
        ended = (record.terminated | record.truncated)[envs]
        self.open[envs] = ~ended
        finished = envs[ended]
        if len(finished):
            self._observation_row(finished, record.next_obs[finished],
                                  None if record.next_vector is None else record.next_vector[finished],
                                  record.episode[finished], record.step[finished] + 1)

    def end_segments(self, envs: torch.Tensor, obs: torch.Tensor, vector: torch.Tensor | None = None) -> None:
        """Close the open stretches of these environments: envs (E,) bool, obs: (E, *obs_shape) each one's
        current observation, the next observation of its newest transition. That transition is marked
        truncated (the critic bootstraps from its next state), so a dropped transition or an interrupted run
        never joins what came before to what comes after."""
        envs = (envs.cpu() & self.open).nonzero().squeeze(1)
        if not len(envs):
            return
        last = (self.cursor[envs] - 1) % self.rows
        self.truncated[last, envs] = True
        self._observation_row(envs, torch.as_tensor(obs)[envs], None if vector is None else vector[envs],
                              self.episode[last, envs], self.step[last, envs] + 1)
        self.open[envs] = False

    @property
    def rows_left(self) -> int:
        """Rows every column can still take before the first one overwrites its oldest."""
        return self.rows - int(self.written.max())

    def _valid_starts(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """starts: (M,) flat row indices -> (M,) bool: `length` transitions of one episode begin there, their
        last observation is stored, and no episode end comes before the last of them."""
        flat = self._stretch(starts, length)  # (M, L + 1)
        seq, episode = self.seq.view(-1)[flat], self.episode.view(-1)[flat]
        contiguous = (seq - seq[:, :1] == torch.arange(length + 1)).all(1) & (seq[:, 0] >= 0)
        same_episode = (episode == episode[:, :1]).all(1)
        transitions = self.has_transition.view(-1)[flat[:, :-1]].all(1)
        ended = (self.terminated.view(-1) | self.truncated.view(-1))[flat[:, :-2]].any(1)
        return contiguous & same_episode & transitions & ~ended

    def _stretch(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(M,) flat indices -> (M, length + 1) the flat indices of the rows that follow in the same column."""
        rows, envs = starts // self.num_envs, starts % self.num_envs
        return ((rows[:, None] + torch.arange(length + 1)) % self.rows) * self.num_envs + envs[:, None]

    def sample_indices(self, batch_size: int, length: int, generator: torch.Generator | None = None,
                       planned_only: bool = False) -> torch.Tensor:
        """(length + 1, batch_size) flat row indices of batch_size stretches of `length` transitions (their
        length + 1 observations), uniformly over valid starts."""
        if len(self) < length:
            raise ValueError(f"memory holds {len(self)} records; cannot sample sequences of {length}")
        high = min(int(self.written.max()), self.rows) * self.num_envs
        chosen: list[torch.Tensor] = []
        needed = batch_size
        for _ in range(100):
            starts = torch.randint(0, high, (4 * needed,), generator=generator)
            valid = self._valid_starts(starts, length)
            if planned_only:
                valid &= self.planned.view(-1)[starts]
            chosen.append(starts[valid][:needed])
            needed -= chosen[-1].numel()
            if needed == 0:
                break
        else:
            raise ValueError(f"memory has too few stretches of {length} steps to sample from")
        return self._stretch(torch.cat(chosen), length).T

    def sample_sequences(self, batch_size: int, length: int, generator: torch.Generator | None = None,
                         planned_only: bool = False) -> SequenceBatch:
        """batch_size stretches of `length` transitions, uniformly over valid starts."""
        idx = self.sample_indices(batch_size, length, generator, planned_only)  # (L + 1, B)
        take = lambda field: field.flatten(0, 1)[idx[:-1]]  # noqa: E731
        vector = None if self.vector is None else self.vector.flatten(0, 1)[idx]
        return SequenceBatch(self.obs.flatten(0, 1)[idx], vector, take(self.action), take(self.plan_action),
                             take(self.cost_terms), take(self.reward), take(self.terminated), take(self.truncated),
                             take(self.planned))

    def timeline(self) -> torch.Tensor:
        """(N,) flat indices of every stored row, column after column, each column oldest first: episodes are
        contiguous in it."""
        seq = self.seq.view(-1)
        filled = (seq >= 0).nonzero().squeeze(1)
        column = filled % self.num_envs
        return filled[torch.argsort(column * (int(self.written.max()) + 1) + seq[filled])]

    def recall(self, key: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Associative recall over the stored transitions. key: (D,) -> (flat indices (k,), cosine similarities
        (k,)), nearest first."""
        stored = self.has_transition.view(-1).nonzero().squeeze(1)
        k = min(k or self.config.recall_k, len(stored))
        keys = self.latent.view(-1, self.latent.shape[-1])[stored]
        sims = torch.nn.functional.cosine_similarity(keys, key.cpu()[None], dim=-1)
        values, order = sims.topk(k)
        return stored[order], values

    def state_dict(self) -> dict:
        """The filled rows only (the same rows of every column), and the write positions."""
        filled = min(int(self.written.max()), self.rows)
        state = {name: getattr(self, name)[:filled].clone() for name in self._fields()}
        return {**state, "rows": self.rows, "num_envs": self.num_envs, "cursor": self.cursor.clone(),
                "written": self.written.clone(), "open": self.open.clone()}

    def load_state_dict(self, state: dict) -> None:
        saved, here = (state["rows"], state["num_envs"], *state["obs"].shape[2:]), (self.rows, *self.obs.shape[1:])
        if tuple(saved) != here or (state.get("vector") is None) != (self.vector is None):
            raise ValueError(f"memory shape mismatch: checkpoint (rows, envs, *obs) {tuple(saved)}, config {here}; "
                             "expected the same agent.memory.capacity, train.num_envs and observation")
        filled = state["obs"].shape[0]
        for name in self._fields():
            field = getattr(self, name)
            field[filled:] = -1 if name in ("episode", "seq") else 0
            field[:filled] = state[name]
        self.cursor, self.written, self.open = state["cursor"].clone(), state["written"].clone(), state["open"].clone()


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

    def fresh(self) -> EpisodeTrail:
        """An empty trail with the same settings (for evaluation beside a training episode)."""
        return EpisodeTrail(self.capacity, self.latent_dim, self.every)

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

"""The vocabulary the six modules speak: small frozen dataclasses of tensors.

Shapes use B for the batch of environments acting at once, N for planner candidates per
environment, H for the plan horizon, D for the latent size, A for the action size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Percept:
    """What perception makes of an observation.

    state: (B, D) latent state.
    goal: (B, D) latent goal, when the observation carries one.
    observation: (B, Q) the observation it came from, whose entries are the named quantities.
    """

    state: torch.Tensor
    goal: torch.Tensor | None = None
    observation: torch.Tensor | None = None


@dataclass(frozen=True)
class Task:
    """The configurator's instructions for one step.

    weights: non-guardrail intrinsic-cost weights by term name (guardrails are not listed: they
        cannot be set). horizon and iterations are the planning budget; mode is "mode1" (policy
        alone) or "mode2" (planning).
    """

    weights: dict[str, float]
    horizon: int
    iterations: int
    mode: str
    goal: torch.Tensor | None = None
    visited: torch.Tensor | None = None  # (B, V, D): the episode's trail, for the boredom term
    boredom_scale: torch.Tensor | None = None  # (B,): the factor on the boredom weight (None: 1)


@dataclass(frozen=True)
class Plan:
    """The actor's answer.

    actions: (H, B, A) best action sequence per environment, in [-1, 1].
    energy_before: (B,) energy of the best candidate before optimisation.
    energy_after: (B,) energy of the returned sequence.
    states: (H + 1, B, D) predicted latent states along the returned sequence.
    candidates: (H, B, N, A) every optimised sequence (for shields and inspection).
    candidate_energy: (B, N).
    """

    actions: torch.Tensor
    energy_before: torch.Tensor
    energy_after: torch.Tensor
    states: torch.Tensor
    candidates: torch.Tensor
    candidate_energy: torch.Tensor
    plan_time_s: float = 0.0
    mode: str = "mode2"


@dataclass(frozen=True)
class ShieldDecision:
    """What the shield did with a batch of proposed actions.

    actions: (B, A) the actions sent. intervened: (B,) the proposed action broke a guardrail and
    was replaced; fallback: (B,) by the declared fallback (no candidate passed the ego model).
    proposed_cost: (B,) guardrail cost of the proposed action's predicted next state.
    ego_rejected, world_model_rejected: (B,) which prediction of the proposed action broke a guardrail.
    """

    actions: torch.Tensor
    intervened: torch.Tensor
    fallback: torch.Tensor
    proposed_cost: torch.Tensor
    ego_rejected: torch.Tensor
    world_model_rejected: torch.Tensor


@dataclass(frozen=True)
class Record:
    """One real transition as short-term memory stores it (numpy-free: tensors on CPU).

    obs, next_obs: (obs_dim,); latent: (D,) the perceived state, the key for recall;
    action: (A,) in [-1, 1]; cost_terms: (T,) raw (unweighted) intrinsic-cost terms, in the order
    of IntrinsicCost.term_names. planned marks actions chosen by Mode-2, which Mode-1 imitates.
    """

    step: int
    episode: int
    obs: torch.Tensor
    next_obs: torch.Tensor
    latent: torch.Tensor
    action: torch.Tensor
    reward: float
    cost_terms: torch.Tensor
    terminated: bool
    truncated: bool
    planned: bool
    plan_energy: float = float("nan")
    info: dict = field(default_factory=dict, compare=False)

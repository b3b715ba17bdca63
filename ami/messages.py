"""The vocabulary the six modules speak: small frozen dataclasses of tensors.

Shapes use B for the batch of environments acting at once, N for planner candidates per
environment, H for the plan horizon, D for the latent size, A for the action size, Q for the named
observation quantities, T for the intrinsic-cost terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Percept:
    """What perception makes of an observation.

    state: (B, D) latent state.
    goal: (B, D) latent goal, when the observation carries one.
    observation: (B, Q) the observation's named quantities (Q = 0 for an image).
    readout_offset: (B, Q) added to the world model's readout of states imagined from this one (zeros unless
        the readout is anchored on the observation: WorldModel.readout_offset).
    """

    state: torch.Tensor
    goal: torch.Tensor | None = None
    observation: torch.Tensor | None = None
    readout_offset: torch.Tensor | None = None


@dataclass(frozen=True)
class Task:
    """The configurator's instructions for one step.

    weights: non-guardrail intrinsic-cost weights by term name (guardrails are not listed: they cannot be set).
    weight_vector: (T,) every term's weight in the intrinsic cost's order, guardrails at their fixed weights.
    horizon and iterations are the planning budget; mode is "random" (uniform proposals: the seed phase and
    reward-free collection), "mode1" (the policy alone) or "mode2" (planning).
    visited: (B, V, D) the episode's trail, for the boredom term; boredom_scale: (B,) the factor on its weight.
    explore: a training step, whose plan may price what the value does not know as a promise (value_optimism).
    """

    weights: dict[str, float]
    weight_vector: torch.Tensor
    horizon: int
    iterations: int
    mode: str
    goal: torch.Tensor | None = None
    visited: torch.Tensor | None = None
    boredom_scale: torch.Tensor | None = None
    explore: bool = False


@dataclass(frozen=True)
class Plan:
    """The actor's answer.

    actions: (H, B, A) best action sequence per environment, in [-1, 1].
    energy_before: (B,) energy of the best candidate before optimisation.
    energy_after: (B,) energy of the returned sequence.
    states: (H + 1, B, D) predicted latent states along the returned sequence.
    candidates: (H, B, N, A) every optimised sequence (for shields and inspection).
    candidate_energy: (B, N).
    proposal_energy: (B,) the energy of Mode-1's proposal as it was proposed (what the configurator compares
        with energy_after to decide whether Mode-1 may act alone); None when there was no proposal.
    energy_trace: (I + 1,) the mean over environments of the best energy found by each of the plan's I + 1
        evaluations (before the first step, after each): how the plan converged, for the configurator's budget.
    """

    actions: torch.Tensor
    energy_before: torch.Tensor
    energy_after: torch.Tensor
    states: torch.Tensor
    candidates: torch.Tensor
    candidate_energy: torch.Tensor
    proposal_energy: torch.Tensor | None = None
    plan_time_s: float = 0.0
    mode: str = "mode2"
    energy_trace: torch.Tensor | None = None


@dataclass(frozen=True)
class ShieldDecision:
    """What the shield did with a batch of proposed actions.

    actions: (B, A) the actions sent. intervened: (B,) the proposed action broke a guardrail and
    was replaced; fallback: (B,) by the declared fallback (no candidate passed the ego model).
    proposed_cost: (B,) guardrail cost of the proposed action's predicted next state.
    ego_rejected, world_model_rejected: (B,) which prediction of the proposed action broke a guardrail.
    breach: (B,) a guardrail was already broken on the real observation; caution: (B,) the model was not
    trusted and the action was shrunk or replaced near a guardrail (None where not checked).
    recovery: (N, B, A) the look-ahead's recovery from the next state (the next step's warm start), and
    recovery_cost: (B,) the largest guardrail cost its best recovery from this state predicts; None without one.
    """

    actions: torch.Tensor
    intervened: torch.Tensor
    fallback: torch.Tensor
    proposed_cost: torch.Tensor
    ego_rejected: torch.Tensor
    world_model_rejected: torch.Tensor
    breach: torch.Tensor | None = None
    caution: torch.Tensor | None = None
    recovery: torch.Tensor | None = None
    recovery_cost: torch.Tensor | None = None


@dataclass(frozen=True)
class Action:
    """What a policy sends to a batch of environments, and, for ami's agent, why.

    actions: (B, A) in [-1, 1], on the CPU: what the env loop steps with. The messages are None for a policy
    that is not an ami agent (a peer, a random policy). predicted: what the world model expects the guardrail
    quantities to read next, scored against the real next observation (the shield's trust); None before it
    has trained or without guardrails.
    """

    actions: np.ndarray
    percept: Percept | None = None
    task: Task | None = None
    plan: Plan | None = None
    decision: ShieldDecision | None = None
    predicted: torch.Tensor | None = None  # (B, Q) the world model's next observation quantities after `actions`


@dataclass(frozen=True)
class Record:
    """One real transition per environment, as short-term memory stores it (CPU tensors, B rows).

    obs, next_obs: (B, *obs_shape), next_obs the true next observation (the final one where the episode
    ended); vector, next_vector: (B, Q) a dict observation's "vector" entries, else None. latent: (B, D) the
    perceived state, the key for recall. action: (B, A) the action sent, in [-1, 1]. planned: (B,) Mode-2
    chose it; plan_action: (B, A) Mode-2's own first action (before exploration noise and the shield): what
    Mode-1 imitates. cost_terms: (B, T) raw (unweighted) intrinsic-cost terms, in IntrinsicCost.term_names
    order. reward, terminated, truncated, plan_energy: (B,). episode: (B,) each transition's episode id;
    step: (B,) its global env step.
    """

    obs: torch.Tensor
    next_obs: torch.Tensor
    latent: torch.Tensor
    action: torch.Tensor
    plan_action: torch.Tensor
    planned: torch.Tensor
    reward: torch.Tensor
    cost_terms: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    plan_energy: torch.Tensor
    episode: torch.Tensor
    step: torch.Tensor
    vector: torch.Tensor | None = None
    next_vector: torch.Tensor | None = None


@dataclass(frozen=True)
class Step:
    """One step of the loop's B environments.

    obs: the observations acted on (B, ...) (a dict of such arrays for dict observations); action: what was
    sent; reward, terminated, truncated: (B,); next_obs: (B, ...) each transition's true next observation (the
    final one where its episode ended); info: key -> (B, ...) each environment's value (0 where it gave none);
    valid: (B,) a real transition (not the reset step of a NEXT_STEP vector env, not dropped); dropped: (B,)
    a real step whose transition was dropped as non-finite (env.nonfinite=skip); started: (B,) the loop's
    current observation now begins a new episode (the agent forgets that environment's episode); episode: (B,)
    each transition's episode id; env_step: (B,) its global env step; finished: the episodes that ended
    (ami.loop.Episode).
    """

    obs: Any
    action: Action
    reward: np.ndarray
    next_obs: Any
    terminated: np.ndarray
    truncated: np.ndarray
    info: dict[str, np.ndarray]
    valid: np.ndarray
    dropped: np.ndarray
    started: np.ndarray
    episode: np.ndarray
    env_step: np.ndarray
    finished: list[Any]

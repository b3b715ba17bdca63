"""Configurator: turns the run's configuration and the modules' reports into each step's Task.

Rule-based. It owns the non-guardrail cost weights, the planning budget and the mode; guardrail terms are
outside its reach, and trying to set one raises GuardrailError. Two rules watch how things go:

- The mode switch (mode "auto"): Mode-2 prices Mode-1's proposal beside its own plan on every state it plans
  from. While the proposal's energy is within mode1_gap of the plan's (relative, averaged over recent plans),
  Mode-1 acts alone, with a Mode-2 audit every audit_every steps; once the gap grows past twice that, Mode-2
  takes control back.
- The stall rule: while the distance to the goal stalls, it turns the boredom weight up, so that the place the
  agent is stuck in wears out faster than the world model's false promise of a way through (a wall it lets
  plans slip past).
- The planning budget (max_iterations > 0): each plan takes one Adam step past the last that still helped the
  one before it, and half as many again while the last step still helped; a plan never waits on the host to ask.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ami.messages import Percept, Plan, Task
from ami.schema import ConfiguratorConfig
from modules.cost import GuardrailError, latent_goal_distance

GAP_RATE = 0.25  # weight of the newest plan in the running energy gap: a few plans decide, one outlier does not


@dataclass
class ConfiguratorState:
    """What the rules carry from step to step. Per environment: best_distance (B,) the closest latent goal
    distance this episode, stalled_steps (B,) steps since it last fell by stall_margin. The mode switch:
    mode1_acting, gap (the running relative energy gap of Mode-1's proposals), steps_since_audit."""

    best_distance: torch.Tensor | None = None
    stalled_steps: torch.Tensor | None = None
    mode1_acting: bool = False
    gap: float | None = None
    steps_since_audit: int = 0

    def fresh_episodes(self) -> ConfiguratorState:
        """The same mode decision, no episode under way (for evaluation beside a training episode)."""
        return dataclasses.replace(self, best_distance=None, stalled_steps=None)


class Configurator:
    """term_weights: every intrinsic-cost term's default weight, in the intrinsic cost's order; guardrails: the
    fixed ones."""

    def __init__(self, config: ConfiguratorConfig, term_weights: Mapping[str, float],
                 guardrails: Iterable[str], horizon: int, iterations: int,
                 device: torch.device | str = "cpu") -> None:
        self.config = config
        self.guardrails = frozenset(guardrails)
        self._defaults = {n: float(w) for n, w in term_weights.items()}
        self._weights = {n: w for n, w in self._defaults.items() if n not in self.guardrails}
        self.horizon = horizon
        self.iterations = iterations
        self.device = torch.device(device)
        self.state = ConfiguratorState()
        self._weight_vector: torch.Tensor | None = None
        for name, value in config.weights.items():
            self.set_weight(name, value)

    def set_weight(self, name: str, value: float) -> None:
        if name in self.guardrails:
            raise GuardrailError(f"configurator cannot set guardrail term {name!r}: guardrail weights "
                                 "are fixed at construction")
        if name not in self._weights:
            raise KeyError(f"configurator: no cost term {name!r}; expected one of {sorted(self._weights)}")
        self._weights[name] = float(value)
        self._weight_vector = None

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def weight_vector(self) -> torch.Tensor:
        """(T,) every term's weight in the intrinsic cost's order, guardrails at their fixed weights."""
        if self._weight_vector is None:
            self._weight_vector = torch.tensor([self._weights.get(n, w) for n, w in self._defaults.items()],
                                               device=self.device)
        return self._weight_vector

    def configure(self, percept: Percept, visited: torch.Tensor | None = None, random: bool = False,
                  explore: bool = False) -> Task:
        """visited: (B, V, D) the latents this episode has passed through (memory.EpisodeTrail), passed on
        to the boredom term, with the stall rule's factor on its weight when the rule is on. random: the run's
        schedule asks for random proposals (the seed phase, reward-free collection). explore: a training step."""
        scale = None
        if self.config.stall_patience and visited is not None and percept.goal is not None:
            scale = self.stall_scale(latent_goal_distance(percept.state, percept.goal, "l2"))
        mode = "random" if random else self.mode()
        return Task(self.weights, self.weight_vector, self.horizon, self.iterations, mode, percept.goal, visited,
                    scale, explore)

    def mode(self) -> str:
        """This step's mode: the configured one, or, with "auto", the switch's (audits included)."""
        if self.config.mode != "auto":
            return self.config.mode
        state = self.state
        if not state.mode1_acting:
            return "mode2"
        state.steps_since_audit += 1
        if state.steps_since_audit >= self.config.audit_every:
            state.steps_since_audit = 0
            return "mode2"
        return "mode1"

    def report(self, plan: Plan) -> None:
        """A fresh Mode-2 plan sets the next one's budget, and, with Mode-1's proposal priced beside it, moves the
        mode switch."""
        if plan.mode != "mode2" or plan.plan_time_s == 0.0:  # a held plan followed, not planned
            return
        if self.config.max_iterations > 0 and plan.energy_trace is not None:
            self.iterations = self.budget(plan.energy_trace)
        if self.config.mode != "auto" or plan.proposal_energy is None:
            return
        gap = float((plan.proposal_energy - plan.energy_after).mean()
                    / plan.energy_after.abs().mean().clamp_min(1e-6))
        state = self.state
        state.gap = gap if state.gap is None else (1 - GAP_RATE) * state.gap + GAP_RATE * gap
        if state.mode1_acting and state.gap > 2 * self.config.mode1_gap:
            state.mode1_acting = False
        elif not state.mode1_acting and state.gap <= self.config.mode1_gap:
            state.mode1_acting, state.steps_since_audit = True, 0

    def budget(self, trace: torch.Tensor) -> int:
        """trace: (I + 1,) the last plan's best energy after each evaluation -> the next plan's iterations: one past
        the last step that lowered it by more than `converged` of its final size, or, where the last step did,
        half as many again, within [min_iterations, max_iterations]."""
        config, values = self.config, trace.tolist()  # the one read of the plan the budget needs, after it
        if len(values) < 2 or not all(math.isfinite(value) for value in values):
            return self.iterations
        scale = max(abs(values[-1]), 1e-6)
        helped = [step for step in range(1, len(values))
                  if (values[step - 1] - values[step]) / scale > config.converged]
        if helped and helped[-1] == len(values) - 1:  # still improving at its last step: more
            iterations = self.iterations + max(1, self.iterations // 2)
        else:
            iterations = (helped[-1] if helped else 0) + 1
        return int(min(max(iterations, config.min_iterations), config.max_iterations))

    def stall_scale(self, distance: torch.Tensor) -> torch.Tensor:
        """distance: (B,) this step's latent goal distance -> (B,) 1 + stalled steps / stall_patience.

        A step counts as progress when the distance falls stall_margin below the best so far; a new batch
        size starts every count afresh."""
        state = self.state
        if state.best_distance is None or state.best_distance.shape != distance.shape:
            state.best_distance = torch.full_like(distance, float("inf"))
            state.stalled_steps = torch.zeros_like(distance)
        progress = distance < state.best_distance - self.config.stall_margin
        state.best_distance = torch.where(progress, distance, state.best_distance)
        state.stalled_steps = torch.where(progress, 0.0, state.stalled_steps + 1)
        return 1 + state.stalled_steps / self.config.stall_patience

    def reset(self, done: torch.Tensor | None = None) -> None:
        """A new episode, everywhere or where done: (B,) is True: no best distance, no stall."""
        state = self.state
        if done is None or state.best_distance is None:
            state.best_distance = state.stalled_steps = None
            return
        done = done.to(state.best_distance.device)
        state.best_distance[done] = float("inf")
        state.stalled_steps[done] = 0.0

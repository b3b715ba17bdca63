"""Configurator: turns the run's configuration and the modules' reports into each step's Task.

Rule-based. It owns the non-guardrail cost weights, the planning budget and the mode; guardrail
terms are outside its reach, and trying to set one raises GuardrailError. One rule watches progress: while
the distance to the goal stalls, it turns the boredom weight up, so that the place the agent is stuck in
wears out faster than the world model's false promise of a way through (a wall it lets plans slip past).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ami.config import ConfiguratorConfig
from ami.messages import Percept, Task
from modules.cost import GuardrailError, latent_goal_distance


class Configurator:
    """term_weights: every intrinsic-cost term's default weight; guardrails: the fixed ones."""

    def __init__(self, config: ConfiguratorConfig, term_weights: Mapping[str, float],
                 guardrails: Iterable[str], horizon: int, iterations: int) -> None:
        self.config = config
        self.guardrails = frozenset(guardrails)
        self._weights = {n: float(w) for n, w in term_weights.items() if n not in self.guardrails}
        self.horizon = horizon
        self.iterations = iterations
        self.policy_error = float("inf")
        self.best_distance: torch.Tensor | None = None  # (B,) each env's closest latent goal distance so far
        self.stalled_steps: torch.Tensor | None = None  # (B,) steps since it last fell by stall_margin
        for name, value in config.weights.items():
            self.set_weight(name, value)

    def set_weight(self, name: str, value: float) -> None:
        if name in self.guardrails:
            raise GuardrailError(f"configurator cannot set guardrail term {name!r}: guardrail weights "
                                 "are fixed at construction")
        if name not in self._weights:
            raise KeyError(f"configurator: no cost term {name!r}; expected one of {sorted(self._weights)}")
        self._weights[name] = float(value)

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def report(self, policy_error: float | None = None) -> None:
        """Modules report how they are doing; the rules below read it."""
        if policy_error is not None:
            self.policy_error = policy_error

    def configure(self, percept: Percept, visited: torch.Tensor | None = None) -> Task:
        """visited: (B, V, D) the latents this episode has passed through (memory.EpisodeTrail), passed on
        to the boredom term, with the stall rule's factor on its weight when the rule is on."""
        mode = self.config.mode
        if mode == "auto":
            mode = "mode1" if self.policy_error < self.config.auto_mode1_error else "mode2"
        scale = None
        if self.config.stall_patience and visited is not None and percept.goal is not None:
            scale = self.stall_scale(latent_goal_distance(percept.state, percept.goal, "l2"))
        return Task(self.weights, self.horizon, self.iterations, mode, percept.goal, visited, scale)

    def stall_scale(self, distance: torch.Tensor) -> torch.Tensor:
        """distance: (B,) this step's latent goal distance -> (B,) 1 + stalled steps / stall_patience.

        A step counts as progress when the distance falls stall_margin below the best so far; a new batch
        size starts every count afresh."""
        if self.best_distance is None or self.best_distance.shape != distance.shape:
            self.best_distance = torch.full_like(distance, float("inf"))
            self.stalled_steps = torch.zeros_like(distance)
        progress = distance < self.best_distance - self.config.stall_margin
        self.best_distance = torch.where(progress, distance, self.best_distance)
        self.stalled_steps = torch.where(progress, 0.0, self.stalled_steps + 1)
        return 1 + self.stalled_steps / self.config.stall_patience

    def reset(self, done: torch.Tensor | None = None) -> None:
        """A new episode, everywhere or where done: (B,) is True: no best distance, no stall."""
        if done is None or self.best_distance is None:
            self.best_distance = self.stalled_steps = None
            return
        done = done.to(self.best_distance.device)
        self.best_distance[done] = float("inf")
        self.stalled_steps[done] = 0.0

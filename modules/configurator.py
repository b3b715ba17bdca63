"""Configurator: turns the run's configuration and the modules' reports into each step's Task.

Rule-based. It owns the non-guardrail cost weights, the planning budget and the mode; guardrail
terms are outside its reach, and trying to set one raises GuardrailError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ami.config import ConfiguratorConfig
from ami.messages import Percept, Task
from modules.cost import GuardrailError


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
        to the boredom term."""
        mode = self.config.mode
        if mode == "auto":
            mode = "mode1" if self.policy_error < self.config.auto_mode1_error else "mode2"
        return Task(self.weights, self.horizon, self.iterations, mode, percept.goal, visited)

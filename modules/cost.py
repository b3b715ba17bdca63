"""Cost: the immutable intrinsic cost (IC) and, in modules/critic.py, the trainable critic (TC).

Energy of a plan = sum_t gamma^t [IC(s_t, a_t) + TC_step(s_t, a_t)] + gamma^H TC_value(s_H).
IC is a weighted sum of hard-coded terms. Analytic terms are formulas on named observation
quantities, so they apply to imagined states through the world model's readout. Measured terms
(the env reward, info["cost"]) exist only on real transitions; TC_step learns to predict them.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from ami.schema import CostTermConfig
from modules.critic import GoalCritic, TrainableCritic


class GuardrailError(RuntimeError):
    """Raised on any attempt to change a guardrail term or its weight."""


class Quantities:
    """Named view of a readout tensor: q["theta_dot"] -> (...,)."""

    def __init__(self, values: torch.Tensor, names: tuple[str, ...]) -> None:
        self.values = values
        self.index = {name: i for i, name in enumerate(names)}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[..., self.index[name]]


# Analytic formulas: (quantities, actions (..., A) in [-1, 1], params) -> (...,)
AnalyticFormula = Callable[[Quantities, torch.Tensor, Mapping[str, Any]], torch.Tensor]


def _pendulum(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Pendulum-v1's own cost: theta^2 + 0.1 theta_dot^2 + 0.001 torque^2."""
    theta = torch.atan2(q["sin_theta"], q["cos_theta"])
    torque = float(p.get("max_torque", 2.0)) * action[..., 0]
    return theta**2 + 0.1 * q["theta_dot"] ** 2 + 0.001 * torque**2


def _effort(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    return action.pow(2).sum(-1)


def _abs_bound_slack(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    return float(p["limit"]) - q[p["quantity"]].abs()


def _abs_bound(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Squared excess of |quantity| over limit: zero inside the bound."""
    return torch.relu(-_abs_bound_slack(q, action, p)).pow(2)


def _squared_error(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    return (q[p["quantity"]] - float(p.get("target", 0.0))).pow(2)


def _distance(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Euclidean norm of several quantities (a fingertip-to-target vector); the epsilon keeps the
    gradient finite at the target itself."""
    squares = sum(q[name].pow(2) for name in p["quantities"])
    return (squares + 1e-6).sqrt()


def _clearance_slack(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    return torch.stack([q[name] for name in p["quantities"]], dim=-1).amin(-1) - float(p["margin"])


def _clearance(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Squared shortfall of the smallest of several range readings below a margin: "keep out of
    hazards with margin m" on a lidar of distances to hazard boundaries. Zero while every reading
    is at least the margin."""
    return torch.relu(-_clearance_slack(q, action, p)).pow(2)


def _norm_bound_slack(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    return float(p["limit"]) - (sum(q[name].pow(2) for name in p["quantities"]) + 1e-12).sqrt()


def _norm_bound(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Squared excess of a vector's norm over a limit ("speed below v" on (vx, vy))."""
    return torch.relu(-_norm_bound_slack(q, action, p)).pow(2)


def _linear(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """scale * quantity: with a negative scale, a cost that rewards the quantity (forward speed)."""
    return float(p.get("scale", 1.0)) * q[p["quantity"]]


def _mountaincar_energy(q: Quantities, action: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    """Mechanical energy still missing to reach the flag, in [0, ~1]: a drive to swing higher.

    MountainCarContinuous-v0 moves as v' = v + 0.0015 F - 0.0025 cos(3x), x' = x + v, so
    0.5 v^2 + (0.0025 / 3) sin(3x) is (nearly) conserved without force. The flag at x = 0.45 sits at
    potential U(0.45); the valley floor at U(-pi/6). Zero once the car has the energy to arrive."""
    scale = 0.0025 / 3.0
    goal = scale * math.sin(3.0 * float(p.get("goal_position", 0.45)))
    floor = scale * math.sin(3.0 * -math.pi / 6)
    energy = 0.5 * q["velocity"].pow(2) + scale * torch.sin(3.0 * q["position"])
    return torch.relu(goal - energy) / (goal - floor)


FORMULAS: dict[str, AnalyticFormula] = {
    "mountaincar_energy": _mountaincar_energy,
    "pendulum": _pendulum,
    "effort": _effort,
    "abs_bound": _abs_bound,
    "squared_error": _squared_error,
    "distance": _distance,
    "linear": _linear,
    "clearance": _clearance,
    "norm_bound": _norm_bound,
}

# How far a quantity stands inside a bound formula's bound, in the quantity's own units (negative past it): what
# lets a guardrail be read on a real observation before any model of the world exists. Each of these formulas is
# relu(-slack)^2.
SLACK: dict[str, AnalyticFormula] = {
    "clearance": _clearance_slack,
    "abs_bound": _abs_bound_slack,
    "norm_bound": _norm_bound_slack,
}

# Measured formulas, on real transitions only: (reward (B,), info, params) -> (B,), where info maps a key to
# each environment's value (B,) (ami.loop.step_info: 0 where an environment did not report it).
MeasuredFormula = Callable[[torch.Tensor, Mapping[str, Any], Mapping[str, Any]], torch.Tensor]
MEASURED: dict[str, MeasuredFormula] = {
    "env_reward": lambda reward, info, p: -reward * float(p.get("scale", 1.0)),
    "info_cost": lambda reward, info, p: torch.as_tensor(info.get(p.get("key", "cost"), 0.0),
                                                         dtype=torch.float32).expand_as(reward),
}


def expand_quantities(term: str, patterns: Any, observation_names: list[str]) -> list[str]:
    """Quantity names, with shell-style patterns ("hazard_range_*") expanded in observation order."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names: list[str] = []
    for pattern in patterns:
        matches = [n for n in observation_names if fnmatch.fnmatchcase(n, pattern)] if any(
            c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise KeyError(f"cost term {term!r}: quantities pattern {pattern!r} matches no observation "
                           f"quantity; expected names among {observation_names}")
        names += matches
    return names


class IntrinsicCost:
    """Hard-wired, immutable cost. Holds no parameters and sits in no optimiser.

    Guardrail weights are fixed here at construction; callers may pass weights only for the other
    terms, and naming a guardrail raises GuardrailError.
    """

    __slots__ = ("_terms", "_names", "_quantity_names", "_weights", "_guardrails", "_frozen")

    def __init__(self, terms: list[CostTermConfig], observation_names: list[str]) -> None:
        frozen_params = []
        for term in terms:
            table = FORMULAS if term.kind == "analytic" else MEASURED
            if term.formula not in table:
                raise KeyError(f"cost term {term.name!r}: formula={term.formula!r} is not a "
                               f"{term.kind} formula; expected one of {sorted(table)}")
            params = dict(term.params)
            if "quantities" in params:
                params["quantities"] = expand_quantities(term.name, params["quantities"], observation_names)
            named = [params["quantity"]] if "quantity" in params else []
            for quantity in named + list(params.get("quantities", [])):
                if quantity not in observation_names:
                    raise KeyError(f"cost term {term.name!r}: params names quantity {quantity!r}; "
                                   f"expected one of {observation_names}")
            frozen_params.append(MappingProxyType(
                {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in params.items()}))
        self._terms = tuple((t.name, t.formula, t.kind, bool(t.guardrail), params)
                            for t, params in zip(terms, frozen_params, strict=True))
        self._names = tuple(t.name for t in terms)
        self._quantity_names = tuple(observation_names)
        self._weights = MappingProxyType({t.name: float(t.weight) for t in terms})
        self._guardrails = frozenset(t.name for t in terms if t.guardrail)
        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise GuardrailError(f"IntrinsicCost is immutable: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise GuardrailError(f"IntrinsicCost is immutable: cannot delete {name!r}")

    @property
    def term_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def guardrail_names(self) -> frozenset[str]:
        return self._guardrails

    @property
    def default_weights(self) -> Mapping[str, float]:
        return self._weights

    def describe(self) -> list[tuple]:
        """(name, formula, kind, guardrail, weight, sorted params) per term: what checkpoints compare."""
        return [(n, f, k, g, self._weights[n], tuple(sorted(p.items()))) for n, f, k, g, p in self._terms]

    def weight_vector(self, overrides: Mapping[str, float] | None = None) -> torch.Tensor:
        """(T,) weights: defaults, overridden for non-guardrail terms only."""
        overrides = dict(overrides or {})
        for name in overrides:
            if name in self._guardrails:
                raise GuardrailError(f"cost term {name!r} is a guardrail: its weight is fixed at "
                                     f"{self._weights[name]} and cannot be set")
            if name not in self._weights:
                raise KeyError(f"no cost term {name!r}; expected one of {list(self._names)}")
        return torch.tensor([overrides.get(n, self._weights[n]) for n in self._names])

    def mask(self, kind: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """(T,) 1.0 where a term is of `kind` ("analytic" or "measured")."""
        return torch.tensor([float(k == kind) for _, _, k, _, _ in self._terms], device=device)

    def analytic_terms(self, quantities: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """quantities: (..., Q), actions: (..., A) -> raw terms (..., T); measured terms are 0."""
        q = Quantities(quantities, self._quantity_names)
        zeros = quantities.new_zeros(quantities.shape[:-1])
        values = [FORMULAS[f](q, actions, p) if k == "analytic" else zeros
                  for _, f, k, _, p in self._terms]
        return torch.stack(values, dim=-1) if values else quantities.new_zeros(*quantities.shape[:-1], 0)

    def real_terms(self, quantities: torch.Tensor, action: torch.Tensor, reward: torch.Tensor,
                   info: Mapping[str, Any]) -> torch.Tensor:
        """Real transitions' raw terms: quantities (B, Q) the observed ones, action (B, A), reward (B,), info
        key -> (B,) -> (B, T); analytic terms on the true quantities, measured ones from reward and info."""
        terms = self.analytic_terms(quantities.float(), action.float())
        for i, (_, formula, kind, _, params) in enumerate(self._terms):
            if kind == "measured":
                terms[:, i] = MEASURED[formula](reward.float(), info, params)
        return terms

    def guardrail_violation(self, quantities: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(...,) summed raw guardrail terms; zero where every guardrail holds."""
        terms = self.analytic_terms(quantities, actions)
        mask = torch.tensor([float(n in self._guardrails) for n in self._names], device=terms.device)
        return (terms * mask).sum(-1)

    @property
    def guardrail_quantities(self) -> tuple[str, ...]:
        """The observation quantities the guardrail terms read, in observation order."""
        used = {n for _, _, _, g, p in self._terms if g
                for n in ([p["quantity"]] if "quantity" in p else []) + list(p.get("quantities", ()))}
        return tuple(n for n in self._quantity_names if n in used)

    def guardrail_slack(self, quantities: torch.Tensor) -> torch.Tensor:
        """quantities: (..., Q) -> (...,) the smallest slack over the guardrail terms (SLACK), in the quantities'
        units: positive inside every bound, negative past one; +inf without a guardrail that has a slack."""
        q = Quantities(quantities, self._quantity_names)
        slack = [SLACK[f](q, quantities, p) for _, f, _, g, p in self._terms if g and f in SLACK]
        if not slack:
            return quantities.new_full(quantities.shape[:-1], float("inf"))
        return torch.stack(slack, dim=-1).amin(-1)

    def guardrail_cost(self, quantities: torch.Tensor, actions: torch.Tensor,
                       band: torch.Tensor | float | None = None) -> torch.Tensor:
        """(...,) guardrail terms weighted by their fixed weights: how the shield ranks actions. band: (...,) or a
        number, a distance the quantities must also keep inside each bound that has a slack (SLACK): a term then
        prices relu(band - slack)^2, which at band 0 is the term itself."""
        terms = self.analytic_terms(quantities, actions)
        if band is not None:
            q = Quantities(quantities, self._quantity_names)
            banded = [torch.relu(band - SLACK[f](q, actions, p)).pow(2) if g and f in SLACK else terms[..., i]
                      for i, (_, f, _, g, p) in enumerate(self._terms)]
            terms = torch.stack(banded, dim=-1) if banded else terms
        weights = torch.tensor([self._weights[n] if n in self._guardrails else 0.0 for n in self._names],
                               device=terms.device, dtype=terms.dtype)
        return (terms * weights).sum(-1)


def latent_goal_distance(states: torch.Tensor, goal: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """The intrinsic cost's goal term: how far latent states are from the latent goal.

    states: (..., B, D), goal: (B, D) -> (..., B). "l2": the Euclidean distance, whose gradient keeps its size
    far from the goal (a planner in another room still hears it); "squared": its square over D (an MSE).
    """
    difference = states - goal
    if metric == "squared":
        return difference.pow(2).mean(-1)
    if metric == "l2":
        return (difference.pow(2).sum(-1) + 1e-8).sqrt()
    raise ValueError(f"goal metric {metric!r}: expected 'l2' or 'squared'")


def boredom(states: torch.Tensor, visited: torch.Tensor, radius: float) -> torch.Tensor:
    """How long the episode has lingered near each state: sum_v exp(-|s - v|^2 / (2 radius^2)).

    states: (H, B, D), visited: (B, V, D) (memory.EpisodeTrail, whose empty slots are far away) -> (H, B).
    The squared distance is expanded (|s|^2 - 2 s.v + |v|^2) so that no (H, B, V, D) tensor is made.
    """
    squared = states.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("hbd,bvd->hbv", states, visited) \
        + visited.pow(2).sum(-1)[None]
    return torch.exp(-squared.clamp_min(0) / (2 * radius**2)).sum(-1)


class Cost:
    """The cost module as the agent sees it: the immutable IC beside the trainable TC (and, for goal
    observations, its goal critic)."""

    def __init__(self, intrinsic: IntrinsicCost, critic: TrainableCritic,
                 goal_critic: GoalCritic | None = None) -> None:
        self.intrinsic = intrinsic
        self.critic = critic
        self.goal_critic = goal_critic

"""Shield: the guardrails enforced at the actor's output.

Before an action leaves the agent, where it leads is predicted and the intrinsic cost's guardrail terms are
evaluated on the prediction. Three checks, each where it can be made:

- look-ahead (recovery_horizon N > 0, once the world model is trusted): an action passes only if, after it,
  every member of the world model's ensemble predicts a recovery, a sequence of actions found by gradient
  descent on the guardrail cost alone (warm-started from the last one), that keeps every guardrail for N steps.
  With error_band, step t of it must also keep t times the model's measured error inside each bound: a tube
  as wide as the model has been wrong. The fallback is the recovery plan's own first action. A one-step check
  cannot see that inertia and a steady push carry the agent over a few steps later; this one can.
- one step (N = 0): the next state predicted by the world model and, where one is declared, by a hard-coded ego
  model of the agent's body (modules.ego), which is what a guarantee rests on.
- the real observation, every step: a guardrail already broken is a signal to recover now. Before the world
  model is trusted (its error on fresh real transitions above a declared bound) this is the only check there
  is: near a guardrail's bound (its slack under `caution`) proposals shrink, and a declared recovery action is
  sent where the bound is close or broken. With stand_in "linear", a linear model of the observation fitted by
  least squares to the real transitions so far (modules.ego.LinearStandIn) takes the world model's place in the
  look-ahead until then, once its own error on fresh transitions is under the trust bound.

Shapes: B environments, M candidate actions per environment, Q observation quantities, A actions, D latent,
E ensemble members, N the recovery horizon.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ami.config import ConfigError
from ami.messages import ShieldDecision
from ami.schema import ShieldConfig
from modules.cost import GuardrailError, IntrinsicCost
from modules.ego import LinearStandIn, PointMassEgo
from modules.nn import AdamSteps
from modules.world_model import WorldModel

__all__ = ["ModelTrust", "PointMassEgo", "Recovery", "Shield"]


class ModelTrust:
    """How far the world model's predictions of the guardrail quantities can be trusted, measured on real
    transitions it has not trained on: each new one, scored the moment it arrives. Mutable, unlike the shield:
    the shield's bound (trust_error) is fixed, the error is measured."""

    def __init__(self, window: int) -> None:
        self.errors: deque[float] = deque(maxlen=window)

    def record(self, errors: torch.Tensor) -> None:
        """errors: (n,) each fresh transition's largest absolute error over the guardrail quantities."""
        self.errors.extend(errors.float().cpu().tolist())

    @property
    def error(self) -> float:
        """Mean error over the window; inf until the window is a quarter full."""
        if len(self.errors) < max(self.errors.maxlen // 4, 1):
            return float("inf")
        return sum(self.errors) / len(self.errors)

    def quantile(self, share: float) -> float:
        """The window's error that `share` of its transitions stay under; 0 with nothing measured."""
        if not self.errors:
            return 0.0
        return float(torch.tensor(list(self.errors)).quantile(share))

    def state_dict(self) -> dict:
        return {"errors": list(self.errors)}

    def load_state_dict(self, state: dict) -> None:
        self.errors.clear()
        self.errors.extend(state["errors"])


@dataclass(frozen=True)
class Recovery:
    """The look-ahead check of M first actions per environment. passes: (B, M) a recovery was found after
    the action; worst: (B, M) its largest guardrail cost over the members and N steps; sequences: (N, B, M, A)
    each action followed by its recovery; plan: (N, B, A) the best recovery from the current state (its first
    action is the fallback), plan_worst: (B,) its largest guardrail cost."""

    passes: torch.Tensor
    worst: torch.Tensor
    sequences: torch.Tensor
    plan: torch.Tensor
    plan_worst: torch.Tensor


class Shield:
    """Checks proposed actions against the guardrails; replaces the ones that break them.

    Immutable like the guardrails it enforces: its settings are copied out of the config at
    construction and cannot be changed afterwards (GuardrailError).
    """

    __slots__ = ("intrinsic_cost", "world_model", "action_dim", "active", "check_world_model", "tolerance",
                 "fallback_kind", "ego", "recovery_horizon", "recovery_iterations", "recovery_lr",
                 "recovery_candidates", "checked_alternatives", "trust_error", "caution", "recovery_action",
                 "error_band", "stand_in", "_description", "_frozen")

    def __init__(self, config: ShieldConfig, intrinsic_cost: IntrinsicCost, world_model: WorldModel,
                 observation_names: Sequence[str], action_dim: int) -> None:
        self.intrinsic_cost = intrinsic_cost
        self.world_model = world_model
        self.action_dim = action_dim
        self.active = bool(config.enabled and intrinsic_cost.guardrail_names)
        self.check_world_model = bool(config.world_model)
        self.tolerance = float(config.tolerance)
        self.fallback_kind = str(config.fallback)
        self.ego = PointMassEgo(dict(config.ego.params), observation_names) if config.ego.kind == "point_mass" else None
        if self.ego is not None and action_dim != 2:
            raise ConfigError(f"agent.shield.ego.kind='point_mass' moves in 2-D; the env has {action_dim} actions")
        self.recovery_horizon = int(config.recovery_horizon)
        self.recovery_iterations = int(config.recovery_iterations)
        self.recovery_lr = float(config.recovery_lr)
        self.recovery_candidates = int(config.recovery_candidates)
        self.checked_alternatives = int(config.checked_alternatives)
        self.trust_error = float(config.trust_error)
        self.caution = float(config.caution)
        self.error_band = float(config.error_band)
        self.stand_in = str(config.stand_in)
        self.recovery_action = tuple(float(a) for a in config.recovery_action)
        if self.recovery_action and len(self.recovery_action) != action_dim:
            raise ConfigError(f"agent.shield.recovery_action={list(self.recovery_action)}: expected {action_dim} "
                              "numbers in [-1, 1], one per action")
        params = tuple(sorted((key, tuple(value) if isinstance(value, list | tuple) else value)
                              for key, value in config.ego.params.items()))
        self._description = (config.enabled, config.world_model, self.tolerance, self.fallback_kind,
                             config.ego.kind, params, self.recovery_horizon, self.recovery_iterations,
                             self.recovery_lr, self.recovery_candidates, self.checked_alternatives,
                             self.trust_error, self.caution, self.recovery_action, self.error_band,
                             world_model.ensemble_size if self.recovery_horizon else 1) \
            + ((self.stand_in,) if self.stand_in != "none" else ())  # runs saved before stand_in existed resume
        self._frozen = True

    def __setattr__(self, name: str, value: object) -> None:
        if getattr(self, "_frozen", False):
            raise GuardrailError(f"the shield is immutable: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def describe(self) -> tuple:
        """What checkpoints compare: a run cannot resume with its shield loosened."""
        return self._description

    @property
    def measures_model(self) -> bool:
        """Whether anything here reads the world model's measured error (a trust bound or an error band)."""
        return self.active and (self.trust_error > 0 or self.error_band > 0)

    def trusts(self, trust: ModelTrust, trained: bool) -> bool:
        """Whether the world model's predictions may be checked: it has trained, and (with a trust_error bound)
        its error on fresh real transitions is below the bound."""
        return trained and self.check_world_model and (self.trust_error <= 0 or trust.error < self.trust_error)

    def trusts_stand_in(self, stand_in: LinearStandIn | None, trust: ModelTrust) -> bool:
        """Whether the look-ahead may run on the stand-in: there is one, it is fitted, and (with a trust_error
        bound) its own error on fresh real transitions is below the bound."""
        return self.active and self.recovery_horizon > 0 and stand_in is not None and stand_in.fitted \
            and (self.trust_error <= 0 or trust.error < self.trust_error)

    def planning_cost(self, observation: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """observation: (B, Q), actions: (B, A) first actions of plans -> (B,) guardrail cost of the
        ego model's worst case after each, differentiable in the actions. The plan energy adds it,
        so the planner sees what the shield will refuse instead of proposing it again and again
        (a robot that keeps pushing at a hazard between it and the goal)."""
        predicted = self.ego.predict(observation, actions[:, None])[:, 0]
        return self.intrinsic_cost.guardrail_cost(predicted, actions)

    def fallback(self, quantities: torch.Tensor) -> torch.Tensor:
        """quantities: (B, Q) -> (B, A) the declared safe action."""
        if self.fallback_kind == "brake" and self.ego is not None:
            return self.ego.brake(quantities)
        if self.recovery_action:
            return quantities.new_tensor(self.recovery_action).expand(quantities.shape[0], -1)
        return quantities.new_zeros(quantities.shape[0], self.action_dim)

    @torch.no_grad()
    def guardrail_costs(self, quantities: torch.Tensor, latent: torch.Tensor | None, candidates: torch.Tensor,
                        readout_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """quantities: (B, Q), latent: (B, D) or None, candidates: (B, M, A) -> guardrail cost of
        each candidate's predicted next state under the ego model and under the world model (its worst member),
        (B, M) each (zeros where that model is not used). readout_offset: (B, Q) added to the world model's
        readout (WorldModel.readout_offset)."""
        ego_cost = torch.zeros(candidates.shape[:2], device=candidates.device)
        if self.ego is not None:
            ego_cost = self.intrinsic_cost.guardrail_cost(self.ego.predict(quantities, candidates), candidates)
        world_cost = torch.zeros_like(ego_cost)
        if latent is not None:
            members = self.world_model.ensemble_size
            states = latent[None, :, None].expand(members, -1, candidates.shape[1], -1).flatten(1, 2)
            predicted = self.world_model.readout(self.world_model.step_members(states, candidates.flatten(0, 1)))
            predicted = predicted.view(members, *candidates.shape[:2], -1)
            if readout_offset is not None:
                predicted = predicted + readout_offset[:, None]
            world_cost = self.intrinsic_cost.guardrail_cost(predicted, candidates.expand(members, -1, -1, -1))
            world_cost = world_cost.amax(0)
        return ego_cost, world_cost

    def recovery(self, latent: torch.Tensor, readout_offset: torch.Tensor, first_actions: torch.Tensor,
                 warm_start: torch.Tensor | None, generator: torch.Generator | None = None,
                 model_error: float = 0.0, model: WorldModel | LinearStandIn | None = None) -> Recovery:
        """latent: (B, D), readout_offset: (B, Q), first_actions: (B, M, A), warm_start: (N, B, A) the last
        recovery advanced one step (None: none yet); model_error: the model's measured error, which error_band
        widens into a tube around the prediction; model: the world model (None) or the stand-in, whose state
        is the observation -> Recovery.

        Each checked action is followed by N - 1 actions, and each of recovery_candidates free sequences (the warm
        start, then constant random levels) has N; all of them descend the summed guardrail cost of their worst
        member for recovery_iterations Adam steps, the checked first actions held fixed."""
        horizon, batch, checked = self.recovery_horizon, latent.shape[0], first_actions.shape[1]
        free, action_dim, device = self.recovery_candidates, self.action_dim, latent.device
        warm = torch.zeros(horizon, batch, action_dim, device=device) if warm_start is None else warm_start
        tails = torch.cat([warm[1:], warm[-1:]])[:, :, None].expand(-1, -1, checked, -1).clone()  # (N, B, M, A)
        tails[0] = first_actions
        levels = torch.rand(free - 1, batch, action_dim, generator=generator).to(device) * 2 - 1
        if self.recovery_action and free > 1:
            levels[0] = torch.tensor(self.recovery_action, device=device)
        fresh = levels.permute(1, 0, 2)[None].expand(horizon, -1, -1, -1)  # (N, B, free - 1, A)
        actions = torch.cat([tails, warm[:, :, None], fresh], dim=2).flatten(1, 2)  # (N, B * (M + free), A)
        rows = checked + free
        movable = torch.ones(horizon, batch, rows, 1, device=device)
        movable[0, :, :checked] = 0.0  # the action being checked is not the recovery's to change
        movable = movable.flatten(1, 2)
        start = latent.detach().repeat_interleave(rows, dim=0)
        offset = readout_offset.repeat_interleave(rows, dim=0)
        adam = AdamSteps(actions)
        best_actions, best_worst = actions, None
        band = None if not self.error_band else \
            self.error_band * model_error * torch.arange(1, horizon + 1, device=device, dtype=latent.dtype)
        for k in range(1, self.recovery_iterations + 2):
            with torch.enable_grad():
                trial = actions.detach().requires_grad_(True)
                per_step = self._member_costs(model or self.world_model, start, offset, trial, band)  # (N, rows)
                (grad,) = torch.autograd.grad(per_step.sum(), trial)
            worst = per_step.detach().amax(0)
            worst = torch.nan_to_num(worst, nan=float("inf"))
            if best_worst is None:
                best_actions, best_worst = actions, worst
            else:
                better = worst < best_worst
                best_worst = torch.where(better, worst, best_worst)
                best_actions = torch.where(better[None, :, None], actions, best_actions)
            if k > self.recovery_iterations:
                break
            # A held action's gradient is zero, so its Adam step is too: it stays as it is.
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0) * movable
            actions = (actions - self.recovery_lr * adam(grad)).clamp(-1.0, 1.0)
        sequences = best_actions.view(horizon, batch, rows, action_dim)
        worst = best_worst.view(batch, rows)
        best_free = worst[:, checked:].argmin(1)
        plan = sequences[:, :, checked:][:, torch.arange(batch, device=device), best_free]
        return Recovery(worst[:, :checked] <= self.tolerance, worst[:, :checked], sequences[:, :, :checked], plan,
                        worst[:, checked:].gather(1, best_free[:, None]).squeeze(1))

    def _member_costs(self, model: WorldModel | LinearStandIn, start: torch.Tensor, offset: torch.Tensor,
                      actions: torch.Tensor, band: torch.Tensor | None = None) -> torch.Tensor:
        """start: (R, D), offset: (R, Q), actions: (N, R, A), band: (N,) the tube's width at each step or None
        -> (N, R) the guardrail cost of each step's predicted state under the model's worst member."""
        members = model.ensemble_size
        states = start[None].expand(members, -1, -1)
        costs = []
        for t, action in enumerate(actions):
            states = model.step_members(states, action)
            quantities = model.readout(states) + offset
            width = None if band is None else band[t]
            costs.append(self.intrinsic_cost.guardrail_cost(quantities, action.expand(members, -1, -1), width).amax(0))
        return torch.stack(costs)

    @torch.no_grad()
    def filter(self, quantities: torch.Tensor, proposed: torch.Tensor, latent: torch.Tensor | None = None,
               alternatives: torch.Tensor | None = None, readout_offset: torch.Tensor | None = None,
               warm_start: torch.Tensor | None = None, generator: torch.Generator | None = None,
               model_error: float = 0.0, stand_in: LinearStandIn | None = None) -> ShieldDecision:
        """quantities: (B, Q) the observation; proposed: (B, A) in [-1, 1]; latent: (B, D), given when the world
        model's prediction should be checked (it is trusted); alternatives: (B, M, A) the planner's other
        candidates' first actions, best first; warm_start: (N, B, A) the last decision's recovery, advanced;
        model_error: the checking model's measured error on fresh transitions (ModelTrust.quantile), for
        error_band; stand_in: the model the look-ahead runs on when latent is None (the world model not trusted),
        given once it is trusted itself (trusts_stand_in) -> the actions to send, and what was done."""
        proposed = proposed.to(quantities.dtype)
        batch = proposed.shape[0]
        no = torch.zeros(batch, dtype=torch.bool, device=proposed.device)
        if not self.active:
            return ShieldDecision(proposed, no, no, torch.zeros(batch, device=proposed.device), no, no)
        if not self.check_world_model:
            latent = None
        breach = ~(self.intrinsic_cost.guardrail_cost(quantities, proposed) <= self.tolerance)
        if latent is not None and self.recovery_horizon > 0:
            return self._look_ahead(quantities, proposed, latent, alternatives, readout_offset, warm_start,
                                    breach, generator, model_error)
        if stand_in is not None and self.recovery_horizon > 0:  # its state is the observation itself
            return self._look_ahead(quantities, proposed, quantities, alternatives, None, warm_start, breach,
                                    generator, model_error, stand_in)
        decision = self._one_step(quantities, proposed, latent, alternatives, readout_offset)
        if latent is not None or self.ego is not None:
            return dataclasses.replace(decision, breach=breach)
        return self._cautious(quantities, decision, breach)

    def _one_step(self, quantities: torch.Tensor, proposed: torch.Tensor, latent: torch.Tensor | None,
                  alternatives: torch.Tensor | None, readout_offset: torch.Tensor | None) -> ShieldDecision:
        """The next state under the ego model and the world model (where given)."""
        batch = proposed.shape[0]
        fallback = torch.nan_to_num(self.fallback(quantities), nan=0.0)  # a brake read off a NaN velocity: none
        parts = [proposed[:, None]] + ([alternatives] if alternatives is not None else []) + [fallback[:, None]]
        # (B, M, A): the proposal, the alternatives, the fallback
        candidates = torch.cat([part.to(quantities.dtype) for part in parts], dim=1).clamp(-1.0, 1.0)
        ego_cost, world_cost = self.guardrail_costs(quantities, latent, candidates, readout_offset)
        total = ego_cost + world_cost
        # A cost that is not a number (a non-finite observation or prediction) breaks the guardrail: only a
        # guardrail shown to hold lets an action through.
        intervened = self._breaks(total[:, 0])
        # Rank replacements by guardrail cost; one that fails the ego model is never chosen over the
        # fallback. argmin keeps the first of equals: the planner's order, the fallback last.
        ranking = torch.nan_to_num(total, nan=float("inf"))
        ranking[:, 0] = float("inf")
        ranking[self._breaks(ego_cost)] = float("inf")
        choice = ranking.argmin(dim=1)
        use_fallback = torch.isinf(ranking.gather(1, choice[:, None]).squeeze(1)) | (choice == candidates.shape[1] - 1)
        replacement = torch.where(use_fallback[:, None], fallback, candidates[torch.arange(batch), choice])
        actions = torch.where(intervened[:, None], replacement, proposed)
        return ShieldDecision(actions, intervened, intervened & use_fallback, total[:, 0],
                              self._breaks(ego_cost[:, 0]), self._breaks(world_cost[:, 0]))

    def _breaks(self, cost: torch.Tensor) -> torch.Tensor:
        return ~(cost <= self.tolerance)

    def _cautious(self, quantities: torch.Tensor, decision: ShieldDecision, breach: torch.Tensor) -> ShieldDecision:
        """No model to check with: read the guardrails on the real observation. Within `caution` of a bound the
        action shrinks in proportion to the slack left; past half of it, or past the bound, the declared recovery
        action is sent (where one is declared)."""
        actions, intervened, fallback = decision.actions, decision.intervened, decision.fallback
        near = breach.clone()
        if self.caution > 0:
            slack = self.intrinsic_cost.guardrail_slack(quantities)
            near = near | (slack < self.caution)
            actions = actions * (slack / self.caution).clamp(0.0, 1.0)[:, None]
            close = breach | (slack < self.caution / 2)
        else:
            close = breach
        if self.recovery_action:
            actions = torch.where(close[:, None], self.fallback(quantities), actions)
            fallback = fallback | close
        return ShieldDecision(actions, intervened | near, fallback, decision.proposed_cost, decision.ego_rejected,
                              decision.world_model_rejected, breach=breach, caution=near)

    def _look_ahead(self, quantities: torch.Tensor, proposed: torch.Tensor, latent: torch.Tensor,
                    alternatives: torch.Tensor | None, readout_offset: torch.Tensor | None,
                    warm_start: torch.Tensor | None, breach: torch.Tensor, generator: torch.Generator | None,
                    model_error: float, model: LinearStandIn | None = None) -> ShieldDecision:
        """The proposal, then the planner's best alternatives, each checked for a recovery after it; the first
        that has one is sent, else the recovery plan's first action. A guardrail already broken on the real
        observation sends the recovery plan at once."""
        arange = torch.arange(proposed.shape[0], device=proposed.device)
        parts = [proposed[:, None]]
        if alternatives is not None and self.checked_alternatives:
            parts.append(alternatives[:, :self.checked_alternatives].to(proposed.dtype))
        candidates = torch.cat(parts, dim=1).clamp(-1.0, 1.0)  # (B, M, A)
        offset = torch.zeros_like(quantities) if readout_offset is None else readout_offset
        found = self.recovery(latent, offset, candidates, warm_start, generator, model_error, model)
        passes = found.passes.clone()
        ego_rejected = torch.zeros_like(passes)
        if self.ego is not None:  # the ego model's verdict too, where there is one
            ego_cost, _ = self.guardrail_costs(quantities, None, candidates)
            ego_rejected = self._breaks(ego_cost)
            passes = passes & ~ego_rejected
        passes[breach] = False
        choice = passes.float().argmax(1)  # the first that passes, in the planner's order
        chosen = passes.any(1)
        recovery_first = found.plan[0]
        fallback = recovery_first
        if self.ego is not None:  # a recovery the ego model refuses gives way to the declared fallback
            ego_recovery, _ = self.guardrail_costs(quantities, None, recovery_first[:, None])
            fallback = torch.where(self._breaks(ego_recovery)[:, 0:1], self.fallback(quantities), recovery_first)
        actions = torch.where(chosen[:, None], candidates[arange, choice], fallback)
        sequences = torch.where(chosen[None, :, None], found.sequences[:, arange, choice], found.plan)
        intervened = ~passes[:, 0]
        return ShieldDecision(actions, intervened, ~chosen, found.worst[:, 0], ego_rejected[:, 0], ~found.passes[:, 0],
                              breach=breach, recovery=torch.cat([sequences[1:], sequences[-1:]]),
                              recovery_cost=found.plan_worst)

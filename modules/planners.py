"""The actor's optimisers: given a state and an energy over action sequences, find a low-energy sequence.

GradientPlanner (Mode-2 as the blueprint has it: gradient descent on the actions through the world model,
over a population of candidates) and MPPIPlanner (sampling, for comparison). Both take any EnergyFn, so the
benchmarks can hand them a true-dynamics oracle as well as the learned PlanEnergy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ami.messages import Plan
from ami.schema import ActorConfig
from modules.nn import AdamSteps, Repairs

EnergyFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def energy_and_grad(energy_fn: EnergyFn, state: torch.Tensor,
                    actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """state: (B, D), actions: (H, B, A) -> (energy (B,), d energy / d actions (H, B, A),
    states (H+1, B, D)).

    Uses the energy's own value_and_grad when it has one (PlanEnergy's, compiled or not), autograd
    otherwise (a hand-written energy such as the true-dynamics oracle).
    """
    own = getattr(energy_fn, "value_and_grad", None)
    if own is not None:
        return own(state, actions)
    return autograd_energy_and_grad(energy_fn, state, actions)


def autograd_energy_and_grad(energy_fn: EnergyFn, state: torch.Tensor,
                              actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    actions = actions.detach().requires_grad_(True)
    with torch.enable_grad():
        energy, states = energy_fn(state, actions)
        (grad,) = torch.autograd.grad(energy.sum(), actions)
    return energy.detach(), grad, states.detach()


def _pick_best(candidates: torch.Tensor, energy: torch.Tensor, states: torch.Tensor,
               batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """candidates: (H, B*N, A), energy: (B*N,) finite or +inf (as _Best keeps it), states: (H+1, B*N, D)
    -> best per env."""
    per_env = energy.view(batch, -1)
    best = per_env.argmin(1) + torch.arange(batch, device=energy.device) * per_env.shape[1]
    return candidates[:, best], energy[best], states[:, best]


class _Best:
    """Each candidate's best sequence over the iterations: Adam's normalised steps move every action
    by about lr whatever its gradient, which on a sensitive system (a pole one push from falling)
    can make a good sequence worse. The planner never returns worse than it has already evaluated."""

    def __init__(self, actions: torch.Tensor) -> None:
        self.actions = actions  # (H, M, A)
        self.energy: torch.Tensor | None = None  # (M,)
        self.states: torch.Tensor | None = None  # (H + 1, M, D)
        self.first_energy: torch.Tensor | None = None
        self.nonfinite = torch.zeros((), dtype=torch.long, device=actions.device)  # energies that were not finite
        self.trace: list[torch.Tensor] = []  # after each offer: the mean over environments of their best energy

    def offer(self, actions: torch.Tensor, energy: torch.Tensor, states: torch.Tensor, batch: int) -> None:
        # A non-finite energy (a diverged imagined state) must never win.
        self.nonfinite = self.nonfinite + (~torch.isfinite(energy)).sum()
        energy = torch.nan_to_num(energy, nan=float("inf"), posinf=float("inf"))
        if self.energy is None:
            self.actions, self.energy, self.states, self.first_energy = actions, energy, states, energy
        else:
            better = energy < self.energy
            self.energy = torch.where(better, energy, self.energy)
            self.actions = torch.where(better[None, :, None], actions, self.actions)
            self.states = torch.where(better[None, :, None], states, self.states)
        self.trace.append(self.energy.view(batch, -1).min(1).values.mean())  # stays on the device: no sync


@dataclass(frozen=True)
class Descent:
    """What a descent found, per candidate row M = B * N: actions (H, M, A), energy (M,), states (H + 1, M, D) of
    its best iterate, first_energy (M,) before any step; trace (I + 1,) the mean over environments of the best
    energy after each evaluation; counts of non-finite energies and gradient entries (scalars)."""

    actions: torch.Tensor
    energy: torch.Tensor
    states: torch.Tensor
    first_energy: torch.Tensor
    trace: torch.Tensor
    nonfinite_energies: torch.Tensor
    nonfinite_gradients: torch.Tensor


def descend(value_and_grad: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
            energy_fn: EnergyFn, states_in: torch.Tensor, actions: torch.Tensor, iterations: int, lr: float,
            batch: int) -> Descent:
    """Adam on the actions (H, M, A) from states_in (M, D) for `iterations` steps, projected onto [-1, 1], each
    iterate priced and the best kept; then the last iterate priced by energy_fn. Nothing here reads the host: run
    eagerly, or traced whole into one graph (GradientPlanner with compile_plan)."""
    adam = AdamSteps(actions)
    kept = _Best(actions)
    nonfinite_gradients = torch.zeros((), dtype=torch.long, device=actions.device)
    for _ in range(iterations):
        energy, grad, states = value_and_grad(states_in, actions)
        kept.offer(actions, energy, states, batch)
        nonfinite_gradients = nonfinite_gradients + (~torch.isfinite(grad)).sum()
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        actions = (actions - lr * adam(grad)).clamp(-1.0, 1.0)
    with torch.no_grad():
        energy, states = energy_fn(states_in, actions)
    kept.offer(actions, energy, states, batch)
    return Descent(kept.actions, kept.energy, kept.states, kept.first_energy, torch.stack(kept.trace),
                   kept.nonfinite, nonfinite_gradients)


def _whole_plan(energy: Any, context: Any, states_in: torch.Tensor, actions: torch.Tensor, iterations: int,
                lr: float, batch: int) -> Descent:
    """descend on a PlanEnergy and its bound context, its gradient by torch.func: what compile_plan traces."""
    return descend(lambda s, a: energy.functional_value_and_grad(s, a, context), lambda s, a: energy(s, a, context),
                   states_in, actions, iterations, lr, batch)


class GradientPlanner:
    """Mode-2: N action sequences per environment optimised jointly with Adam through energy_fn.

    Candidate 0 is the warm start (previous plan shifted by one step), candidate 1 the Mode-1
    proposal when given; the rest are the warm start plus Gaussian noise, and a share
    (fresh_fraction) random piecewise-constant actions plus noise, or, with screen_samples, the best of
    that many such sequences by a forward pass. Projection onto [-1, 1]
    after each step keeps actions in bounds without the vanishing gradients of a squashing function.
    """

    def __init__(self, config: ActorConfig, repairs: Repairs | None = None) -> None:
        self.config = config
        self.repairs = repairs or Repairs()
        self._plan_graphs: dict[str, Callable[..., Descent]] = {}  # compile_plan's, by device type

    def _plan_graph(self, device: torch.device) -> Callable[..., Descent]:
        """The whole descent traced into one graph (compile_plan), on a GPU captured as a CUDA graph."""
        if device.type not in self._plan_graphs:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._plan_graphs[device.type] = torch.compile(_whole_plan, fullgraph=True, dynamic=False, mode=mode)
        return self._plan_graphs[device.type]

    def initial_candidates(self, batch: int, horizon: int, action_dim: int, device: torch.device,
                           warm_start: torch.Tensor | None, proposal: torch.Tensor | None,
                           generator: torch.Generator | None) -> torch.Tensor:
        """-> (H, B, N, A)."""
        cfg, n = self.config, self.config.candidates
        base = torch.zeros(horizon, batch, 1, action_dim, device=device) if warm_start is None \
            else warm_start[:, :, None]
        noise = torch.randn(horizon, batch, n, action_dim, generator=generator).to(device)
        candidates = (base + cfg.init_std * noise).clamp(-1.0, 1.0)
        # Fresh candidates hold a random level over the whole horizon: a local optimiser started only
        # near the warm start can stall where every small change looks bad (a pendulum at rest). With
        # fresh_segments > 1 the level changes at random steps: a detour (to a door, then to the goal)
        # that no single straight move and no small change of one can find.
        fresh = int(cfg.fresh_fraction * n)
        if fresh:
            level = self.fresh_levels(fresh, batch, horizon, action_dim, generator).to(device)
            candidates[:, :, n - fresh:] = (level + cfg.init_std * noise[:, :, n - fresh:]).clamp(-1.0, 1.0)
        candidates[:, :, 0] = base[:, :, 0]
        if proposal is not None and n > 1:
            candidates[:, :, 1] = proposal
        return candidates

    def fresh_levels(self, count: int, batch: int, horizon: int, action_dim: int,
                     generator: torch.Generator | None) -> torch.Tensor:
        """count piecewise-constant sequences per env, fresh_segments random levels each, switching at
        random steps -> (H, B, count, A)."""
        segments = self.config.fresh_segments
        levels = torch.rand(segments, batch, count, action_dim, generator=generator) * 2 - 1
        switches = torch.rand(segments - 1, 1, batch, count, generator=generator) * horizon
        steps = torch.arange(horizon, dtype=torch.float32)[None, :, None, None]
        segment = (steps >= switches).sum(0)  # (H, B, count): which level holds at each step
        return levels.gather(0, segment[..., None].expand(-1, -1, -1, action_dim))

    @torch.no_grad()
    def screen(self, candidates: torch.Tensor, state: torch.Tensor, energy_fn: EnergyFn,
               generator: torch.Generator | None) -> torch.Tensor:
        """Replace the fresh candidates with the best of screen_samples fresh sequences per env, priced
        by one forward pass each (a third of a gradient step's cost): a detour through a door is rare
        among random piecewise moves, and a gradient step cannot find it from a poor one.
        candidates: (H, B, N, A), state: (B, D) -> (H, B, N, A)."""
        cfg = self.config
        horizon, batch, n, action_dim = candidates.shape
        fresh = int(cfg.fresh_fraction * n)
        if not fresh or cfg.screen_samples <= fresh:
            return candidates
        pool = self.fresh_levels(cfg.screen_samples, batch, horizon, action_dim, generator).to(state.device)
        energy, _ = energy_fn(state.repeat_interleave(cfg.screen_samples, dim=0), pool.flatten(1, 2))
        self.repairs.count("nonfinite_energies", ~torch.isfinite(energy))
        energy = torch.nan_to_num(energy.view(batch, -1), nan=float("inf"), posinf=float("inf"))
        best = energy.topk(fresh, dim=1, largest=False).indices  # (B, fresh)
        candidates = candidates.clone()
        candidates[:, :, n - fresh:] = pool.gather(2, best[None, :, :, None].expand(horizon, -1, -1, action_dim))
        return candidates

    def plan(self, state: torch.Tensor, energy_fn: EnergyFn, horizon: int, iterations: int,
             action_dim: int, warm_start: torch.Tensor | None = None,
             proposal: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Plan:
        """state: (B, D); warm_start, proposal: (H, B, A) -> Plan."""
        start = time.perf_counter()
        batch, n = state.shape[0], self.config.candidates
        init = self.initial_candidates(batch, horizon, action_dim, state.device, warm_start,
                                       proposal, generator)
        init = self.screen(init, state.detach(), energy_fn, generator)
        actions = init.flatten(1, 2)  # (H, B*N, A)
        states_in = state.detach().repeat_interleave(n, dim=0)  # (B*N, D)
        descent = self._descend(energy_fn, states_in, actions, iterations, batch)
        self.repairs.count("nonfinite_energies", descent.nonfinite_energies)
        self.repairs.count("nonfinite_gradients", descent.nonfinite_gradients)
        first = descent.first_energy.view(batch, n)
        best_actions, best_energy, best_states = _pick_best(descent.actions, descent.energy, descent.states, batch)
        return Plan(best_actions, first.min(1).values, best_energy, best_states,
                    descent.actions.view(horizon, batch, n, action_dim), descent.energy.view(batch, n),
                    first[:, 1] if proposal is not None and n > 1 else None, time.perf_counter() - start, "mode2",
                    descent.trace)

    def _descend(self, energy_fn: EnergyFn, states_in: torch.Tensor, actions: torch.Tensor, iterations: int,
                 batch: int) -> Descent:
        """The whole-plan graph for a learned plan energy when compile_plan is on; else each iteration's energy and
        gradient on their own (compiled or eager as the energy is; autograd for a hand-written energy)."""
        context = getattr(energy_fn, "bound_context", None)
        if self.config.compile_plan and context is not None:
            with torch.no_grad():  # torch.func differentiates the actions alone
                descent = self._plan_graph(actions.device)(energy_fn.energy, context(states_in), states_in, actions,
                                                           iterations, self.config.lr, batch)
            if actions.device.type != "cuda":
                return descent
            # A CUDA graph's outputs live in its own memory, overwritten by its next replay: the plan keeps copies.
            return Descent(*(getattr(descent, field.name).clone() for field in dataclasses.fields(descent)))
        return descend(lambda s, a: energy_and_grad(energy_fn, s, a), energy_fn, states_in, actions, iterations,
                       self.config.lr, batch)


class MPPIPlanner:
    """Sampling-based planner (MPPI): the same interface as GradientPlanner, for comparison."""

    def __init__(self, config: ActorConfig, repairs: Repairs | None = None) -> None:
        self.config = config
        self.repairs = repairs or Repairs()

    @torch.no_grad()
    def plan(self, state: torch.Tensor, energy_fn: EnergyFn, horizon: int, iterations: int,
             action_dim: int, warm_start: torch.Tensor | None = None,
             proposal: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Plan:
        cfg = self.config
        start = time.perf_counter()
        batch, n = state.shape[0], cfg.candidates
        elite = min(cfg.mppi_elite, n)
        mean = torch.zeros(horizon, batch, action_dim, device=state.device) if warm_start is None \
            else warm_start.clone()
        std = torch.full_like(mean, 2 * cfg.init_std)
        states_in = state.repeat_interleave(n, dim=0)
        energy_before = proposal_energy = None
        for _ in range(max(iterations, 1)):
            noise = torch.randn(horizon, batch, n, action_dim, generator=generator).to(state.device)
            samples = (mean[:, :, None] + std[:, :, None] * noise).clamp(-1.0, 1.0)
            samples[:, :, 0] = mean
            if proposal is not None and n > 1:
                samples[:, :, 1] = proposal
            energy, _ = energy_fn(states_in, samples.flatten(1, 2))
            self.repairs.count("nonfinite_energies", ~torch.isfinite(energy))
            energy = torch.nan_to_num(energy.view(batch, n), nan=1e30, posinf=1e30)
            if energy_before is None:
                energy_before = energy.min(1).values
                proposal_energy = energy[:, 1] if proposal is not None and n > 1 else None
            elite_energy, elite_idx = energy.topk(elite, dim=1, largest=False)  # (B, E)
            weights = torch.softmax(-(elite_energy - elite_energy[:, :1]) / cfg.mppi_temperature, 1)
            gather = elite_idx[None, :, :, None].expand(horizon, batch, elite, action_dim)
            elites = samples.gather(2, gather)  # (H, B, E, A)
            w = weights[None, :, :, None]
            mean = (w * elites).sum(2)
            std = ((w * (elites - mean[:, :, None]) ** 2).sum(2)).sqrt().clamp(cfg.mppi_min_std, 2.0)
        final_energy, final_states = energy_fn(state, mean)
        return Plan(mean, energy_before, final_energy, final_states, samples, energy, proposal_energy,
                    time.perf_counter() - start, "mode2")


def shift_plan(previous: torch.Tensor, horizon: int) -> torch.Tensor:
    """The warm start for the next step: previous (H', B, A) advanced one step, its last action
    repeated to fill `horizon` -> (horizon, B, A)."""
    shifted = torch.cat([previous[1:], previous[-1:]], dim=0)
    if shifted.shape[0] < horizon:
        shifted = torch.cat([shifted, shifted[-1:].expand(horizon - shifted.shape[0], -1, -1)])
    return shifted[:horizon]

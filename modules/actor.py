"""Actor: Mode-2 planning by gradient descent on the plan energy, Mode-1 policy, and MPPI.

Every planner takes an energy function, energy_fn(state (B, D), actions (H, B, A)) ->
(energy (B,), states (H + 1, B, D)), so the same planner runs on a learned world model or on a
hand-written one. Actions live in [-1, 1]; the environment wrapper maps them to its bounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ami.config import ActorConfig, GoalConfig
from ami.messages import Percept, Plan, Task
from modules.cost import IntrinsicCost, TrainableCritic, discount_weights, latent_goal_distance
from modules.perception import mlp
from modules.world_model import WorldModel

EnergyFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class PlanEnergy:
    """Energy of action sequences through the world model, the intrinsic cost and the critic.

    E = sum_t gamma^t [IC_analytic(readout(s_t), a_t) + TC_step(s_t, a_t)] + w_v gamma^H TC_value(s_H)
        + (with a goal g) sum_{t=1..H} gamma^t w_g d(s_t, g) + w_f d(s_H, g)
    """

    def __init__(self, world_model: WorldModel, intrinsic_cost: IntrinsicCost,
                 critic: TrainableCritic, discount: float, value_weight: float,
                 first_action_cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 goal: GoalConfig | None = None) -> None:
        """first_action_cost: (observation (B, Q), first actions (B, A)) -> (B,), a known cost of
        the first step added to the energy (the shield's ego-model guardrail cost). goal: the goal
        term's weights and metric, used when a plan is bound to a latent goal."""
        self.goal_config = goal or GoalConfig()
        self.world_model = world_model
        self.intrinsic_cost = intrinsic_cost
        self.critic = critic
        self.discount = discount
        self.value_weight = value_weight
        self.first_action_cost = first_action_cost
        self._forward: Callable = self.__call__
        self._compiled_value_and_grad: Callable | None = None

    def __call__(self, state: torch.Tensor, actions: torch.Tensor, analytic_weights: torch.Tensor,
                 use_step_head: bool, readout_offset: torch.Tensor,
                 observation: torch.Tensor, goal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """state: (B, D), actions: (H, B, A), analytic_weights: (T,), readout_offset: (B, Q) added to
        every readout, observation: (B, Q), goal: (B, D) or None -> (energy (B,), states (H+1, B, D))."""
        horizon = actions.shape[0]
        states = self.world_model.rollout(state, actions)  # (H + 1, B, D)
        quantities = self.world_model.readout(states[:-1]) + readout_offset
        terms = self.intrinsic_cost.analytic_terms(quantities, actions)
        step_cost = (terms * analytic_weights).sum(-1)  # (H, B)
        if use_step_head:
            step_cost = step_cost + self.critic.step_cost(states[:-1], actions)
        gammas = discount_weights(horizon + 1, self.discount, state.device)
        energy = (gammas[:-1, None] * step_cost).sum(0)
        if self.value_weight:
            energy = energy + self.value_weight * gammas[-1] * self.critic.value(states[-1])
        if self.first_action_cost is not None:
            energy = energy + self.first_action_cost(observation, actions[0])
        if goal is not None:
            distance = latent_goal_distance(states[1:], goal, self.goal_config.metric)  # (H, B)
            energy = energy + self.goal_config.weight * (gammas[1:, None] * distance).sum(0) \
                + self.goal_config.final_weight * distance[-1]
        return energy, states

    def _summed(self, actions: torch.Tensor, state: torch.Tensor, analytic_weights: torch.Tensor,
                use_step_head: bool, readout_offset: torch.Tensor, observation: torch.Tensor,
                goal: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        energy, states = self(state, actions, analytic_weights, use_step_head, readout_offset, observation, goal)
        return energy.sum(), (energy, states)

    def value_and_grad(self, state: torch.Tensor, actions: torch.Tensor, analytic_weights: torch.Tensor,
                       use_step_head: bool, readout_offset: torch.Tensor, observation: torch.Tensor,
                       goal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (energy (B,), d energy / d actions (H, B, A), states (H+1, B, D)); no gradient reaches
        the parameters."""
        if self._compiled_value_and_grad is None:  # eager autograd beats the eager torch.func transform
            return _autograd_energy_and_grad(
                lambda s, a: self(s, a, analytic_weights, use_step_head, readout_offset, observation, goal),
                state.detach(), actions)
        with torch.no_grad():  # the transform differentiates the actions alone
            grad, (_, (energy, states)) = self._compiled_value_and_grad(
                actions.detach(), state.detach(), analytic_weights, use_step_head, readout_offset, observation,
                goal)
        return energy, grad, states

    def compile(self) -> None:
        """torch.compile the energy and its action gradient, each into one fused graph per shape.

        Planning is a long chain of small ops (horizon x layers, forward and backward), so on a CPU
        its cost is mostly per-op overhead; fusing removes most of it. The first call per batch size
        and horizon compiles (about a minute on a 2-core CPU; Inductor caches it on disk after).
        """
        self._forward = torch.compile(self.__call__, dynamic=False)
        self._compiled_value_and_grad = torch.compile(
            torch.func.grad_and_value(self._summed, has_aux=True), dynamic=False, fullgraph=True)

    @property
    def compiled(self) -> bool:
        return self._compiled_value_and_grad is not None

    def bind(self, weights: torch.Tensor, readout_offset: torch.Tensor | None = None,
             observation: torch.Tensor | None = None, goal: torch.Tensor | None = None) -> BoundEnergy:
        """The energy for one task's weights: (T,), and one batch's readout offset and observation:
        (B, Q) each (WorldModel.readout_offset; zeros when None), and latent goal: (B, D) or None."""
        analytic = weights * self.intrinsic_cost.mask("analytic", weights.device)
        use_step_head = bool((weights * self.intrinsic_cost.mask("measured", weights.device)).abs().sum() > 0)
        if self.first_action_cost is not None and observation is None:
            raise ValueError("this plan energy prices the first action on the observation; bind it with one")
        return BoundEnergy(self, analytic, use_step_head, readout_offset, observation, goal)


class BoundEnergy:
    """An EnergyFn with its weights, readout offset and goal fixed, and a fast action gradient."""

    def __init__(self, energy: PlanEnergy, analytic_weights: torch.Tensor, use_step_head: bool,
                 readout_offset: torch.Tensor | None = None, observation: torch.Tensor | None = None,
                 goal: torch.Tensor | None = None) -> None:
        self.energy = energy
        self.analytic_weights = analytic_weights
        self.use_step_head = use_step_head
        self.readout_offset = readout_offset
        self.observation = observation
        self.goal = goal

    def _rows(self, per_env: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
        """(B', Q) for a state batch of B' rows: planners repeat each environment's state once per
        candidate, so B' is a multiple of the bound tensor's B."""
        if per_env is None:
            return state.new_zeros(state.shape[0], len(self.energy.world_model.observation_names))
        return per_env.repeat_interleave(state.shape[0] // per_env.shape[0], dim=0)

    def _context(self, state: torch.Tensor) -> tuple:
        goal = None if self.goal is None else self.goal.repeat_interleave(state.shape[0] // self.goal.shape[0], 0)
        return (self.analytic_weights, self.use_step_head, self._rows(self.readout_offset, state),
                self._rows(self.observation, state), goal)

    def __call__(self, state: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.energy._forward(state, actions, *self._context(state))

    def value_and_grad(self, state: torch.Tensor,
                       actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.energy.value_and_grad(state, actions, *self._context(state))


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
    return _autograd_energy_and_grad(energy_fn, state, actions)


def _autograd_energy_and_grad(energy_fn: EnergyFn, state: torch.Tensor,
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

    def offer(self, actions: torch.Tensor, energy: torch.Tensor, states: torch.Tensor) -> None:
        # A non-finite energy (a diverged imagined state) must never win.
        energy = torch.nan_to_num(energy, nan=float("inf"), posinf=float("inf"))
        if self.energy is None:
            self.actions, self.energy, self.states, self.first_energy = actions, energy, states, energy
            return
        better = energy < self.energy
        self.energy = torch.where(better, energy, self.energy)
        self.actions = torch.where(better[None, :, None], actions, self.actions)
        self.states = torch.where(better[None, :, None], states, self.states)


class GradientPlanner:
    """Mode-2: N action sequences per environment optimised jointly with Adam through energy_fn.

    Candidate 0 is the warm start (previous plan shifted by one step), candidate 1 the Mode-1
    proposal when given; the rest are the warm start plus Gaussian noise, and a share
    (fresh_fraction) random constant actions plus noise. Projection onto [-1, 1]
    after each step keeps actions in bounds without the vanishing gradients of a squashing function.
    """

    def __init__(self, config: ActorConfig) -> None:
        self.config = config

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
            levels = torch.rand(cfg.fresh_segments, batch, fresh, action_dim, generator=generator) * 2 - 1
            switches = torch.rand(cfg.fresh_segments - 1, 1, batch, fresh, generator=generator) * horizon
            steps = torch.arange(horizon, dtype=torch.float32)[None, :, None, None]
            segment = (steps >= switches).sum(0)  # (H, B, fresh): which level holds at each step
            level = levels.gather(0, segment[..., None].expand(-1, -1, -1, action_dim)).to(device)
            candidates[:, :, n - fresh:] = (level + cfg.init_std * noise[:, :, n - fresh:]).clamp(-1.0, 1.0)
        candidates[:, :, 0] = base[:, :, 0]
        if proposal is not None and n > 1:
            candidates[:, :, 1] = proposal
        return candidates

    def plan(self, state: torch.Tensor, energy_fn: EnergyFn, horizon: int, iterations: int,
             action_dim: int, warm_start: torch.Tensor | None = None,
             proposal: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Plan:
        """state: (B, D); warm_start, proposal: (H, B, A) -> Plan."""
        start = time.perf_counter()
        batch, n = state.shape[0], self.config.candidates
        init = self.initial_candidates(batch, horizon, action_dim, state.device, warm_start,
                                       proposal, generator)
        actions = init.flatten(1, 2)  # (H, B*N, A)
        states_in = state.detach().repeat_interleave(n, dim=0)  # (B*N, D)
        # Adam written out: torch.optim.Adam's per-step bookkeeping costs more than this whole update
        # on a tensor this small, and planning runs every env step.
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        first, second = torch.zeros_like(actions), torch.zeros_like(actions)
        kept = _Best(actions)
        for k in range(1, iterations + 1):
            energy, grad, states = energy_and_grad(energy_fn, states_in, actions)
            kept.offer(actions, energy, states)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            first = beta1 * first + (1 - beta1) * grad
            second = beta2 * second + (1 - beta2) * grad.square()
            step = (first / (1 - beta1**k)) / ((second / (1 - beta2**k)).sqrt() + eps)
            actions = (actions - self.config.lr * step).clamp(-1.0, 1.0)
        with torch.no_grad():
            energy, states = energy_fn(states_in, actions)
        kept.offer(actions, energy, states)
        energy_before = kept.first_energy.view(batch, n).min(1).values
        best_actions, best_energy, best_states = _pick_best(kept.actions, kept.energy, kept.states, batch)
        return Plan(best_actions, energy_before, best_energy, best_states,
                    kept.actions.view(horizon, batch, n, action_dim), kept.energy.view(batch, n),
                    time.perf_counter() - start, "mode2")


class MPPIPlanner:
    """Sampling-based planner (MPPI): the same interface as GradientPlanner, for comparison."""

    def __init__(self, config: ActorConfig) -> None:
        self.config = config

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
        energy_before = None
        for _ in range(max(iterations, 1)):
            noise = torch.randn(horizon, batch, n, action_dim, generator=generator).to(state.device)
            samples = (mean[:, :, None] + std[:, :, None] * noise).clamp(-1.0, 1.0)
            samples[:, :, 0] = mean
            if proposal is not None and n > 1:
                samples[:, :, 1] = proposal
            energy, _ = energy_fn(states_in, samples.flatten(1, 2))
            energy = torch.nan_to_num(energy.view(batch, n), nan=1e30, posinf=1e30)
            if energy_before is None:
                energy_before = energy.min(1).values
            elite_energy, elite_idx = energy.topk(elite, dim=1, largest=False)  # (B, E)
            weights = torch.softmax(-(elite_energy - elite_energy[:, :1]) / cfg.mppi_temperature, 1)
            gather = elite_idx[None, :, :, None].expand(horizon, batch, elite, action_dim)
            elites = samples.gather(2, gather)  # (H, B, E, A)
            w = weights[None, :, :, None]
            mean = (w * elites).sum(2)
            std = ((w * (elites - mean[:, :, None]) ** 2).sum(2)).sqrt().clamp(cfg.mppi_min_std, 2.0)
        final_energy, final_states = energy_fn(state, mean)
        return Plan(mean, energy_before, final_energy, final_states, samples, energy,
                    time.perf_counter() - start, "mode2")


def shift_plan(previous: torch.Tensor, horizon: int) -> torch.Tensor:
    """The warm start for the next step: previous (H', B, A) advanced one step, its last action
    repeated to fill `horizon` -> (horizon, B, A)."""
    shifted = torch.cat([previous[1:], previous[-1:]], dim=0)
    if shifted.shape[0] < horizon:
        shifted = torch.cat([shifted, shifted[-1:].expand(horizon - shifted.shape[0], -1, -1)])
    return shifted[:horizon]


class Policy(nn.Module):
    """Mode-1: a reactive policy, state (B, D) -> action (B, A) in [-1, 1], imitating Mode-2 plans."""

    def __init__(self, latent_dim: int, action_dim: int, config: ActorConfig) -> None:
        super().__init__()
        self.net = mlp(latent_dim, config.policy_hidden_dim, action_dim)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(state))

    @torch.no_grad()
    def propose(self, state: torch.Tensor, world_model: WorldModel, horizon: int) -> torch.Tensor:
        """Roll the policy through the world model: state (B, D) -> actions (H, B, A)."""
        actions = []
        for _ in range(horizon):
            actions.append(self(state))
            state = world_model.step(state, actions[-1])
        return torch.stack(actions)


class Actor:
    """Chooses actions for a batch of environments, keeping each one's previous plan as warm start."""

    def __init__(self, policy: Policy, energy: PlanEnergy, action_dim: int, config: ActorConfig) -> None:
        self.config = config
        self.policy = policy
        self.energy = energy
        self.action_dim = action_dim
        self.planner = GradientPlanner(config) if config.planner == "gradient" else MPPIPlanner(config)
        self.previous: torch.Tensor | None = None  # (H, B, A)
        self.held: Plan | None = None  # the plan being followed between planning calls (replan_every > 1)
        self.held_age = 0

    def reset(self, done: torch.Tensor | None = None) -> None:
        """Forget warm starts: all of them, or where done: (B,) is True."""
        self.held = None  # any environment starting afresh replans at once
        if done is None or self.previous is None:
            self.previous = None
        else:
            self.previous[:, done.to(self.previous.device)] = 0.0

    def _follow(self, batch: int) -> Plan | None:
        """The held plan advanced by one step, while replan_every allows and actions remain."""
        plan = self.held
        if plan is None or self.held_age + 1 >= self.config.replan_every or plan.actions.shape[0] < 2 \
                or plan.actions.shape[1] != batch:
            return None
        self.held_age += 1
        plan = Plan(plan.actions[1:], plan.energy_before, plan.energy_after, plan.states[1:],
                    plan.candidates[1:], plan.candidate_energy, 0.0, plan.mode)
        self.held, self.previous = plan, plan.actions
        return plan

    def warm_start(self, batch: int, horizon: int) -> torch.Tensor | None:
        prev = self.previous
        if prev is None or prev.shape[1] != batch:
            return None
        return shift_plan(prev, horizon)

    def act(self, percept: Percept, task: Task, weights: torch.Tensor,
            generator: torch.Generator | None = None) -> Plan:
        """percept.state: (B, D) -> Plan with actions (H, B, A)."""
        state = percept.state.detach()
        if task.mode == "mode2" and (followed := self._follow(state.shape[0])) is not None:
            return followed
        energy_fn = self.energy.bind(weights, self.energy.world_model.readout_offset(percept), percept.observation,
                                     task.goal)
        proposal = self.policy.propose(state, self.energy.world_model, task.horizon)
        if task.mode == "mode1":
            start = time.perf_counter()
            with torch.no_grad():
                energy, states = energy_fn(state, proposal)
            plan = Plan(proposal, energy, energy, states, proposal[:, :, None], energy[:, None],
                        time.perf_counter() - start, "mode1")
        else:
            plan = self.planner.plan(state, energy_fn, task.horizon, task.iterations, self.action_dim,
                                     self.warm_start(state.shape[0], task.horizon), proposal, generator)
        if torch.isfinite(plan.actions).all():
            self.previous = plan.actions
        else:  # never warm-start from a broken plan; the agent sends a safe action instead
            self.previous = None
        self.held, self.held_age = (plan, 0) if self.previous is not None and task.mode == "mode2" else (None, 0)
        return plan

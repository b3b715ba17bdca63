"""Actor: the plan energy, the Mode-1 policy, and the actor that plans with an injected planner.

Every planner takes an energy function, energy_fn(state (B, D), actions (H, B, A)) ->
(energy (B,), states (H + 1, B, D)), so the same planner runs on a learned world model or on a
hand-written one. Actions live in [-1, 1]; the environment wrapper maps them to its bounds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ami.messages import Percept, Plan, Task
from ami.schema import ActorConfig, GoalConfig
from modules.cost import IntrinsicCost, boredom, latent_goal_distance
from modules.critic import GoalCritic, TrainableCritic, discount_weights, expected_discounted_cost
from modules.nn import Repairs, mlp
from modules.planners import autograd_energy_and_grad, shift_plan
from modules.world_model import WorldModel


@dataclass(frozen=True)
class PlanContext:
    """Everything one plan's energy reads besides its start state and actions, bound once per plan.

    analytic_weights: (T,) the task's weights on the analytic terms (0 on measured ones); use_step_head: the
    task weighs a measured term, which the critic's step head prices on imagined states. Per environment,
    B rows: readout_offset, observation: (B, Q); goal: (B, D); visited: (B, V, D) the episode's trail;
    boredom_scale: (B,) the configurator's factor on the boredom weight. explore: a training step's plan, whose last
    state the critic prices with its optimism. A new energy term adds its field here and reads it in
    PlanEnergy.__call__; nothing between them changes.
    """

    analytic_weights: torch.Tensor
    use_step_head: bool
    readout_offset: torch.Tensor | None  # None only when bound without any per-environment tensor: zeros
    observation: torch.Tensor | None
    goal: torch.Tensor | None = None
    visited: torch.Tensor | None = None
    boredom_scale: torch.Tensor | None = None
    explore: bool = False

    PER_ENV = ("readout_offset", "observation", "goal", "visited", "boredom_scale")

    def repeat(self, rows: int) -> PlanContext:
        """Each environment's rows repeated for its candidates: planners lay out B * N rows, env by env."""
        def repeated(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.repeat_interleave(rows // value.shape[0], dim=0)
        return dataclasses.replace(self, **{name: repeated(getattr(self, name)) for name in self.PER_ENV})


class PlanEnergy:
    """Energy of action sequences through the world model, the intrinsic cost and the critic.

    E = sum_{t<H} gamma^t [IC_analytic(readout(s_t), a_t) + TC_step(s_t, a_t)]
        + gamma^H [(1 - w_v) IC_analytic(readout(s_H), 0) + w_v TC_value(s_H)]
        (with a continuation head, these in expectation over where the episode ends: modules.critic's
        expected_discounted_cost)
        + (with an ego model) the shield's guardrail cost of the first action
        + (with a goal g) sum_{t=1..H} gamma^t w_g d(s_t, g) + w_f d(s_H, g) + w_c steps(s_H, g)
        + (with the episode's trail V) w_b k sum_{t=1..H} boredom(s_t, V)

    The last imagined state is priced by the critic's value as far as value_weight w_v trusts it, by the
    analytic terms (at rest) for the rest: with w_v = 0 a plan that ends past a guardrail or far from the
    goal still pays for it. d is a latent distance or the goal critic's steps (GoalConfig.metric); w_c the
    critic_final_weight; w_b the boredom_weight (modules.cost.boredom), k the configurator's boredom scale.
    """

    def __init__(self, world_model: WorldModel, intrinsic_cost: IntrinsicCost,
                 critic: TrainableCritic, discount: float, value_weight: float,
                 first_action_cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 goal: GoalConfig | None = None, goal_critic: GoalCritic | None = None,
                 boredom_weight: float = 0.0, boredom_radius: float = 0.5) -> None:
        """first_action_cost: (observation (B, Q), first actions (B, A)) -> (B,), a known cost of
        the first step added to the energy (the shield's ego-model guardrail cost). goal: the goal
        term's weights and metric, used when a plan is bound to a latent goal; goal_critic: the
        trained GoalCritic that metric "critic" and critic_final_weight use. boredom_weight and
        boredom_radius: the boredom term, used when a plan is bound to a trail of visited latents."""
        if not 0.0 <= value_weight <= 1.0:
            raise ValueError(f"value_weight={value_weight!r}: expected a number in [0, 1]")
        self.goal_config = goal or GoalConfig()
        self.goal_critic = goal_critic
        self.world_model = world_model
        self.intrinsic_cost = intrinsic_cost
        self.critic = critic
        self.discount = discount
        self.value_weight = value_weight
        self.first_action_cost = first_action_cost
        self.boredom_weight = boredom_weight
        self.boredom_radius = boredom_radius
        self._forward: Callable = self.__call__
        self._compiled_value_and_grad: Callable | None = None

    def __call__(self, state: torch.Tensor, actions: torch.Tensor, context: PlanContext
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """state: (B, D), actions: (H, B, A), context with B rows -> (energy (B,), states (H+1, B, D))."""
        horizon = actions.shape[0]
        states = self.world_model.rollout(state, actions)  # (H + 1, B, D)
        quantities = self.world_model.readout(states) + context.readout_offset
        weights = context.analytic_weights
        step_cost = self._step_costs(states, quantities, actions, context)  # (H, B)
        gammas = discount_weights(horizon + 1, self.discount, state.device)
        tail = torch.zeros_like(step_cost[0])
        if self.value_weight < 1:
            at_rest = actions.new_zeros(actions.shape[1:])
            terminal = (self.intrinsic_cost.analytic_terms(quantities[-1], at_rest) * weights).sum(-1)
            tail = tail + (1 - self.value_weight) * terminal
        if self.value_weight:
            tail = tail + self.value_weight * self.critic.value(states[-1], explore=context.explore)
        if self.critic.continuation_head is None:
            energy = (gammas[:-1, None] * step_cost).sum(0) + gammas[-1] * tail
        else:
            energy = expected_discounted_cost(step_cost, self.critic.continuation(states[1:]), tail, self.discount,
                                              self.critic.terminal_value)
        if self.first_action_cost is not None:
            energy = energy + self.first_action_cost(context.observation, actions[0])
        if context.goal is not None:
            distance = self.goal_distance(states[1:], context.goal)  # (H, B)
            energy = energy + self.goal_config.weight * (gammas[1:, None] * distance).sum(0) \
                + self.goal_config.final_weight * distance[-1]
            if self.goal_config.critic_final_weight:
                # With metric "critic" the last distance already is the critic's steps from s_H.
                steps = distance[-1] if self.goal_config.metric == "critic" \
                    else self.goal_critic.steps(states[-1], context.goal)
                energy = energy + self.goal_config.critic_final_weight * steps
        if context.visited is not None and self.boredom_weight:
            bored = boredom(states[1:], context.visited, self.boredom_radius).sum(0)
            if context.boredom_scale is not None:
                bored = context.boredom_scale * bored
            energy = energy + self.boredom_weight * bored
        return energy, states

    def _step_costs(self, states: torch.Tensor, quantities: torch.Tensor, actions: torch.Tensor,
                    context: PlanContext) -> torch.Tensor:
        cost = (self.intrinsic_cost.analytic_terms(quantities[:-1], actions) * context.analytic_weights).sum(-1)
        if context.use_step_head:
            cost = cost + self.critic.step_cost(states[:-1], actions)
        return cost

    def step_costs(self, states: torch.Tensor, actions: torch.Tensor, context: PlanContext) -> torch.Tensor:
        """The intrinsic cost of each imagined step as a plan prices it, the analytic terms on the readout and the
        step head's measured terms: states (H + 1, B, D), actions (H, B, A) -> (H, B)."""
        quantities = self.world_model.readout(states) + context.readout_offset
        return self._step_costs(states, quantities, actions, context)

    def goal_distance(self, states: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """states: (..., B, D), goal: (B, D) -> (..., B) by the goal term's metric."""
        if self.goal_config.metric == "critic":
            return self.goal_critic.steps(states, goal)
        return latent_goal_distance(states, goal, self.goal_config.metric)

    def _summed(self, actions: torch.Tensor, state: torch.Tensor, context: PlanContext
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        energy, states = self(state, actions, context)
        return energy.sum(), (energy, states)

    def value_and_grad(self, state: torch.Tensor, actions: torch.Tensor, context: PlanContext
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (energy (B,), d energy / d actions (H, B, A), states (H+1, B, D)); no gradient reaches
        the parameters."""
        if self._compiled_value_and_grad is None:  # eager autograd beats the eager torch.func transform
            return autograd_energy_and_grad(lambda s, a: self(s, a, context), state.detach(), actions)
        with torch.no_grad():  # the transform differentiates the actions alone
            return self._compiled_value_and_grad(state.detach(), actions.detach(), context)

    def functional_value_and_grad(self, state: torch.Tensor, actions: torch.Tensor, context: PlanContext
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """value_and_grad by torch.func: what compile() compiles, and what a graph traced around the whole plan
        differentiates (modules.planners.descend under compile_plan)."""
        grad, (_, (energy, states)) = torch.func.grad_and_value(self._summed, has_aux=True)(actions, state, context)
        return energy, grad, states

    def compile(self) -> None:
        """torch.compile the energy and its action gradient, each into one fused graph per shape.

        Planning is a long chain of small ops (horizon x layers, forward and backward), so on a CPU
        its cost is mostly per-op overhead; fusing removes most of it. The first call per batch size
        and horizon compiles (about a minute on a 2-core CPU; Inductor caches it on disk after).
        """
        self._forward = torch.compile(self.__call__, dynamic=False)
        self._compiled_value_and_grad = torch.compile(self.functional_value_and_grad, dynamic=False, fullgraph=True)

    @property
    def compiled(self) -> bool:
        return self._compiled_value_and_grad is not None

    def bind(self, weights: torch.Tensor, readout_offset: torch.Tensor | None = None,
             observation: torch.Tensor | None = None, goal: torch.Tensor | None = None,
             visited: torch.Tensor | None = None, boredom_scale: torch.Tensor | None = None,
             explore: bool = False) -> BoundEnergy:
        """The energy of one plan: the task's weights (T,), and per environment (B rows) the readout offset and
        observation (B, Q) each (zeros when None), the latent goal (B, D), the episode's trail of visited
        latents (B, V, D) (memory.EpisodeTrail) and the configurator's factor on the boredom weight (B,).
        explore: a training step's plan (the critic's value_optimism applies)."""
        analytic = weights * self.intrinsic_cost.mask("analytic", weights.device)
        use_step_head = bool((weights * self.intrinsic_cost.mask("measured", weights.device)).abs().sum() > 0)
        if self.first_action_cost is not None and observation is None:
            raise ValueError("this plan energy prices the first action on the observation; bind it with one")
        uses_critic = self.goal_config.metric == "critic" or self.goal_config.critic_final_weight != 0
        if goal is not None and uses_critic and (self.goal_critic is None or not bool(self.goal_critic.trained)):
            raise ValueError("agent.cost.goal.metric='critic' and critic_final_weight need a trained goal critic: "
                             "train one with reward_free.critic_updates > 0, or use metric l2 with "
                             "critic_final_weight 0")
        rows = next((t.shape[0] for t in (readout_offset, observation, goal, visited, boredom_scale) if t is not None),
                    None)
        zeros = None if rows is None else weights.new_zeros(rows, len(self.world_model.observation_names))
        context = PlanContext(analytic, use_step_head, zeros if readout_offset is None else readout_offset,
                              zeros if observation is None else observation, goal, visited, boredom_scale, explore)
        return BoundEnergy(self, context)


class BoundEnergy:
    """An EnergyFn with its plan's context fixed, and a fast action gradient."""

    def __init__(self, energy: PlanEnergy, context: PlanContext) -> None:
        self.energy = energy
        self.context = context
        self._repeated: dict[int, PlanContext] = {}

    def bound_context(self, state: torch.Tensor) -> PlanContext:
        """The context for a batch of state rows, made once per row count (a plan calls the energy with the same
        few row counts every iteration)."""
        rows = state.shape[0]
        if rows not in self._repeated:
            context = self.context
            if context.readout_offset is None:  # bound without any per-environment tensor: zeros for every row
                zeros = state.new_zeros(rows, len(self.energy.world_model.observation_names))
                context = dataclasses.replace(context, readout_offset=zeros, observation=zeros)
            self._repeated[rows] = context.repeat(rows)
        return self._repeated[rows]

    def __call__(self, state: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.energy._forward(state, actions, self.bound_context(state))

    def value_and_grad(self, state: torch.Tensor,
                       actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.energy.value_and_grad(state, actions, self.bound_context(state))


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


@dataclass
class ActorEpisodes:
    """What the actor carries from one step of its environments' episodes to the next.

    previous: (H, B, A) each environment's last plan (the next warm start); held: the plan being followed
    between planning calls (replan_every > 1), held_age steps old; random_actions: (B, A) the random
    proposals being held (random_hold > 1)."""

    previous: torch.Tensor | None = None
    held: Plan | None = None
    held_age: int = 0
    random_actions: torch.Tensor | None = None


class Actor:
    """Chooses actions for a batch of environments, keeping each one's previous plan as warm start.

    planner: anything with GradientPlanner's plan(); build_planner makes the configured one."""

    def __init__(self, policy: Policy, energy: PlanEnergy, planner: object, action_dim: int, config: ActorConfig,
                 repairs: Repairs | None = None) -> None:
        self.config = config
        self.policy = policy
        self.energy = energy
        self.planner = planner
        self.action_dim = action_dim
        self.repairs = repairs or Repairs()
        self.episodes = ActorEpisodes()

    def reset(self, done: torch.Tensor | None = None) -> None:
        """Forget warm starts: all of them, or where done: (B,) is True."""
        episodes = self.episodes
        if done is not None and not bool(done.any()):
            return
        episodes.held = None  # any environment starting afresh replans at once
        if done is None or episodes.previous is None:
            episodes.previous = None
        else:
            episodes.previous[:, done.to(episodes.previous.device)] = 0.0

    def _follow(self, batch: int) -> Plan | None:
        """The held plan advanced by one step, while replan_every allows and actions remain."""
        episodes = self.episodes
        plan = episodes.held
        if plan is None or episodes.held_age + 1 >= self.config.replan_every or plan.actions.shape[0] < 2 \
                or plan.actions.shape[1] != batch:
            return None
        episodes.held_age += 1
        plan = dataclasses.replace(plan, actions=plan.actions[1:], states=plan.states[1:],
                                   candidates=plan.candidates[1:], plan_time_s=0.0)
        episodes.held, episodes.previous = plan, plan.actions
        return plan

    def warm_start(self, batch: int, horizon: int) -> torch.Tensor | None:
        prev = self.episodes.previous
        if prev is None or prev.shape[1] != batch:
            return None
        return shift_plan(prev, horizon)

    def random_plan(self, state: torch.Tensor, generator: torch.Generator | None) -> Plan:
        """Uniform random proposals, each held for a geometric number of steps (mean random_hold): (1, B, A)."""
        batch, device = state.shape[0], state.device
        held = self.episodes.random_actions
        fresh = torch.rand(batch, self.action_dim, generator=generator).to(device) * 2 - 1
        if held is None or held.shape[0] != batch:
            held = fresh
        else:
            change = torch.rand(batch, generator=generator).to(device) < 1.0 / self.config.random_hold
            held = torch.where(change[:, None], fresh, held)
        self.episodes.random_actions = held
        zeros = state.new_zeros(batch)
        return Plan(held[None], zeros, zeros, state[None], held[None, :, None], zeros[:, None], None, 0.0, "random")

    def act(self, percept: Percept, task: Task, generator: torch.Generator | None = None) -> Plan:
        """percept.state: (B, D) -> Plan with actions (H, B, A)."""
        state = percept.state.detach()
        if task.mode == "random":
            return self.random_plan(state, generator)
        if task.mode == "mode2" and (followed := self._follow(state.shape[0])) is not None:
            return followed
        energy_fn = self.energy.bind(task.weight_vector, percept.readout_offset, percept.observation, task.goal,
                                     task.visited, task.boredom_scale, task.explore)
        proposal = self.policy.propose(state, self.energy.world_model, task.horizon)
        if task.mode == "mode1":
            start = time.perf_counter()
            with torch.no_grad():
                energy, states = energy_fn(state, proposal)
            plan = Plan(proposal, energy, energy, states, proposal[:, :, None], energy[:, None], energy,
                        time.perf_counter() - start, "mode1")
        else:
            plan = self.planner.plan(state, energy_fn, task.horizon, task.iterations, self.action_dim,
                                     self.warm_start(state.shape[0], task.horizon), proposal, generator)
        finite = torch.isfinite(plan.actions).flatten(2).all(2).all(0)  # (B,)
        self.repairs.count("dropped_plans", ~finite)
        # Never warm-start from a broken plan (the agent sends a safe action instead).
        self.episodes.previous = torch.where(finite[None, :, None], plan.actions, 0.0)
        follow = task.mode == "mode2" and bool(finite.all())
        self.episodes.held, self.episodes.held_age = (plan, 0) if follow else (None, 0)
        return plan


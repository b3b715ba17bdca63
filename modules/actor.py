"""Actor: the plan energy, the Mode-1 policy, and the actor that plans with modules.planners.

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
from modules.cost import GoalCritic, IntrinsicCost, TrainableCritic, boredom, discount_weights, latent_goal_distance
from modules.perception import mlp
from modules.planners import GradientPlanner, MPPIPlanner, autograd_energy_and_grad, shift_plan
from modules.world_model import WorldModel


class PlanEnergy:
    """Energy of action sequences through the world model, the intrinsic cost and the critic.

    E = sum_t gamma^t [IC_analytic(readout(s_t), a_t) + TC_step(s_t, a_t)] + w_v gamma^H TC_value(s_H)
        + (with a goal g) sum_{t=1..H} gamma^t w_g d(s_t, g) + w_f d(s_H, g) + w_c steps(s_H, g)
        + (with the episode's trail V) w_b k sum_{t=1..H} boredom(s_t, V)

    d is a latent distance or the goal critic's steps (GoalConfig.metric); w_c the critic_final_weight;
    w_b the boredom_weight (modules.cost.boredom), k the configurator's boredom scale (1 when it gives none).
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

    def __call__(self, state: torch.Tensor, actions: torch.Tensor, analytic_weights: torch.Tensor,
                 use_step_head: bool, readout_offset: torch.Tensor,
                 observation: torch.Tensor, goal: torch.Tensor | None = None,
                 visited: torch.Tensor | None = None, boredom_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """state: (B, D), actions: (H, B, A), analytic_weights: (T,), readout_offset: (B, Q) added to
        every readout, observation: (B, Q), goal: (B, D) or None, visited: (B, V, D) or None,
        boredom_scale: (B,) or None -> (energy (B,), states (H+1, B, D))."""
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
            distance = self.goal_distance(states[1:], goal)  # (H, B)
            energy = energy + self.goal_config.weight * (gammas[1:, None] * distance).sum(0) \
                + self.goal_config.final_weight * distance[-1]
            if self.goal_config.critic_final_weight:
                # With metric "critic" the last distance already is the critic's steps from s_H.
                steps = distance[-1] if self.goal_config.metric == "critic" \
                    else self.goal_critic.steps(states[-1], goal)
                energy = energy + self.goal_config.critic_final_weight * steps
        if visited is not None and self.boredom_weight:
            bored = boredom(states[1:], visited, self.boredom_radius).sum(0)
            if boredom_scale is not None:
                bored = boredom_scale * bored
            energy = energy + self.boredom_weight * bored
        return energy, states

    def goal_distance(self, states: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """states: (..., B, D), goal: (B, D) -> (..., B) by the goal term's metric."""
        if self.goal_config.metric == "critic":
            return self.goal_critic.steps(states, goal)
        return latent_goal_distance(states, goal, self.goal_config.metric)

    def _summed(self, actions: torch.Tensor, state: torch.Tensor, analytic_weights: torch.Tensor,
                use_step_head: bool, readout_offset: torch.Tensor, observation: torch.Tensor,
                goal: torch.Tensor | None, visited: torch.Tensor | None, boredom_scale: torch.Tensor | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        energy, states = self(state, actions, analytic_weights, use_step_head, readout_offset, observation, goal,
                              visited, boredom_scale)
        return energy.sum(), (energy, states)

    def value_and_grad(self, state: torch.Tensor, actions: torch.Tensor, analytic_weights: torch.Tensor,
                       use_step_head: bool, readout_offset: torch.Tensor, observation: torch.Tensor,
                       goal: torch.Tensor | None = None, visited: torch.Tensor | None = None,
                       boredom_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (energy (B,), d energy / d actions (H, B, A), states (H+1, B, D)); no gradient reaches
        the parameters."""
        if self._compiled_value_and_grad is None:  # eager autograd beats the eager torch.func transform
            return autograd_energy_and_grad(
                lambda s, a: self(s, a, analytic_weights, use_step_head, readout_offset, observation, goal, visited,
                                  boredom_scale),
                state.detach(), actions)
        with torch.no_grad():  # the transform differentiates the actions alone
            grad, (_, (energy, states)) = self._compiled_value_and_grad(
                actions.detach(), state.detach(), analytic_weights, use_step_head, readout_offset, observation,
                goal, visited, boredom_scale)
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
             observation: torch.Tensor | None = None, goal: torch.Tensor | None = None,
             visited: torch.Tensor | None = None, boredom_scale: torch.Tensor | None = None) -> BoundEnergy:
        """The energy for one task's weights: (T,), and one batch's readout offset and observation:
        (B, Q) each (WorldModel.readout_offset; zeros when None), latent goal: (B, D) or None, the
        episode's trail of visited latents: (B, V, D) or None (memory.EpisodeTrail), and the configurator's
        factor on the boredom weight: (B,) or None (1)."""
        analytic = weights * self.intrinsic_cost.mask("analytic", weights.device)
        use_step_head = bool((weights * self.intrinsic_cost.mask("measured", weights.device)).abs().sum() > 0)
        if self.first_action_cost is not None and observation is None:
            raise ValueError("this plan energy prices the first action on the observation; bind it with one")
        uses_critic = self.goal_config.metric == "critic" or self.goal_config.critic_final_weight != 0
        if goal is not None and uses_critic and (self.goal_critic is None or not bool(self.goal_critic.trained)):
            raise ValueError("agent.cost.goal.metric='critic' and critic_final_weight need a trained goal critic: "
                             "train one with reward_free.critic_updates > 0, or use metric l2 with "
                             "critic_final_weight 0")
        return BoundEnergy(self, analytic, use_step_head, readout_offset, observation, goal, visited, boredom_scale)


class BoundEnergy:
    """An EnergyFn with its weights, readout offset and goal fixed, and a fast action gradient."""

    def __init__(self, energy: PlanEnergy, analytic_weights: torch.Tensor, use_step_head: bool,
                 readout_offset: torch.Tensor | None = None, observation: torch.Tensor | None = None,
                 goal: torch.Tensor | None = None, visited: torch.Tensor | None = None,
                 boredom_scale: torch.Tensor | None = None) -> None:
        self.energy = energy
        self.analytic_weights = analytic_weights
        self.use_step_head = use_step_head
        self.readout_offset = readout_offset
        self.observation = observation
        self.goal = goal
        self.visited = visited
        self.boredom_scale = boredom_scale

    @staticmethod
    def _repeat(per_env: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor | None:
        """(B, ...) -> (B', ...) for a state batch of B' rows: planners repeat each environment's state once
        per candidate, so B' is a multiple of the bound tensor's B."""
        return None if per_env is None else per_env.repeat_interleave(state.shape[0] // per_env.shape[0], dim=0)

    def _rows(self, per_env: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
        """(B', Q), zeros when per_env is None."""
        if per_env is None:
            return state.new_zeros(state.shape[0], len(self.energy.world_model.observation_names))
        return self._repeat(per_env, state)

    def _context(self, state: torch.Tensor) -> tuple:
        return (self.analytic_weights, self.use_step_head, self._rows(self.readout_offset, state),
                self._rows(self.observation, state), self._repeat(self.goal, state), self._repeat(self.visited, state),
                self._repeat(self.boredom_scale, state))

    def __call__(self, state: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.energy._forward(state, actions, *self._context(state))

    def value_and_grad(self, state: torch.Tensor,
                       actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.energy.value_and_grad(state, actions, *self._context(state))


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
                                     task.goal, task.visited, task.boredom_scale)
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

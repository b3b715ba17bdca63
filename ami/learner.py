"""Updates from short-term memory: world model (with perception), critic, Mode-1 policy; and, on a frozen
encoder's latents of a reward-free dataset, the predictor alone and the goal critic."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ami.agent import Agent
from ami.distributed import Group
from ami.schema import AgentConfig, RewardFreeConfig
from modules.actor import BoundEnergy, PlanContext
from modules.memory import SequenceBatch


class NonFiniteLossError(RuntimeError):
    """A loss or its gradient was not finite: the update is not applied and the run stops."""


def episode_bounds(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: (N,) episode id per position, episodes contiguous -> (first, last): (N,) each, the first and last
    position of each position's episode."""
    new_episode = torch.ones_like(ids, dtype=torch.bool)
    new_episode[1:] = ids[1:] != ids[:-1]
    starts = new_episode.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([len(ids)]))
    first = starts.repeat_interleave(lengths)
    return first, first + lengths.repeat_interleave(lengths) - 1


def hindsight_goals(index: torch.Tensor, first: torch.Tensor, last: torch.Tensor, discount: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A goal for each transition position: (B,) -> (B,) positions, from the transition's own episode (the only
    frames that share its walls), [first, last] per position: itself (a fifth of them: reached), a frame a
    geometric(1 - discount) number of steps on (half), or any frame of the episode (the rest: the dot can walk
    back)."""
    batch = index.shape[0]
    kind = torch.rand(batch, generator=generator)
    ahead = torch.ceil(torch.log(torch.rand(batch, generator=generator).clamp_min(1e-12)) / math.log(discount))
    future = torch.minimum(index + ahead.long().clamp_min(1), last[index])
    anywhere = first[index] + (torch.rand(batch, generator=generator) * (last[index] - first[index] + 1)).long()
    return torch.where(kind < 0.2, index, torch.where(kind < 0.7, future, anywhere))


def imagined_value_loss(agent: Agent, start: torch.Tensor, context: PlanContext, horizon: int
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's loss on imagined states: the policy (which imitates the planner) rolled `horizon` steps through
    the world model from start (B, D), each step priced as a plan prices it (context: the plan energy's, bound to
    the task's weights), the episode going on as far as the continuation head (when there is one) predicts."""
    critic = agent.cost.critic
    with torch.no_grad():
        actions = agent.actor.policy.propose(start, agent.world_model, horizon)  # (H, B, A)
        states = agent.world_model.rollout(start, actions)  # (H + 1, B, D)
        costs = agent.actor.energy.step_costs(states, actions, context)
        continues = None if critic.continuation_head is None else critic.continuation(states[1:])
    return critic.imagined_loss(states, costs, continues)


def imitation_error(policy: nn.Module, states: torch.Tensor, plan_actions: torch.Tensor,
                    planned: torch.Tensor) -> torch.Tensor:
    """states: (K + 1, B, D), plan_actions: (K, B, A), planned: (K, B) True where Mode-2 planned the step ->
    the policy's summed squared error on the planned steps (a mask, not a selection: one shape for a compiled
    graph whatever the count)."""
    squared = (policy(states[:-1]) - plan_actions).pow(2).sum(-1)
    return (squared * planned).sum()


def policy_energy_surrogate(agent: Agent, states: torch.Tensor, context: PlanContext) -> torch.Tensor:
    """The policy pushed down the plan energy of its own action, a one-step plan (the step's cost, then the value):
    states (N, D) -> a scalar whose gradient in the policy's parameters is the mean of dE/da . da/dtheta over the
    energies' spread across the batch (std), so its weight beside imitation does not depend on the reward's scale
    (TD-MPC2 divides its Q by a running range for the same reason). The energy's gradient is taken in the action
    alone (torch.func), so nothing reaches the world model or critic."""
    actions = agent.actor.policy(states)
    with torch.no_grad():
        energy, grad, _ = agent.actor.energy.functional_value_and_grad(states, actions.detach()[None], context)
        spread = energy.std().clamp_min(1e-3)
    return (actions * grad[0]).sum(-1).mean() / spread


class Learner:
    """Each update samples from memory and steps one optimiser per trained part.

    The intrinsic cost is read, never trained: it has no parameters to give an optimiser. In a group of
    processes (ami.distributed) the world model's, critic's and policy's losses run through
    DistributedDataParallel: each rank's batch is its own memory's, and the gradients stepped are the group's mean.
    With agent.learner.compile each loss and its backward run as compiled graphs. An update reads the host twice
    (the group's count of planned steps, and one finiteness check of every loss and gradient norm); the figures
    it returns stay tensors until logged.
    """

    def __init__(self, agent: Agent, config: AgentConfig, reward_free: RewardFreeConfig, seed: int,
                 group: Group | None = None) -> None:
        self.agent = agent
        self.config = config
        self.reward_free = reward_free
        self.group = Group() if group is None else group
        def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
            # One whole graph per loss and batch shape: a graph break would be an error, not a silent split.
            return torch.compile(function, dynamic=False, fullgraph=True) if config.learner.compile else function

        self.world_model_loss = self.group.objective(compiled(agent.world_model.loss), perception=agent.perception,
                                                     world_model=agent.world_model)
        imagined_horizon = config.cost.imagined_horizon

        def critic_loss(states: torch.Tensor, actions: torch.Tensor, total_costs: torch.Tensor,
                        measured_costs: torch.Tensor, terminated: torch.Tensor, context: PlanContext | None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            """The critic's loss on the batch's real states, and (imagined_horizon > 0) on imagined ones."""
            loss, stats = agent.cost.critic.loss(states, actions, total_costs, measured_costs, terminated)
            if not imagined_horizon:
                return loss, stats
            imagined, imagined_stats = imagined_value_loss(agent, states[0], context, imagined_horizon)
            return loss + imagined, {**stats, **imagined_stats}

        self.critic_loss = self.group.objective(compiled(critic_loss), critic=agent.cost.critic)
        value_weight = config.actor.policy_value_weight

        def policy_loss(states: torch.Tensor, plan_actions: torch.Tensor, planned: torch.Tensor,
                        imitation_scale: torch.Tensor, context: PlanContext | None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            """The policy's imitation of Mode-2's planned actions (its summed error times imitation_scale), and
            (policy_value_weight > 0) its own action's plan energy on every batch state."""
            imitation = imitation_error(agent.actor.policy, states, plan_actions, planned) * imitation_scale
            if not value_weight:
                return imitation, {"policy_imitation_loss": imitation.detach()}
            surrogate = policy_energy_surrogate(agent, states[:-1].flatten(0, 1).detach(), context)
            return imitation + value_weight * surrogate, {"policy_imitation_loss": imitation.detach()}

        self.policy_loss = self.group.objective(compiled(policy_loss), policy=agent.actor.policy)
        self.prediction_loss = compiled(agent.world_model.prediction_loss)
        self.goal_critic_loss = None if agent.cost.goal_critic is None else compiled(agent.cost.goal_critic.loss)
        self._bound: tuple[torch.Tensor, BoundEnergy] | None = None  # (the weights, the energy bound to them)
        lr = config.world_model.lr
        self.optimisers: dict[str, torch.optim.Optimizer] = {
            "world_model": torch.optim.Adam([*agent.perception.encoder.parameters(),
                                             *agent.world_model.parameters()], lr=lr),
            "predictor": torch.optim.Adam(agent.world_model.predictor_parameters(), lr=lr),
            "critic": torch.optim.Adam([p for p in agent.cost.critic.parameters() if p.requires_grad],
                                       lr=config.cost.critic_lr),
            "policy": torch.optim.Adam(agent.actor.policy.parameters(), lr=config.actor.policy_lr)}
        if agent.cost.goal_critic is not None:
            self.optimisers["goal_critic"] = torch.optim.Adam(agent.cost.goal_critic.net.parameters(),
                                                              lr=config.cost.goal.critic_lr)
        self.parameters = {name: [p for group in optimiser.param_groups for p in group["params"]]
                           for name, optimiser in self.optimisers.items()}  # what each optimiser steps, and clips
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0  # every update of every kind

    def _step(self, losses: dict[str, tuple[torch.Tensor, float]]) -> dict[str, torch.Tensor]:
        """Backpropagate each loss into its optimiser (name -> (loss, gradient clip)), clip and step them all; a
        non-finite loss or gradient norm anywhere in the group stops the run before any parameter moves. The losses
        train disjoint parameters from detached inputs, so one backward of their sum is each one's own.
        -> the gradient norms before clipping, by name."""
        for name in losses:
            self.optimisers[name].zero_grad(set_to_none=True)
        sum(loss for loss, _ in losses.values()).backward()
        norms = {name: nn.utils.clip_grad_norm_(self.parameters[name], clip) for name, (_, clip) in losses.items()}
        checked = torch.stack([*(loss.detach() for loss, _ in losses.values()), *norms.values()])
        finite = bool(torch.isfinite(checked).all())  # the one read of the host
        if not self.group.all(finite):  # every rank stops, or none
            for name in losses:
                self.optimisers[name].zero_grad(set_to_none=True)
            raise NonFiniteLossError(self._non_finite(losses, norms, finite))
        for name in losses:
            self.optimisers[name].step()
        return norms

    def _non_finite(self, losses: dict[str, tuple[torch.Tensor, float]], norms: dict[str, torch.Tensor],
                    finite: bool) -> str:
        """The first non-finite loss or gradient norm, by name and value (or that another rank had one)."""
        kept = "no parameter was changed and the last checkpoint is kept"
        if finite:
            return f"a loss or gradient was not finite on another rank at update {self.updates + 1}; {kept}"
        for name, (loss, _) in losses.items():
            if not torch.isfinite(loss):
                return f"the {name} loss is {loss.item()} at update {self.updates + 1}; {kept}"
        name, norm = next((name, norm) for name, norm in norms.items() if not torch.isfinite(norm))
        return f"the {name} gradient norm is {norm.item()} at update {self.updates + 1}; {kept}"

    def update(self, batch: SequenceBatch | None = None) -> dict[str, float | torch.Tensor | None]:
        """One joint update: world model and encoder on a batch of stored sequences (default: sampled from
        memory); on the same encodings, the critic (when the cost has terms) and the policy (on the steps Mode-2
        planned). Every loss is computed before any parameter moves."""
        agent, cfg = self.agent, self.config
        device = agent.device
        if batch is None:
            batch = agent.memory.sample_sequences(cfg.world_model.batch_size, cfg.world_model.rollout_horizon,
                                                  self.generator)
        obs, actions = batch.obs.to(device), batch.actions.to(device)
        vector = None if batch.vector is None else batch.vector.to(device)
        wm_losses, states = self.world_model_loss(agent.perception, obs, actions, vector)
        wm = cfg.world_model
        losses = {"world_model": (wm_losses.total, wm.grad_clip)}
        stats: dict[str, float | torch.Tensor | None] = {
            "world_model/loss": wm_losses.total.detach(),
            "world_model/prediction_loss": wm_losses.prediction,
            "world_model/prediction_loss_by_horizon": wm_losses.prediction_by_horizon,
            "world_model/readout_loss": wm_losses.readout,
            "world_model/variance_loss": wm_losses.variance,
            "world_model/covariance_loss": wm_losses.covariance,
            "world_model/latent_std": wm_losses.latent_std}
        for name, weight, value in (("inverse_dynamics", wm.inverse_dynamics_weight, wm_losses.inverse_dynamics),
                                    ("smoothness", wm.smoothness_weight, wm_losses.smoothness),
                                    ("temporal_variance", wm.temporal_variance_weight, wm_losses.temporal_variance)):
            if weight:
                stats[f"world_model/{name}_loss"] = value
        stats.update({f"world_model/z/{name}": value for name, value in wm_losses.latent_variable.items()})

        intrinsic = agent.cost.intrinsic
        if intrinsic.term_names:
            terms = batch.cost_terms.to(device) * agent.configurator.weight_vector  # (L, B, T)
            measured = (terms * intrinsic.mask("measured", device)).sum(-1)
            context = self._context(states[0]) if cfg.cost.imagined_horizon else None
            critic_loss, critic_stats = self.critic_loss(states, actions, terms.sum(-1), measured,
                                                         batch.terminated.to(device), context)
            losses["critic"] = (critic_loss, cfg.cost.grad_clip)
            stats.update({f"cost/critic/{key}": value for key, value in critic_stats.items()})

        planned = batch.planned.to(device)
        stats["actor/policy_imitation_loss"] = None
        planned_rows = self.group.sum([float(planned.sum())])[0]  # over the group: a rank may have none
        value_trained = bool(cfg.actor.policy_value_weight) and bool(intrinsic.term_names)
        if planned_rows or value_trained:
            target = batch.plan_actions.to(device)
            # The mean over the group's planned steps: DDP averages the ranks' gradients, hence world_size.
            scale = self.group.world_size / (planned_rows * target.shape[-1]) if planned_rows else 0.0
            context = self._context(states[:-1].flatten(0, 1)) if value_trained else None
            policy_loss, policy_stats = self.policy_loss(states, target, planned, torch.tensor(scale, device=device),
                                                         context)
            losses["policy"] = (policy_loss, 10.0)
            if planned_rows:
                stats["actor/policy_imitation_loss"] = policy_stats["policy_imitation_loss"]
        stats["world_model/grad_norm"] = self._step(losses)["world_model"]
        agent.perception.update_target()
        if "critic" in losses:
            agent.cost.critic.update_target()
        agent.world_model_trained = True
        self.updates += 1
        return stats

    def _context(self, states: torch.Tensor) -> PlanContext:
        """The plan energy's context for these state rows (N, D) at the configurator's current weights, bound again
        only when they change (binding reads the host)."""
        weights = self.agent.configurator.weight_vector
        if self._bound is None or self._bound[0] is not weights:
            self._bound = (weights, self.agent.actor.energy.bind(weights))
        return self._bound[1].bound_context(states)

    def update_predictor(self, latents: torch.Tensor) -> dict[str, float | torch.Tensor]:
        """One predictor-only update: rollouts of predictor_horizon steps on a frozen encoder's latents of every
        stored row, latents: (rows, D) by flat row index."""
        rf, agent = self.reward_free, self.agent
        idx = agent.memory.sample_indices(rf.predictor_batch_size, rf.predictor_horizon, self.generator)
        states = latents[idx].to(agent.device)  # (K + 1, B, D)
        actions = agent.memory.action.flatten(0, 1)[idx[:-1]].to(agent.device)
        _, loss, by_horizon, latent_figures = self.prediction_loss(states[0], actions, states[1:])
        grad_norm = self._step({"predictor": (loss, self.config.world_model.grad_clip)})["predictor"]
        self.updates += 1
        return {"world_model/prediction_loss": loss.detach(),
                "world_model/prediction_loss_by_horizon": by_horizon.detach(), "world_model/grad_norm": grad_norm,
                **{f"world_model/z/{name}": value for name, value in latent_figures.items()}}

    def goal_critic_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored rows in time order (N,) flat indices, their episodes' first and last positions (N,) each,
        and the positions (M,) whose next row is the next observation of the same episode."""
        memory = self.agent.memory
        order = memory.timeline()
        first, last = episode_bounds(memory.episode.view(-1)[order])
        seq = memory.seq.view(-1)[order]
        same_column = order[1:] % memory.num_envs == order[:-1] % memory.num_envs
        follows = same_column & (seq[1:] == seq[:-1] + 1) & memory.has_transition.view(-1)[order[:-1]]
        return order, first, last, follows.nonzero().squeeze(1)

    def update_goal_critic(self, latents: torch.Tensor,
                           data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
        """One goal-critic update on a frozen encoder's latents (rows, D), each transition s_t -> s_t+1 with a
        hindsight goal from its own episode. data: goal_critic_data()."""
        agent, goal_config = self.agent, self.config.cost.goal
        order, first, last, transitions = data
        position = transitions[torch.randint(len(transitions), (self.reward_free.critic_batch_size,),
                                             generator=self.generator)]
        goal = hindsight_goals(position, first, last, goal_config.critic_discount, self.generator)
        states, next_states, goals = (latents[order[p]].to(agent.device) for p in (position, position + 1, goal))
        loss, stats = self.goal_critic_loss(states, next_states, goals, (goal == position).to(agent.device))
        self._step({"goal_critic": (loss, float("inf"))})
        agent.cost.goal_critic.update_target()
        agent.cost.goal_critic.trained.fill_(True)
        self.updates += 1
        return {f"cost/critic/{key}": value for key, value in stats.items()}

    def state_dict(self) -> dict:
        return {"optimisers": {k: o.state_dict() for k, o in self.optimisers.items()},
                "generator": self.generator.get_state(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for key, optimiser in self.optimisers.items():
            optimiser.load_state_dict(state["optimisers"][key])
        self.generator.set_state(state["generator"].cpu())  # map_location may have moved it
        self.updates = int(state["updates"])
        self.agent.world_model_trained = self.updates > 0

"""Updates from short-term memory: world model (with perception), critic, Mode-1 policy; and, on a frozen
encoder's latents of a reward-free dataset, the predictor alone and the goal critic."""

from __future__ import annotations

import math

import torch
from torch import nn

from ami.agent import Agent
from ami.config import AgentConfig, RewardFreeConfig
from ami.distributed import Group
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


class Learner:
    """Each update samples from memory and steps one optimiser per trained part.

    The intrinsic cost is read, never trained: it has no parameters to give an optimiser. In a group of
    processes (ami.distributed) the world model's, critic's and policy's losses run through
    DistributedDataParallel: each rank's batch is its own memory's, and the gradients stepped are the group's mean.
    """

    def __init__(self, agent: Agent, config: AgentConfig, reward_free: RewardFreeConfig, seed: int,
                 group: Group | None = None) -> None:
        self.agent = agent
        self.config = config
        self.reward_free = reward_free
        self.group = Group() if group is None else group
        self.world_model_loss = self.group.objective(agent.world_model.loss, perception=agent.perception,
                                                     world_model=agent.world_model)
        self.critic_loss = self.group.objective(agent.cost.critic.loss, critic=agent.cost.critic)
        self.policy = self.group.objective(agent.actor.policy, policy=agent.actor.policy)
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
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0  # every update of every kind

    def _step(self, name: str, loss: torch.Tensor, clip: float) -> float:
        """Backpropagate loss into optimiser `name` and step it; a non-finite loss or gradient stops the run
        before any parameter moves."""
        finite = bool(torch.isfinite(loss))
        if not self.group.all(finite):  # every rank stops, or none
            value = f"not finite on another rank (here {loss.item()})" if finite else loss.item()
            raise NonFiniteLossError(f"the {name} loss is {value} at update {self.updates + 1}; no parameter was "
                                     "changed and the last checkpoint is kept")
        optimiser = self.optimisers[name]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimiser.param_groups for p in group["params"]]
        norm = float(nn.utils.clip_grad_norm_(params, clip))
        if not math.isfinite(norm):
            optimiser.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the {name} gradient norm is {norm} at update {self.updates + 1}; no "
                                     "parameter was changed and the last checkpoint is kept")
        optimiser.step()
        return norm

    def update(self, batch: SequenceBatch | None = None) -> dict[str, float | torch.Tensor | None]:
        """One joint update: world model and encoder on a batch of stored sequences (default: sampled from
        memory); on the same encodings, the critic (when the cost has terms) and the policy (on the steps Mode-2
        planned)."""
        agent, cfg = self.agent, self.config
        device = agent.device
        if batch is None:
            batch = agent.memory.sample_sequences(cfg.world_model.batch_size, cfg.world_model.rollout_horizon,
                                                  self.generator)
        obs, actions = batch.obs.to(device), batch.actions.to(device)
        vector = None if batch.vector is None else batch.vector.to(device)
        wm_losses, states = self.world_model_loss(agent.perception, obs, actions, vector)
        stats: dict[str, float | torch.Tensor | None] = {
            "world_model/loss": wm_losses.total.item(),
            "world_model/prediction_loss": wm_losses.prediction.item(),
            "world_model/prediction_loss_by_horizon": wm_losses.prediction_by_horizon,
            "world_model/readout_loss": wm_losses.readout.item(),
            "world_model/variance_loss": wm_losses.variance.item(),
            "world_model/covariance_loss": wm_losses.covariance.item(),
            "world_model/latent_std": wm_losses.latent_std}
        wm = cfg.world_model
        for name, weight, value in (("inverse_dynamics", wm.inverse_dynamics_weight, wm_losses.inverse_dynamics),
                                    ("smoothness", wm.smoothness_weight, wm_losses.smoothness),
                                    ("temporal_variance", wm.temporal_variance_weight, wm_losses.temporal_variance)):
            if weight:
                stats[f"world_model/{name}_loss"] = value.item()
        stats["world_model/grad_norm"] = self._step("world_model", wm_losses.total, wm.grad_clip)
        agent.perception.update_target()
        agent.world_model_trained = True

        intrinsic = agent.cost.intrinsic
        if intrinsic.term_names:
            terms = batch.cost_terms.to(device) * agent.configurator.weight_vector  # (L, B, T)
            measured = (terms * intrinsic.mask("measured", device)).sum(-1)
            critic_loss, critic_stats = self.critic_loss(states, actions, terms.sum(-1), measured,
                                                         batch.terminated.to(device))
            self._step("critic", critic_loss, cfg.cost.grad_clip)
            agent.cost.critic.update_target()
            stats.update({f"cost/critic/{key}": value for key, value in critic_stats.items()})

        planned = batch.planned.to(device)
        stats["actor/policy_imitation_loss"] = None
        planned_rows = self.group.sum([float(planned.sum())])[0]  # over the group: a rank may have none
        if planned_rows:
            target = batch.plan_actions.to(device)[planned]
            # The mean over the group's planned steps: DDP averages the ranks' gradients, hence world_size.
            squared = (self.policy(states[:-1][planned]) - target).pow(2).sum()
            imitation = squared * self.group.world_size / (planned_rows * target.shape[-1])
            self._step("policy", imitation, 10.0)
            stats["actor/policy_imitation_loss"] = imitation.item()
        self.updates += 1
        return stats

    def update_predictor(self, latents: torch.Tensor) -> dict[str, float | torch.Tensor]:
        """One predictor-only update: rollouts of predictor_horizon steps on a frozen encoder's latents of every
        stored row, latents: (rows, D) by flat row index."""
        rf, agent = self.reward_free, self.agent
        idx = agent.memory.sample_indices(rf.predictor_batch_size, rf.predictor_horizon, self.generator)
        states = latents[idx].to(agent.device)  # (K + 1, B, D)
        actions = agent.memory.action.flatten(0, 1)[idx[:-1]].to(agent.device)
        _, loss, by_horizon = agent.world_model.prediction_loss(states[0], actions, states[1:])
        grad_norm = self._step("predictor", loss, self.config.world_model.grad_clip)
        self.updates += 1
        return {"world_model/prediction_loss": loss.item(), "world_model/prediction_loss_by_horizon": by_horizon,
                "world_model/grad_norm": grad_norm}

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
                           data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, float]:
        """One goal-critic update on a frozen encoder's latents (rows, D), each transition s_t -> s_t+1 with a
        hindsight goal from its own episode. data: goal_critic_data()."""
        agent, goal_config = self.agent, self.config.cost.goal
        order, first, last, transitions = data
        position = transitions[torch.randint(len(transitions), (self.reward_free.critic_batch_size,),
                                             generator=self.generator)]
        goal = hindsight_goals(position, first, last, goal_config.critic_discount, self.generator)
        states, next_states, goals = (latents[order[p]].to(agent.device) for p in (position, position + 1, goal))
        loss, stats = agent.cost.goal_critic.loss(states, next_states, goals, (goal == position).to(agent.device))
        self._step("goal_critic", loss, float("inf"))
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

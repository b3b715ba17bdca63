"""Updates from short-term memory: world model (with perception), critic, and Mode-1 policy."""

from __future__ import annotations

import torch
from torch import nn

from ami.agent import Agent
from ami.config import AgentConfig


class Learner:
    """One update round samples a batch of sequences and steps the three optimisers.

    The intrinsic cost is read, never trained: it has no parameters to give an optimiser.
    """

    def __init__(self, agent: Agent, config: AgentConfig, seed: int) -> None:
        self.agent = agent
        self.config = config
        wm = config.world_model
        self.world_model_optimiser = torch.optim.Adam(
            [*agent.perception.encoder.parameters(), *agent.world_model.parameters()], lr=wm.lr)
        self.critic_optimiser = torch.optim.Adam(
            [p for p in agent.cost.critic.parameters() if p.requires_grad], lr=config.cost.critic_lr)
        self.policy_optimiser = torch.optim.Adam(agent.actor.policy.parameters(), lr=config.actor.policy_lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"world_model": self.world_model_optimiser, "critic": self.critic_optimiser,
                "policy": self.policy_optimiser}

    @staticmethod
    def _step(optimiser: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> float:
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimiser.param_groups for p in group["params"]]
        norm = float(nn.utils.clip_grad_norm_(params, clip))
        optimiser.step()
        return norm

    def update(self) -> dict[str, float | torch.Tensor]:
        agent, cfg = self.agent, self.config
        device = agent.device
        batch = agent.memory.sample_sequences(cfg.world_model.batch_size, cfg.world_model.rollout_horizon,
                                              self.generator)
        obs, actions = batch.obs.to(device), batch.actions.to(device)

        wm_losses = agent.world_model.loss(agent.perception, obs, actions)
        wm_grad = self._step(self.world_model_optimiser, wm_losses.total, cfg.world_model.grad_clip)
        agent.perception.update_target()

        with torch.no_grad():
            states = agent.perception(obs.flatten(0, 1)).view(*obs.shape[:2], -1)
        intrinsic = agent.cost.intrinsic
        weights = intrinsic.weight_vector(agent.configurator.weights).to(device)
        terms = batch.cost_terms.to(device) * weights  # (L, B, T)
        measured = (terms * intrinsic.mask("measured", device)).sum(-1)
        critic_loss, critic_stats = agent.cost.critic.loss(
            states, actions, terms.sum(-1), measured, batch.terminated.to(device))
        self._step(self.critic_optimiser, critic_loss, cfg.cost.grad_clip)
        agent.cost.critic.update_target()

        planned = batch.planned.to(device)
        policy_error = float("nan")
        if planned.any():
            imitation = (agent.actor.policy(states[:-1][planned]) - actions[planned]).pow(2).mean()
            self._step(self.policy_optimiser, imitation, 10.0)
            policy_error = imitation.item()
            agent.configurator.report(policy_error=policy_error)
        self.updates += 1
        agent.world_model_trained = True
        return {
            "world_model/loss": wm_losses.total.item(),
            "world_model/prediction_loss": wm_losses.prediction.item(),
            "world_model/prediction_loss_by_horizon": wm_losses.prediction_by_horizon,
            "world_model/readout_loss": wm_losses.readout.item(),
            "world_model/variance_loss": wm_losses.variance.item(),
            "world_model/covariance_loss": wm_losses.covariance.item(),
            "world_model/latent_std": wm_losses.latent_std,
            "world_model/grad_norm": wm_grad,
            "cost/critic/value_loss": critic_stats["value_loss"],
            "cost/critic/step_loss": critic_stats["step_loss"],
            "cost/critic/value_target_mean": critic_stats["value_mean"],
            "actor/policy_imitation_loss": policy_error,
        }

    def state_dict(self) -> dict:
        return {"optimisers": {k: o.state_dict() for k, o in self.optimisers().items()},
                "generator": self.generator.get_state(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for key, optimiser in self.optimisers().items():
            optimiser.load_state_dict(state["optimisers"][key])
        self.generator.set_state(state["generator"].cpu())  # map_location may have moved it
        self.updates = int(state["updates"])
        self.agent.world_model_trained = self.updates > 0

"""The cost module's trainable half (TC): the critic's value, step and continuation heads, the goal critic, and the
discounted sums that train them and price plans with them.

value(s) is the discounted future cost from s; step(s, a) the measured intrinsic terms of one step (the env reward,
info["cost"]), which exist only on real transitions; continuation(s') the probability that the episode goes on.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ami.schema import CostConfig, GoalConfig
from modules.nn import mlp, soft_update


def lambda_returns(costs: torch.Tensor, continues: torch.Tensor, values: torch.Tensor, discount: float,
                   lam: float, terminal_value: float = 0.0) -> torch.Tensor:
    """TD(lambda) cost-to-go along a sequence (imagined, or real through value_targets).

    costs, continues: (H, B); values: (H + 1, B) each state's cost-to-go estimate. G_H = V_H and
    G_t = c_t + discount * [(1 - continues_t) terminal_value + continues_t ((1 - lam) V_t+1 + lam G_t+1)]:
    lam = 1 is the H-step return bootstrapped from V_H, lam = 0 one-step TD. -> (H, B)
    """
    returns = torch.empty_like(costs)
    future = values[-1]
    for t in range(costs.shape[0] - 1, -1, -1):
        going_on = (1.0 - lam) * values[t + 1] + lam * future
        future = costs[t] + discount * ((1.0 - continues[t]) * terminal_value + continues[t] * going_on)
        returns[t] = future
    return returns


def value_targets(costs: torch.Tensor, terminated: torch.Tensor, bootstrap: torch.Tensor,
                  discount: float, terminal_value: float = 0.0) -> torch.Tensor:
    """Discounted cost-to-go for every step of a sequence.

    costs, terminated: (L, B); bootstrap: (B,) value of the state after the last step.
    G_t = c_t + discount * (terminal_value if terminated_t else G_{t+1}), with G_L = bootstrap: lambda_returns at
    lam = 1, where only the last state's value counts. A truncated episode is not terminated: its last state still
    has a future, so the bootstrap applies. terminal_value prices the state after a termination: with costs >= 0
    and a value of 0 there, ending the episode (a pole falling) would look cheaper than carrying on.
    """
    values = torch.cat([torch.zeros_like(costs), bootstrap[None]])
    return lambda_returns(costs, 1.0 - terminated.float(), values, discount, 1.0, terminal_value)


def pessimistic(values: torch.Tensor, pessimism: float) -> torch.Tensor:
    """values: (members, ...) costs-to-go -> (...,) their mean + pessimism x their std over members (population):
    above the mean where the members disagree, for pessimism > 0."""
    return values.mean(0) + pessimism * values.std(0, correction=0)


def expected_discounted_cost(step_costs: torch.Tensor, continues: torch.Tensor, tail: torch.Tensor,
                             discount: float, terminal_value: float = 0.0) -> torch.Tensor:
    """The discounted cost of a sequence whose episode may end on the way, in expectation.

    step_costs, continues: (H, B), continues[t] the probability that the episode goes on after step t; tail: (B,)
    the cost-to-go of the state after the last step. Step t counts as far as every step before it went on; an end
    after step t costs terminal_value from there. With continues of 0 and 1 this is value_targets' G_0 with
    terminated = 1 - continues and bootstrap = tail. -> (B,)
    """
    horizon = step_costs.shape[0]
    gammas = discount_weights(horizon + 1, discount, step_costs.device)[:, None]  # (H + 1, 1)
    alive = torch.cat([torch.ones_like(continues[:1]), torch.cumprod(continues, 0)])  # (H + 1, B)
    ended = alive[:-1] - alive[1:]
    return (gammas[:-1] * (alive[:-1] * step_costs + discount * terminal_value * ended)).sum(0) \
        + gammas[-1, 0] * alive[-1] * tail


class TrainableCritic(nn.Module):
    """TC: value(s) -> discounted future IC; step(s, a) -> the measured IC terms of one step; with
    config.continuation, continuation(s') -> the probability that the episode goes on in s'."""

    def __init__(self, latent_dim: int, action_dim: int, config: CostConfig) -> None:
        super().__init__()
        self.config = config
        self.value_head = mlp(latent_dim, config.critic_hidden_dim, 1)
        # The value ensemble's other members (value_ensemble - 1 of them), as the world model keeps its ensemble.
        self.value_ensemble = nn.ModuleList(mlp(latent_dim, config.critic_hidden_dim, 1)
                                            for _ in range(config.value_ensemble - 1))
        self.step_head = mlp(latent_dim + action_dim, config.critic_hidden_dim, 1)
        self.target_value_head = copy.deepcopy(self.value_head).requires_grad_(False)
        self.target_value_ensemble = copy.deepcopy(self.value_ensemble).requires_grad_(False)
        self.continuation_head = mlp(latent_dim, config.critic_hidden_dim, 1) if config.continuation else None

    @property
    def terminal_value(self) -> float:
        """The cost-to-go after a termination: termination_cost every step, forever."""
        return self.config.termination_cost / (1.0 - self.config.discount) if self.config.termination_cost else 0.0

    def continuation(self, states: torch.Tensor) -> torch.Tensor:
        """states: (..., D) -> (...,) in (0, 1)."""
        return torch.sigmoid(self.continuation_head(states).squeeze(-1))

    def member_values(self, states: torch.Tensor, target: bool = False) -> torch.Tensor:
        """states: (..., D) -> (members, ...), the online heads' or the target heads'."""
        head, others = (self.target_value_head, self.target_value_ensemble) if target \
            else (self.value_head, self.value_ensemble)
        return torch.stack([member(states).squeeze(-1) for member in (head, *others)])

    def value(self, states: torch.Tensor, target: bool = False, explore: bool = False) -> torch.Tensor:
        """states: (..., D) -> (...,): the members' mean + value_pessimism x their std (over members, population);
        explore: minus value_optimism x that std as well, the price a training step's plan puts on its last state."""
        if not len(self.value_ensemble):
            head = self.target_value_head if target else self.value_head
            return head(states).squeeze(-1)
        optimism = self.config.value_optimism if explore else 0.0
        return pessimistic(self.member_values(states, target), self.config.value_pessimism - optimism)

    def step_cost(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """states: (..., D), actions: (..., A) -> (...,)."""
        return self.step_head(torch.cat([states, actions], dim=-1)).squeeze(-1)

    def loss(self, states: torch.Tensor, actions: torch.Tensor, total_costs: torch.Tensor,
             measured_costs: torch.Tensor, terminated: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """states: (L + 1, B, D) detached latents; actions: (L, B, A); costs, terminated: (L, B). -> (the loss, its
        parts as detached scalars: read when logged, so that computing them waits for nothing).

        With discount 1 an episode that never terminates has no finite cost-to-go: the value head is not
        trained then (and cannot price plans: the configuration requires value_weight 0), the step head is."""
        step_loss = (self.step_cost(states[:-1], actions) - measured_costs).pow(2).mean()
        # The share of the measured costs' variance the step head explains (1 - MSE / variance, the batch's R^2):
        # whether the head fits the env's reward at its scale, which the loss alone does not say.
        variance = measured_costs.detach().var(correction=0).clamp_min(1e-8)
        stats = {"step_loss": step_loss.detach(), "step_explained": 1.0 - step_loss.detach() / variance}
        loss = step_loss
        if self.continuation_head is not None:  # s[t+1] goes on unless transition t terminated
            logits = self.continuation_head(states[1:]).squeeze(-1)
            continuation_loss = nn.functional.binary_cross_entropy_with_logits(logits, 1.0 - terminated.float())
            loss, stats["continuation_loss"] = loss + continuation_loss, continuation_loss.detach()
        if self.config.discount >= 1.0:
            return loss, stats
        with torch.no_grad():
            bootstrap = self.value(states[-1], target=True)
            targets = value_targets(total_costs, terminated, bootstrap, self.config.discount, self.terminal_value)
        # Each member on its own error (summed: each learns at the critic's rate), reported as their mean.
        errors = (self.member_values(states[:-1]) - targets).pow(2).mean((1, 2))
        value_loss = errors.mean()
        stats.update(value_loss=value_loss.detach(), value_mean=targets.mean())
        return loss + errors.sum(), stats

    def imagined_loss(self, states: torch.Tensor, costs: torch.Tensor, continues: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The value on states the world model imagines, as plans query it: states (H + 1, B, D) of a rollout, costs
        (H, B) of its steps, continues (H, B) (None: every step goes on) -> (the loss, its parts), TD(lambda)
        targets from the target heads (config.imagined_lambda)."""
        with torch.no_grad():
            continues = torch.ones_like(costs) if continues is None else continues
            targets = lambda_returns(costs, continues, self.value(states, target=True), self.config.discount,
                                     self.config.imagined_lambda, self.terminal_value)
        errors = (self.member_values(states[:-1].detach()) - targets).pow(2).mean((1, 2))
        return errors.sum(), {"imagined_value_loss": errors.mean().detach(), "imagined_value_mean": targets.mean()}

    def update_target(self) -> None:
        soft_update(self.target_value_head, self.value_head, self.config.critic_tau)
        if len(self.value_ensemble):
            soft_update(self.target_value_ensemble, self.value_ensemble, self.config.critic_tau)


def discount_weights(horizon: int, discount: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(H,) gamma^t."""
    return torch.tensor([math.pow(discount, t) for t in range(horizon)], device=device)


class GoalCritic(nn.Module):
    """TC's goal-reaching part: how many steps a latent state is from a latent goal, learned without reward.

    reach(s, g) = discount^steps(s, g) in (0, 1), trained by expectile TD on stored episodes, where every
    frame is a goal the episode's other frames reach: reach(s_t, s_t) = 1, else discount * reach(s_t+1, g).
    The upper expectile makes it the best the data's moves achieve rather than the random walk's average.
    Unlike a latent distance, steps(s, g) knows that a wall stands between two states that look alike.
    """

    def __init__(self, latent_dim: int, config: GoalConfig) -> None:
        super().__init__()
        self.config = config
        self.net = mlp(2 * latent_dim, config.critic_hidden_dim, 1, layers=3)
        self.target_net = copy.deepcopy(self.net).requires_grad_(False)
        self.register_buffer("trained", torch.tensor(False))

    def _logit(self, net: nn.Module, states: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """states: (..., B, D), goal: (B, D) -> (..., B); reach = sigmoid(-logit)."""
        return net(torch.cat([states, goal.expand_as(states)], dim=-1)).squeeze(-1)

    def steps(self, states: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """states: (..., B, D), goal: (B, D) -> (..., B) steps to the goal, >= 0.
        log sigmoid(-x) / log discount = softplus(x) / -log discount: smooth, and linear far from the goal."""
        return nn.functional.softplus(self._logit(self.net, states, goal)) / -math.log(self.config.critic_discount)

    def loss(self, states: torch.Tensor, next_states: torch.Tensor, goals: torch.Tensor,
             reached: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """states, next_states, goals: (B, D) detached latents; reached: (B,) True where the goal is the state.
        -> (the loss, detached scalars to log)."""
        with torch.no_grad():
            next_reach = torch.sigmoid(-self._logit(self.target_net, next_states, goals))
            target = torch.where(reached, torch.ones_like(next_reach), self.config.critic_discount * next_reach)
        reach = torch.sigmoid(-self._logit(self.net, states, goals))
        error = target - reach
        tau = self.config.critic_expectile
        loss = (torch.where(error > 0, tau, 1 - tau) * error.pow(2)).mean()
        steps = torch.log(reach.detach().clamp_min(1e-6)) / math.log(self.config.critic_discount)
        return loss, {"goal_critic_loss": loss.detach(), "goal_critic_steps_mean": steps.mean()}

    def update_target(self) -> None:
        soft_update(self.target_net, self.net, self.config.critic_tau)

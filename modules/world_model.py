"""World model: an action-conditioned predictor in latent space, trained JEPA-style.

It predicts the target encoder's embedding of future observations over several steps, reads named
observation quantities out of any latent (real or imagined) for the analytic cost terms, and is kept
from collapsing by a VICReg variance + covariance regulariser on the encoder's output, with an inverse-dynamics
head (the action from two consecutive states) and a temporal-smoothness term where those help.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ami.messages import Percept
from ami.schema import WorldModelConfig
from modules.nn import mlp
from modules.perception import ImagePerception, Perception


@dataclass(frozen=True)
class WorldModelLosses:
    """total: scalar to minimise. prediction_by_horizon: (K,) latent MSE at steps 1..K.
    latent_std: (D,) per-dimension std of the encoder's output over the batch."""

    total: torch.Tensor
    prediction: torch.Tensor
    prediction_by_horizon: torch.Tensor
    readout: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor
    inverse_dynamics: torch.Tensor
    smoothness: torch.Tensor
    temporal_variance: torch.Tensor
    latent_std: torch.Tensor


def variance_covariance(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VICReg's anti-collapse terms on z: (M, D).

    Returns (variance hinge: mean over dims of relu(1 - std), covariance: sum of squared
    off-diagonal covariances / D, std: (D,)).
    """
    z = z - z.mean(0)
    std = (z.var(0) + 1e-4).sqrt()
    variance = torch.relu(1.0 - std).mean()
    dim = z.shape[1]
    cov = (z.T @ z) / max(z.shape[0] - 1, 1)
    off_diagonal = cov - torch.diag(torch.diag(cov))
    covariance = off_diagonal.pow(2).sum() / dim
    return variance, covariance, std


class WorldModel(nn.Module):
    """s[t+1] = s[t] + predictor(s[t], a[t]); readout(s) -> named observation quantities.

    latent_dim D, action_dim A, readout_dim Q (the length of observation_names).
    """

    def __init__(self, latent_dim: int, action_dim: int, observation_names: list[str],
                 config: WorldModelConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_dim = latent_dim
        self.action_dim = action_dim
        self.observation_names = list(observation_names)
        self.predictor = mlp(latent_dim + action_dim, config.hidden_dim, latent_dim)
        # More predictors of the same step, differently initialised, trained on the same data: where they
        # disagree the model does not know, and the shield checks the worst of them. The planner uses the first.
        self.ensemble = nn.ModuleList(mlp(latent_dim + action_dim, config.hidden_dim, latent_dim)
                                      for _ in range(config.ensemble_size - 1))
        with warnings.catch_warnings():  # an image observation names no quantities: an empty head, on purpose
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.readout_head = mlp(latent_dim, config.hidden_dim, len(self.observation_names))
        self.inverse_dynamics_head = mlp(2 * latent_dim, config.hidden_dim, action_dim, layers=1)

    def step(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """state: (B, D), action: (B, A) in [-1, 1] -> next state (B, D)."""
        return state + self.predictor(torch.cat([state, action], dim=-1))

    @property
    def ensemble_size(self) -> int:
        return 1 + len(self.ensemble)

    def predictor_parameters(self) -> list[nn.Parameter]:
        """Every member's parameters: what a predictor-only update trains."""
        return [*self.predictor.parameters(), *self.ensemble.parameters()]

    def step_members(self, states: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """states: (E, B, D) one state per member, action: (B, A) -> (E, B, D), member e stepping states[e]."""
        members = [self.predictor, *self.ensemble]
        return torch.stack([state + member(torch.cat([state, action], dim=-1))
                            for member, state in zip(members, states, strict=True)])

    def rollout(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """state: (B, D), actions: (H, B, A) -> states (H + 1, B, D), the first being `state`."""
        states = [state]
        for action in actions:
            states.append(self.step(states[-1], action))
        return torch.stack(states)

    def readout(self, states: torch.Tensor) -> torch.Tensor:
        """states: (..., D) -> quantities (..., Q), in the observation's own units."""
        return self.readout_head(states)

    @torch.no_grad()
    def readout_offset(self, percept: Percept) -> torch.Tensor:
        """(B, Q) to add to the readout of states imagined from percept.state: observation minus
        the readout of the current state with anchor_readout, else zeros."""
        state = percept.state
        if not self.config.anchor_readout or percept.observation is None:
            return state.new_zeros(state.shape[0], len(self.observation_names))
        return percept.observation - self.readout(state)

    def prediction_loss(self, state: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """state: (B, D), actions: (K, B, A), targets: (K, B, D) -> (predicted states (K + 1, B, D), the
        multi-step JEPA loss (scalar, step k weighted horizon_discount**k; every ensemble member's summed), the
        first member's MSE by step (K,))."""
        predicted = self.rollout(state, actions)
        by_horizon = (predicted[1:] - targets).pow(2).mean(dim=(1, 2))
        weights = self.config.horizon_discount ** torch.arange(actions.shape[0], device=state.device,
                                                              dtype=torch.float32)
        loss = (weights * by_horizon).sum() / weights.sum()
        if self.ensemble:
            # The other members learn the same rollouts from the same (detached) start: they shape no encoder.
            members = state.detach()[None].expand(len(self.ensemble), -1, -1)
            member_loss = 0.0
            for k, action in enumerate(actions):
                members = torch.stack([s + m(torch.cat([s, action], dim=-1)) for m, s in zip(self.ensemble, members,
                                                                                               strict=True)])
                member_loss = member_loss + weights[k] * (members - targets[k].detach()).pow(2).mean()
            loss = loss + member_loss / weights.sum()
        return predicted, loss, by_horizon

    def loss(self, perception: Perception | ImagePerception, obs: torch.Tensor, actions: torch.Tensor,
             vector: torch.Tensor | None = None) -> tuple[WorldModelLosses, torch.Tensor]:
        """obs: (K + 1, B, *obs_shape) contiguous, within one episode (vectors, or uint8 images); vector:
        (K + 1, B, Q) a dict observation's vector beside its image, else None; actions: (K, B, A). The named
        quantities the readout learns are the vector observation, or a dict observation's vector.
        -> (the losses, the online encodings (K + 1, B, D) detached: the critic's states)."""
        cfg = self.config
        flat_vector = None if vector is None else vector.flatten(0, 1)
        online = perception(obs.flatten(0, 1), flat_vector).view(*obs.shape[:2], -1)  # (K + 1, B, D)
        # With a stop-gradient target the online encodings are the targets: no second encoder pass.
        targets = online[1:].detach() if perception.config.target == "stopgrad" else \
            perception.target(obs[1:], None if vector is None else vector[1:])
        predicted, prediction, by_horizon = self.prediction_loss(online[0], actions, targets)
        zero = prediction.new_zeros(())
        readout = zero
        if self.observation_names:
            # Readout on the encoder's state and on every imagined one, scaled per quantity so that no
            # observation unit dominates.
            quantities = obs if vector is None else vector
            normalizer = perception.normalizer
            scale = torch.where(normalizer.count >= 2, normalizer.std, torch.ones_like(normalizer.std))
            readout = ((self.readout(predicted) - quantities) / scale).pow(2).mean()
        variance, covariance, std = variance_covariance(online.flatten(0, 1))
        inverse = smoothness = temporal = zero
        if cfg.inverse_dynamics_weight:
            pairs = torch.cat([online[:-1], online[1:]], dim=-1)  # (K, B, 2D)
            inverse = (torch.tanh(self.inverse_dynamics_head(pairs)) - actions).pow(2).mean()
        if cfg.temporal_variance_weight:
            # Variance across the batch can be met by what differs between episodes alone (a wall placed
            # at random) while what moves within one (the agent) is ignored: ask for change over time.
            temporal_std = (online.var(0) + 1e-4).sqrt().mean(-1)  # (B,)
            temporal = torch.relu(cfg.temporal_std_target - temporal_std).mean()
        if cfg.smoothness_weight:
            smoothness = (online[1:] - online[:-1]).pow(2).sum(-1).mean()
        total = (prediction + cfg.readout_weight * readout + cfg.variance_weight * variance
                 + cfg.covariance_weight * covariance + cfg.inverse_dynamics_weight * inverse
                 + cfg.smoothness_weight * smoothness + cfg.temporal_variance_weight * temporal)
        return WorldModelLosses(total, prediction.detach(), by_horizon.detach(), readout.detach(),
                                variance.detach(), covariance.detach(), inverse.detach(), smoothness.detach(),
                                temporal.detach(), std.detach()), online.detach()

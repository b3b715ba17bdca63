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
from torch.nn import functional

from ami.messages import Percept
from ami.schema import WorldModelConfig
from modules.nn import mlp
from modules.perception import ImagePerception, Perception


@dataclass(frozen=True)
class WorldModelLosses:
    """total: scalar to minimise. prediction_by_horizon: (K,) latent MSE at steps 1..K.
    latent_std: (D,) per-dimension std of the encoder's output over the batch. latent_variable: the z figures
    (information, usage, posterior_error, prior_sample_error, spread: scalars), empty without one."""

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
    latent_variable: dict[str, torch.Tensor]


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


class LatentVariable(nn.Module):
    """z[t]: what the past cannot predict about s[t+1]. A posterior q(z | s, a, s') reads it off a real transition
    in training; a prior p(z | s, a), trained toward the posterior, proposes it when imagining.

    kind "gaussian": z (..., Z) real, both distributions diagonal Gaussians (params: mean and raw std, (..., 2Z));
    "discrete": z (..., Z) one-hot over Z classes (params: logits, (..., Z)). Draws take their randomness as an
    argument (`noise`, from `noise_like`), so that a caller batching K samples per plan owns the stream.
    """

    min_std = 0.1  # a floor on every Gaussian's std: the KL stays finite and a draw never becomes a point mass
    prior_share = 0.8  # of the KL's gradient, the part that moves the prior toward the posterior (the rest
    # pulls the posterior toward the prior): the prior learns the world's spread faster than z is squeezed

    def __init__(self, latent_dim: int, action_dim: int, config: WorldModelConfig) -> None:
        super().__init__()
        self.kind, self.dim = config.z_kind, config.z_dim
        width = 2 * self.dim if self.kind == "gaussian" else self.dim
        self.prior_net = mlp(latent_dim + action_dim, config.hidden_dim, width)
        self.posterior_net = mlp(2 * latent_dim + action_dim, config.hidden_dim, width)

    def prior(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """state: (..., D), action: (..., A) -> the prior's params (..., P)."""
        return self.prior_net(torch.cat([state, action], dim=-1))

    def posterior(self, state: torch.Tensor, action: torch.Tensor, next_state: torch.Tensor) -> torch.Tensor:
        """state, next_state: (..., D), action: (..., A) -> the posterior's params (..., P)."""
        return self.posterior_net(torch.cat([state, action, next_state], dim=-1))

    def _gaussian(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_std = params.chunk(2, dim=-1)
        return mean, functional.softplus(raw_std) + self.min_std

    def noise_like(self, params: torch.Tensor) -> torch.Tensor:
        """Fresh randomness for one draw per row of params (..., P) -> (..., Z): standard normal for a Gaussian,
        uniform in (0, 1) for a discrete z (turned into Gumbel noise by `sample`)."""
        shape = (*params.shape[:-1], self.dim)
        if self.kind == "gaussian":
            return torch.randn(shape, device=params.device, dtype=params.dtype)
        return torch.rand(shape, device=params.device, dtype=params.dtype).clamp(1e-6, 1 - 1e-6)

    def sample(self, params: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """params: (..., P), noise: (..., Z) or None -> z: (..., Z). None gives the likeliest z (the Gaussian's mean,
        the likeliest class); noise gives a draw, differentiable in params (reparameterised; for a discrete z the
        Gumbel-max class, its gradient through the softmax: straight-through)."""
        if self.kind == "gaussian":
            mean, std = self._gaussian(params)
            return mean if noise is None else mean + std * noise
        scores = params if noise is None else params - torch.log(-torch.log(noise))
        hard = functional.one_hot(scores.argmax(-1), self.dim).to(params.dtype)
        soft = params.softmax(-1)
        return hard + soft - soft.detach()

    def _kl_terms(self, posterior: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """KL(posterior || prior) by z dimension (Gaussian) or by class (discrete): (..., Z) summing to the KL."""
        if self.kind == "gaussian":
            mean_q, std_q = self._gaussian(posterior)
            mean_p, std_p = self._gaussian(prior)
            ratio = (std_q / std_p).pow(2)
            return 0.5 * (ratio + ((mean_q - mean_p) / std_p).pow(2) - 1 - ratio.log())
        log_q, log_p = posterior.log_softmax(-1), prior.log_softmax(-1)
        return log_q.exp() * (log_q - log_p)

    def kl(self, posterior: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """KL(posterior || prior) in nats, params (..., P) each -> (...,): the information z carries per step."""
        return self._kl_terms(posterior, prior).sum(-1)

    def kl_loss(self, posterior: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The KL as a loss (same value), its gradient split prior_share : 1 - prior_share between the prior and
        the posterior."""
        return (self.prior_share * self.kl(posterior.detach(), prior)
                + (1 - self.prior_share) * self.kl(posterior, prior.detach()))

    def usage(self, posterior: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The share of z in use, in [0, 1], params (..., P) each: a discrete z's classes by the perplexity of the
        batch's mean posterior (1: all used evenly); a Gaussian's dimensions carrying over 0.01 nats on average."""
        if self.kind == "discrete":
            mean = posterior.softmax(-1).flatten(0, -2).mean(0)
            return (-(mean * mean.clamp_min(1e-12).log()).sum()).exp() / self.dim
        per_dim = self._kl_terms(posterior, prior).flatten(0, -2).mean(0)  # (Z,)
        return (per_dim > 0.01).float().mean()


class WorldModel(nn.Module):
    """s[t+1] = s[t] + predictor(s[t], a[t] [, z[t]]); readout(s) -> named observation quantities.

    latent_dim D, action_dim A, readout_dim Q (the length of observation_names), z_dim Z (0: no latent variable,
    and the model is exactly the deterministic one). Imagining (step, rollout, step_members) takes z from the
    prior: its likeliest value, or a draw per row where noise ((..., Z), latent_variable.noise_like) is given.
    """

    def __init__(self, latent_dim: int, action_dim: int, observation_names: list[str],
                 config: WorldModelConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_dim = latent_dim
        self.action_dim = action_dim
        self.observation_names = list(observation_names)
        inputs = latent_dim + action_dim + config.z_dim
        self.predictor = mlp(inputs, config.hidden_dim, latent_dim)
        # More predictors of the same step, differently initialised, trained on the same data: where they
        # disagree the model does not know, and the shield checks the worst of them. The planner uses the first.
        self.ensemble = nn.ModuleList(mlp(inputs, config.hidden_dim, latent_dim)
                                      for _ in range(config.ensemble_size - 1))
        with warnings.catch_warnings():  # an image observation names no quantities: an empty head, on purpose
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.readout_head = mlp(latent_dim, config.hidden_dim, len(self.observation_names))
        self.inverse_dynamics_head = mlp(2 * latent_dim, config.hidden_dim, action_dim, layers=1)
        # Made last, so that without it every other part is initialised from the same random stream as before.
        self.latent_variable = LatentVariable(latent_dim, action_dim, config) if config.z_dim else None

    @staticmethod
    def _advance(member: nn.Module, state: torch.Tensor, action: torch.Tensor, z: torch.Tensor | None
                 ) -> torch.Tensor:
        """One predictor's step: state (..., D) + member([state, action (..., A), z (..., Z) if any])."""
        inputs = [state, action] if z is None else [state, action, z]
        return state + member(torch.cat(inputs, dim=-1))

    def _z(self, state: torch.Tensor, action: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor | None:
        """The predictor's extra input: z from the prior at (state, action), or None without a latent variable."""
        if self.latent_variable is None:
            return None
        return self.latent_variable.sample(self.latent_variable.prior(state, action), noise)

    def step(self, state: torch.Tensor, action: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """state: (B, D), action: (B, A) in [-1, 1], noise: (B, Z) or None -> next state (B, D)."""
        return self._advance(self.predictor, state, action, self._z(state, action, noise))

    @property
    def ensemble_size(self) -> int:
        return 1 + len(self.ensemble)

    def predictor_parameters(self) -> list[nn.Parameter]:
        """Every member's parameters, and the latent variable's: what a predictor-only update trains."""
        latent = [] if self.latent_variable is None else list(self.latent_variable.parameters())
        return [*self.predictor.parameters(), *self.ensemble.parameters(), *latent]

    def step_members(self, states: torch.Tensor, action: torch.Tensor, noise: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """states: (E, B, D) one state per member, action: (B, A), noise: (E, B, Z) or None -> (E, B, D), member e
        stepping states[e] (with z from the prior at its own state)."""
        members = [self.predictor, *self.ensemble]
        z = self._z(states, action.expand(len(members), *action.shape), noise)
        return torch.stack([self._advance(member, state, action, None if z is None else z[e])
                            for e, (member, state) in enumerate(zip(members, states, strict=True))])

    def rollout(self, state: torch.Tensor, actions: torch.Tensor, noise: torch.Tensor | None = None
                ) -> torch.Tensor:
        """state: (B, D), actions: (H, B, A), noise: (H, B, Z) or None -> states (H + 1, B, D), the first being
        `state`."""
        states = [state]
        for k, action in enumerate(actions):
            states.append(self.step(states[-1], action, None if noise is None else noise[k]))
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

    def _posterior_rollout(self, state: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The rollout of training: each step's z read off the real transition it predicts.
        -> (predicted (K + 1, B, D), z (K, B, Z), the KL loss (scalar), the z figures)."""
        latent = self.latent_variable
        real = torch.cat([state[None], targets]).detach()  # z shapes no encoder
        posterior = latent.posterior(real[:-1], actions, real[1:])  # (K, B, P)
        z = latent.sample(posterior, latent.noise_like(posterior))
        states = [state]
        for k, action in enumerate(actions):
            states.append(self._advance(self.predictor, states[-1], action, z[k]))
        predicted = torch.stack(states)
        prior = latent.prior(predicted[:-1].detach(), actions)  # the prior is asked where planning asks it
        information = latent.kl(posterior, prior)  # (K, B)
        with torch.no_grad():  # how much the first step leans on z, and how far apart the prior's futures lie
            priors = prior[0].expand(8, *prior[0].shape)
            draws = latent.sample(priors, latent.noise_like(priors))
            futures = self._advance(self.predictor, state.expand(8, -1, -1), actions[0].expand(8, -1, -1), draws)
            figures = {"information": information.mean(),
                       "usage": latent.usage(posterior, prior),
                       "posterior_error": (predicted[1] - targets[0]).pow(2).mean(),
                       "prior_sample_error": (futures[0] - targets[0]).pow(2).mean(),
                       "spread": futures.std(0).mean()}
        return predicted, z, latent.kl_loss(posterior, prior).mean(), figures

    def prediction_loss(self, state: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """state: (B, D), actions: (K, B, A), targets: (K, B, D) -> (predicted states (K + 1, B, D), the
        multi-step JEPA loss (scalar, step k weighted horizon_discount**k; every ensemble member's summed; with a
        latent variable, plus z_weight times its KL per latent dimension), the first member's MSE by step (K,), the
        z figures (empty without a latent variable))."""
        z, z_loss, figures = None, None, {}
        if self.latent_variable is None:
            predicted = self.rollout(state, actions)
        else:
            predicted, z, z_loss, figures = self._posterior_rollout(state, actions, targets)
        by_horizon = (predicted[1:] - targets).pow(2).mean(dim=(1, 2))
        weights = self.config.horizon_discount ** torch.arange(actions.shape[0], device=state.device,
                                                              dtype=torch.float32)
        loss = (weights * by_horizon).sum() / weights.sum()
        if self.ensemble:
            # The other members learn the same rollouts from the same (detached) start: they shape no encoder.
            members = state.detach()[None].expand(len(self.ensemble), -1, -1)
            member_loss = 0.0
            for k, action in enumerate(actions):
                members = torch.stack([self._advance(m, s, action, None if z is None else z[k].detach())
                                       for m, s in zip(self.ensemble, members, strict=True)])
                member_loss = member_loss + weights[k] * (members - targets[k].detach()).pow(2).mean()
            loss = loss + member_loss / weights.sum()
        if z_loss is not None:
            # Per latent dimension, as the squared error is: the same weight means the same trade of nats for
            # error whatever D is (the ELBO of a Gaussian predictor of variance z_weight / 2).
            loss = loss + self.config.z_weight * z_loss / self.latent_dim
        return predicted, loss, by_horizon, figures
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
        predicted, prediction, by_horizon, latent_figures = self.prediction_loss(online[0], actions, targets)
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
                                temporal.detach(), std.detach(), latent_figures), online.detach()

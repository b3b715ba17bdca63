"""Perception: observation -> latent state, with the target encoder the JEPA loss predicts."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ami.config import PerceptionConfig


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Linear-LayerNorm-SiLU blocks, then a linear output. LayerNorm keeps planning gradients tame."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU()]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*blocks)


class RunningNorm(nn.Module):
    """Per-dimension running mean and variance (parallel Welford), applied as (x - mean) / std.

    The statistics are buffers: saved in checkpoints, never trained.
    """

    def __init__(self, dim: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """x: (B, dim)."""
        x = x.detach().to(self.mean.device, torch.float64).reshape(-1, self.mean.shape[0])
        n = x.shape[0]
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count.copy_(total)

    @property
    def std(self) -> torch.Tensor:
        var = self.m2 / self.count.clamp(min=1.0)
        return (var + self.eps).sqrt().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Clamped even before statistics exist: one wild observation must not overflow the encoder.
        x = torch.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)
        if self.count >= 2:
            x = (x - self.mean.float()) / self.std
        return x.clamp(-10.0, 10.0)


class Perception(nn.Module):
    """Encodes vector observations into latent states.

    obs: (B, obs_dim) -> state: (B, D). The target encoder (EMA of the online encoder, or the online
    encoder detached) supplies the embeddings the world model learns to predict.
    """

    def __init__(self, obs_dim: int, config: PerceptionConfig) -> None:
        super().__init__()
        self.config = config
        self.obs_dim = obs_dim
        self.latent_dim = config.latent_dim
        self.normalizer = RunningNorm(obs_dim)
        self.encoder = mlp(obs_dim, config.hidden_dim, config.latent_dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalizer(obs))

    @torch.no_grad()
    def target(self, obs: torch.Tensor) -> torch.Tensor:
        """obs: (..., obs_dim) -> (..., D), no gradient."""
        encoder = self.target_encoder if self.config.target == "ema" else self.encoder
        return encoder(self.normalizer(obs))

    @torch.no_grad()
    def update_target(self) -> None:
        if self.config.target != "ema":
            return
        tau = self.config.target_tau
        for target, online in zip(self.target_encoder.parameters(), self.encoder.parameters(), strict=True):
            target.lerp_(online, tau)

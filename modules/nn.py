"""Pieces every box shares: the MLP, Polyak averaging, Adam on a tensor, and the count of silent repairs."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> nn.Sequential:
    """Linear-LayerNorm-SiLU blocks, then a linear output. LayerNorm keeps planning gradients tame."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU()]
        dim = hidden_dim
    blocks.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*blocks)


@torch.no_grad()
def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Polyak averaging: each target parameter moves a share tau of the way to its online twin."""
    for target_param, online_param in zip(target.parameters(), online.parameters(), strict=True):
        target_param.lerp_(online_param, tau)


class AdamSteps:
    """Adam written out, for a tensor optimised directly (a plan's actions): torch.optim.Adam's per-step
    bookkeeping costs more than this whole update on a tensor this small, and planning runs every env step."""

    def __init__(self, like: torch.Tensor, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.first, self.second = torch.zeros_like(like), torch.zeros_like(like)
        self.steps = 0

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        """grad: the tensor's gradient -> the bias-corrected step to subtract (times a learning rate)."""
        self.steps += 1
        self.first = self.beta1 * self.first + (1 - self.beta1) * grad
        self.second = self.beta2 * self.second + (1 - self.beta2) * grad.square()
        return (self.first / (1 - self.beta1**self.steps)) / (
            (self.second / (1 - self.beta2**self.steps)).sqrt() + self.eps)


class Repairs:
    """Counts of the places where a module quietly mends a value so that the agent keeps going (a NaN action sent
    as 0, a NaN gradient step skipped, a diverged plan dropped, an observation clipped): each is counted here and
    logged (charts/repairs/<name>), never hidden. Counts stay tensors on their device until read, so counting
    adds no synchronisation to the hot path."""

    def __init__(self) -> None:
        self._counts: dict[str, torch.Tensor | int] = {}

    def count(self, name: str, amount: torch.Tensor | int) -> None:
        """amount: a number, or a tensor of anything countable (a bool mask counts its True entries)."""
        if isinstance(amount, torch.Tensor):
            amount = amount.sum() if amount.dtype != torch.bool else amount.count_nonzero()
        self._counts[name] = self._counts.get(name, 0) + amount

    def take(self) -> dict[str, int]:
        """The counts since the last take, as ints, and start again from zero."""
        counts = {name: int(value) for name, value in self._counts.items()}
        self._counts.clear()
        return counts

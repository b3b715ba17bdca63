"""Latent-health figures: is the JEPA's latent alive, informative and predictable?

effective rank of the embedding covariance, a linear probe of true positions, the predictor's error by
horizon relative to assuming nothing moves, and pictures of imagined latents as their nearest real frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def effective_rank(latents: torch.Tensor, floor: float = 1e-2) -> float:
    """latents: (M, D) -> exp(entropy of the normalised singular values of the centred latents) (Roy and
    Vetterli, 2007), over the directions whose std exceeds `floor`: D for an isotropic cloud, 1 for a line,
    0 for a collapse (every direction's spread below the floor: the scale-free measure alone would read a
    tiny cloud of noise as full rank)."""
    centred = latents.double() - latents.double().mean(0)
    spread = torch.linalg.svdvals(centred) / max(latents.shape[0] - 1, 1) ** 0.5  # std along each direction
    spread = spread[spread > floor]
    if spread.numel() == 0:
        return 0.0
    p = spread / spread.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def linear_probe_error(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       ridge: float = 1e-3) -> float:
    """Ridge regression from latents (M, D) to targets (M, K), fitted on train, scored on test: the root
    mean squared error per target, in the targets' units (pixels for positions)."""
    mean_x, mean_y = train_x.mean(0), train_y.mean(0)
    scale = train_x.std(0).clamp(min=1e-6)
    x = ((train_x - mean_x) / scale).double()
    gram = x.T @ x + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(gram, x.T @ (train_y - mean_y).double())
    predicted = ((test_x - mean_x) / scale).double() @ weights + mean_y.double()
    return float((predicted - test_y.double()).pow(2).sum(-1).mean().sqrt())


def relative_prediction_error(predicted: torch.Tensor, targets: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """predicted, targets: (K, B, D), start: (B, D) the encoding they were predicted from -> (K,) the
    prediction's squared error over that of predicting no change (targets[k] = start): comparable across
    encoders whatever the scale of their latents. 1.0 is no better than assuming nothing moves."""
    still = (targets - start).pow(2).sum(-1).mean(-1)
    return (predicted - targets).pow(2).sum(-1).mean(-1) / still.clamp(min=1e-12)


@dataclass(frozen=True)
class HealthReport:
    """effective_rank of the encodings; probe_rmse in the position's units (pixels); latent_std: (D,);
    relative_error_by_horizon: (K,) (relative_prediction_error)."""

    effective_rank: float
    probe_rmse: float
    latent_std: torch.Tensor
    relative_error_by_horizon: torch.Tensor


@torch.no_grad()
def encode(perception: torch.nn.Module, frames: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """frames: (M, H, W, C) uint8 -> latents (M, D), encoded in chunks on the encoder's device."""
    device = next(perception.parameters()).device
    return torch.cat([perception(frames[i:i + batch].to(device)).cpu() for i in range(0, len(frames), batch)])


@torch.no_grad()
def health_report(perception: torch.nn.Module, world_model: torch.nn.Module, frames: torch.Tensor,
                  positions: torch.Tensor, sequences: tuple[torch.Tensor, torch.Tensor]) -> HealthReport:
    """frames: (M, H, W, C), positions: (M, 2) their true positions (3/4 fit the probe, 1/4 score it);
    sequences: (obs (K + 1, B, H, W, C), actions (K, B, A)) for the prediction error."""
    latents = encode(perception, frames)
    split = 3 * len(frames) // 4
    probe = linear_probe_error(latents[:split], positions[:split], latents[split:], positions[split:])
    obs, actions = sequences
    device = next(perception.parameters()).device
    encoded = encode(perception, obs.flatten(0, 1)).view(*obs.shape[:2], -1).to(device)
    predicted = world_model.rollout(encoded[0], actions.to(device))
    relative = relative_prediction_error(predicted[1:], encoded[1:], encoded[0]).cpu()
    return HealthReport(effective_rank(latents), probe, latents.std(0), relative)


def nearest_frames(imagined: torch.Tensor, bank_latents: torch.Tensor, bank_frames: torch.Tensor) -> torch.Tensor:
    """imagined: (T, D) latents -> (T, H, W, C) the bank's frames whose latents are nearest (Euclidean)."""
    distances = torch.cdist(imagined.cpu().float(), bank_latents.float())
    return bank_frames[distances.argmin(1)]


def side_by_side(real: list[np.ndarray], imagined: torch.Tensor, scale: int = 2) -> np.ndarray:
    """Two rows, real frames over imagined ones (nearest stored frames), as one (3, H', W') uint8 picture
    for TensorBoard's add_image; frames (H, W, C) with C of 1 or 3."""
    columns = min(len(real), imagined.shape[0])

    def rgb(frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        return np.repeat(frame, 3, axis=2) if frame.shape[2] == 1 else frame[:, :, :3]

    rows = []
    for frames in (real[:columns], [f.numpy() for f in imagined[:columns]]):
        tiles = [np.pad(rgb(f), ((1, 1), (1, 1), (0, 0)), constant_values=255) for f in frames]
        rows.append(np.concatenate(tiles, axis=1))
    picture = np.concatenate(rows, axis=0)
    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    return picture.transpose(2, 0, 1)

"""Perception: observation -> latent state, with the target encoder the JEPA loss predicts."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ami.schema import PerceptionConfig
from modules.nn import mlp, soft_update


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

    LIMIT = 10.0  # normalised entries are clipped to +-LIMIT

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)
        # A select, not a branch on the count: a compiled graph then reads the count instead of breaking on it.
        return torch.where(self.count >= 2, (x - self.mean.float()) / self.std, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Clamped even before statistics exist: one wild observation must not overflow the encoder.
        return self._normalised(x).clamp(-self.LIMIT, self.LIMIT)

    @torch.no_grad()
    def repaired(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, dim) -> (B, dim) True where forward changes the value it would otherwise use: a non-finite
        entry, or one clipped at +-LIMIT once normalised."""
        return ~torch.isfinite(x) | (self._normalised(x).abs() > self.LIMIT)


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

    def forward(self, obs: torch.Tensor, vector: None = None) -> torch.Tensor:
        """obs: (B, obs_dim) -> (B, D); a vector observation has no separate vector (the argument keeps one
        signature with ImagePerception)."""
        return self.encoder(self.normalizer(obs))

    @torch.no_grad()
    def target(self, obs: torch.Tensor, vector: None = None) -> torch.Tensor:
        """obs: (..., obs_dim) -> (..., D), no gradient."""
        encoder = self.target_encoder if self.config.target == "ema" else self.encoder
        return encoder(self.normalizer(obs))

    def update_target(self) -> None:
        if self.config.target != "ema":
            return
        soft_update(self.target_encoder, self.encoder, self.config.target_tau)


class SpatialSoftmax(nn.Module):
    """features: (B, C, H, W) -> (B, 2K): for each of K keypoint maps (a 1x1 convolution of the features), the
    expected (x, y) in [-1, 1] under the softmax of the map over its pixels (Finn et al., 2016): where
    something is, as numbers that move linearly with it."""

    def __init__(self, channels: int, keypoints: int, height: int, width: int) -> None:
        super().__init__()
        self.maps = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], dim=-1), persistent=False)  # (HW, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.maps(features).flatten(2) / self.log_temperature.exp()  # (B, K, HW)
        return (logits.softmax(-1) @ self.grid).flatten(1)  # (B, K * 2)


class ConvEncoder(nn.Module):
    """image: (B, H, W, C) uint8 (or float in [0, 255]), vector: (B, V) normalised -> (B, D).

    conv_layers stride-2 4x4 convolutions (GroupNorm, SiLU), on the image plus two coordinate channels so
    that where something is stays as easy to read out as what it is; with keypoints > 0, a spatial softmax
    on the second layer's map adds keypoint coordinates. Then an MLP over the flattened final map, the
    keypoints and the vector.
    """

    def __init__(self, image_shape: tuple[int, int, int], vector_dim: int, config: PerceptionConfig) -> None:
        super().__init__()
        height, width, channels = image_shape
        reduction = 2**config.conv_layers
        if height % reduction or width % reduction:
            raise ValueError(f"perception.conv_layers={config.conv_layers}: an image of {height}x{width} is "
                             f"not divisible by 2**{config.conv_layers}; expected fewer layers or another size")
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("coordinates", torch.stack([xs, ys])[None], persistent=False)  # (1, 2, H, W)
        layers: list[nn.Module] = []
        in_channels = channels + 2
        for _ in range(config.conv_layers):
            layers.append(nn.Sequential(nn.Conv2d(in_channels, config.conv_channels, 4, stride=2, padding=1),
                                        nn.GroupNorm(1, config.conv_channels), nn.SiLU()))
            in_channels = config.conv_channels
        split = min(2, config.conv_layers)
        self.early, self.late = nn.Sequential(*layers[:split]), nn.Sequential(*layers[split:], nn.Flatten())
        self.keypoints = SpatialSoftmax(config.conv_channels, config.keypoints, height // 2**split,
                                        width // 2**split) if config.keypoints else None
        if config.keypoints_only and not config.keypoints:
            raise ValueError("perception.keypoints_only=true needs perception.keypoints > 0")
        self.keypoints_only = config.keypoints_only
        flat = 0 if self.keypoints_only else config.conv_channels * (height // reduction) * (width // reduction)
        self.head = mlp(flat + 2 * config.keypoints + vector_dim, config.hidden_dim, config.latent_dim, layers=1)

    def first_layer(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, H, W, C) -> the first layer (convolution, norm, activation) on [image / 255, coordinates],
        (B, C', H/2, W/2).

        The convolution is linear, so it is split: the image's channels at weight / 255, plus the coordinate
        channels' part, one (1, C', H/2, W/2) map shared by every image. No (B, C + 2, H, W) input is built,
        and the image stays in its (channels-last) layout, which the convolution and the add read fastest."""
        conv, norm, activation = self.early[0]
        x = image.permute(0, 3, 1, 2).float()
        channels = x.shape[1]
        out = nn.functional.conv2d(x, conv.weight[:, :channels] / 255.0, None, conv.stride, conv.padding)
        position = nn.functional.conv2d(self.coordinates, conv.weight[:, channels:], conv.bias, conv.stride,
                                        conv.padding)
        layout = torch.channels_last if out.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        return activation(norm(out + position.contiguous(memory_format=layout)))

    def forward(self, image: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        early = self.early[1:](self.first_layer(image))
        features = [] if self.keypoints_only else [self.late(early)]
        if self.keypoints is not None:
            features.append(self.keypoints(early))
        if vector is not None:
            features.append(vector)
        return self.head(torch.cat(features, dim=-1))


class ImagePerception(nn.Module):
    """Encodes image observations, optionally with a goal image and a vector (a dict observation).

    image: (B, H, W, C) uint8 -> state (B, D); the goal image goes through the same encoder, so that a goal
    is a latent state like any other. The vector, when there is one, is normalised like Perception's input
    and is the observation's named quantities.
    """

    def __init__(self, image_shape: tuple[int, int, int], vector_dim: int, has_goal: bool,
                 config: PerceptionConfig) -> None:
        super().__init__()
        self.config = config
        self.image_shape = tuple(image_shape)
        self.vector_dim = vector_dim
        self.has_goal = has_goal
        self.latent_dim = config.latent_dim
        self.normalizer = RunningNorm(vector_dim)
        self.encoder = ConvEncoder(self.image_shape, vector_dim, config)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)

    def _vector(self, vector: torch.Tensor | None) -> torch.Tensor | None:
        return None if vector is None or self.vector_dim == 0 else self.normalizer(vector)

    def forward(self, image: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        """image: (B, H, W, C) -> (B, D)."""
        return self.encoder(image, self._vector(vector))

    @torch.no_grad()
    def target(self, image: torch.Tensor, vector: torch.Tensor | None = None) -> torch.Tensor:
        """image: (..., H, W, C) -> (..., D), no gradient."""
        encoder = self.target_encoder if self.config.target == "ema" else self.encoder
        lead = image.shape[:-3]
        flat_vector = None if vector is None else vector.reshape(-1, vector.shape[-1])
        out = encoder(image.reshape(-1, *self.image_shape), self._vector(flat_vector))
        return out.view(*lead, -1)

    update_target = Perception.update_target

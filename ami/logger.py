"""TensorBoard logging with the tag namespaces of DESIGN.md; the x-axis is the global env step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams


class Logger:
    """purge_step: on resume, events at or after this step from the interrupted run are dropped,
    so the resumed curves continue the old ones without overlap."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        """None: nothing to log. A non-finite value is written as it is: a diverging loss must show."""
        if value is None:
            return
        self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        """Floats become scalars; a vector (per latent dimension, say) a histogram and its min and mean as scalars
        (a scalar per entry would bury the losses under pages of them)."""
        for tag, value in values.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                if tag.endswith("by_horizon"):
                    base = tag.removesuffix("_by_horizon")
                    for k, v in enumerate(value.tolist(), start=1):
                        self.scalar(f"{base}/h{k}", v, step)
                else:
                    finite = value[torch.isfinite(value)]
                    if finite.numel():  # TensorBoard's histogram code fails on non-finite values
                        self.writer.add_histogram(tag, finite, step)
                    self.scalar(f"{tag}_min", value.min().item(), step)
                    self.scalar(f"{tag}_mean", value.mean().item(), step)
            else:
                self.scalar(tag, None if value is None else float(value), step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """image: (H, W, 3) uint8."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def video(self, tag: str, gif: bytes, height: int, width: int, step: int) -> None:
        """An animated GIF (ami.figures.gif), written as add_video writes one, without its moviepy dependency."""
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """Hyperparameters in this run's own directory (add_hparams would make a sub-run)."""
        experiment, session_start, session_end = hparams(params, metrics)
        for summary in (experiment, session_start, session_end):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

"""Checkpoints: one versioned dict that resumes everything, written so that a crash never loses the last good one.

A run keeps two: checkpoints/latest.pt and the one before it, checkpoints/previous.pt. A new checkpoint is
written to a temporary file, flushed to disk and read back before it becomes latest.pt (and the old latest.pt
becomes previous.pt). Reading loads tensors only (weights_only=True); a truncated or corrupt file is named in
one line, and resuming falls back to the previous checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 2
LATEST, PREVIOUS = "latest.pt", "previous.pt"


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be read, or the one read cannot resume this configuration."""


def checkpoint_paths(run_dir: str | Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    return [folder / LATEST, folder / PREVIOUS]


def _read(path: Path, device: torch.device | str, mmap: bool = False) -> dict[str, Any]:
    """One checkpoint file -> its dict; CheckpointError naming the file when it cannot be read."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises RuntimeError, EOFError, pickle errors... for a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {reason[:160]})") from error
    if not isinstance(state, dict) or state.get("version") != SCHEMA_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise CheckpointError(f"{path}: checkpoint schema version {version}; this ami reads version "
                              f"{SCHEMA_VERSION} (retrain, or use the ami that wrote it)")
    return state


def save_checkpoint(state: dict[str, Any], run_dir: str | Path) -> Path:
    """Write state as the run's latest checkpoint; the one it replaces becomes the previous one. The new file is
    read back before anything is renamed: a crash at any point leaves at least one good checkpoint."""
    latest, previous = checkpoint_paths(run_dir)
    latest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=latest.parent, prefix=".checkpoint.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**state, "version": SCHEMA_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        _read(tmp, "cpu", mmap=True)
        if latest.exists():
            os.replace(latest, previous)
        os.replace(tmp, latest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return latest


def load_checkpoint(run_dir: str | Path, device: torch.device | str = "cpu",
                    warn: Any = print) -> tuple[dict[str, Any], Path]:
    """The run's newest readable checkpoint -> (its dict, its path). A damaged latest.pt is reported through
    warn (one line) and the previous checkpoint read instead; CheckpointError when there is none to read."""
    paths = [path for path in checkpoint_paths(run_dir) if path.is_file()]
    if not paths:
        raise CheckpointError(f"{run_dir}: no checkpoints/{LATEST}; is this an ami run directory?")
    errors = []
    for path in paths:
        try:
            state = _read(path, device, mmap=True)
        except CheckpointError as error:
            errors.append(str(error))
            continue
        if errors:
            warn(f"ami: {errors[0]}; using {path} instead")
        return state, path
    raise CheckpointError("; ".join(errors))


def check_guardrails(state: dict[str, Any], guardrails: list[tuple], shield: tuple, path: Path) -> None:
    """Raise GuardrailError unless the checkpoint's guardrail terms and shield are this configuration's: no
    checkpoint can change what the agent must never do."""
    from modules.cost import GuardrailError

    saved = [tuple(term) for term in state["guardrails"]]
    if saved != guardrails:
        raise GuardrailError(f"{path}: its guardrails {saved} differ from this configuration's {guardrails}; "
                             "guardrails cannot be changed by loading a checkpoint")
    if tuple(state["shield"]) != shield:
        raise GuardrailError(f"{path}: its shield {tuple(state['shield'])} differs from this configuration's "
                             f"{shield}; the shield cannot be changed by loading a checkpoint")

"""Checkpoints: written atomically (temp file, fsync, rename) so a crash never leaves a torn file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from segscale.errors import SegscaleError


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("epoch_*.pt"))
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` epoch checkpoints."""
    for old in sorted((run_dir / "checkpoints").glob("epoch_*.pt"))[:-keep]:
        old.unlink()


def load_checkpoint(path: Path, config_digest: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a torn or foreign file
        raise SegscaleError(f"{path}: cannot read checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise SegscaleError(f"{path}: not a segscale checkpoint")
    if state.get("config_digest") != config_digest:
        raise SegscaleError(
            f"{path}: written by a different configuration ({state.get('config_digest')} ≠ {config_digest}); "
            "resume only with the config the run started with"
        )
    return state

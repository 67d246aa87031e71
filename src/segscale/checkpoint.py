"""Checkpoints that survive crashes: atomic writes, checksums, and a fallback to the last valid one.

Each checkpoint is `checkpoints/step_NNNNNNNN.pt` plus a `.sha256` sidecar. A write goes to a temp
file in the same folder, is fsynced and renamed into place, and only then gets its sidecar, so a
crash at any moment leaves either a complete, verifiable checkpoint or none. On load the newest
checkpoint whose checksum verifies wins; a torn or corrupt one is skipped with a warning.
The newest `keep` checkpoints are kept, plus `best.pt` (the best validation Dice so far).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from segscale._files import file_sha256, write_atomic
from segscale.errors import SegscaleError


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to `path` atomically (temp file, fsync, rename), then its checksum sidecar.
    Disk full or a read-only folder raise a SegscaleError and leave earlier files untouched."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: torch.save(obj, f))
        write_atomic(path.with_name(path.name + ".sha256"), file_sha256(path))
    except OSError as e:
        raise SegscaleError(
            f"cannot write {path}: {e.strerror or e}; the checkpoints written before are intact"
        ) from e


def write_checkpoint(run_dir: Path, state: dict[str, Any], keep: int, best: bool) -> Path:
    """Write a Trainer's state (Trainer.state_dict plus every rank's state) as the checkpoint of
    its step, and as best.pt when `best`; keep the newest `keep`; returns its path. best.pt is
    written first: a step checkpoint never records a best metric that best.pt does not hold
    (a disk that filled in between left a resumed run with a stale best.pt)."""
    path = checkpoint_path(run_dir, state["step"])
    if best:
        atomic_save(state, run_dir / "checkpoints" / "best.pt")
        copy_checkpoint(run_dir / "checkpoints" / "best.pt", path)
    else:
        atomic_save(state, path)
    prune_checkpoints(run_dir, keep)
    return path


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    return sorted((run_dir / "checkpoints").glob("step_*.pt"))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (best.pt is separate and stays)."""
    for old in list_checkpoints(run_dir)[:-keep]:
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        old.unlink()


def copy_checkpoint(source: Path, target: Path) -> None:
    """A verified checkpoint's copy with its sidecar, atomically; disk full or a read-only
    folder raise a SegscaleError, as atomic_save does."""
    try:
        write_atomic(target, source.read_bytes())
        write_atomic(
            target.with_name(target.name + ".sha256"),
            source.with_name(source.name + ".sha256").read_bytes(),
        )
    except OSError as e:
        raise SegscaleError(
            f"cannot write {target}: {e.strerror or e}; the checkpoints written before are intact"
        ) from e


def verify(path: Path) -> str | None:
    """None when the checkpoint's checksum verifies, else why not."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return "no checksum file (the write did not finish)"
    if file_sha256(path) != sidecar.read_text().strip():
        return "checksum mismatch (truncated or corrupt)"
    return None


def load_checkpoint(path: Path, config_digest: str | tuple[str, ...]) -> dict[str, Any]:
    """The checkpoint at `path`, verified, whose config_digest is `config_digest` (or one of
    them). Raises SegscaleError for a damaged file or another configuration's checkpoint."""
    accepted = (config_digest,) if isinstance(config_digest, str) else config_digest
    problem = verify(path)
    if problem:
        raise SegscaleError(f"{path}: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a foreign or damaged file
        raise SegscaleError(f"{path}: cannot read checkpoint: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise SegscaleError(f"{path}: not a segscale checkpoint")
    if state.get("config_digest") not in accepted:
        raise SegscaleError(
            f"{path}: written by a different configuration or model ({state.get('config_digest')} ≠ "
            f"{accepted[0]}); resume only with the config the run started with"
        )
    return state


def load_latest(run_dir: Path, config_digest: str | tuple[str, ...]) -> dict[str, Any] | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning. A checkpoint
    of another configuration is an error, not something to skip."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem:
            # set aside: pruning counts valid checkpoints only (it kept this one and deleted a
            # good one), and the next resume does not trip over it again
            aside = path.with_name(path.name + ".damaged")
            with contextlib.suppress(OSError):
                path.rename(aside)
                path.with_name(path.name + ".sha256").unlink(missing_ok=True)
            warnings.warn(f"skipping {path} ({problem}; kept as {aside.name})", stacklevel=2)
            continue
        return load_checkpoint(path, config_digest)
    return None


def check_world_size(run_dir: Path, epoch_step: int, saved: int, now: int, hint: str = "") -> None:
    """Raise SegscaleError when a mid-epoch checkpoint (epoch_step > 0) of `saved` workers would
    resume on `now`: each rank's states go back to the same rank, so the number must match."""
    if epoch_step and saved != now:
        raise SegscaleError(
            f"{run_dir}: the newest checkpoint is mid-epoch from {saved} worker(s); exact resume "
            f"needs the same number (got {now}){hint}"
        )


def resume_point(run_dir: Path) -> tuple[int, int] | None:
    """(epoch_step, world_size) of the checkpoint a resume would start from (the newest that
    verifies), read memory-mapped (its tensors are not loaded); None when there is none or it
    cannot be read here (the workers then say why). For checks before a launch."""
    for path in reversed(list_checkpoints(run_dir)):
        if verify(path):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return int(state["epoch_step"]), int(state["world_size"])
        except Exception:  # an older format, a damaged file: left to the workers
            return None
    return None

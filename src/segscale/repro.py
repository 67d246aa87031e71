"""Determinism and the environment record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


def derive_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """The one seed formula for per-epoch randomness: the data order (by epoch, the same on
    every rank), augmentation and the global torch RNG for dropout (by epoch and rank). Mixing
    with two primes keeps (seed, epoch, rank) triples apart for any realistic run length.
    Returns a seed in [0, 2^63)."""
    # modulo 2^63: any seed the config takes (up to SEED_MAX) gives one torch's generators take;
    # a smaller seed's values are as they were
    epoch_seed = (seed * 1_000_003 + epoch) % 2**63
    return epoch_seed if rank is None else (epoch_seed * 7919 + rank) % 2**63


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; with `deterministic`, ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls (set before CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        deterministic_kernels()
        torch.backends.cudnn.benchmark = False


def deterministic_kernels() -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True) without its import of the compiler
    in every worker: the public function also sets torch._inductor.config.deterministic, and importing that config imports
    torch._inductor and torch._dynamo. Unless a compiler is already loaded (train.compile, or a
    plug-in that compiles at import) it sets only the eager flag, through the same C++
    switch the public function calls. A model compiled later, inside its constructor, keeps
    inductor's default autotuning."""
    if "torch._inductor" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new uninitialised tensor with NaN, a debugging aid that
    # catches kernels reading memory they never wrote; it does not change what correct kernels
    # compute, and costs a share of every CPU step (docs/performance.md). The bit-identity
    # tests (resume, fork vs spawn, the demo) guard the results instead.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]


def environment() -> dict[str, Any]:
    """What ran the job: software versions, hardware (CPU model; GPU model, memory, driver; CUDA,
    cuDNN and NCCL versions), the installed packages' digest, and the git commit of the working
    directory the job started from (with a dirty flag), when it is a git repository."""
    import segscale

    env: dict[str, Any] = {
        "segscale": segscale.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        env["gpus"] = [p.name for p in props]
        env["gpu_memory_gb"] = [round(p.total_memory / 2**30, 1) for p in props]
        env["cudnn"] = torch.backends.cudnn.version()
        nccl = torch.cuda.nccl.version() if hasattr(torch.cuda, "nccl") else None
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        env["gpu_driver"] = _nvidia_driver()
    env["packages_sha256"] = hashlib.sha256("\n".join(packages()).encode()).hexdigest()
    env["git"] = git_state(Path.cwd())
    return env


def packages() -> list[str]:
    """Every installed distribution as 'name==version', sorted (the environment's fingerprint)."""
    from importlib import metadata

    found = {
        f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]
    }
    return sorted(found, key=str.lower)


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what platform says)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_state(folder: Path) -> dict[str, Any] | None:
    """{'commit', 'dirty'} of the git repository holding `folder`, or None (not one, or no git)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _nvidia_driver() -> str | None:
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:
        return None


def determinism(
    deterministic: bool, device: str, strategy: str, nondeterministic: list[str] | None = None
) -> dict[str, Any]:
    """Whether this run can be repeated bit for bit, and why not when it cannot. `nondeterministic`:
    the ops of a training step found without a deterministic kernel on this device
    (nondeterministic_ops), or None when no step was probed."""
    why = []
    if not deterministic:
        why.append(
            "train.deterministic is false (cuDNN autotuning and non-deterministic kernels allowed)"
        )
    if device == "cuda" and deterministic:
        if nondeterministic is None:
            why.append(
                "on CUDA, deterministic kernels are requested (warn-only): an op without one "
                "warns at its first call and stays non-deterministic (docs/reproducibility.md)"
            )
        elif nondeterministic:
            why.append(
                "these CUDA ops of a training step have no deterministic kernel: "
                + ", ".join(nondeterministic)
            )
    out = {"requested": deterministic, "bit_identical": not why, "why_not": why}
    if nondeterministic is not None:
        out["nondeterministic_ops"] = nondeterministic
    return out


_ALERT = re.compile(r"^(\S+) does not have a deterministic implementation")


def nondeterministic_ops(step: Any) -> list[str]:
    """The ops that raise torch's deterministic-algorithms alert while `step()` runs (warn-only
    mode, as segscale sets it): their names as torch gives them, e.g.
    'upsample_bilinear2d_backward_out_cuda', sorted, each once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    found = {m.group(1) for w in caught if (m := _ALERT.search(str(w.message)))}
    return sorted(found)


# what a resumed run may change, kept from its earlier attempts (environment.json's "earlier")
RESUMABLE = (
    "workers",
    "global_batch",
    "peak_lr",
    "steps_per_epoch",
    "simulated",
    "gpus",
    "cpu_model",
    # the speed settings (config.SPEED_SETTINGS), each as this attempt ran it
    "config_digest",
    "plugins",  # a plug-in's file edited between attempts: its sha256 changes
    "channels_last",
    "compile",
    "data_on_device",
    "loader_workers",
    "torch_threads",
)


def earlier_records(path: Path, record: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """The settings of a resumed run's earlier attempts, oldest first, read from its
    environment.json (`path`): the last attempt's RESUMABLE settings are added when they differ
    from `record`'s (say, resumed on other workers: another global batch and peak lr). [] for a
    new run or an unreadable record."""
    if not resume:
        return []
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return []
    earlier = [e for e in old.get("earlier", []) if isinstance(e, dict)]
    last = {k: old.get(k) for k in RESUMABLE}
    return earlier + ([last] if last != {k: record.get(k) for k in RESUMABLE} else [])

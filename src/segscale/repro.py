"""Determinism and the environment record."""

from __future__ import annotations

import os
import platform
import random
import socket
import sys
from typing import Any

import numpy as np
import torch


def derive_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """The one seed formula for per-epoch randomness: the data order (by epoch, the same on
    every rank), augmentation and the global torch RNG for dropout (by epoch and rank). Mixing
    with two primes keeps (seed, epoch, rank) triples apart for any realistic run length."""
    epoch_seed = seed * 1_000_003 + epoch
    return epoch_seed if rank is None else epoch_seed * 7919 + rank


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
    torch._inductor and torch._dynamo. segscale compiles nothing, so unless a compiler is already
    loaded (a plug-in that compiles at import) it sets only the eager flag, through the same C++
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
    """What ran the job: software versions, hardware, and the distributed layout."""
    import segscale

    env: dict[str, Any] = {
        "segscale": segscale.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env

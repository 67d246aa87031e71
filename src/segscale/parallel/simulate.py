"""Simulated scale: the math of K synchronous workers in one process.

Each step runs K micro-batches (virtual rank r's batch under the same DistributedSampler sharding
and the same augmentation seeds as real rank r), accumulates the gradients divided by K, and steps
once: the averaged gradient of a K-worker all-reduce. BatchNorm normalises each micro-batch alone,
like per-GPU BN. What differs from a real run: float summation order (≈1e-6 relative), dropout
masks (one RNG stream instead of K), and BN running statistics (updated K times per step instead of
rank 0's once), which touch evaluation only. So the accuracy effects of scale can be studied, and
lr scaling rules tuned, on one machine.
"""

from __future__ import annotations

from segscale.errors import SegscaleError
from segscale.parallel.base import ProcessEnv


class SimulatedStrategy(ProcessEnv):
    def __init__(self, workers: int, device: str = "auto", threads: int | None = None) -> None:
        super().__init__(device, threads)
        if self.world_size > 1:
            raise SegscaleError("simulate_workers runs in one process: use it with --workers 1")
        self.virtual_workers = workers

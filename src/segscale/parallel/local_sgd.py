"""Local SGD: each worker steps on its own gradients, and the models are averaged (one all-reduce
of the parameters) every `period` steps: synchronous periodic averaging (thesis §2.2.2.1), with
torch's PeriodicModelAverager through PostLocalSGDOptimizer. period=1 with plain SGD (no momentum)
is the same math as gradient all-reduce; larger periods trade accuracy for less communication."""

from __future__ import annotations

import torch

from segscale.errors import SegscaleError
from segscale.parallel.base import ProcessEnv


class LocalSGDStrategy(ProcessEnv):
    # wrap() is ProcessEnv's: no DDP, gradients stay local; only the averager communicates.
    def __init__(
        self, device: str = "auto", threads: int | None = None, *, period: int = 4
    ) -> None:
        if period < 1:
            raise SegscaleError(f"local_sgd period {period}: expected at least 1")
        super().__init__(device, threads)
        self.period = period

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.world_size == 1:
            return optimizer
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        return PostLocalSGDOptimizer(
            optimizer, PeriodicModelAverager(period=self.period, warmup_steps=0)
        )

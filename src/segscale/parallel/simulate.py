"""Simulated scale: the math of K synchronous workers in one process.

Each step runs K micro-batches (virtual rank r's batch under the same DistributedSampler sharding
and the same augmentation seeds as real rank r), accumulates the gradients divided by K, and steps
once: the averaged gradient of a K-worker all-reduce. BatchNorm normalises each micro-batch alone,
like per-GPU BN. What differs from a real run: float summation order (≈1e-6 relative), dropout
masks (one RNG stream instead of K), and BN running statistics (updated K times per step instead of
rank 0's once), which touch evaluation only. So the accuracy effects of scale can be studied, and
lr scaling rules tuned, on one machine.

The exact path runs the K micro-batches one after the other. The fused path (`simulate_fused`)
runs them as one batch; `ghost_batchnorm` then keeps BatchNorm per micro-batch inside that pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from segscale.errors import SegscaleError
from segscale.parallel.base import ProcessEnv


class SimulatedStrategy(ProcessEnv):
    def __init__(self, workers: int, device: str = "auto", threads: int | None = None) -> None:
        super().__init__(device, threads)
        if self.world_size > 1:
            raise SegscaleError("simulate_workers runs in one process: use it with --workers 1")
        self.virtual_workers = workers


class _GhostBatchNorm:
    """Mixed into a BatchNorm class: in training, the batch is `ghost_groups` equal micro-batches
    one after the other, and each is normalised by the BatchNorm forward on its own (statistics,
    running-statistics update, num_batches_tracked), exactly as K separate passes would do it.
    In evaluation it is the BatchNorm it was. "Ghost batch normalisation": Hoffer et al., 2017."""

    ghost_groups: int
    training: bool  # the BatchNorm's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: Any = super()
        if not self.training or self.ghost_groups == 1:
            return bn.forward(x)
        if len(x) % self.ghost_groups:
            raise SegscaleError(
                f"ghost BatchNorm: a batch of {len(x)} does not split into "
                f"{self.ghost_groups} equal micro-batches"
            )
        return torch.cat([bn.forward(part) for part in x.chunk(self.ghost_groups)])


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    pass


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    pass


class GhostBatchNorm3d(_GhostBatchNorm, nn.BatchNorm3d):
    pass


# torch's BatchNorm classes map to the named classes above (so a whole model still pickles); a
# user's own BatchNorm subclass gets one made here
_GHOST_CLASSES: dict[type, type] = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
}


def ghost_batchnorm(model: nn.Module, groups: int) -> nn.Module:
    """Make every BatchNorm layer of `model` normalise each of `groups` micro-batches alone, in
    place. Each layer keeps its parameters, buffers and state_dict keys: only its class changes,
    to a subclass of its own (a subclass of the user's own BatchNorm subclass, if that is what it
    is), so checkpoints and model.pt load into the plain model."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, _GhostBatchNorm):
            cls = type(module)
            if cls not in _GHOST_CLASSES:
                _GHOST_CLASSES[cls] = type(f"Ghost{cls.__name__}", (_GhostBatchNorm, cls), {})
            module.__class__ = _GHOST_CLASSES[cls]
        if isinstance(module, _GhostBatchNorm):
            module.ghost_groups = groups
    return model

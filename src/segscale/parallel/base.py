"""The strategy protocol, and `allreduce`: synchronous data parallelism with DDP's ring all-reduce.

A strategy reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), sets up the process
group and the device, wraps the model, and reduces tensors. With WORLD_SIZE unset it is a plain
single process, so the same Trainer code runs alone or under torchrun.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from segscale.errors import SegscaleError
from segscale.registry import STRATEGIES


@runtime_checkable
class Strategy(Protocol):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module: ...
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def gather_objects(self, obj: object) -> list[object]: ...
    def barrier(self) -> None: ...
    def close(self) -> None: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


@STRATEGIES.register("allreduce")
class AllReduceStrategy:
    """DistributedDataParallel: gradients averaged by bucketed ring all-reduce during backward."""

    def __init__(
        self,
        device: str = "auto",
        bucket_cap_mb: float = 25.0,
        gradient_as_bucket_view: bool = True,
    ) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise SegscaleError("train.device is 'cuda' but no CUDA device is available")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
            # Workers on one machine share its cores: oversubscribed threads slow everyone down.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                "nccl" if use_cuda else "gloo", device_id=self.device if use_cuda else None
            )
        self.bucket_cap_mb = bucket_cap_mb
        self.gradient_as_bucket_view = gradient_as_bucket_view

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.bucket_cap_mb,
            gradient_as_bucket_view=self.gradient_as_bucket_view,
        )

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's obj, in rank order, on every rank (pickled; for small results)."""
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def create_strategy(name: str, device: str) -> Strategy:
    return STRATEGIES.resolve(name)(device=device)

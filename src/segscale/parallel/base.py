"""The strategy protocol and the process environment every strategy shares.

A strategy reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), sets up the process
group and the device, wraps the model (and, if it needs to, the optimiser), and reduces tensors.
With WORLD_SIZE unset it is a plain single process, so the same Trainer runs alone or under
torchrun. Each strategy registers its own name; users can name their own class as 'pkg.mod:Class'.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from segscale._memory import keep_freed_memory
from segscale.errors import SegscaleError
from segscale.registry import STRATEGIES

# DDP models are kept until the worker process ends (with os._exit: segscale.worker's exit_now, or
# multiprocessing's once a forked worker returns), never freed. Freeing one deallocates its C++
# Reducer with the GIL held; the Reducer releases its gloo process group, whose destructor joins
# gloo's threads, and one of them may be waiting for the GIL to free the tensors of the last
# collective: a deadlock (pytorch/pytorch#56297). It showed as a worker that hung after its last
# step until torchrun killed it, 30 s later.
_UNTIL_EXIT: list[nn.Module] = []


@runtime_checkable
class Strategy(Protocol):
    rank: int
    world_size: int  # processes
    local_rank: int
    device: torch.device
    virtual_workers: int  # workers whose math one step reproduces (world_size unless simulated)

    def wrap(self, model: nn.Module) -> nn.Module: ...
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer: ...
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def gather_objects(self, obj: object) -> list[object]: ...
    def barrier(self) -> None: ...
    def close(self) -> None: ...


def uses_cuda(device: str) -> bool:
    """Whether train.device resolves to CUDA ('auto': when torch sees a GPU)."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def resolve_amp(amp: str, device: torch.device) -> str:
    """An amp setting ('auto', 'none', 'bf16', 'fp16') for `device`: auto is bf16 on a GPU that
    supports it (fp32's range, no loss scaling) and none (fp32) elsewhere; the others as given."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


class ProcessEnv:
    """Rank, device and process group from the torchrun environment (the fixed part of a strategy)."""

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.virtual_workers = self.world_size
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        keep_freed_memory()
        use_cuda = uses_cuda(device)
        if use_cuda and not torch.cuda.is_available():
            raise SegscaleError("train.device is 'cuda' but no CUDA device is available")
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
            # Workers on one machine share its cores: oversubscribed threads slow everyone down.
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
        if self.world_size > 1 and not dist.is_initialized():
            self._init_process_group("nccl" if use_cuda else "gloo")

    def _init_process_group(self, backend: str) -> None:
        """init_process_group over torchrun's store, with keys prefixed by the restart attempt:
        after torchrun restarts failed workers, stale peer addresses of the dead attempt must not
        be read (seen with --standalone: gloo dialled a dead worker's port; torch issue #167288)."""
        from torch.distributed.rendezvous import rendezvous

        store, rank, world = next(rendezvous("env://", self.rank, self.world_size))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(f"segscale/attempt-{attempt}", store),
            rank=rank,
            world_size=world,
            device_id=self.device if self.device.type == "cuda" else None,
        )

    def wrap(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

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


COMPRESSION = ("none", "fp16", "bf16", "powersgd")


def check_compression(compression: str, device: str, world_size: int) -> None:
    """Refuse a gradient compression that cannot run: an unknown name, or bf16 between CPU
    workers (torch's bf16 hook casts with NCCL's bf16 support; gloo has none and every worker
    would fail with a TypeError at its first step). Raises SegscaleError."""
    if compression not in COMPRESSION:
        raise SegscaleError(
            f"allreduce compression '{compression}': expected one of {', '.join(COMPRESSION)}"
        )
    if compression == "bf16" and world_size > 1 and not uses_cuda(device):
        raise SegscaleError(
            "allreduce compression 'bf16' needs GPUs (torch's bf16 hook runs on NCCL only); "
            "on CPU use fp16 or powersgd"
        )


class AllReduceStrategy(ProcessEnv):
    """Synchronous data parallelism with DistributedDataParallel: gradients averaged by bucketed
    ring all-reduce during backward (the thesis' Horovod setup, on torch). `compression` installs a
    DDP communication hook: fp16/bf16 halve the bytes sent, PowerSGD sends a low-rank approximation."""

    def __init__(
        self,
        device: str = "auto",
        threads: int | None = None,
        *,
        bucket_cap_mb: float = 25.0,
        gradient_as_bucket_view: bool = True,
        static_graph: bool = False,
        compression: str = "none",
        powersgd_rank: int = 1,
        powersgd_start_iter: int = 10,
    ) -> None:
        # before the process group: a refused worker leaves no peer waiting
        check_compression(compression, device, int(os.environ.get("WORLD_SIZE", 1)))
        self._powersgd = (
            _powersgd_state(powersgd_rank, powersgd_start_iter)
            if compression == "powersgd"
            else None
        )
        super().__init__(device, threads)
        self.ddp_kwargs = {
            "bucket_cap_mb": bucket_cap_mb,
            "gradient_as_bucket_view": gradient_as_bucket_view,
            "static_graph": static_graph,
        }
        self.compression, self.powersgd_rank, self.powersgd_start_iter = (
            compression,
            powersgd_rank,
            powersgd_start_iter,
        )
        if self.world_size == 1 and compression != "none":
            warnings.warn(
                f"compression '{compression}' has no effect with one worker", stacklevel=2
            )

    def ddp(self, model: nn.Module) -> nn.Module:
        ddp = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            **self.ddp_kwargs,
        )
        _UNTIL_EXIT.append(ddp)
        return ddp

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        ddp = self.ddp(model)
        hook, state = self._comm_hook()
        if hook is not None:
            ddp.register_comm_hook(state, hook)
        return ddp

    def _comm_hook(self) -> tuple[Any, Any]:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        if self.compression == "fp16":
            return default_hooks.fp16_compress_hook, None
        if self.compression == "bf16":
            return default_hooks.bf16_compress_hook, None
        if self.compression == "powersgd":
            return powerSGD_hook.powerSGD_hook, self._powersgd
        return None, None


def _powersgd_state(rank: int, start_iter: int) -> Any:
    """torch's PowerSGD state for these kwargs, built (and so checked by torch) when the
    strategy is, which `plan` does before any worker starts. Raises SegscaleError for a rank
    under 1 or a start_iter that torch refuses (it must exceed 1: PowerSGD's error feedback and
    warm start begin after DDP's first two iterations)."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    if rank < 1:
        raise SegscaleError(f"allreduce powersgd_rank {rank}: expected 1 or more")
    try:
        return powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=start_iter
        )
    except ValueError as e:
        raise SegscaleError(f"allreduce powersgd_start_iter {start_iter}: {e}") from None


def create_strategy(
    name: str, device: str, kwargs: dict[str, Any] | None = None, threads: int | None = None
) -> Strategy:
    return STRATEGIES.resolve(name)(device=device, threads=threads, **(kwargs or {}))

"""Torch datasets and loaders over a prepared store.

Training loaders shard with DistributedSampler (set_epoch each epoch); evaluation loaders shard
exactly (rank::world, no padding duplicates), so summed confusion counts are exact. Loaders yield
batches already on the device, augmented there when augmentation is on; with data.on_device the
training split lives on the device and batches are gathered there (the same batches).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from segscale.config import AugmentConfig
from segscale.errors import SegscaleError, raised_in
from segscale.imgmed.augment import BatchAugment
from segscale.imgmed.store import Store
from segscale.repro import derive_seed


class SliceDataset(Dataset):
    """(image (C, S, S) float32, mask (S, S) int64, case index) for the rows of one split,
    through a user's per-sample `transform` (image, mask) → (image, mask) when given (see
    `transformed`; `key` names it in errors, e.g. "data.transform 'my.py:aug'")."""

    def __init__(
        self, store: Store, split: str, transform: Any = None, key: str = "data.transform"
    ) -> None:
        self.store, self.transform, self.key = store, transform, key
        self.cases = store.cases(split)
        self.rows = store.rows(split)
        self.case_of_row = np.concatenate(
            [np.full(c["count"], i) for i, c in enumerate(self.cases)]
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        r = self.rows[i]
        image = torch.from_numpy(np.array(self.store.images[r]))
        mask = torch.from_numpy(self.store.masks[r].astype(np.int64))
        if self.transform is not None:
            case = self.cases[int(self.case_of_row[i])]["id"]
            where = f"{case} (row {int(r)} of the store)"
            image, mask = transformed(self.transform, self.key, where, image, mask, self.store)
        return image, mask, int(self.case_of_row[i])

    def seed(self, seed: int) -> None:
        """Reseed a transform that can be (MONAI's set_random_state), for reproducible epochs."""
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed)


def transformed(
    transform: Any, key: str, where: str, image: torch.Tensor, mask: torch.Tensor, store: Store
) -> tuple[torch.Tensor, torch.Tensor]:
    """transform(image (C, S, S) float32, mask (S, S) int64) with its output checked, as tensors
    or arrays: a finite image (C, H, W) of the store's C channels and a mask (H, W) of whole class
    values 0..classes-1 (the store's). The image is returned as float32, the mask as int64; the
    batch stacks samples, so H, W must be the same for every sample (a random crop to a fixed
    size is fine). Raises SegscaleError naming `key` and the sample `where` when it raises or
    returns anything else."""
    try:
        pair = transform(image, mask)
    except Exception as e:
        raise raised_in(f"{key} on {where}", e) from e
    if not (isinstance(pair, tuple | list) and len(pair) == 2):
        got = f"{len(pair)} items" if isinstance(pair, tuple | list) else type(pair).__name__
        raise SegscaleError(f"{key} on {where}: returns {got}; expected the pair (image, mask)")
    out = []
    for name, value in zip(("image", "mask"), pair):
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):  # a MONAI MetaTensor is a Tensor
            raise SegscaleError(
                f"{key} on {where}: returns a {type(value).__name__} as the {name}; expected a "
                "tensor or an array"
            )
        out.append(value.as_tensor() if hasattr(value, "as_tensor") else value)
    image, mask = out
    channels, classes = store.in_channels, store.num_classes
    if image.ndim != 3 or image.shape[0] != channels:
        raise SegscaleError(
            f"{key} on {where}: returns an image of shape {tuple(image.shape)}; expected "
            f"({channels}, H, W): the store's {channels} channel(s) first"
        )
    if mask.shape != image.shape[1:]:
        raise SegscaleError(
            f"{key} on {where}: returns a mask of shape {tuple(mask.shape)} for an image of "
            f"{tuple(image.shape)}; expected (H, W) = {tuple(image.shape[1:])}"
        )
    if not image.is_floating_point():
        raise SegscaleError(
            f"{key} on {where}: returns a {image.dtype} image; expected floating point values"
        )
    if not torch.isfinite(image).all():  # a NaN reaches the loss: "diverged" at step 1
        raise SegscaleError(f"{key} on {where}: returns an image with NaN or infinite values")
    if mask.is_floating_point() and not torch.equal(mask, mask.round()):
        raise SegscaleError(
            f"{key} on {where}: returns a mask with fractional values (interpolated?); "
            "expected whole class values (transform masks with nearest-neighbour interpolation)"
        )
    mask = mask.long()
    low, high = (int(v) for v in mask.aminmax()) if mask.numel() else (0, 0)
    if low < 0 or high >= classes:
        raise SegscaleError(
            f"{key} on {where}: returns mask values {low}..{high}; expected class values "
            f"0..{classes - 1} (the store's {classes} classes)"
        )
    return image.float(), mask


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ...: every sample exactly once across ranks (shards may be uneven)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)


class _OffsetSampler(Sampler[int]):
    """A sampler's order from position `offset` on: resuming mid-epoch skips the trained batches
    without loading them."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.offset = sampler, 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.offset, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.offset


class TrainLoader:
    """Shuffled, sharded, optionally augmented device batches. Each step yields one (x, y) per
    worker this process plays: its own rank under torchrun, or every virtual rank when simulating
    K workers (each with the sampler shard and augmentation seed that real rank would have).
    `set_epoch` reseeds everything for that epoch, so a run resumed at an epoch boundary sees
    exactly the batches it would have seen."""

    def __init__(
        self,
        dataset: SliceDataset,
        batch_size: int,
        ranks: list[int],
        num_replicas: int,
        device: torch.device,
        seed: int,
        augment: AugmentConfig,
        num_workers: int = 0,
        on_device: bool = False,
    ) -> None:
        self.seed, self.ranks, self.device, self.dataset = seed, ranks, device, dataset
        self.samplers = [
            DistributedSampler(dataset, num_replicas=num_replicas, rank=r, shuffle=True, seed=seed)
            for r in ranks
        ]
        self.generators = [torch.Generator() for _ in ranks]
        self.offsets = [_OffsetSampler(s) for s in self.samplers]
        self.batch_size = batch_size
        self.loaders = [
            DataLoader(
                dataset,
                batch_size=batch_size,
                sampler=offset,
                # A last batch of one sample breaks BatchNorm and skews the step; drop it when we can.
                drop_last=len(sampler) >= batch_size,
                num_workers=num_workers,
                worker_init_fn=_seed_worker,
                generator=gen,
                persistent_workers=num_workers > 0,
                pin_memory=device.type == "cuda",
                multiprocessing_context=loader_context(num_workers),
            )
            for sampler, offset, gen in zip(self.samplers, self.offsets, self.generators)
        ]
        self.steps = len(self.loaders[0])  # full batches per epoch
        self.augment = BatchAugment(augment) if augment.enabled else None
        self.aug_generators = [torch.Generator() for _ in ranks]
        # on_device: the split's rows copied once to the device, batches gathered there by the
        # same sampler indices (what the DataLoaders above would yield, without their work)
        self.resident: tuple[torch.Tensor, torch.Tensor] | None = None
        if on_device:
            if dataset.transform is not None:
                raise ValueError("on_device cannot apply a per-sample transform")
            images = torch.from_numpy(np.asarray(dataset.store.images[dataset.rows]))
            masks = torch.from_numpy(np.asarray(dataset.store.masks[dataset.rows]))
            self.resident = (images.to(device), masks.to(device))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        for sampler, offset, gen, aug, rank in zip(
            self.samplers, self.offsets, self.generators, self.aug_generators, self.ranks
        ):
            sampler.set_epoch(epoch)
            offset.offset = skip_batches * self.batch_size
            gen.manual_seed(derive_seed(self.seed, epoch))
            aug.manual_seed(derive_seed(self.seed, epoch, rank))
        # a plugin transform's own generator (in this process; DataLoader workers keep theirs)
        self.dataset.seed(derive_seed(self.seed, epoch, self.ranks[0]) % 2**32)

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict[str, Any]:
        """The augmentation generators' states: with the epoch and the skipped batches, all a
        resumed epoch needs to produce the very same batches."""
        return {"augment": [g.get_state() for g in self.aug_generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g, s in zip(self.aug_generators, state["augment"]):
            g.set_state(s)

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        batches: Iterable[Any] = (
            zip(*self.loaders) if self.resident is None else zip(*map(self._gathered, self.offsets))
        )
        for batch in batches:
            step = []
            for (x, y, *_), aug in zip(batch, self.aug_generators):
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if self.augment is not None:
                    x, y = self.augment(x, y, aug)
                step.append((x, y))
            yield step

    def _gathered(self, sampler: _OffsetSampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches a DataLoader over `sampler` would yield (drop_last as there), gathered
        from the device-resident split."""
        images, masks = self.resident
        drop_last = len(sampler.sampler) >= self.batch_size
        indices = iter(sampler)
        while True:
            chunk = list(itertools.islice(indices, self.batch_size))
            if not chunk or (drop_last and len(chunk) < self.batch_size):
                return
            index = torch.tensor(chunk, device=images.device)
            yield images[index], masks[index].long()


def eval_loader(
    dataset: SliceDataset, batch_size: int, rank: int, world_size: int, num_workers: int = 0
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        multiprocessing_context=loader_context(num_workers),
    )


def loader_context(num_workers: int) -> str | None:
    """How DataLoader processes start: forked on Linux, as PyTorch does by default there. Said
    explicitly because training workers are themselves started by a fork server, whose children
    default to it too: a loader process would then re-import the worker's main module (and a
    transform would have to be picklable). Elsewhere, Python's default."""
    return "fork" if num_workers > 0 and sys.platform == "linux" else None

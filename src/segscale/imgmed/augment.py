"""Augmentation, online and offline. Online: BatchAugment warps training batches on their device.
Offline: a prepared store → a new store whose training split is grown to N slices
with augmented copies (the thesis augmented its left-atrium set to 35,000 images this way).

Augmented slices are written as extra training cases, `<case>_aug<k>`, each a copy of one original
case's slices (every slice warped independently; image and mask share the geometry), so every
store invariant holds: a case's rows are contiguous, its slice indices and geometry are real, and
validation and test cases are copied untouched. The same augmentation runs on the fly in training
(BatchAugment, below); this command is for when a fixed, enlarged set is wanted.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segscale._progress import progress_bar
from segscale.config import AUGMENT_PRESETS, AugmentConfig
from segscale.errors import DataError
from segscale.imgmed.store import Origin, Store, StoreWriter, is_current

if TYPE_CHECKING:  # torch is imported where used: importing segscale.imgmed must not load it
    import torch

PRESETS = {name: AugmentConfig(**values) for name, values in AUGMENT_PRESETS.items()}


class BatchAugment:
    """Random rotation, zoom, translation, flips (one affine per sample, applied to image and mask
    alike with grid_sample) and intensity jitter. Runs on whatever device the batch is on; random
    parameters come from a CPU generator so runs are reproducible across devices."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        cfg, n = self.cfg, x.shape[0]

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

        angle = uniform(-cfg.rotation, cfg.rotation) * math.pi / 180
        zoom = uniform(*cfg.zoom)
        shift = torch.stack([uniform(-cfg.translation, cfg.translation) for _ in range(2)], 1) * 2
        flip = torch.ones(n, 2, dtype=torch.float64)
        if cfg.flip:
            flip = torch.where(torch.rand(n, 2, generator=gen) < 0.5, -1.0, 1.0).double()
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos * flip[:, 0], -sin, shift[:, 0]], 1),
                torch.stack([sin, cos * flip[:, 1], shift[:, 1]], 1),
            ],
            1,
        ).to(x.device, torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(
            y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        if cfg.intensity > 0:
            scale = 1 + cfg.intensity * torch.randn(n, 1, 1, 1, generator=gen)
            offset = cfg.intensity * torch.randn(n, 1, 1, 1, generator=gen)
            x = x * scale.to(x.device) + offset.to(x.device)
        return x, y[:, 0].long()


def augment_store(
    source: str | Path,
    output: str | Path,
    total: int,
    augment: AugmentConfig,
    seed: int = 0,
    batch: int = 64,
    progress: bool = True,
    force: bool = False,
) -> tuple[Path, bool]:
    """Write `output`: `source` with its training split grown to `total` slices. Returns
    (path, written); re-running with the same inputs is a no-op; with other settings, it
    replaces the store it augmented from `source`; a store of another origin only with `force`
    (store.is_current)."""
    import torch

    store = Store.open(source)
    output = Path(output).resolve()
    train = store.cases("train")
    have = sum(c["count"] for c in train)
    if not have:  # nothing to copy: the rounds below would never reach the total
        raise DataError(f"{store.path}: the training split has no slices to augment")
    if total <= have:
        raise DataError(
            f"--to {total}: expected more than the {have} slices the training split has"
        )
    params = {"to": total, "seed": seed, "augment": augment.model_dump(mode="json")}
    input_hash = hashlib.sha256(
        # the source's split too: its test cases stay out of the augmented training split
        json.dumps(
            [store.meta["content_hash"], store.meta["splits"], params], sort_keys=True
        ).encode()
    ).hexdigest()
    if is_current(output, input_hash, Origin("augmented", str(store.path.resolve())), force):
        return output, False

    rows = len(store.masks)
    # first: a --to the disk cannot hold is refused before its copies are listed
    writer = StoreWriter(
        output, rows + total - have, store.in_channels, int(store.images.shape[-1])
    )
    # whole augmented copies of the training cases in turn; the last one may be partial
    copies: list[tuple[dict[str, Any], int, int]] = []  # (case, round, slices)
    missing, k = total - have, 0
    while missing > 0:
        k += 1
        for case in train:
            n = min(case["count"], missing)
            copies.append((case, k, n))
            missing -= n
            if missing == 0:
                break
    try:
        writer.images[:rows] = store.images
        writer.masks[:rows] = store.masks
        warp = BatchAugment(augment.model_copy(update={"enabled": True}))
        generator = torch.Generator().manual_seed(seed)
        cases = [dict(c) for c in store.meta["cases"]]
        start = rows
        with progress_bar(
            progress, f"augmenting to {total} training slices", len(copies)
        ) as advance:
            for case, k, n in copies:
                for i in range(0, n, batch):
                    src = slice(case["start"] + i, case["start"] + min(i + batch, n))
                    # np.array copies: the store's memmaps are read-only
                    x = torch.from_numpy(np.array(store.images[src]))
                    y = torch.from_numpy(np.asarray(store.masks[src]).astype(np.int64))
                    x, y = warp(x, y, generator)
                    writer.images[start + i : start + i + len(x)] = x.numpy()
                    writer.masks[start + i : start + i + len(x)] = y.numpy().astype(np.uint8)
                cases.append(
                    {
                        **case,
                        "id": f"{case['id']}_aug{k}",
                        "split": "train",
                        "slice_indices": case["slice_indices"][:n],
                        "start": start,
                        "count": n,
                        "augmented_from": case["id"],
                    }
                )
                start += n
                advance()
        augmented = {"source": str(Path(source).resolve()), **params}
        writer.commit_cases({**store.meta, "augmented": augmented, "input_hash": input_hash}, cases)
    except BaseException:
        writer.abort()
        raise
    return output, True

"""Offline augmentation: a prepared store → a new store whose training split is grown to N slices
with augmented copies (the thesis augmented its left-atrium set to 35,000 images this way).

Augmented slices are written as extra training cases, `<case>_aug<k>`, each a copy of one original
case's slices (every slice warped independently; image and mask share the geometry), so every
store invariant holds: a case's rows are contiguous, its slice indices and geometry are real, and
validation and test cases are copied untouched. The same augmentation runs on the fly in training
(segscale.data.BatchAugment); this command is for when a fixed, enlarged set is wanted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from segscale._progress import progress_bar
from segscale.config import AUGMENT_PRESETS, AugmentConfig
from segscale.errors import DataError
from segscale.imgmed.store import Store, StoreWriter, is_current

PRESETS = {name: AugmentConfig(**values) for name, values in AUGMENT_PRESETS.items()}


def augment_store(
    source: str | Path,
    output: str | Path,
    total: int,
    augment: AugmentConfig,
    seed: int = 0,
    batch: int = 64,
    progress: bool = True,
) -> tuple[Path, bool]:
    """Write `output`: `source` with its training split grown to `total` slices. Returns
    (path, written); re-running with the same inputs is a no-op."""
    import torch

    from segscale.data import BatchAugment

    store = Store.open(source)
    output = Path(output).resolve()
    train = store.cases("train")
    have = sum(c["count"] for c in train)
    if total <= have:
        raise DataError(f"--to {total}: the training split already has {have} slices")
    params = {"to": total, "seed": seed, "augment": augment.model_dump(mode="json")}
    input_hash = hashlib.sha256(
        json.dumps([store.meta["content_hash"], params], sort_keys=True).encode()
    ).hexdigest()
    if is_current(output, input_hash):
        return output, False

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
    rows = len(store.masks)
    writer = StoreWriter(
        output, rows + total - have, store.in_channels, int(store.images.shape[-1])
    )
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

"""Sharded, exact evaluation: per-case confusion matrices summed across workers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from segscale.parallel import Strategy
from segscale.segeval import metrics_from_confusion


@torch.no_grad()
def confusion_by_case(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    num_classes: int,
    num_cases: int,
    strategy: Strategy,
) -> np.ndarray:
    """(num_cases, C, C) int64 confusion counts over every sample of every rank's shard.

    A case's slices may sit on different ranks; counts add, so the 3D per-case metrics equal
    those of the case's slices stacked back into its volume."""
    was_training = model.training
    model.eval()
    device = strategy.device
    cc = num_classes * num_classes
    counts = torch.zeros(num_cases * cc, dtype=torch.int64, device=device)
    for x, y, case in batches:
        pred = model(x.to(device)).argmax(1)
        idx = case.to(device)[:, None, None] * cc + y.to(device) * num_classes + pred
        counts += torch.bincount(idx.reshape(-1), minlength=num_cases * cc)
    strategy.all_reduce_sum(counts)
    model.train(was_training)
    return counts.reshape(num_cases, num_classes, num_classes).cpu().numpy()


def summarize(counts: np.ndarray, case_ids: list[str]) -> dict:
    """The evaluation record: dataset-level metrics (summed confusion), per-case metrics, and the
    mean ± SD of per-case Dice (the figure medical papers report)."""
    dataset = metrics_from_confusion(counts.sum(0))
    cases = [{"case": cid, **metrics_from_confusion(cm)} for cid, cm in zip(case_ids, counts)]
    dice = np.array([c["dice"] for c in cases])
    return {
        "dataset": dataset,
        "per_case_dice": {
            "mean": float(dice.mean()),
            "sd": float(dice.std(ddof=1)) if len(dice) > 1 else 0.0,
            "n": len(dice),
        },
        "cases": cases,
    }

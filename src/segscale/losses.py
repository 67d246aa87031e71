"""Segmentation losses: cross-entropy, soft Dice over foreground classes, and their sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceLoss(nn.Module):
    """1 − soft Dice, averaged over foreground classes, from batch-summed (not per-image) overlaps
    so that slices without foreground do not dominate the loss."""

    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return 1 - dice[1:].mean() if logits.shape[1] > 1 else 1 - dice.mean()


class DiceCELoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target) + self.dice(logits, target)

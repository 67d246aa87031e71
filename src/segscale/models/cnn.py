"""A small CNN classifier for the classification task: the proof that the engine does not care
what the network predicts, and a quick slice-level detector in its own right."""

from __future__ import annotations

import torch
from torch import nn

from segscale.models.unet import _act, _norm


class SmallCNN(nn.Module):
    """`depth` stages of (3×3 conv stride 2 → norm → act → 3×3 conv → norm → act), widths
    base·2^i, then global average pooling, dropout and one linear layer: (N, C, H, W) → (N, K)
    logits, for any input size."""

    encoder_modules = ("features",)  # the convolutions before the classifier (train.finetune)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "batch",
        act: str = "relu",
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError("depth and base_channels must be at least 1")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout {dropout}: expected 0 ≤ dropout < 1")
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(depth):
            cout = base_channels * 2**i
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                _norm(norm, cout),
                _act(act, cout),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                _norm(norm, cout),
                _act(act, cout),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))

"""Adapters for users who prefer MONAI or TorchIO transforms (neither is a dependency of
segscale). A transform plug-in is any factory, named in the config by path, that returns a
callable (image (C, H, W) float tensor, mask (H, W) int64 tensor) → (image, mask):

    data:
      transform: {name: examples/plugins/monai_augment.py:augment, kwargs: {prob: 0.5}}

It runs per sample on the CPU, before batching and before segscale's own batch augmentation
(`data.augment`, which can stay off).
"""

from __future__ import annotations

from typing import Any

import torch


class DictTransform:
    """Wraps a MONAI dictionary transform (keys 'image' and 'label', channel-first), or any
    callable on such dicts. MONAI's random transforms are reseeded every epoch through
    `set_random_state`, so runs repeat; an exact mid-epoch resume cannot restore their state."""

    def __init__(self, transform: Any, image_key: str = "image", label_key: str = "label") -> None:
        self.transform, self.image_key, self.label_key = transform, image_key, label_key

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.transform({self.image_key: image, self.label_key: mask[None]})
        x, y = out[self.image_key], out[self.label_key]
        # MONAI returns MetaTensors; the training loop wants plain tensors of the usual types
        return (
            torch.as_tensor(x).as_subclass(torch.Tensor).float(),
            torch.as_tensor(y).as_subclass(torch.Tensor)[0].round().long(),
        )

    def set_random_state(self, seed: int) -> None:
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed)

"""Volume → 2D slices → fixed size, and back. Shared by `prepare` and `predict` so both see the
same pixels: a model never meets an input preprocessed differently from its training data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from segscale.errors import DataError

if TYPE_CHECKING:  # imported where used: opening a store must not cost torch's import
    import torch


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs (recorded in the store's meta.json)."""

    size: int = 256  # slices are resized to size × size
    axis: int = 2  # slicing axis of the 3D volume
    channels: tuple[int, ...] | None = None  # channels to keep of a 4D image (None: all)
    slices: int | None = None  # N evenly spaced slices per case (None: all)
    normalize: str = "zscore"  # zscore | minmax | none (per case, per channel)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels) if self.channels is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        if d.get("channels") is not None:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


def channels_first(
    image: np.ndarray, is_volume: bool, channels: tuple[int, ...] | None
) -> np.ndarray:
    """(C, *spatial) from a 3D/4D volume (channel last, NIfTI style) or a 2D/RGB image."""
    spatial = 3 if is_volume else 2
    if image.ndim == spatial:
        image = image[None]
    elif image.ndim == spatial + 1:
        image = np.moveaxis(image, -1, 0)
    else:
        raise DataError(
            f"expected a {spatial}D image (or {spatial}D + channels), got shape {image.shape}"
        )
    if channels is not None:
        bad = [c for c in channels if not 0 <= c < image.shape[0]]
        if bad:
            raise DataError(f"channel(s) {bad} out of range: the image has {image.shape[0]}")
        image = image[list(channels)]
    return image


def normalize(image: np.ndarray, method: str) -> np.ndarray:
    """Per-channel intensity normalisation of a (C, ...) array."""
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise DataError("image contains NaN or infinite values")
    if method == "none":
        return image
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        x = image[c]
        if method == "zscore":
            out[c] = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif method == "minmax":
            lo, hi = float(x.min()), float(x.max())
            out[c] = (x - lo) / max(hi - lo, 1e-8)
        else:
            raise ValueError(f"unknown normalisation '{method}' (zscore | minmax | none)")
    return out


def slice_indices(length: int, count: int | None) -> np.ndarray:
    """All indices, or `count` evenly spaced ones (the thesis kept 70 per scan)."""
    if count is None or count >= length:
        return np.arange(length)
    return np.unique(np.round(np.linspace(0, length - 1, count)).astype(int))


def to_slices(volume: np.ndarray, axis: int, indices: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) → (N, C, H, W) along a spatial axis (0, 1 or 2)."""
    return np.moveaxis(np.take(volume, indices, axis=axis + 1), axis + 1, 0)


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of to_slices for (N, H, W) masks: back to (X, Y, Z)."""
    return np.moveaxis(slices, 0, axis)


def resize_images(x: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float → (N, C, size, size), bilinear; antialiased when shrinking."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(x, dtype=torch.float32)
    out = (size, size) if isinstance(size, int) else size
    if tuple(t.shape[-2:]) == tuple(out):
        return t.clone()
    return F.interpolate(t, size=out, mode="bilinear", align_corners=False, antialias=True)


def resize_masks(x: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, H, W) integer labels → (N, size, size), nearest (no invented label values)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)[:, None]
    out = (size, size) if isinstance(size, int) else size
    return F.interpolate(t, size=out, mode="nearest-exact")[:, 0].to(torch.uint8)


def preprocess(
    image: np.ndarray, is_volume: bool, p: Preprocessing
) -> tuple[torch.Tensor, np.ndarray]:
    """A raw image → (N, C, size, size) model inputs and the slice indices they came from."""
    image = normalize(channels_first(image, is_volume, p.channels), p.normalize)
    if is_volume:
        indices = slice_indices(image.shape[p.axis + 1], p.slices)
        slices = to_slices(image, p.axis, indices)
    else:
        indices, slices = np.zeros(1, dtype=int), image[None]
    return resize_images(slices, p.size), indices

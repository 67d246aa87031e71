"""Volume → 2D slices → fixed size, and back. Shared by `prepare` and `predict` so both see the
same pixels: a model never meets an input preprocessed differently from its training data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from segscale.errors import DataError

if TYPE_CHECKING:  # imported where used: opening a store must not cost torch's import
    import torch


MAX_SIZE = 8192  # pixels a side of a prepared slice: larger ones do not fit in memory


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs (recorded in the store's meta.json)."""

    size: int = 256  # slices are resized to size × size
    axis: int = 2  # slicing axis of the 3D volume
    channels: tuple[int, ...] | None = None  # channels to keep of a 4D image (None: all)
    slices: int | None = None  # N evenly spaced slices per case (None: all)
    normalize: str = "zscore"  # zscore | minmax | none (per case, per channel)
    clip: tuple[float, float] | None = None  # clip to these percentiles before normalising
    nonzero: bool = False  # statistics over nonzero voxels (the body, as nnU-Net does for MRI)
    foreground_margin: int | None = None  # keep slices within this many of one with foreground
    spacing: float | None = None  # resample in-plane to this many mm per pixel, then centre in size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels) if self.channels is not None else None
        d["clip"] = list(self.clip) if self.clip is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)  # keys missing from an older store take their defaults
        if d.get("channels") is not None:
            d["channels"] = tuple(d["channels"])
        if d.get("clip") is not None:
            d["clip"] = tuple(d["clip"])
        return cls(**d)

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_SIZE:  # 10^5: a 40 GB slice, refused by torch or the kernel
            raise DataError(
                f"size {self.size}: expected 1 to {MAX_SIZE} pixels a side (a slice of "
                f"{MAX_SIZE}² float32 is {MAX_SIZE**2 * 4 / 1e9:.2g} GB)"
            )
        if self.slices is not None and self.slices < 1:
            raise DataError(f"slices {self.slices}: expected at least 1 per case (or all)")
        if self.channels is not None:
            twice = sorted({c for c in self.channels if list(self.channels).count(c) > 1})
            if not self.channels or twice or min(self.channels) < 0:
                why = f"{twice} given twice" if twice else "expected channel indices ≥ 0"
                raise DataError(f"channels {list(self.channels)}: {why}")
        if self.clip is not None and not 0 <= self.clip[0] < self.clip[1] <= 100:
            raise DataError(f"clip {self.clip}: expected percentiles 0 ≤ low < high ≤ 100")
        if self.foreground_margin is not None and self.foreground_margin < 0:
            raise DataError(f"foreground margin {self.foreground_margin}: expected ≥ 0")
        if self.spacing is not None and not 0 < self.spacing < float("inf"):  # NaN too
            raise DataError(f"spacing {self.spacing}: expected a finite positive size in mm")
        if self.normalize not in ("zscore", "minmax", "none"):
            raise DataError(f"normalize '{self.normalize}': expected zscore, minmax or none")


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


def require_finite(image: np.ndarray, where: str = "image") -> None:
    """Raise DataError saying how many values are NaN or infinite, and where the first is."""
    finite = np.isfinite(image)
    if not finite.all():
        raise DataError(
            f"{where} contains {int(finite.size - np.count_nonzero(finite))} NaN or infinite "
            f"value(s) of {finite.size} (the first at index {np.argwhere(~finite)[0].tolist()})"
        )


def normalize(
    image: np.ndarray,
    method: str,
    clip: tuple[float, float] | None = None,
    nonzero: bool = False,
) -> np.ndarray:
    """Per-channel intensity normalisation of a (C, ...) array: optionally clipped to percentiles
    first, with statistics over every voxel or (nonzero) over the nonzero ones only, which then
    stay 0 (the background outside the body does not dilute the statistics)."""
    image = image.astype(np.float32, copy=False)
    require_finite(image)
    if method == "none" and clip is None:
        return image
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        x = image[c]
        inside = x != 0 if nonzero else None
        values = x[inside] if inside is not None else x
        if values.size == 0:  # an all-zero channel: nothing to normalise
            out[c] = x
            continue
        if clip is not None:
            lo, hi = np.percentile(values, clip)
            x, values = np.clip(x, lo, hi), np.clip(values, lo, hi)
        if method == "zscore":
            y = (x - values.mean()) / max(float(values.std()), 1e-8)
        elif method == "minmax":
            lo, hi = float(values.min()), float(values.max())
            y = (x - lo) / max(hi - lo, 1e-8)
        elif method == "none":
            y = x
        else:
            raise ValueError(f"unknown normalisation '{method}' (zscore | minmax | none)")
        out[c] = np.where(inside, y, 0) if inside is not None else y
    return out


def select_slices(
    length: int,
    count: int | None,
    foreground: np.ndarray | None = None,
    margin: int | None = None,
) -> np.ndarray:
    """Slice indices: those within `margin` of a slice whose mask has foreground (`foreground`: a
    bool per slice; a case without any keeps all), then `count` evenly spaced among them."""
    candidates = np.arange(length)
    if margin is not None and foreground is not None and foreground.any():
        hit = np.flatnonzero(foreground)
        near = np.zeros(length, dtype=bool)
        for i in hit:
            near[max(0, i - margin) : i + margin + 1] = True
        candidates = np.flatnonzero(near)
    return candidates[slice_indices(len(candidates), count)]


def slice_indices(length: int, count: int | None) -> np.ndarray:
    """All indices, or `count` evenly spaced ones (the thesis kept 70 per scan)."""
    if count is None or count >= length:
        return np.arange(length)
    return np.unique(np.round(np.linspace(0, length - 1, count)).astype(int))


def to_slices(volume: np.ndarray, axis: int, indices: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) → (N, C, H, W) along a spatial axis (0, 1 or 2); a view when the indices
    are one contiguous run (the common case: all slices), so nothing is copied twice."""
    if len(indices) and np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices))):
        picked = np.moveaxis(volume, axis + 1, 0)[indices[0] : indices[0] + len(indices)]
        return picked
    return np.moveaxis(np.take(volume, indices, axis=axis + 1), axis + 1, 0)


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of to_slices for (N, H, W) masks: back to (X, Y, Z)."""
    return np.moveaxis(slices, 0, axis)


@dataclass(frozen=True)
class Plane:
    """Where one case's slices land on the size × size grid: resized whole to it (no target
    spacing, or no spacing known), or resampled to the target spacing and centred in it (cropped
    where larger, padded with 0 where smaller). Predictions go back through `from_grid`."""

    shape: tuple[int, int]  # the original in-plane size
    resampled: tuple[int, int]  # its size after resampling (the grid size for a plain resize)
    offset: tuple[int, int]  # the resampled plane's top-left corner on the grid (< 0: cropped)

    @classmethod
    def of(
        cls, p: Preprocessing, shape: tuple[int, ...], spacing: tuple[float, ...] | None
    ) -> Plane:
        hw = (int(shape[0]), int(shape[1]))
        if p.spacing is None or spacing is None:
            return cls(hw, (p.size, p.size), (0, 0))
        exact = [n * s / p.spacing for n, s in zip(hw, spacing)]
        if max(exact) > 4 * MAX_SIZE:  # 1e-300 mm: an overflow deep in torch, or no memory
            raise DataError(
                f"spacing {p.spacing:g} mm: a {hw[0]}×{hw[1]} slice of "
                f"{'×'.join(f'{s:g}' for s in spacing[:2])} mm pixels resamples to "
                f"{max(exact):.3g} pixels a side (at most {4 * MAX_SIZE}); give a coarser spacing"
            )
        resampled = tuple(max(1, round(e)) for e in exact)
        offset = tuple((p.size - r) // 2 for r in resampled)
        return cls(hw, resampled, offset)  # type: ignore[arg-type]

    def _pads(self, size: int) -> tuple[int, int, int, int]:
        (r0, r1), (o0, o1) = self.resampled, self.offset
        return (o1, size - o1 - r1, o0, size - o0 - r0)  # F.pad order: last dim first


def to_grid(
    x: np.ndarray | torch.Tensor, plane: Plane, size: int, masks: bool = False
) -> torch.Tensor:
    """(N, C, H, W) images (bilinear, antialiased when shrinking) or (N, H, W) label maps
    (nearest) → the size × size grid."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if masks:
        t = t[:, None]
    if tuple(t.shape[-2:]) != plane.resampled:
        if masks:
            t = F.interpolate(t, size=plane.resampled, mode="nearest-exact")
        else:
            t = F.interpolate(
                t, size=plane.resampled, mode="bilinear", align_corners=False, antialias=True
            )
    t = F.pad(t, plane._pads(size))  # negative pads crop
    return t[:, 0].to(torch.uint8) if masks else t


def from_grid(t: torch.Tensor, plane: Plane, size: int) -> torch.Tensor:
    """The inverse for (N, K, size, size) logits: back to the original (N, K, H, W). What was
    cropped away comes back as all-zero logits, which argmax reads as class 0 (background)."""
    import torch.nn.functional as F

    t = F.pad(t, tuple(-v for v in plane._pads(size)))
    if tuple(t.shape[-2:]) != plane.shape:
        t = F.interpolate(t, size=plane.shape, mode="bilinear", align_corners=False)
    return t


def inplane_spacing(affine: np.ndarray | None, axis: int) -> tuple[float, float] | None:
    """The two in-plane voxel sizes (mm) of slices along `axis`, from a 4×4 affine."""
    if affine is None:
        return None
    from segscale.imgmed.geometry import spacing_from_affine

    sp = spacing_from_affine(affine)
    a, b = (i for i in range(3) if i != axis)
    return sp[a], sp[b]


def preprocess(
    image: np.ndarray,
    is_volume: bool,
    p: Preprocessing,
    mask: np.ndarray | None = None,
    affine: np.ndarray | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """A raw image → (N, C, size, size) model inputs and the slice indices they came from. The
    mask (spatial shape of the image) is needed only to select slices near the foreground, the
    affine only to resample to a target spacing."""
    image = normalize(channels_first(image, is_volume, p.channels), p.normalize, p.clip, p.nonzero)
    if is_volume:
        foreground = None
        if p.foreground_margin is not None:
            if mask is None:
                raise DataError("selecting slices near the foreground needs the mask")
            other = tuple(a for a in range(3) if a != p.axis)
            foreground = np.asarray(mask).any(axis=other)
        indices = select_slices(image.shape[p.axis + 1], p.slices, foreground, p.foreground_margin)
        slices = to_slices(image, p.axis, indices)
        plane = Plane.of(p, slices.shape[-2:], inplane_spacing(affine, p.axis))
    else:
        indices, slices = np.zeros(1, dtype=int), image[None]
        plane = Plane.of(p, slices.shape[-2:], None)
    return to_grid(slices, plane, p.size), indices

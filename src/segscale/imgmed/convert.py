"""Format conversion and export: volume → PNG slices (windowed to 8 bit), picture stacks → volume,
and anything → anything `load`/`save` know (DICOM → NIfTI, JPEG → PNG, NIfTI → .npz, ...).

An exported slice folder carries `slices.json` (source, axis, window, affine, shape), so stacking it
back gives a volume in the original geometry: the exact inverse up to the 8-bit windowing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from segscale._files import write_atomic
from segscale.errors import DataError
from segscale.imgmed.files import list_files, strip_suffix
from segscale.imgmed.io import Image, _family_of_name, load, save, sniff, to_uint8

SIDE_CAR = "slices.json"


def export_slices(
    image: Image, out_dir: str | Path, axis: int = 2, window: tuple[float, float] | None = None
) -> list[Path]:
    """Each slice along `axis` as an 8-bit PNG `<stem>_<k>.png` (one window for the whole volume,
    so slices stay comparable); rows of a picture run along the volume's second in-plane axis.
    Without `window`, integer data within 0..255 (a label map, 8-bit data) keeps its values
    (slices.json then records no window); anything else, or any data with `window`, is windowed."""
    a = _numeric(image)
    if a.ndim != 3:
        raise DataError(f"{image.path}: {a.ndim}D array; slice export takes a 3D volume")
    if axis not in (0, 1, 2):
        raise DataError(f"axis {axis}: expected 0, 1 or 2")
    if window is None and np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() < 256:
        pixels, recorded = a.astype(np.uint8), None  # values kept, whatever the integer type
    else:
        low, high = window if window is not None else np.percentile(a, (0.5, 99.5))
        pixels, recorded = to_uint8(a, (float(low), float(high))), [float(low), float(high)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = strip_suffix(image.path.name)
    width = max(3, len(str(a.shape[axis] - 1)))
    written = []
    for k in range(a.shape[axis]):
        path = out_dir / f"{stem}_{k:0{width}d}.png"
        save(np.ascontiguousarray(np.take(pixels, k, axis=axis).T), path)
        written.append(path)
    meta = {
        "source": str(image.path),
        "axis": axis,
        "window": recorded,
        "shape": list(a.shape),
        "affine": None if image.affine is None else np.asarray(image.affine).tolist(),
        "files": [p.name for p in written],
    }
    write_atomic(out_dir / SIDE_CAR, json.dumps(meta, indent=1))
    return written


def stack_pictures(folder: str | Path, spacing: tuple[float, float, float] | None = None) -> Image:
    """A folder of 2D pictures → a volume, slices in natural name order (img_2 before img_10).
    With the slices.json of `export_slices`, the original axis, shape and affine come back."""
    folder = Path(folder)
    side = folder / SIDE_CAR
    meta = json.loads(side.read_text()) if side.is_file() else None
    if meta is not None:
        names = meta["files"]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(
                f"{folder}: {len(missing)} slice(s) of {SIDE_CAR} missing, e.g. {missing[0]}"
            )
        files = [folder / n for n in names]
    else:
        files = sorted(
            (p for p in list_files(folder) if _family_of_name(p) == "image"),
            key=_natural,
        )
    if not files:
        raise DataError(f"{folder}: no PNG/JPEG/TIFF pictures to stack")
    pictures = [load(p).array for p in files]
    shapes = {p.shape for p in pictures}
    if len(shapes) > 1:
        raise DataError(f"{folder}: pictures of different sizes {sorted(shapes)}; cannot stack")
    if pictures[0].ndim != 2:
        raise DataError(f"{files[0]}: a colour picture; stacking takes greyscale slices")
    if meta is not None:
        axis = int(meta["axis"])
        volume = np.stack([p.T for p in pictures], axis=axis)
        if list(volume.shape) != meta["shape"]:
            raise DataError(
                f"{folder}: slices make {volume.shape}, {SIDE_CAR} says {meta['shape']}"
            )
        affine = None if meta["affine"] is None else np.array(meta["affine"])
    else:
        volume = np.stack([p.T for p in pictures], axis=2)
        affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
    return Image(volume, affine, "image", folder)


def convert(
    src: str | Path,
    dst: str | Path,
    axis: int = 2,
    window: tuple[float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> list[Path]:
    """One call for every conversion; returns the files written. `dst` without a suffix (or an
    existing folder) receives PNG slices; a folder of pictures as `src` is stacked into a volume,
    and one picture into a NIfTI is a stack of one (the same axes, `spacing` applied)."""
    src, dst = Path(src), Path(dst)
    if src.is_dir() and sniff_folder(src) == "pictures":
        image = stack_pictures(src, spacing)
    else:
        image = load(src)
        if image.kind == "image" and _family_of_name(dst) == "nifti":  # a stack of one
            if image.array.ndim != 2:
                raise DataError(f"{src}: a colour picture; a NIfTI volume takes greyscale slices")
            affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
            image = Image(image.array.T[:, :, None], affine, "image", src)
    if dst.is_dir() or not dst.suffix:
        return export_slices(image, dst, axis, window)
    dst.parent.mkdir(parents=True, exist_ok=True)
    array = _numeric(image)
    if _family_of_name(dst) == "image":
        if array.ndim == 3 and array.shape[-1] not in (3, 4):
            raise DataError(
                f"{src}: a {'×'.join(map(str, array.shape))} volume into one picture {dst.name}; "
                "give a folder as the destination for one picture per slice"
            )
        if window is not None or array.dtype not in (np.uint8, np.uint16):
            array = to_uint8(array, window)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype in (np.int64, np.uint64):  # NIfTI-1 writers refuse 64-bit integers
        if array.size and (
            array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max
        ):
            raise DataError(
                f"{src}: 64-bit integers beyond the 32-bit range; NIfTI cannot hold them"
            )
        array = array.astype(np.int32)
    return [save(array, dst, image.affine)]


def _numeric(image: Image) -> np.ndarray:
    """The image's array as numbers: booleans as 0/1; a structured (RGB24 NIfTI) array refused
    in one line."""
    a = np.asarray(image.array)
    if a.dtype.names is not None:
        raise DataError(
            f"{image.path}: a structured ({', '.join(a.dtype.names)}) array, e.g. an RGB24 "
            "NIfTI; expected one number per voxel"
        )
    return a.astype(np.uint8) if a.dtype == np.bool_ else a


def sniff_folder(folder: Path) -> str:
    """'pictures' for a folder of PNG/JPEG/TIFF files, 'dicom' otherwise."""
    files = list_files(folder)
    if files and all(p.name == SIDE_CAR or sniff(p) == "image" for p in files):
        return "pictures"
    return "dicom"


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]

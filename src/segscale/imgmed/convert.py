"""Format conversion and export: volume → PNG slices, picture stacks → volume, and anything →
anything `load`/`save` know (DICOM → NIfTI, JPEG → PNG, NIfTI → .npz, ...).

Label maps keep their values in pictures (8 bit, or 16 bit above 255); intensities are windowed
to 8 bit. An exported slice folder carries `slices.json` (source, axis, window, affine, shape),
so stacking it back gives a volume in the original geometry: label values exactly, intensities
on their own scale again up to the 8-bit quantisation of the window. Volumes are (x, y[, z])
arrays and pictures (rows, columns): a slice's x runs along a picture's columns both ways.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from segscale._files import _umask, write_atomic
from segscale.errors import DataError
from segscale.imgmed.files import list_files, strip_suffix
from segscale.imgmed.io import (
    Image,
    _family_of_name,
    load,
    nifti_header,
    save,
    sniff,
    to_uint8,
)

SIDE_CAR = "slices.json"


def export_slices(
    image: Image, out_dir: str | Path, axis: int = 2, window: tuple[float, float] | None = None
) -> list[Path]:
    """Each slice along `axis` as a PNG `<stem>_<k>.png` (one window for the whole volume, so
    slices stay comparable); rows of a picture run along the volume's second in-plane axis.
    Without `window`, a label map keeps its values (picture_values; slices.json records no
    window); anything else, or any data with `window`, is windowed to 8 bit.

    The folder is written whole or not at all: the slices go to a hidden sibling folder first,
    which then replaces `out_dir`. An existing `out_dir` must be empty or hold an earlier export
    (its slices.json and slices, replaced); other files are refused (DataError)."""
    a = _numeric(image)
    if a.ndim != 3:
        raise DataError(f"{image.path}: {a.ndim}D array; slice export takes a 3D volume")
    if axis not in (0, 1, 2):
        raise DataError(f"axis {axis}: expected 0, 1 or 2")
    out_dir = Path(out_dir).resolve()
    earlier = _replaceable(out_dir)
    pixels, recorded = picture_values(a, window)
    stem = strip_suffix(image.path.name)
    width = max(3, len(str(a.shape[axis] - 1)))
    names = [f"{stem}_{k:0{width}d}.png" for k in range(a.shape[axis])]
    meta = {
        "source": str(image.path),
        "axis": axis,
        "window": recorded,
        "shape": list(a.shape),
        "affine": None if image.affine is None else np.asarray(image.affine).tolist(),
        "files": names,
    }
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    except OSError as e:
        raise DataError(f"cannot write {out_dir}: {e.strerror}") from None
    try:
        for k, name in enumerate(names):
            save(np.ascontiguousarray(np.take(pixels, k, axis=axis).T), partial / name)
        write_atomic(partial / SIDE_CAR, json.dumps(meta, indent=1))
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from others
        old = None
        if earlier:  # an earlier export, or an empty folder: moved aside whole
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            out_dir.rename(old / out_dir.name)
        try:
            partial.rename(out_dir)
        except OSError:
            if old is not None:  # the earlier export back in its place (kept aside if not)
                (old / out_dir.name).rename(out_dir)
                old.rmdir()
            raise
        if old is not None:  # replaced: the earlier export goes
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise DataError(f"cannot write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return [out_dir / name for name in names]


def _replaceable(folder: Path) -> bool:
    """Whether `folder` exists, empty or holding an earlier export (which a new one replaces).
    Raises DataError for a folder that holds anything else, which an export would mix with or
    delete."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise DataError(f"{folder}: a file; slices go to a folder")
    present = {p.name for p in folder.iterdir()}
    side = folder / SIDE_CAR
    listed: set[str] = set()
    if side.is_file():
        try:
            listed = {SIDE_CAR, *json.loads(side.read_text())["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            listed = set()
    other = sorted(present - listed)
    if other:
        raise DataError(
            f"{folder}: holds {len(other)} file(s) of no earlier export (e.g. {other[0]}); "
            "slices go to a new or empty folder, or one an earlier export wrote"
        )
    return True


def _ordered(window: tuple[float, float] | list[float]) -> bool:
    """Whether a window is LOW < HIGH, both finite numbers."""
    return (
        all(isinstance(v, int | float) and math.isfinite(v) for v in window)
        and window[0] < window[1]
    )


def check_window(window: tuple[float, float] | None) -> None:
    """Raise DataError unless `window` is None or LOW < HIGH, both finite."""
    if window is not None and not _ordered(window):
        raise DataError(f"--window {window[0]:g},{window[1]:g}: expected LOW < HIGH, both finite")


def picture_values(
    a: np.ndarray, window: tuple[float, float] | None = None
) -> tuple[np.ndarray, list[float] | None]:
    """(pixels, window): what a picture of `a` holds. Without `window`, whole non-negative
    values (any integer type, or floats holding whole numbers: a label or instance map saved as
    float) are kept, exactly: up to 255 in 8 bit, up to 65535 in 16 bit; the window returned is
    then None. Anything else is windowed to 8 bit, with `window` or the 0.5-99.5 percentiles,
    and that window returned. Raises DataError for a bad window, and for whole values of a few
    kinds (at most 256: a label map) that no picture holds (negative, or above 65535), which a
    window would merge."""
    check_window(window)
    if window is None and a.size:
        whole = np.issubdtype(a.dtype, np.integer) or (
            np.issubdtype(a.dtype, np.floating) and bool(np.all(np.mod(a, 1) == 0))
        )
        low, high = a.min(), a.max()
        if whole and low >= 0 and high < 256:
            return a.astype(np.uint8), None
        if whole and low >= 0 and high < 65536:
            return a.astype(np.uint16), None
        if whole and np.unique(a).size <= 256:
            raise DataError(
                f"whole values from {low:g} to {high:g} (a label map?) that no picture holds "
                "(0 to 65535); write NIfTI or .npy, or give --window to show them as intensities"
            )
    low, high = window if window is not None else np.percentile(a, (0.5, 99.5))
    return to_uint8(a, (float(low), float(high))), [float(low), float(high)]


def stack_pictures(folder: str | Path, spacing: tuple[float, float, float] | None = None) -> Image:
    """A folder of 2D pictures → a volume, slices in natural name order (img_2 before img_10).
    With the slices.json of `export_slices`, the original axis, shape and affine come back."""
    folder = Path(folder)
    side = folder / SIDE_CAR
    meta = _read_side_car(side) if side.is_file() else None
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
    if len({s[:2] for s in shapes}) == 1 and len(shapes) > 1:  # one size, grey and colour mixed
        colour = next(f for f, p in zip(files, pictures, strict=True) if p.ndim == 3)
        raise DataError(
            f"{folder}: grey and colour pictures mixed (e.g. {colour.name} is colour); stacking "
            "takes greyscale slices: save them all as grey"
        )
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
        if meta["window"] is not None:  # intensities back on their scale (8-bit steps)
            low, high = meta["window"]
            volume = (low + volume.astype(np.float32) / 255 * (high - low)).astype(np.float32)
    else:
        volume = np.stack([p.T for p in pictures], axis=2)
        affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
    return Image(volume, affine, "image", folder)


def _stored_values(path: Path, shown: np.ndarray) -> np.ndarray:
    """A picture as numbers for an array format: a palette picture's indices and a 1-bit
    picture's 0/1 (what label images store, and what nnU-Net reads), else what it shows."""
    from PIL import Image as Picture

    from segscale.imgmed.io import load_mask2d

    with Picture.open(path) as im:
        mode = im.mode
    return load_mask2d(path) if mode in ("P", "PA", "1") else shown


def check_spacing(spacing: tuple[float, ...] | None) -> None:
    """Raise DataError unless `spacing` is None or every value is positive and finite (a
    negative one would flip an axis of the affine; 0 or NaN makes no affine)."""
    if spacing is not None and not all(0 < v < math.inf for v in spacing):
        raise DataError(
            f"--spacing {','.join(f'{v:g}' for v in spacing)}: expected positive finite mm"
        )


def _read_side_car(path: Path) -> dict:
    """An export's slices.json, checked: one DataError line when it is damaged."""
    try:
        meta = json.loads(path.read_text())
        files, window, shape, affine = meta["files"], meta["window"], meta["shape"], meta["affine"]
        ok = meta["axis"] in (0, 1, 2) and isinstance(files, list) and files
        # plain names in this folder only
        ok = ok and all(
            isinstance(f, str) and f == Path(f).name and f not in (".", "..") for f in files
        )
        ok = ok and (
            window is None or (isinstance(window, list) and len(window) == 2 and _ordered(window))
        )
        ok = ok and isinstance(shape, list) and len(shape) == 3
        ok = ok and all(isinstance(n, int) and n > 0 for n in shape)
        if affine is not None:
            matrix = np.array(affine, dtype=np.float64)
            ok = ok and matrix.shape == (4, 4) and bool(np.isfinite(matrix).all())
            ok = ok and abs(float(np.linalg.det(matrix[:3, :3]))) > 1e-12
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise DataError(
            f"{path}: damaged (expected the JSON an export writes: files, axis, window, shape, "
            "affine); remove it to stack the pictures by name"
        )
    return meta


def convert(
    src: str | Path,
    dst: str | Path,
    axis: int = 2,
    window: tuple[float, float] | None = None,
    spacing: tuple[float, float, float] | None = None,
    force: bool = False,
) -> list[Path]:
    """One call for every conversion; returns the files written. `dst` without a suffix (or an
    existing folder) receives PNG slices; a folder of pictures as `src` is stacked into a volume,
    and one picture into a NIfTI is a stack of one (the same axes, `spacing` applied). An
    existing file at `dst` is replaced only with `force`."""
    from segscale._files import apart_from_input, not_a_record, output_file

    src, dst = Path(src), apart_from_input(Path(dst), Path(src), "DST")
    not_a_record(dst, "DST")
    if dst.is_file():  # a file of the user's (a volume, a picture): never replaced unasked
        output_file(dst, "DST", overwrite=force)
    if src.is_file() and sniff(src) == "dicom":  # a slice of a series: its folder is the input
        apart_from_input(dst, src.parent, "DST")
    check_window(window)
    check_spacing(spacing)
    if src.is_dir() and sniff_folder(src) == "pictures":
        if spacing is not None and (src / SIDE_CAR).is_file():
            warnings.warn(
                f"--spacing: {src / SIDE_CAR} gives the geometry; --spacing is not used",
                stacklevel=2,
            )
        image = stack_pictures(src, spacing)
    else:
        image = load(src)
        if image.kind == "image" and _family_of_name(dst) != "image":
            image = Image(_stored_values(src, image.array), None, "image", src)
            a = image.array
            if a.ndim == 3 and a.shape[-1] == 3 and (a == a[..., :1]).all():
                image = Image(a[..., 0], None, "image", src)  # grey stored as RGB: its grey
        if image.kind == "numpy" and image.affine is None and image.array.ndim == 2:
            image = Image(image.array, None, "image", src)  # no geometry, 2D: a picture's rows
        if image.kind == "image" and _family_of_name(dst) == "nifti":  # a stack of one
            if image.array.ndim != 2:
                raise DataError(f"{src}: a colour picture; a NIfTI volume takes greyscale slices")
            affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
            image = Image(image.array.T[:, :, None], affine, "image", src)
    if window is not None and _family_of_name(dst) not in ("image", None):
        warnings.warn(
            f"--window: {dst.name} keeps the values as they are; --window sets how pictures "
            "show them",
            stacklevel=2,
        )
    if dst.is_dir() or not dst.suffix:
        return export_slices(image, dst, axis, window)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write {dst}: {e.strerror}") from None
    array = _numeric(image)
    if _family_of_name(dst) == "image":
        volume = image.kind in ("nifti", "dicom") or image.affine is not None
        if volume and array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]  # one slice of a volume
        if volume and array.ndim == 2:
            array = np.ascontiguousarray(array.T)  # (x, y) → rows of y, columns of x
        if array.ndim == 3 and (volume or array.shape[-1] not in (3, 4)):  # 3 slices: no RGB
            raise DataError(
                f"{src}: a {'×'.join(map(str, array.shape))} volume into one picture {dst.name}; "
                "give a folder as the destination for one picture per slice"
            )
        if window is not None or array.dtype not in (np.uint8, np.uint16):
            array = picture_values(array, window)[0]
        if array.dtype == np.uint16 and dst.suffix.lower() in (".jpg", ".jpeg"):
            raise DataError(
                f"{dst.name}: JPEG holds 8-bit pictures and these values go to "
                f"{int(array.max())}; write a .png or .tif, or give --window"
            )
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:  # NIfTI-1 has no half floats
        array = array.astype(np.float32)
    elif array.dtype in (np.int64, np.uint64):  # NIfTI-1 writers refuse 64-bit integers
        if array.size and (
            array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max
        ):
            raise DataError(
                f"{src}: 64-bit integers beyond the 32-bit range; NIfTI cannot hold them"
            )
        array = array.astype(np.int32)
    if _family_of_name(dst) == "npy" and image.kind in ("nifti", "dicom") and array.ndim == 2:
        array = np.ascontiguousarray(array.T)  # no geometry in .npy: a 2D array is a picture's
    if image.affine is not None and _family_of_name(dst) in ("image", "npy"):
        # said as a dropped --window is, once the file is known to be written: converted back,
        # it is on a 1 mm grid at the origin
        warnings.warn(
            f"{dst.name}: a {'picture' if _family_of_name(dst) == 'image' else '.npy'} holds "
            f"no geometry; {src.name}'s voxel size and orientation are not kept (a .nii.gz, an "
            ".npz or a folder of slices keeps them)",
            stacklevel=2,
        )
    nifti_to_nifti = image.kind == "nifti" and _family_of_name(dst) == "nifti"
    like = nifti_header(src) if nifti_to_nifti else None  # its units and form codes kept
    return [save(array, dst, image.affine, like=like)]


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

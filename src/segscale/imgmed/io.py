"""Reading and writing images; files are checked by content, not only by extension."""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from segscale.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def is_nifti_name(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def check_nifti(path: Path) -> None:
    """Raise DataError unless the file starts with a NIfTI-1/2 header (gzipped or not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.open(f) as g:
                    header = g.read(548)
            else:
                header = f.read(548)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read as NIfTI ({e})") from e
    if path.name.endswith(".gz") and head != b"\x1f\x8b":
        raise DataError(f"{path}: named .gz but is not gzip-compressed; expected a NIfTI file")
    if len(header) < 348:
        raise DataError(f"{path}: too short for a NIfTI header ({len(header)} bytes)")
    sizes = {struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]}
    magic1, magic2 = header[344:348], header[4:8]
    if not (348 in sizes and magic1 in (b"n+1\x00", b"ni1\x00")) and not (
        540 in sizes and magic2.startswith((b"n+2", b"ni2"))
    ):
        raise DataError(f"{path}: not a NIfTI file (no NIfTI-1/2 header found)")


def load_nifti(path: str | Path, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array (scaled by the header's slope/intercept) and the 4×4 affine."""
    import nibabel as nib

    path = Path(path)
    check_nifti(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: cannot read NIfTI data (truncated or corrupt?): {e}") from e
    affine = np.asarray(img.affine, dtype=np.float64)
    return data, affine


def nifti_shape(path: str | Path) -> tuple[int, ...]:
    """The array shape from the header alone (no voxel data read)."""
    import nibabel as nib

    path = Path(path)
    check_nifti(path)
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: cannot read NIfTI header: {e}") from e


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write a NIfTI file atomically (temp file in the same folder, then rename)."""
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_image2d(path: str | Path) -> np.ndarray:
    """A 2D image as (H, W) for grayscale or (H, W, C) for colour, via Pillow."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "P", "LA"):
                im = im.convert("RGB")
            if im.mode == "I;16":
                return np.asarray(im, dtype=np.uint16)
            return np.asarray(im)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: cannot read as an image: {e}") from e


def save_png(array: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strip_suffix(name: str) -> str:
    for s in NIFTI_SUFFIXES + PNG_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name

"""DICOM series → one volume and its affine, with the checks a scanner export needs.

A folder holds one series: every file's SeriesInstanceUID must agree (a folder mixing series is an
error that lists them), so must the image size and orientation. Slices are ordered by their position
along the slice normal (file names and InstanceNumber are not trusted), their spacing must be
uniform, and each slice's RescaleSlope/RescaleIntercept is applied. The result is laid out like a
NIfTI volume read by nibabel: array (columns, rows, slices) and a 4×4 affine from voxel indices to
RAS millimetres (DICOM positions are LPS: x and y change sign).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from segscale.errors import DataError
from segscale.imgmed.files import list_files


def _one_series_folder(path: Path, files: list[Path]) -> None:
    """Raise DataError unless the folder holds DICOM files only: a folder of other images, a
    study folder of series folders, or a series beside other files is one line saying which
    (pydicom would say "not a readable DICOM file ... use force=True"). Called when the folder
    is empty or one of its files does not read, so a good series is not read twice."""
    from segscale.imgmed.io import sniff

    def kind(f: Path) -> str:
        try:
            return sniff(f)
        except DataError:
            return "unknown"

    if not files:
        inner = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if inner:
            raise DataError(
                f"{path}: no DICOM files here, but {len(inner)} folder(s) ({', '.join(inner[:3])}"
                f"{', ...' if len(inner) > 3 else ''}); give one series folder"
            )
        raise DataError(f"{path}: an empty folder; expected a DICOM series or a stack of pictures")
    kinds = {f: kind(f) for f in files}
    other = [f for f, k in kinds.items() if k != "dicom"]
    if len(other) == len(files):
        held = Counter(kinds.values()).most_common(1)[0][0]
        held = "files of unknown content" if held == "unknown" else f"{held} files"
        raise DataError(
            f"{path}: a folder of {held}, no DICOM series (e.g. {other[0].name}); give "
            "the files themselves, or a folder of one DICOM series"
        )
    if other:
        raise DataError(
            f"{other[0]}: {kinds[other[0]]} content in a DICOM series folder; a series folder "
            "holds only its slices"
        )


def load_dicom_series(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(volume float32 (columns, rows, slices), affine 4×4 RAS) of a series folder or one file.
    Rescale slope and intercept are applied; MONOCHROME1 pixels (low values shown white) are
    negated so that bright is high, as MONOCHROME2 stores them."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    files = list_files(path) if path.is_dir() else [path]
    if path.is_dir() and not files:
        _one_series_folder(path, files)
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError, EOFError, ValueError) as e:
            if path.is_dir():  # what the folder holds instead, when its contents tell
                _one_series_folder(path, files)
            raise DataError(f"{f}: not a readable DICOM file ({e})") from None
        if "PixelData" in ds:  # a DICOMDIR or a structured report holds no image
            slices.append((f, ds))
    if not slices:
        raise DataError(f"{path}: DICOM files without image data (no PixelData)")
    _check_one_series(path, slices)
    first = slices[0][1]
    for f, ds in slices:
        if (
            "PerFrameFunctionalGroupsSequence" in ds
            or int(getattr(ds, "NumberOfFrames", 1) or 1) > 1
        ):
            raise DataError(
                f"{f}: a multi-frame (enhanced) DICOM; segscale reads one frame per file. "
                "Convert it to NIfTI first (dcm2niix, 3D Slicer)"
            )
    orientation = _floats(first, "ImageOrientationPatient", slices[0][0], 6)
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    norms, dot = (np.linalg.norm(row_dir), np.linalg.norm(col_dir)), float(row_dir @ col_dir)
    if not (np.allclose(norms, 1, atol=1e-3) and abs(dot) < 1e-3):  # rounded to 1e-4 or so
        raise DataError(
            f"{slices[0][0]}: ImageOrientationPatient {list(orientation)} is not two orthogonal "
            f"unit vectors (lengths {norms[0]:.4g}, {norms[1]:.4g}; cosine {dot:.4g}); a "
            "damaged or hand-edited header"
        )
    normal = np.cross(row_dir, col_dir)
    for f, ds in slices:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", f, 6), orientation, atol=1e-4):
            raise DataError(f"{f}: its orientation differs from {slices[0][0].name}'s; one series?")
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise DataError(
                f"{f}: {ds.Rows}×{ds.Columns} pixels, but {slices[0][0].name} has "
                f"{first.Rows}×{first.Columns}"
            )
        spacing = _floats(ds, "PixelSpacing", f, 2)
        if not np.allclose(spacing, _floats(first, "PixelSpacing", slices[0][0], 2), rtol=1e-4):
            raise DataError(
                f"{f}: PixelSpacing {list(spacing)} mm, but {slices[0][0].name} has "
                f"{list(_floats(first, 'PixelSpacing', slices[0][0], 2))}; one series?"
            )
    positions = np.array([_floats(ds, "ImagePositionPatient", f, 3) for f, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices, positions = [slices[i] for i in order], positions[order]
    depth = positions @ normal
    gaps = np.diff(depth)
    if len(gaps) and np.any(gaps < 1e-6):
        i = int(np.argmin(gaps))
        raise DataError(
            f"{path}: {slices[i][0].name} and {slices[i + 1][0].name} lie at the same position; "
            "two series or duplicated files?"
        )
    # 1% of the spacing, and never under 0.02 mm: positions written to 0.01 mm round by 0.005
    if len(gaps) and np.ptp(gaps) > max(0.01 * float(np.mean(gaps)), 0.02):
        raise DataError(
            f"{path}: slice spacing varies from {gaps.min():.3g} to {gaps.max():.3g} mm "
            "(missing slices?); resampling such a series is not supported"
        )
    row_spacing, col_spacing = _floats(first, "PixelSpacing", slices[0][0], 2)
    step = (
        (positions[-1] - positions[0]) / (len(slices) - 1)
        if len(slices) > 1
        else normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    )
    if len(slices) > 2:  # one slice off the line the others make lies elsewhere than its pixels
        off = positions - (positions[0] + np.arange(len(slices))[:, None] * step)
        off -= np.outer(off @ normal, normal)  # in-plane only: depth has its own check above
        distance = np.linalg.norm(off, axis=1)
        worst = int(np.argmax(distance))
        # half a pixel, and never under 0.1 mm: positions are written rounded (to 0.1 mm, often)
        if distance[worst] > max(0.5 * min(row_spacing, col_spacing), 0.1):
            raise DataError(
                f"{slices[worst][0]}: its ImagePositionPatient lies {distance[worst]:.3g} mm "
                "off the line the series' other slices make; a moved slice, or two series?"
            )
    if len(slices) > 1:  # positions off the slice normal: a gantry tilt shears the grid
        tilt = np.degrees(np.arccos(min(1.0, abs(float(step @ normal)) / np.linalg.norm(step))))
        if tilt > 0.5:
            warnings.warn(
                f"{path}: slices sheared by {tilt:.1f}° against their normal (gantry tilt); the "
                "affine keeps the shear, which ITK-based tools refuse to read (dcm2niix can "
                "resample a tilted series)",
                stacklevel=2,
            )
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # along a row: the column index grows
    lps[:3, 1] = col_dir * row_spacing  # down a column: the row index grows
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS → RAS
    volume = np.empty((first.Columns, first.Rows, len(slices)), dtype=np.float32)
    for k, (f, ds) in enumerate(slices):
        try:
            pixels = ds.pixel_array
        except Exception as e:  # pydicom raises many kinds for unsupported or damaged pixel data
            raise DataError(f"{f}: cannot decode the pixel data ({e})") from None
        if pixels.ndim != 2:
            raise DataError(
                f"{f}: pixel data of shape {pixels.shape}; expected one greyscale frame"
            )
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        volume[:, :, k] = pixels.T.astype(np.float32) * slope + intercept
        if str(getattr(ds, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
            volume[
                :, :, k
            ] *= -1  # low values shown white: negated, so bright is high (MONOCHROME2)
    return volume, affine


def series_axis_codes(path: str | Path) -> str | None:
    """The axis codes (e.g. 'LPS') of the volume load_dicom_series makes of a series, from one
    slice's ImageOrientationPatient (no pixel data read): columns, rows, then the slice normal
    (the loader orders slices along it). None when no file gives an orientation."""
    import pydicom

    from segscale.imgmed.geometry import axis_codes

    path = Path(path)
    for f in list_files(path) if path.is_dir() else [path]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            row, col = (np.array(v, float) for v in np.reshape(ds.ImageOrientationPatient, (2, 3)))
        except Exception:  # not DICOM, damaged, or no orientation: the loader says which
            continue
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1], lps[:3, 2] = row, col, np.cross(row, col)
        return axis_codes(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    return None


def _check_one_series(path: Path, slices: list) -> None:
    uids = Counter(str(getattr(ds, "SeriesInstanceUID", "?")) for _, ds in slices)
    if len(uids) > 1:
        described = {
            str(getattr(ds, "SeriesInstanceUID", "?")): str(getattr(ds, "SeriesDescription", ""))
            for _, ds in slices
        }
        listing = "; ".join(
            f"{uid} ({n} files{', ' + described[uid] if described[uid] else ''})"
            for uid, n in uids.most_common()
        )
        raise DataError(
            f"{path}: mixes {len(uids)} DICOM series: {listing}; put each series in its own folder"
        )


def _floats(ds: object, key: str, f: Path, n: int) -> list[float]:
    value = getattr(ds, key, None)
    if value is None or len(value) != n:
        raise DataError(f"{f}: missing or malformed {key} (expected {n} numbers)")
    return [float(v) for v in value]

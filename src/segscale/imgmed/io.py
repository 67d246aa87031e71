"""Reading and writing images; files are checked by content, not only by extension."""

from __future__ import annotations

import gzip
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segscale._files import publish
from segscale.errors import DataError
from segscale.imgmed.files import DICOM_SUFFIXES, NIFTI_SUFFIXES, PNG_SUFFIXES, dicom_head


def check_nifti(path: Path) -> bool:
    """Raise DataError unless the file holds a NIfTI-1/2 header, gzipped or not, whatever its
    name says; returns whether it is gzip-compressed."""
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
    if not head:  # said alike by every reader (sniff)
        raise DataError(f"{path}: empty file")
    compressed = head == b"\x1f\x8b"
    if not _is_nifti_header(header):
        if not compressed:
            _other_content(path)
        if path.name.lower().endswith(".gz") and not compressed:
            raise DataError(f"{path}: named .gz but is not gzip-compressed; expected a NIfTI file")
        if len(header) < 348:
            raise DataError(f"{path}: too short for a NIfTI header ({len(header)} bytes)")
        raise DataError(f"{path}: not a NIfTI file (no NIfTI-1/2 header found)")
    return compressed


def _is_nifti_header(header: bytes) -> bool:
    if len(header) < 348:
        return False
    sizes = {struct.unpack("<i", header[:4])[0], struct.unpack(">i", header[:4])[0]}
    magic1, magic2 = header[344:348], header[4:8]
    return (348 in sizes and magic1 in (b"n+1\x00", b"ni1\x00")) or (
        540 in sizes and magic2.startswith((b"n+2", b"ni2"))
    )


def _open_nifti(path: Path) -> Any:
    """nibabel's image of a NIfTI file, read by its content: a gzipped file named .nii, or a
    plain one named .nii.gz, is read as what it holds (with a warning). Raises DataError."""
    import nibabel as nib

    compressed = check_nifti(path)
    try:
        # nibabel picks the format by the name, and lower-cases some mixed-case suffixes
        if path.name.endswith(".nii.gz" if compressed else ".nii"):
            return nib.load(str(path))
        if compressed == path.name.lower().endswith(".gz"):  # the name is right, in other case
            return _from_bytes(path, compressed)
        named = (
            ".nii"
            if path.name.lower().endswith(".nii")
            else ".nii.gz"
            if path.name.lower().endswith(".nii.gz")
            else f"'{path.name}'"
        )
        warnings.warn(
            f"{path}: named {named} but {'gzip-compressed' if compressed else 'not compressed'}; "
            "read by its content (a NIfTI file)",
            stacklevel=3,
        )
        return _from_bytes(path, compressed)
    except DataError:
        raise
    except Exception as e:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: cannot read NIfTI (truncated or corrupt?): {e}") from e


def _from_bytes(path: Path, compressed: bool) -> Any:
    """A NIfTI image from the file's bytes, whatever its name (nibabel reads files by name)."""
    import nibabel as nib

    try:
        if compressed:
            with gzip.open(path) as g:
                data = g.read()
        else:
            data = path.read_bytes()
        sizes = {struct.unpack("<i", data[:4])[0], struct.unpack(">i", data[:4])[0]}
        return (nib.Nifti2Image if 540 in sizes else nib.Nifti1Image).from_bytes(data)
    except Exception as e:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: cannot read NIfTI (truncated or corrupt?): {e}") from e


def _without_trailing_ones(shape: tuple[int, ...], keep: int = 3) -> tuple[int, ...]:
    """(X, Y, Z, 1, 1) → (X, Y, Z): axes of size 1 after the first `keep` carry nothing."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > keep and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def load_nifti(path: str | Path, dtype: type | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array (scaled by the header's slope/intercept; dtype None keeps the file's type
    when there is no scaling) and the 4×4 affine. Trailing axes of size 1 after the third, as
    some writers store 3D volumes ((X, Y, Z, 1)), are dropped with a warning; `save_nifti` with
    the input's header writes them back. ITK's multi-component images, (X, Y, Z, 1, C) with
    the components on NIfTI's fifth axis, are read as (X, Y, Z, C) channels."""
    data, affine, _ = read_nifti(path, dtype)
    return data, affine


def read_nifti(
    path: str | Path, dtype: type | None = np.float32
) -> tuple[np.ndarray, np.ndarray, Any]:
    """load_nifti's array and affine, and the file's header (for an output with its geometry),
    from one read of the file."""
    path = Path(path)
    img = _open_nifti(path)
    stored = img.get_data_dtype()
    if stored.kind == "c":  # numpy would drop the imaginary part with a warning naming no file
        raise DataError(f"{path}: complex values ({stored}); expected real numbers per voxel")
    if stored.names is not None:  # RGB24/RGBA32: a record per voxel, not a number
        raise DataError(
            f"{path}: a {stored.names} colour NIfTI (one record per voxel); expected one number "
            "per voxel: store the colours as a 4th axis of 3 channels"
        )
    if 0 in img.shape:  # nibabel reads it as shape (0,): the header's shape names it
        raise DataError(f"{path}: empty image (shape {tuple(img.shape)})")
    try:
        data = np.asarray(img.dataobj, dtype=dtype) if dtype else np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for a damaged file
        raise DataError(f"{path}: cannot read NIfTI data (truncated or corrupt?): {e}") from e
    shape = _without_trailing_ones(data.shape)
    if shape != data.shape:
        warnings.warn(
            f"{path}: shape {data.shape} read as {shape} (trailing axes of size 1 dropped)",
            stacklevel=3,
        )
        data = data.reshape(shape)
    if data.ndim == 5 and data.shape[3] == 1:  # ITK's vector image: (X, Y, Z, 1 time, C)
        data = data[:, :, :, 0, :]
    # a zero sform, or zero voxel sizes without one: no place for any voxel (nibabel's axis
    # codes and every resampling fail on it far from the file)
    affine = _voxel_to_world(img.affine, path, "its header's affine (sform, qform or voxel sizes)")
    _forms_agree(img, path)
    return data, affine, img.header


def _forms_agree(img: Any, path: Path) -> None:
    """Warn when a file's qform and sform, both set, place it differently: segscale (like nibabel)
    uses the sform, and a tool that reads the qform would put the image elsewhere."""
    header = img.header
    if int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0:
        q, s = img.get_qform(), img.get_sform()
        apart = float(np.abs(q - s).max())
        if apart > 1e-3:
            warnings.warn(
                f"{path}: its qform and sform disagree (by up to {apart:.3g} mm or its "
                "direction); segscale uses the sform, tools that read the qform place it "
                "elsewhere",
                stacklevel=4,
            )


def nifti_header(path: str | Path) -> Any:
    """The file's NIfTI header (nibabel), for writing an output with the same geometry. Read
    beside its data (load_nifti), which says what is odd about the file once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _open_nifti(Path(path)).header


def stored_axis_codes(header: Any) -> str | None:
    """The axis codes (e.g. 'RAS') a NIfTI header's affine gives its array, or None when the
    header gives no orientation (qform and sform codes 0: nibabel then guesses an LAS-like
    affine from the voxel sizes alone)."""
    from segscale.imgmed.geometry import axis_codes

    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        return None
    return axis_codes(header.get_best_affine())


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    like: Any = None,
    description: str | None = None,
) -> None:
    """Write a NIfTI file atomically (temp file in the same folder, then rename). With `like` (an
    input's header, from nifti_header), the output carries that input's geometry exactly: its
    qform and sform with their codes, its units, its trailing axes of size 1 and their steps (the
    time step, TR, of a 4D file)."""
    import nibabel as nib

    path = Path(path)
    if like is not None:
        own = tuple(int(n) for n in like.get_data_shape())
        if array.shape != own and _without_trailing_ones(own, 2) == _without_trailing_ones(
            array.shape, 2
        ):
            array = array.reshape(own)  # (X, Y, Z, 1) back as such; a 2D input's mask as (X, Y)
    img = nib.Nifti1Image(array, affine)
    if like is not None:
        img.set_qform(like.get_qform(), code=int(like["qform_code"]))
        img.set_sform(like.get_sform(), code=int(like["sform_code"]))
        img.header.set_xyzt_units(*like.get_xyzt_units())
        if array.ndim > 3:  # the time step (TR) and any further axis steps, which no affine holds
            pixdim = img.header["pixdim"]
            pixdim[4 : array.ndim + 1] = like["pixdim"][4 : array.ndim + 1]
            img.header["pixdim"] = pixdim
            img.header["toffset"] = like["toffset"]
    else:
        # a new file's geometry in both forms, as ITK and dcm2niix write it: tools that read the
        # qform alone (nibabel leaves it unset) place it right; not a shear the qform cannot
        # hold (a gantry tilt), which only the sform keeps
        code = int(img.header["sform_code"])
        img.set_qform(affine, code=code)
        if not np.allclose(img.get_qform(), affine, atol=1e-4):
            img.set_qform(affine, code=0)
    img.header.set_data_dtype(array.dtype)
    if description is not None:  # the header's 80-byte descrip field
        img.header["descrip"] = description.encode()[:79]
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        nib.save(img, tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _one_frame(im: Any, path: Path) -> None:
    frames = getattr(im, "n_frames", 1)
    if frames > 1:  # reading frame 0 alone would drop the rest without a word
        raise DataError(
            f"{path}: {frames} frames (a multi-page or animated picture); expected one 2D image"
        )


def _picture_read_as(mode: str) -> str | None:
    """The Pillow mode load_image2d converts a picture of `mode` to; None when read as stored."""
    if mode in ("LA", "La", "1"):
        return "L"
    if mode in ("L", "I", "F", "RGB") or mode.startswith("I;16"):
        return None
    return "RGB"  # RGBA, RGBa, P, PA, CMYK, YCbCr, LAB, HSV


def picture_note(path: str | Path) -> str:
    """How a picture stored in another mode is read, for `imgmed info`, as an image
    (load_image2d) and, where that differs, as a mask (load_mask2d): 'stored as P (palette),
    read as RGB as an image, as its palette indices as a mask'; '' when read as stored or not
    a picture."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            transparent = "transparency" in im.info  # a palette's or grey's transparent colour
    except (OSError, UnidentifiedImageError, ValueError):
        return ""
    read_as = _picture_read_as(mode)
    if read_as is None:
        return ""
    dropped = " (transparency dropped)" if "A" in mode or "a" in mode or transparent else ""
    image = "grey 0/255" if mode == "1" else "grey" if read_as == "L" else read_as
    mask = {"1": "0/1", "P": "its palette indices", "PA": "its palette indices"}.get(mode)
    stored = {"1": "1-bit", "P": "P (palette)", "PA": "PA (palette with alpha)"}.get(mode, mode)
    note = f"stored as {stored}, read as {image}{dropped}"
    return f"{note} as an image, as {mask} as a mask" if mask else note


def load_image2d(path: str | Path) -> np.ndarray:
    """A 2D image as (H, W) for grayscale or (H, W, C) for colour, via Pillow, read as what it
    shows: palette → RGB, 1-bit → 0/255 grey, grey with alpha → grey, RGBA → RGB (transparency is
    not an image channel), CMYK and YCbCr → RGB. For label images: load_mask2d."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            _one_frame(im, path)
            read_as = _picture_read_as(im.mode)
            if read_as is not None:
                im = im.convert(read_as)
            if im.mode.startswith("I;16"):
                return np.asarray(im, dtype=np.uint16)
            return np.asarray(im)
    except DataError:  # ours, saying what is wrong already
        raise
    except (OSError, UnidentifiedImageError, ValueError) as e:
        _other_content(path)
        raise DataError(f"{path}: cannot read as an image: {e}") from e


def load_mask2d(path: str | Path) -> np.ndarray:
    """A 2D label image as (H, W) integers, with the values a user sees in it, for every mode
    segmentation tools write: 1-bit → 0/1; 8- and 16-bit grey as stored; palette → its indices
    (what nnU-Net and Pillow read); grey stored as RGB or RGBA (R = G = B) → that grey; grey with
    alpha → the grey. Raises DataError for a colour mask (RGB that is not grey): its colours have
    no class order."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            _one_frame(im, path)
            if im.format == "JPEG":  # by content: a .png name does not make it lossless
                warnings.warn(
                    f"{path.parent}: masks stored as JPEG, whose lossy compression changes "
                    "label values along every edge; save masks as PNG",
                    stacklevel=2,
                )
            mode = im.mode
            if mode == "1":
                return np.asarray(im, dtype=np.uint8)  # booleans → 0/1
            if mode in ("L", "P", "I", "F") or mode.startswith("I;16"):
                array = np.asarray(im)
                return array.astype(np.uint16) if mode.startswith("I;16") else array
            if mode in ("LA", "PA", "RGBA"):
                _not_in_alpha(im, path)
            if mode in ("LA", "PA"):
                return np.asarray(im.getchannel(0))
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"))
            else:
                raise DataError(
                    f"{path}: a {mode} picture; expected a label image (grey, palette or 1-bit)"
                )
    except DataError:  # ours, saying what is wrong already
        raise
    except (OSError, UnidentifiedImageError, ValueError) as e:
        _other_content(path)
        raise DataError(f"{path}: cannot read as an image: {e}") from e
    grey = rgb[..., 0]
    if not ((rgb[..., 1] == grey) & (rgb[..., 2] == grey)).all():
        y, x = np.argwhere((rgb != grey[..., None]).any(-1))[0]
        raise DataError(
            f"{path}: a colour mask (pixel ({y}, {x}) is RGB {tuple(int(v) for v in rgb[y, x])}); "
            "expected a single-channel label image: grey values, a palette's indices or 1-bit"
        )
    return grey


def _not_in_alpha(im: Any, path: Path) -> None:
    """Refuse a mask drawn in its alpha channel (one colour everywhere, the shape in its
    transparency): read as what it shows, it would be one value with no foreground."""
    alpha = np.asarray(im.getchannel("A"))
    colour = np.asarray(im)[..., :3] if im.mode == "RGBA" else np.asarray(im.getchannel(0))
    if alpha.min() != alpha.max() and (colour == colour.reshape(-1, *colour.shape[2:])[0]).all():
        raise DataError(
            f"{path}: one colour everywhere, with the shape in its alpha channel (transparency); "
            "save the mask as grey values"
        )


def save_png(array: np.ndarray, path: str | Path, description: str | None = None) -> None:
    """Write a picture atomically in the format its name says (PNG by default); `description`:
    a PNG's Software text chunk."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
        kind = fmt.get(path.suffix.lower(), "PNG")
        text = PngImagePlugin.PngInfo()
        if description is not None and kind == "PNG":
            text.add_text("Software", description)
        Image.fromarray(array).save(
            tmp, format=kind, **({"pnginfo": text} if kind == "PNG" else {})
        )
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ one load / save pair


@dataclass
class Image:
    """An image or volume as loaded: the array, its 4×4 voxel → RAS affine (None for 2D pictures
    and plain arrays), what it was read from, and where."""

    array: np.ndarray
    affine: np.ndarray | None
    kind: str  # nifti | dicom | image | numpy
    path: Path

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """Voxel size in mm along each array axis (volumes with an affine only)."""
        if self.affine is None:
            return None
        from segscale.imgmed.geometry import spacing_from_affine

        return spacing_from_affine(self.affine)


def sniff(path: Path) -> str:
    """What a path holds, from its content: dicom (a folder of a series, or one file), nifti,
    image (PNG/JPEG/TIFF/BMP), npy or npz."""
    if path.is_dir():
        return "dicom"
    try:
        with open(path, "rb") as f:
            head = f.read(348)  # a NIfTI-1 header's length; its magic sits at 344
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not head:
        raise DataError(f"{path}: empty file")
    if head[:2] == b"\x1f\x8b" or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"  # gzip: NIfTI is the only gzipped format read here; checked on load
    if len(head) >= 8 and struct.unpack("<i", head[:4])[0] in (348, 540):
        return "nifti"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:4] == b"PK\x03\x04":
        return "npz"
    if dicom_head(head):
        return "dicom"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")):
        return "image"
    raise DataError(f"{path}: unknown content; expected NIfTI, DICOM, PNG/JPEG/TIFF, .npy or .npz")


def _family_of_name(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((*PNG_SUFFIXES, ".bmp")):
        return "image"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return None


def content_kind(path: Path) -> str:
    """sniff's kind of `path`, refused when its name says another format (a picture named
    .nii.gz: a mistake, or its output would take a name other than the input's). A NIfTI named
    with the wrong compression is NIfTI either way (read with a warning). Raises DataError."""
    kind = sniff(path)
    _misnamed(path, kind)
    return kind


def _misnamed(path: Path, kind: str) -> None:
    named = _family_of_name(path)
    if named is not None and named != kind and not path.is_dir():
        article = "an" if named[0] in "aeiou" else "a"
        raise DataError(f"{path}: named like {article} {named} file but holds {kind} data")


def _other_content(path: Path) -> None:
    """For a reader chosen by the file's name that cannot read it: content_kind's DataError
    when the content is another known format (a PNG named .nii.gz), or sniff's when it is
    empty or of no known format (a text file named .png), so that every command says it
    alike; nothing when it is of the format its name says (the reader says what is wrong:
    truncated, corrupt)."""
    _misnamed(path, sniff(path))


MAX_AFFINE_MM = 1e6  # a kilometre: no voxel size or scanner position comes near it


def _voxel_to_world(affine: Any, path: Path, what: str = "its 'affine'") -> np.ndarray:
    """A file's affine (`what`: an .npz's 'affine' entry, a NIfTI header's) as a 4×4 float64
    voxel → world map (mm). Raises DataError naming the file unless it is finite, within
    ±MAX_AFFINE_MM, [0, 0, 0, 1] below, with a 3×3 part that can be inverted (a zero or 3×3
    matrix places no voxel; nibabel fails on it deep in a conversion or a geometry check)."""
    matrix = np.asarray(affine)
    if (
        matrix.shape != (4, 4)
        or not np.issubdtype(matrix.dtype, np.number)
        or np.iscomplexobj(matrix)
    ):
        raise DataError(
            f"{path}: {what} is {matrix.dtype} of shape {matrix.shape}; expected a 4×4 "
            "voxel → world matrix of numbers"
        )
    matrix = matrix.astype(np.float64)
    if not np.isfinite(matrix).all() or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise DataError(
            f"{path}: {what} has NaN or infinite values, or a last row other than "
            "[0, 0, 0, 1]; expected a 4×4 voxel → world matrix"
        )
    if np.abs(matrix).max() > MAX_AFFINE_MM:  # 1e300: geometry overflows to inf downstream
        raise DataError(
            f"{path}: {what} has values beyond ±{MAX_AFFINE_MM:g} mm (largest "
            f"{np.abs(matrix).max():.3g}); expected voxel sizes and a position in mm"
        )
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise DataError(
            f"{path}: {what} maps the voxels onto a plane or a point (its 3×3 part cannot "
            "be inverted); expected a voxel size on each axis"
        )
    return matrix


def load(path: str | Path, *, check_finite: bool = True) -> Image:
    """Read any supported image, checked by content: a name that says one format over data of
    another is an error, as are empty images and (by default) NaN or infinite values."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    kind = content_kind(path)
    affine: np.ndarray | None = None
    if kind == "nifti":
        array, affine = load_nifti(path, dtype=None)
    elif kind == "dicom":
        from segscale.imgmed.dicom import load_dicom_series

        array, affine = load_dicom_series(path)
    elif kind == "image":
        array = load_image2d(path)
    else:
        try:
            if kind == "npy":
                array = np.load(path, allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as z:
                    if "array" not in z:
                        raise DataError(f"{path}: an .npz without an 'array' entry ({list(z)})")
                    array = z["array"]
                    if "affine" in z:
                        affine = _voxel_to_world(z["affine"], path)
        except DataError:  # ours (an .npz without its entry): the reason, not "corrupt?"
            raise
        except ValueError as e:
            if "allow_pickle" in str(e):  # an object array: unpickling runs code
                raise DataError(
                    f"{path}: holds Python objects (a pickled {kind}), which segscale does not "
                    "load; save a numeric array"
                ) from None
            raise DataError(f"{path}: cannot read {kind} data (truncated or corrupt?): {e}") from e
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read {kind} data (truncated or corrupt?): {e}") from e
        kind = "numpy"
    if array.size == 0:
        raise DataError(f"{path}: empty image (shape {array.shape})")
    if array.ndim < 2:  # a .npy of one number or one row: no picture (written as a NIfTI of 0)
        raise DataError(
            f"{path}: a {array.ndim}-D array (shape {array.shape}); expected an image (2D, or 3D "
            "with channels) or a volume (3D or 4D)"
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(
        array
    ):  # complex k-space, text: no image any reader of masks and scans takes
        raise DataError(f"{path}: {array.dtype} values; expected real numbers")
    if check_finite and np.issubdtype(array.dtype, np.floating):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(f"{path}: {bad} NaN or infinite voxel(s) of {array.size}")
    return Image(array, affine, kind, path)


def save(
    array: np.ndarray, path: str | Path, affine: np.ndarray | None = None, like: Any = None
) -> Path:
    """Write by the name's format (NIfTI, PNG/JPEG/TIFF, .npy, .npz with the affine), atomically:
    a refused write (disk full, no permission) leaves nothing behind and names the file. `like`:
    a NIfTI input's header, whose geometry and units a NIfTI output keeps (save_nifti)."""
    path = Path(path)
    family = _family_of_name(path)
    try:
        if family == "nifti":
            save_nifti(array, np.eye(4) if affine is None else affine, path, like)
        elif family == "image":
            if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3):
                raise DataError(
                    f"{path}: pictures take 2D uint8/uint16 arrays, got {array.ndim}D {array.dtype}; "
                    "window it to 8 bit first (to_uint8, or `segscale imgmed convert --window`)"
                )
            save_png(array, path)  # Pillow picks the format from the name
        elif family in ("npy", "npz"):
            _save_numpy(array, affine, path, compressed=family == "npz")
        else:
            raise DataError(
                f"{path}: cannot tell the format from the name; use .nii.gz, .png, .npy or .npz"
            )
    except OSError as e:
        reason = e.strerror or f"the write was cut short ({e}); disk full?"
        raise DataError(f"cannot write {path}: {reason}") from None
    return path


def _save_numpy(array: np.ndarray, affine: np.ndarray | None, path: Path, compressed: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if compressed:
                extra = {} if affine is None else {"affine": affine}
                np.savez_compressed(f, array=array, **extra)
            else:
                np.save(f, array, allow_pickle=False)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_uint8(
    array: np.ndarray,
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Window intensities to 0..255: [low, high] given, or the volume's percentiles (robust to a
    few bright voxels). Label maps (few integer values) keep their values when they fit in 8 bit."""
    a = np.asarray(array)
    if window is None and np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() < 256:
        return a.astype(np.uint8)
    low, high = window if window is not None else np.percentile(a, percentiles)
    if high <= low:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round(np.clip((a - low) / (high - low), 0, 1) * 255).astype(np.uint8)

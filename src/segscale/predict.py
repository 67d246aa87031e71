"""`segscale predict`: segment NIfTI volumes or 2D images; masks come back in each input's geometry
(same shape, trailing axes of size 1 included; the input's qform and sform with their codes; the
same file name), with the training resize undone."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segscale._files import output_dir
from segscale.errors import DataError, SegscaleError
from segscale.imgmed.files import (
    NIFTI_SUFFIXES,
    PNG_SUFFIXES,
    case_key,
    is_nifti_name,
    list_files,
    list_images,
    strip_suffix,
)
from segscale.imgmed.geometry import one_slice_on_axis, to_axis_codes
from segscale.imgmed.io import (
    content_kind,
    nifti_header,
    save_nifti,
    save_png,
    sniff,
    stored_axis_codes,
)
from segscale.imgmed.prepare import MIN_PLANE, load_channel_files
from segscale.imgmed.transforms import Plane, from_grid, from_slices, inplane_spacing, preprocess
from segscale.parallel.base import resolve_amp
from segscale.zoo import load_any_model


@torch.no_grad()
def segment_slices(
    models: torch.nn.Module | list[torch.nn.Module],
    x: torch.Tensor,
    plane: Plane,
    batch_size: int,
    device: torch.device,
    amp: str = "none",
) -> np.ndarray:
    """(N, C, S, S) inputs → (N, H, W) labels: logits taken back to the slice's own grid (the
    resize or the spacing resampling undone), then argmax. Several models (an ensemble): the
    mean of their softmax probabilities on that grid, then argmax, as nnU-Net ensembles its
    folds; one model gives the same mask either way. `amp` "bf16": the networks under bf16
    autocast (the resampling, softmax and argmax in fp32)."""
    models = models if isinstance(models, list) else [models]
    masks = []
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size].to(device, non_blocking=True)
        total = None
        for model in models:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                logits = model(batch)
            out = from_grid(logits.float(), plane, x.shape[-1])
            out = out.softmax(1) if len(models) > 1 else out
            total = out if total is None else total + out
        masks.append(total.argmax(1).to(torch.uint8).cpu())
    return torch.cat(masks).numpy()


class Written(list):
    """The masks `predict` wrote (a list of paths), with how fast the model segmented them:
    `slices`, `seconds` (the network's share: preprocessing and file I/O excluded) and
    `images_per_second`."""

    slices: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else float("nan")


def predict(
    run_dir: Path | list[Path],
    inputs: list[Path],
    out_dir: Path,
    batch_size: int = 16,
    device: str = "cpu",
    amp: str = "auto",
    force: bool = False,
) -> Written:
    """Segment `inputs` with the model of a finished run folder or of a pulled zoo entry's folder,
    or with several run folders as one ensemble (their mean softmax, see segment_slices: the
    runs of a repeat share one config's store and preprocessing, which the first run gives);
    returns the masks written (out_dir/<input name>) with the model's throughput. `amp`: auto is
    bf16 on a GPU that supports it, none (fp32) elsewhere. All or nothing: the masks are written
    into a hidden folder in `out_dir` and moved into place once every input is segmented, so an
    input that fails (unreadable, wrong channels) leaves `out_dir` as it was. A mask an earlier
    predict wrote of the same input file name is replaced; a mask of another input (a.jpg's,
    where a.tif's goes) or any other file of a mask's name (a reference label: nnU-Net names
    them alike) only with `force`. A volume stored in other axes than the training volumes
    (e.g. LPS against RAS) is segmented in theirs (a permutation and flips, exact) and its
    mask written in its own. Raises SegscaleError for bad input."""
    if amp not in ("auto", "none", "bf16"):
        raise SegscaleError(f"--amp {amp}: expected auto, none or bf16")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SegscaleError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SegscaleError(f"--device {device}: no CUDA device is available; use --device cpu")
    dev = torch.device(device)
    amp = resolve_amp(amp, dev)
    out_dir = output_dir(out_dir)  # inputs and outputs checked before the model is read
    targets = _targets(input_cases(list_images(inputs)), out_dir, force)
    sources = run_dir if isinstance(run_dir, list) else [run_dir]
    loaded = [load_any_model(s, dev) for s in sources]  # runs or pulled zoo entries' folders
    models, plan = [m for m, _ in loaded], loaded[0][1]
    run_dir = sources[0]
    if plan.cfg.task.name != "segmentation":
        raise SegscaleError(
            f"{run_dir}: a {plan.cfg.task.name} run; `segscale predict` writes masks, for "
            "segmentation runs (score a classifier with `segscale evaluate`)"
        )
    for folder in (Path(p).resolve() for p in inputs):  # (equal to one: _targets says why)
        if folder.is_dir() and out_dir != folder and out_dir.is_relative_to(folder):
            raise SegscaleError(  # a dataset's images/pred is read as a DICOM series by prepare
                f"--out {out_dir}: inside the input folder {folder}; a dataset's images/ "
                "folder would then hold masks: write them to another folder"
            )
    store = plan.store
    # Every slice of a volume gets segmented, whatever subset training used.
    prep = dataclasses.replace(store.preprocessing, slices=None, foreground_margin=None)
    class_to_raw = mask_values(store.meta)
    orientation = store.orientation
    declared = store.meta.get("declared")  # [name, labels, the source's channel names]
    source_channels = declared[2] if isinstance(declared, list) and len(declared) > 2 else None
    unknown: list[Path] = []  # volumes segmented as stored: the model's orientation unknown
    made = _missing_folders(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SegscaleError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    written = Written()

    def segment(files: list[Path], target: Path) -> None:
        volume = sniff(files[0]) == "nifti"  # by content: the name may lie
        image, affine = load_channel_files(files, volume)
        back, stored = None, affine  # back: the orientation that takes the mask to the input's
        if volume:
            header = nifti_header(files[0])
            codes = stored_axis_codes(header)
            if codes is None:
                warnings.warn(
                    f"{files[0]}: no orientation in its header (qform and sform codes 0); "
                    "segmented as stored",
                    stacklevel=2,
                )
            elif orientation is None:  # unknown, or a store of pictures (which have none)
                if store.meta.get("source_kind") != "png2d":
                    unknown.append(files[0])
            elif codes != orientation and 1 not in image.shape[:3]:
                # slices cut in the plane the network was trained on (an LPS copy of a RAS
                # volume scored Dice 0.50 where the RAS one scored 0.76); one slice is what it is
                image, affine, back = to_axis_codes(image, affine, orientation)
            one_slice = one_slice_on_axis(image, affine, prep.axis) if back is None else None
            if one_slice is not None:  # (X, 1, Z) cut along its axis of size 1
                image, affine, back = one_slice
            spatial = image.shape[:3]
        else:
            image = _as_channels(image, plan.in_channels, prep)
            spatial = image.shape[:2]
        picking = _picking(prep, image, volume, files, source_channels)
        x, _ = preprocess(image, volume, picking, affine=affine)
        if x.shape[1] != plan.in_channels:
            raise DataError(
                f"{files[0]}: {x.shape[1]} channel(s) after preprocessing; the model was trained "
                f"on {plan.in_channels}" + _channel_hint(plan.in_channels, files)
            )
        hw = tuple(s for i, s in enumerate(spatial) if i != prep.axis) if volume else spatial
        plane = Plane.of(prep, hw, inplane_spacing(affine, prep.axis) if volume else None)
        _say_degenerate(files[0], image, hw, plane.resampled)
        started = time.perf_counter()
        masks = segment_slices(models, x, plane, batch_size, dev, amp)
        written.seconds += time.perf_counter() - started  # .cpu() in it waited for the device
        written.slices += len(x)
        if volume:
            mask = class_to_raw[from_slices(masks, prep.axis)]
            if back is not None:
                from nibabel.orientations import apply_orientation

                mask = np.ascontiguousarray(apply_orientation(mask, back))
            save_nifti(mask, stored, target, like=header, description=_mark(files))
        else:
            save_png(class_to_raw[masks[0]], target, description=_mark(files))

    try:
        stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".segscale-predict-"))
    except OSError as e:
        raise SegscaleError(f"--out {out_dir}: cannot write there ({e.strerror})") from None
    try:
        for target, files in targets.items():
            try:
                segment(files, stage / target.name)
            except DataError as e:  # a message of the shared readers that names no file
                if str(files[0]) not in str(e) and files[0].name not in str(e):
                    raise DataError(f"{files[0]}: {e}") from None
                raise
        for target in targets:  # every input segmented: publish them all
            os.replace(stage / target.name, target)
            written.append(target)
        if unknown:
            warnings.warn(
                f"{run_dir}: its store does not record the axes its volumes were stored in "
                f"(published by an older segscale); {len(unknown)} volume(s) segmented as "
                f"stored (e.g. {unknown[0].name}): give them in the training data's axes",
                stacklevel=2,
            )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not written:  # folders made for masks that never came
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return written


CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def input_cases(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """(mask name, its input files) per case to segment, in input order. A <case>_0000<ending>
    file is nnU-Net v2's first channel of <case>: it and the <case>_0001, _0002, ... files
    given from the same folder are one case, whose mask is named <case><ending> as nnU-Net
    names predictions (so that `segscale evaluate` pairs it with labelsTs/<case><ending>).
    Every other file is a case of its own, its mask named like it (.png for 2D pictures). How
    many channels the files hold (an RGB picture is 3) is checked against the model when they
    are read. Raises DataError for a case whose channel files skip a number."""
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    for f in files:
        m = CHANNEL_FILE.match(strip_suffix(f.name))
        if m:
            groups.setdefault((f.parent, m["case"]), {})[int(m["channel"])] = f
    cases, done = [], set()
    for f in files:
        m = CHANNEL_FILE.match(strip_suffix(f.name))
        key = (f.parent, m["case"]) if m else None
        if key is None or 0 not in groups[key]:  # not a channel file: a case of its own
            cases.append((f.name, [f]))
        elif key not in done:
            done.add(key)
            channels = groups[key]
            gap = next((c for c in range(len(channels)) if c not in channels), None)
            if gap is not None:
                raise DataError(
                    f"{f.parent / m['case']}: channel files "
                    f"{', '.join(f'_{c:04d}' for c in sorted(channels))}; _{gap:04d} is missing"
                )
            cases.append((f"{m['case']}{_suffix(f)}", [channels[c] for c in sorted(channels)]))
    return cases


def _suffix(path: Path) -> str:
    return path.name[len(strip_suffix(path.name)) :]


def _channel_hint(channels: int, files: list[Path]) -> str:
    if channels > 1 and len(files) == 1:
        return (
            "; give its channels as one 4D file, or as nnU-Net's <case>_0000, <case>_0001, ... "
            "files from one folder"
        )
    if len(files) > 1:
        return (
            f"; {', '.join(f.name for f in files)} were read together as nnU-Net's channel "
            "files of one case (rename files that are cases of their own)"
        )
    return ""


def _picking(
    prep: Any, image: np.ndarray, volume: bool, files: list[Path], source: list[str] | None
) -> Any:
    """The preprocessing for an input of a model trained on some of its source's channels
    (`prepare --channels T1gd`): an input with all the source's channels has them picked; one
    with only those the model uses is taken as it is; any other count is refused (a 4-channel
    Decathlon BraTS volume had its T1w read as T1gd, exit 0). `source`: the training data's
    channel names (None: unknown)."""
    if prep.channels is None or not volume:
        return prep
    held = image.shape[3] if image.ndim == 4 else 1
    if source is None:  # picked when they are there, else the model's own count taken as it is
        fits = held <= max(prep.channels) and held == len(prep.channels)
        return dataclasses.replace(prep, channels=None) if fits else prep
    if held == len(source):
        return prep
    if held == len(prep.channels):
        return dataclasses.replace(prep, channels=None)
    used = ", ".join(source[c] if c < len(source) else f"channel_{c}" for c in prep.channels)
    raise DataError(
        f"{files[0]}: {held} channel(s); the model reads {used} of its training data's "
        f"{len(source)} ({', '.join(source)}): give those {len(source)}, or only {used}"
        + _channel_hint(len(source), files)
    )


def _say_degenerate(
    path: Path, image: np.ndarray, hw: tuple[int, ...], resampled: tuple[int, ...]
) -> None:
    """Warn about an input whose mask can say nothing: a constant image (a zero-filled export
    came back 18% left atrium), or slices under MIN_PLANE pixels across before or after the
    training resampling (as `prepare` warns)."""
    if image.size and float(image.max()) == float(image.min()):
        warnings.warn(
            f"{path}: a constant image (every voxel {float(image.min()):g}); its mask says nothing",
            stacklevel=3,
        )
    small = min(*hw, *resampled)
    if small < MIN_PLANE:
        warnings.warn(
            f"{path}: slices of {'×'.join(map(str, hw))} pixels, {'×'.join(map(str, resampled))} "
            f"at the model's resolution: under {MIN_PLANE} across, little anatomy to segment",
            stacklevel=3,
        )


MARK = "segscale predict"  # in each mask (NIfTI descrip, PNG Software), with its input


def _mark(files: list[Path]) -> str:
    """The mark of the mask of `files`: MARK and the input's file name (its first channel's),
    or the name's sha256 where it would not fit NIfTI's 80-byte descrip."""
    mark = f"{MARK} of {files[0].name}"
    if len(mark.encode()) > 79:
        mark = f"{MARK} of sha256:{hashlib.sha256(files[0].name.encode()).hexdigest()[:16]}"
    return mark


def _predict_mark(path: Path) -> str | None:
    """The mark of a mask an earlier predict wrote (`_mark`, or MARK alone from a segscale that
    named no input); None for any other file."""
    from PIL import Image

    try:
        if sniff(path) == "nifti":
            found = bytes(nifti_header(path)["descrip"]).rstrip(b"\0").decode()
        else:
            with Image.open(path) as picture:
                found = str(picture.info.get("Software", ""))
    except (SegscaleError, OSError, ValueError):
        return None
    return found if found == MARK or found.startswith(f"{MARK} of ") else None


def _targets(
    cases: list[tuple[str, list[Path]]], out_dir: Path, force: bool = False
) -> dict[Path, list[Path]]:
    """mask path → input files, checked before anything is computed: two inputs never write one
    mask, nor two masks of one case (a.png and A.png, v.nii and v.nii.gz: evaluate, as every
    tool on macOS or Windows, takes them for one), a mask never replaces an input, and nothing
    but a file is in a mask's way. An older mask of the same input is replaced; another input's
    mask or another file (a reference label) only with `force`."""
    once = {(name, tuple(f.resolve() for f in files)): (name, files) for name, files in cases}
    cases = list(once.values())  # a file given twice (scans/ and scans/*.nii.gz), once
    foreign: list[Path] = []
    inputs = {f.resolve(): f for _, files in cases for f in files}
    beside = next((f for f in inputs.values() if f.resolve().parent == out_dir.resolve()), None)
    if beside is not None:  # the next prepare or predict of that folder would read them as images
        raise DataError(
            f"--out {out_dir}: the folder of the input {beside.name}; masks beside the images "
            "they segment are read as images next time: write them to another folder"
        )
    targets: dict[Path, list[Path]] = {}
    taken: dict[str, Path] = {}  # case key (imgmed.files.case_key) → this call's mask
    there = {  # the masks in --out already, by case key
        case_key(p.name): p
        for p in (list_files(out_dir, (*NIFTI_SUFFIXES, *PNG_SUFFIXES)) if out_dir.is_dir() else [])
    }
    for name, files in cases:
        kind = content_kind(files[0])  # a picture named .nii.gz is refused, as by load
        if kind == "dicom":
            raise DataError(
                f"{files[0]}: DICOM; predict reads NIfTI and pictures: convert the series first "
                "(`segscale imgmed convert SERIES_FOLDER scan.nii.gz`)"
            )
        if kind in ("npy", "npz"):
            raise DataError(
                f"{files[0]}: a numpy array; predict reads NIfTI volumes (which carry the "
                "geometry a mask is written in) and pictures: `segscale imgmed convert` one"
            )
        volume = kind == "nifti"
        # the input's name, with the ending of what is written (by content: a name may lie)
        if volume:
            target = out_dir / (
                name if is_nifti_name(Path(name)) else strip_suffix(name) + ".nii.gz"
            )
        else:
            target = out_dir / (strip_suffix(name) + ".png")
        key = case_key(target.name)
        if key in taken:
            both = target.name if taken[key] == target else f"{taken[key].name} and {target.name}"
            raise DataError(
                f"{files[0]} and {targets[taken[key]][0]}: both would write the mask of case "
                f"'{strip_suffix(target.name)}' ({both} in {out_dir}); rename one"
            )
        taken[key] = target
        other = there.get(key)
        if other is not None and other.name != target.name:
            raise DataError(
                f"{other}: a mask of case '{strip_suffix(target.name)}' is there under another "
                f"name; {files[0].name}'s would be {target.name} beside it, and evaluate would "
                "find two masks for one case: move it, or use another --out"
            )
        if target.resolve() in inputs:
            raise DataError(
                f"--out {out_dir}: the mask of {files[0].name} would replace the input "
                f"{inputs[target.resolve()]}; write masks to another folder"
            )
        if target.exists() and not target.is_file():
            raise DataError(
                f"{target}: in the way of a mask (not a file); move it or use another --out"
            )
        if target.is_file() and not force:  # whose mask (or file) is in the way
            mark = _predict_mark(target)
            if mark is None:
                foreign.append(target)
            elif mark not in (MARK, _mark(files)):  # the mask of a.jpg, where a.tif goes
                raise DataError(
                    f"{target}: the mask of another input ({mark.removeprefix(MARK + ' of ')}), "
                    f"written by an earlier predict; {files[0].name} would replace it: give "
                    "--force, or another --out"
                )
        targets[target] = list(files)
    if foreign:
        raise DataError(
            f"--out {out_dir}: {len(foreign)} file(s) of the masks' names that predict did not "
            f"write, e.g. {foreign[0].name} (reference labels? masks of an older segscale carry "
            "no mark); give --force to replace them, or another --out"
        )
    return targets


def _missing_folders(folder: Path) -> list[Path]:
    """The folders `folder.mkdir(parents=True)` would create, deepest first."""
    missing = []
    for f in (folder, *folder.parents):
        if f.exists():
            break
        missing.append(f)
    return missing


def _as_channels(picture: np.ndarray, channels: int, prep) -> np.ndarray:
    """A 2D picture with the channels the model was trained on, where what it shows allows: a
    grey picture stored as RGB (R = G = B) for a grey model, a grey picture for a colour one
    (R = G = B). Anything else is left to the channel check."""
    if prep.channels is not None:
        return picture
    grey_rgb = picture.ndim == 3 and picture.shape[-1] == 3
    if channels == 1 and grey_rgb and (picture[..., 1:] == picture[..., :1]).all():
        return picture[..., 0]
    if channels == 3 and picture.ndim == 2:
        return np.repeat(picture[..., None], 3, axis=-1)
    return picture


def mask_values(meta: dict) -> np.ndarray:
    """Class index → the raw mask value it came from (the smallest, where several were mapped
    to one class), so that masks come back in the training masks' values: a 2D 0/255 mask, or
    BraTS' 0, 1, 2, 4 (classes 0..3), in pictures and volumes alike."""
    table = {int(raw): int(cls) for raw, cls in meta.get("label_values", {}).items()}
    wide = max(table, default=0) > 255
    lut = np.arange(len(meta["labels"]), dtype=np.uint16 if wide else np.uint8)  # 16-bit masks
    for raw, cls in sorted(table.items(), reverse=True):
        lut[cls] = raw
    return lut

"""Discover the cases of a raw dataset: a Decathlon/nnU-Net folder or a 2D images/ + masks/ folder."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segscale.errors import DataError
from segscale.imgmed.files import (
    NIFTI_SUFFIXES,
    PNG_SUFFIXES,
    by_case,
    case_key,
    has_suffix,
    list_files,
    list_folders,
    strip_suffix,
    without_postfix,
)

IGNORE = "ignore"  # nnU-Net v2's label name for voxels nobody annotated


@dataclass
class Case:
    id: str
    images: list[Path]  # one file, or one per channel (nnU-Net v2)
    label: Path | None


@dataclass
class Source:
    kind: str  # "msd" (Decathlon / nnU-Net) | "png2d" | "dicom"
    root: Path
    name: str
    labels: dict[int, str]
    channel_names: list[str]
    cases: list[Case] = field(default_factory=list)
    volumes: bool = (
        True  # 3D cases (NIfTI, DICOM); False for pictures (nnU-Net's .png datasets too)
    )
    channels_declared: bool = False  # channel_names from dataset.json, not a default
    # files that make no case (an image without its label, ...), one line each: discover
    # refuses them all at once; `imgmed check` reports them beside the cases it can read
    unpaired: list[str] = field(default_factory=list)


def discover(root: str | Path, lenient: bool = False) -> Source:
    """The cases of a raw dataset, each with a unique id, compared in any case (two files that
    would make one case id, such as a.png beside a.tif or A.png, are refused: one would stand
    for the other, or one image would land in two splits). Files that make no case (an image
    without its label, a label without its image, an unlisted image, ...) are refused all at
    once in one DataError, one line each (the first 20); `lenient`: kept in Source.unpaired
    instead, the other cases returned."""
    problems: list[str] = []
    # absolute, symlinks kept: records name it
    source = _discover(Path(os.path.abspath(root)), problems)
    seen: dict[str, Case] = {}
    for case in source.cases:
        key = case.id.casefold()
        if key in seen:
            problems.append(
                f"{case.images[0]} and {seen[key].images[0]}: both make case '{case.id}'; "
                "rename or remove one"
            )
            continue
        seen[key] = case
    source.cases = list(seen.values())  # lenient: the first of each id, checked as a case
    if len(problems) == 1 and not lenient:
        raise DataError(problems[0])
    if problems and not lenient:
        shown = problems[:20]
        more = len(problems) - len(shown)
        raise DataError(
            f"{len(problems)} files make no case (no case was read):\n"
            + "\n".join(f"  {p}" for p in shown)
            + (f"\n  and {more} more: `segscale imgmed check` lists them" if more else "")
        )
    source.unpaired = problems
    return source


def _discover(root: Path, problems: list[str]) -> Source:
    if not root.is_dir():
        raise DataError(
            f"{root}: not a folder; expected a Decathlon/nnU-Net folder or images/ + masks/"
        )
    if (root / "dataset.json").is_file():
        try:
            return _read_dataset_json(root, problems)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(
                f"{root / 'dataset.json'}: unexpected content ({type(e).__name__}: {e}); "
                "expected the Decathlon or nnU-Net v2 layout"
            ) from None
    if (root / "images").is_dir() and (root / "masks").is_dir():
        if list_folders(root / "images"):
            return _read_dicom_folder(root, problems)
        return _read_png_folder(root, problems)
    if (root / "imagesTr").is_dir():
        raise DataError(f"{root / 'dataset.json'}: missing; a Decathlon/nnU-Net folder needs it")
    raise DataError(
        f"{root}: no dataset.json (Decathlon/nnU-Net layout) and no images/ + masks/ folders (2D layout)"
    )


def _read_dataset_json(root: Path, problems: list[str]) -> Source:
    path = root / "dataset.json"
    meta = read_json(path)
    labels = labels_of(meta, path)
    ignored = [v for v, n in labels.items() if n == IGNORE]
    if ignored:
        raise DataError(
            f"{path}: label {ignored[0]} is nnU-Net's 'ignore' (voxels nobody annotated); "
            "segscale cannot train on partly annotated masks: annotate them, or give those voxels "
            "a class (`segscale evaluate` does leave them out)"
        )
    if "channel_names" in meta:  # nnU-Net v2: one file per channel
        channels = [meta["channel_names"][k] for k in sorted(meta["channel_names"], key=int)]
        ending = meta.get("file_ending", ".nii.gz")
        if not isinstance(ending, str) or ending.lower() not in (*NIFTI_SUFFIXES, *PNG_SUFFIXES):
            raise DataError(
                f"{path}: file_ending {ending!r}; expected one of "
                f"{', '.join((*NIFTI_SUFFIXES, *PNG_SUFFIXES))}"
            )
        cases = _nnunet_v2_cases(root, len(channels), ending, problems)
    else:  # Decathlon: a 'training' list of image/label pairs
        modality = meta.get("modality", {"0": "image"})
        channels = [modality[k] for k in sorted(modality, key=int)]
        cases = _msd_cases(root, path, meta, problems)
    declared = meta.get("numTraining")
    if declared is not None and declared != len(cases) and not problems:
        raise DataError(
            f"{path}: numTraining is {declared} but {len(cases)} training case(s) were found; "
            "correct numTraining or add the missing cases"
        )
    if not cases:
        raise DataError(
            f"{path}: no case has all its files (image or channel files, and label): {problems[0]}"
        )
    volumes = all(has_suffix(p, NIFTI_SUFFIXES) for p in cases[0].images)
    name = str(meta.get("name", root.name))
    declared_channels = "channel_names" in meta or "modality" in meta
    return Source("msd", root, name, labels, channels, cases, volumes, declared_channels)


def labels_of(meta: dict, path: Path) -> dict[int, str]:
    """Raw label value → name from a dataset.json's `labels`: Decathlon's {"0": "background", ...}
    or nnU-Net v2's {"background": 0, ...}. nnU-Net's region-based entries ({"whole tumor":
    [1, 2, 3]}) are unions of label values, which the label files hold as they are: segscale
    trains and scores those values, one class each (named by a plain entry, else "label V"), and
    says so in a warning. Raises DataError for any other shape."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a 'labels' mapping")
    if all(_label_value(v) or _region(v) for v in raw.values()):  # nnU-Net v2: name -> value
        names = {int(v): str(k) for k, v in raw.items() if _label_value(v)}
        regions = {str(k): v for k, v in raw.items() if _region(v)}
        if regions:
            values = sorted({v for r in regions.values() for v in r} - set(names))
            names |= {v: f"label {v}" for v in values}
            warnings.warn(
                f"{path}: {', '.join(repr(k) for k in regions)} are regions (nnU-Net "
                f"region-based training); segscale trains and scores the label values "
                f"{', '.join(str(v) for v in sorted(names))}, one class each",
                stacklevel=2,
            )
        return names
    try:
        return {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        first = next((k, v) for k, v in raw.items() if not str(k).strip().isdigit())  # the culprit
        raise DataError(
            f"{path}: 'labels' entry {first[0]!r}: {first[1]!r} is neither Decathlon's "
            '{"0": "background", ...} nor nnU-Net v2\'s {"background": 0, ...} (values as '
            "numbers, not text)"
        ) from None


def _label_value(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _region(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_label_value(x) for x in v)


def read_json(path: Path) -> Any:
    """A dataset's JSON file (dataset.json, labels.json) as read. Raises DataError naming the
    file when it cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read as JSON: {e}") from None


def declared_labels(path: Path) -> dict[int, str]:
    """The labels a dataset.json declares (see labels_of)."""
    return labels_of(read_json(path), path)


def labels_json(path: Path) -> dict[int, str]:
    """The labels a labels.json declares (segscale's DICOM layout: its `labels` entry alone, in
    Decathlon's or nnU-Net's form, see labels_of). Raises DataError when it is not a mapping."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f'{path}: expected {{"0": "background", "1": "name"}}')
    return labels_of({"labels": raw}, path)


def _msd_cases(root: Path, path: Path, meta: dict, problems: list[str]) -> list[Case]:
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DataError(f"{path}: expected a non-empty 'training' list of image/label pairs")
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{path}: training[{i}] needs an 'image' (and a 'label')")
        # absolute, but not resolved: a symlink (DataLad, git-annex, DVC) names the case
        image = Path(os.path.normpath(root.absolute() / entry["image"]))
        label = entry.get("label")
        label_path = None if label is None else Path(os.path.normpath(root.absolute() / label))
        if not image.is_file():
            problems.append(f"{path}: training[{i}] image not found: {image}")
        elif label_path is None:
            problems.append(f"{image}: image without a label (training[{i}] in {path})")
        elif not label_path.is_file():
            problems.append(f"{image}: image without a label; expected {label_path}")
        else:
            cases.append(Case(strip_suffix(image.name), [image], label_path))
    listed = {
        Path(os.path.normpath(root.absolute() / e[k])).name
        for e in training
        for k in ("image", "label")
        if isinstance(e, dict) and isinstance(e.get(k), str)
    }
    for folder, what in ((root / "imagesTr", "image"), (root / "labelsTr", "label")):
        for extra in list_files(folder, NIFTI_SUFFIXES) if folder.is_dir() else []:
            if extra.name not in listed:
                problems.append(f"{extra}: {what} not listed in {path} 'training'")
    return cases


def _nnunet_v2_cases(root: Path, num_channels: int, ending: str, problems: list[str]) -> list[Case]:
    """nnU-Net v2: labelsTr/<case><ending> and imagesTr/<case>_<XXXX><ending> per channel; the
    ending matched in any case, hidden files skipped."""
    pictures = ending.lower() in PNG_SUFFIXES  # an RGB picture holds 3 channels in one file
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(
                f"{folder}: missing; an nnU-Net v2 dataset needs imagesTr/ and labelsTr/"
            )
    images: dict[str, Path] = {}
    for p in list_files(images_dir, (ending,)):
        if p.name.lower() in images:
            raise DataError(
                f"{p} and {images[p.name.lower()]}: two files for one channel of one case; "
                "remove one"
            )
        images[p.name.lower()] = p
    cut = len(ending)
    cases = []
    for label in list_files(labels_dir, (ending,)):
        cid = label.name[:-cut]
        wanted = [f"{cid}_{c:04d}{ending}" for c in range(num_channels)]
        if pictures:  # the files there are, from _0000 on: the channel count is checked on read
            present = [w for w in wanted if w.lower() in images]
            wanted = wanted[: len(present)] if present == wanted[: len(present)] else wanted
            wanted = wanted or [f"{cid}_0000{ending}"]
        missing = [w for w in wanted if w.lower() not in images]
        if missing and len(missing) < len(wanted):
            problems.append(
                f"{images_dir / missing[0]}: missing; case '{cid}' has other channel files, and "
                f"dataset.json's channel_names declares {num_channels}"
            )
        elif missing:
            problems.append(f"{label}: label without its image {images_dir / missing[0]}")
        else:
            cases.append(Case(cid, [images[w.lower()] for w in wanted], label))
    labelled = {label.name[:-cut].lower() for label in list_files(labels_dir, (ending,))}
    used = {p for c in cases for p in c.images}
    for im in images.values():
        if im in used:
            continue
        cid, _, channel = im.name[:-cut].rpartition("_")
        if not cid or not (len(channel) == 4 and channel.isdigit()):
            problems.append(
                f"{im}: not named <case>_<XXXX>{ending} (XXXX: the channel, e.g. _0000); "
                "nnU-Net v2 names every image by its case and channel"
            )
        elif cid.lower() in labelled:  # a channel file beyond channel_names would be left out
            if int(channel) >= num_channels:
                problems.append(
                    f"{im}: channel {channel} of case '{cid}', but dataset.json's channel_names "
                    f"declares {num_channels} channel(s) (_0000 to _{num_channels - 1:04d}); "
                    "declare it or remove the file"
                )
        else:
            problems.append(f"{im}: image without a label; expected {labels_dir / (cid + ending)}")
    if not cases and not problems:
        raise DataError(f"{labels_dir}: no labels ending in {ending}")
    return cases


def _read_png_folder(root: Path, problems: list[str]) -> Source:
    images = list_files(root / "images", PNG_SUFFIXES)
    if not images:
        raise DataError(f"{root / 'images'}: no PNG/JPG/TIFF images")
    masks = without_postfix(
        by_case(list_files(root / "masks", PNG_SUFFIXES), "masks", problems),
        [case_key(im.name) for im in images],
        root / "masks",
        "masks paired with their images",
    )
    cases = []
    for im in images:
        mask = masks.get(case_key(im.name))
        if mask is None:
            problems.append(f"{im}: image without a mask in {root / 'masks'}")
        else:
            cases.append(Case(strip_suffix(im.name), [im], mask))
    _no_orphans(masks, cases, "image", root / "images", problems)
    if not cases:
        raise DataError(f"{root}: no image has its mask ({_unpaired(problems)})")
    return Source("png2d", root, root.name, {}, ["image"], cases, volumes=False)


def _unpaired(problems: list[str]) -> str:
    """The first problem of a source where no case paired, and the masks left without their
    image or series beside it: what each side is called, so that the renaming is plain."""
    orphans = [p for p in problems if ": mask without its " in p]
    also = f"; {len(orphans)} mask(s) without theirs, e.g. {orphans[0]}" if orphans else ""
    return f"{problems[0]}{also}" if problems else ""


def _no_orphans(
    masks: dict[str, Path], cases: list[Case], what: str, where: Path, problems: list[str]
) -> None:
    """A mask that no case uses is refused: a stale or misnamed file, whose image is missing."""
    used = {c.label for c in cases}
    problems += [
        f"{m}: mask without its {what} in {where}" for m in masks.values() if m not in used
    ]


def _read_dicom_folder(root: Path, problems: list[str]) -> Source:
    """images/<case>/ (one DICOM series per case) + masks/<case>.nii.gz (the series' voxel grid,
    as ITK-SNAP or 3D Slicer export it); class names from an optional labels.json."""
    cases = []
    series = list_folders(root / "images")
    masks = without_postfix(
        by_case(list_files(root / "masks", NIFTI_SUFFIXES), "masks", problems),
        [case_key(folder.name) for folder in series],
        root / "masks",
        "masks paired with their series",
    )
    for folder in series:
        mask = masks.get(case_key(folder.name))
        if mask is None:
            expected = root / "masks" / f"{folder.name}.nii.gz"
            problems.append(f"{folder}: DICOM series without a mask; expected {expected}")
        else:
            cases.append(Case(folder.name, [folder], mask))
    _no_orphans(masks, cases, "DICOM series", root / "images", problems)
    if not cases:
        why = f" ({_unpaired(problems)})" if problems else ""
        raise DataError(f"{root}: no DICOM series with its mask in images/ and masks/{why}")
    labels: dict[int, str] = {}
    names = root / "labels.json"
    if names.is_file():
        labels = labels_json(names)
    return Source("dicom", root, root.name, labels, ["image"], cases)


def channel_indices(
    root: str | Path, spec: list[int | str] | tuple[int | str, ...]
) -> tuple[int, ...]:
    """Channels of 4D images by index or by dataset.json modality name ('T1gd' → 1)."""
    from segscale.errors import did_you_mean

    names: list[str] | None = None
    out = []
    for c in spec:
        if isinstance(c, int) or c.strip().lstrip("-").isdigit():
            out.append(int(c))
            continue
        names = names if names is not None else discover(root).channel_names
        if c not in names:
            raise DataError(
                f"{root}: no channel named '{c}'{did_you_mean(c, names)}; "
                f"channels: {', '.join(f'{i}: {n}' for i, n in enumerate(names))}"
            )
        out.append(names.index(c))
    return tuple(out)

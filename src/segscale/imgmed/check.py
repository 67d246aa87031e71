"""`segscale imgmed check SOURCE`: every problem of every case of a raw dataset, in one pass.

The same loading and checks as `prepare` (sources, file listing, geometry in world space, label
values), but a refused case does not stop the others: the report lists, per case, what `prepare`
would refuse and what is only worth a look (a constant image, a label without foreground), and
for the dataset the files that are skipped and why, mixed orientations and spacing outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segscale._progress import progress_bar
from segscale.errors import DataError
from segscale.imgmed.files import NIFTI_SUFFIXES, PNG_SUFFIXES, has_suffix, is_hidden
from segscale.imgmed.geometry import axis_codes, dataset_notes, majority, spacing_from_affine
from segscale.imgmed.prepare import case_orientations, label_table, load_case
from segscale.imgmed.sources import Case, Source, discover
from segscale.imgmed.transforms import channels_first


@dataclass
class CaseReport:
    case: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None  # mm per array axis (volumes)
    axes: str | None = None  # orientation codes, e.g. RAS
    classes: list[int] = field(default_factory=list)  # classes present in the label
    channels: int | None = None
    refused: str | None = None  # what prepare would refuse, or None
    notes: list[str] = field(default_factory=list)  # worth a look, not refused
    stray: bool = False  # a file that makes no case (an image without a label, ...), not a case


@dataclass
class Check:
    source: Source | None
    cases: list[CaseReport]
    skipped: list[str]  # files that are no input, and why
    notes: list[str]  # dataset-wide
    refused: str | None = None  # the dataset itself cannot be read

    @property
    def ok(self) -> bool:
        return self.refused is None and not any(c.refused for c in self.cases)


def check_source(
    root: str | Path,
    label_map: dict[int, int] | None = None,
    axis: int = 2,
    progress: bool = True,
) -> Check:
    """Check every case of the dataset at `root` as `prepare` would read it (slices along
    `axis`, for the orientation note). Never raises for a problem of the data: it is reported."""
    root = Path(root)
    skipped = _skipped_files(root)
    try:
        src = discover(root, lenient=True)
        _, value_to_class = label_table(src, label_map)
    except DataError as e:
        return Check(None, [], skipped, [], refused=str(e))
    # files that make no case: each a refused row, beside the cases that can be read
    reports = [
        CaseReport(Path(p.partition(": ")[0]).name, refused=p, stray=True) for p in src.unpaired
    ]
    affines = []
    with progress_bar(progress, f"checking {src.name}", len(src.cases)) as advance:
        for case in src.cases:
            report, affine = _check_case(case, src.volumes, value_to_class)
            reports.append(report)
            if affine is not None:
                affines.append((case.id, affine))
            advance()
    groups: dict[int, list[str]] = {}
    for r in reports:
        if r.channels is not None:
            groups.setdefault(r.channels, []).append(r.case)
    if len(groups) > 1:  # a store holds one channel count: prepare refuses the others
        common = majority(groups)
        for r in reports:
            if r.channels is not None and r.channels != common:
                r.refused = f"{r.channels} channel(s); most cases have {common}"
    if src.channels_declared:  # prepare refuses these, with --channels too
        declared = len(src.channel_names)
        for r in reports:
            if r.refused is None and r.channels is not None and r.channels != declared:
                r.refused = (
                    f"{r.channels} channel(s); dataset.json declares {declared} "
                    f"({', '.join(src.channel_names)})"
                )
    codes = case_orientations(src) if src.volumes else {}
    for r in reports:
        if r.axes is not None and codes.get(r.case, r.axes) is None:
            r.axes = "none"
            r.notes.append(
                "no orientation in its header (qform and sform codes 0): sliced as stored"
            )
    one_slice = {r.case for r in reports if r.shape and (len(r.shape) == 2 or 1 in r.shape[:3])}
    codes = {cid: (None if cid in one_slice else c) for cid, c in codes.items()}  # not reoriented
    return Check(src, reports, skipped, dataset_notes(affines, axis, codes or None))


def _check_case(
    case: Case, volumes: bool, value_to_class: dict[int, int]
) -> tuple[CaseReport, np.ndarray | None]:
    """One case read as prepare reads it: its report, and its affine when it has one."""
    report = CaseReport(case.id)
    try:
        image, mask, affine = load_case(case, volumes, value_to_class)
    except DataError as e:  # its message names the file
        report.refused = str(e)
        return report, None
    try:
        channels = channels_first(image, volumes, None).shape[0]  # the shape prepare slices
    except DataError as e:
        report.refused = f"{case.images[0]}: {e}"
        return report, None
    report.shape = tuple(int(n) for n in image.shape)
    report.classes = [int(v) for v in np.unique(mask)]
    report.channels = int(channels)
    if affine is not None:
        report.spacing = spacing_from_affine(affine)
        report.axes = axis_codes(affine)
    if np.ptp(image.reshape(-1, channels), axis=0).min() == 0:
        report.notes.append("constant image: no contrast to learn from")
    if not (mask > 0).any():
        report.notes.append("no foreground in the label")
    return report, affine


def _skipped_files(root: Path) -> list[str]:
    """Entries of the dataset's folders that no command reads: hidden and system files, and
    files without an image name where images are expected."""
    if not root.is_dir():
        return []
    out = []
    folders = [root, *(root / n for n in ("imagesTr", "labelsTr", "images", "masks"))]
    images = root / "images"
    if images.is_dir():
        folders += [p for p in images.iterdir() if p.is_dir() and not is_hidden(p)]
    for folder in folders:
        if not folder.is_dir():
            continue
        dicom = folder.parent == images
        for p in sorted(folder.iterdir()):
            if is_hidden(p):
                out.append(f"{p}: hidden or system file")
            elif (
                folder != root
                and not dicom
                and p.is_file()
                and not has_suffix(p, (*NIFTI_SUFFIXES, *PNG_SUFFIXES))
            ):
                out.append(f"{p}: not an image name ({', '.join(NIFTI_SUFFIXES + PNG_SUFFIXES)})")
    return out

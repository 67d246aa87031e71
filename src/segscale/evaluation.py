"""Evaluation at three levels, exact for any number of workers.

- dataset: metrics of the confusion matrix summed over every pixel of the split (the thesis' way);
- case:    each case's slices stacked back into its volume; overlap and distance metrics per case and
           per class, then mean ± SD over cases (what medical papers report);
- slice:   2D Dice per slice, mean ± SD over slices.
Workers split the cases (case i goes to rank i mod world), so each case is evaluated once, whole, on
one rank; integer counts and per-case values are gathered, never averaged across ranks. A rank with
no case still joins the gather, so nothing hangs. Training-time validation uses the lighter
`confusion_by_case` (slices sharded, counts all-reduced).
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segscale._files import to_json, write_atomic
from segscale._progress import progress_bar
from segscale.errors import DataError
from segscale.imgmed.files import (
    NIFTI_SUFFIXES,
    PNG_SUFFIXES,
    by_case,
    is_nifti_name,
    list_files,
    list_folders,
    list_images,
    strip_suffix,
    without_postfix,
)
from segscale.imgmed.geometry import onto_grid, spacing_from_affine
from segscale.imgmed.io import load_mask2d, load_nifti
from segscale.imgmed.prepare import class_names
from segscale.imgmed.sources import IGNORE, labels_json, labels_of, read_json
from segscale.imgmed.store import Store
from segscale.imgmed.transforms import Plane
from segscale.parallel import Strategy
from segscale.segeval import (
    DISTANCE_METRICS,
    class_metrics,
    confusion_matrix,
    distance_metrics,
    mean_defined,
    metrics_from_confusion,
    per_class_dice,
)

CASE_METRICS = ("dice", "iou", "precision", "sensitivity", "specificity", "f1", *DISTANCE_METRICS)
CONVENTIONS = {
    "not_applicable": "a class absent from both reference and prediction is not applicable: every "
    "overlap and distance metric of it is NaN, left out of every mean and counted in 'excluded' "
    "(nnU-Net's rule); a class missed entirely scores Dice 0 and F1 0",
    "dice": "mean over the applicable foreground classes",
    "dice_with_background": "the thesis' formula: mean over all applicable classes, background included",
    "distances": "physical units (voxel spacing); one mask empty: NaN (undefined), excluded and counted",
    "levels": "dataset = summed confusion matrix; case = one 3D volume per case; slice = one 2D slice",
    "aggregation": "case_first (case_summary): each case's mean over its applicable foreground "
    "classes, then the mean over cases; label_first (nnU-Net's foreground_mean): each class's mean "
    "over cases, then the mean over classes. They differ when values are missing",
}


@torch.no_grad()
def confusion_by_case(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    num_classes: int,
    num_cases: int,
    strategy: Strategy,
    target: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """(num_cases, C, C) int64 confusion counts over every sample of every rank's shard; `target`
    turns the masks into what the model predicts (a class per slice, for a classifier).

    A case's slices may sit on different ranks; counts add, so the 3D per-case overlap metrics equal
    those of the case's slices stacked back into its volume."""
    was_training = model.training
    model.eval()
    device = strategy.device
    counts = torch.zeros(num_cases, num_classes, num_classes, dtype=torch.int64, device=device)
    for x, y, case in batches:
        pred = model(x.to(device)).argmax(1)
        ref = y.to(device) if target is None else target(y.to(device))
        groups = case.to(device).view(-1, *[1] * (pred.dim() - 1))  # a case index per pixel
        counts += confusion_matrix(pred, ref, num_classes, groups, num_cases)
    strategy.all_reduce_sum(counts)
    model.train(was_training)
    return counts.cpu().numpy()


@dataclass
class CaseEval:
    """The raw results of one case: exact counts and per-class distances."""

    case: str
    counts: np.ndarray  # (C, C) int64
    slice_counts: np.ndarray  # (slices, C, C) int64
    distances: dict[int, dict[str, float]]  # foreground class → distance metrics


def evaluate_case(
    pred: torch.Tensor,
    ref: torch.Tensor,
    num_classes: int,
    spacing: tuple[float, ...] | None,
    case: str,
) -> CaseEval:
    """pred, ref: (slices, H, W) integer labels 0..num_classes-1 (on any device). Counts by
    bincount on that device; distances on the CPU with SciPy. A 2D case has one slice and a
    2-value spacing; a case of one slice is scored in 2D whatever its spacing (in 3D, every voxel
    of a one-voxel-thick slab is surface, so its distances would say nothing)."""
    n, h, w = pred.shape
    if n == 1 and spacing is not None:
        spacing = tuple(spacing[-2:])
    ref = ref.to(pred.device)
    if not (
        pred.is_contiguous() and ref.is_contiguous()
    ):  # e.g. a NIfTI volume moved to slice-first
        pred, ref = pred.contiguous(), ref.contiguous()
    # Most voxels are background in both: count only inside the foreground's bounding box, then
    # credit everything outside it to (background, background). Exact, and several times faster.
    fg = (pred != 0) | (ref != 0)
    slice_counts = torch.zeros(n, num_classes, num_classes, dtype=torch.int64, device=pred.device)
    box: tuple[slice, ...] = (slice(0, 1),) * 3  # no foreground: one background voxel stands in
    if bool(fg.any()):
        box = tuple(
            _extent(fg.any(dim=tuple(d for d in range(3) if d != axis))) for axis in range(3)
        )
        p_box, r_box = pred[box], ref[box]
        slice_index = torch.arange(p_box.shape[0], device=pred.device)[:, None, None]
        slice_counts[box[0]] = confusion_matrix(
            p_box, r_box, num_classes, slice_index, p_box.shape[0]
        )
    slice_counts[:, 0, 0] += h * w - slice_counts.sum((1, 2))
    slice_counts = slice_counts.cpu().numpy()
    # distances are translation-invariant: the box holds every foreground voxel of both masks
    small = torch.uint8 if num_classes <= 256 else torch.int32  # labels beyond 255 kept apart
    p, r = pred[box].to(small).cpu().numpy(), ref[box].to(small).cpu().numpy()
    if n == 1:
        p, r = p[0], r[0]
    classes = list(_foreground(num_classes))
    # SciPy and the KD-tree release the GIL: classes run side by side on the cores
    with ThreadPoolExecutor(min(len(classes), os.cpu_count() or 1)) as pool:
        found = pool.map(lambda c: distance_metrics(p == c, r == c, spacing), classes)
    distances = dict(zip(classes, found))
    return CaseEval(case, slice_counts.sum(0), slice_counts, distances)


def _extent(hit: torch.Tensor) -> slice:
    idx = torch.nonzero(hit).flatten()
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _foreground(num_classes: int) -> range:
    return range(1, num_classes) if num_classes > 1 else range(num_classes)


def store_spacing(case: dict[str, Any], store: Store) -> tuple[float, ...]:
    """The voxel size of a case in the store's (slice, H, W) space: the original spacing, stretched
    by the resize in-plane and by the gap between kept slices."""
    size = store.images.shape[-1]
    shape = case["shape"]
    if case["affine"] is None:  # a 2D image: pixel units of the original image
        return (shape[0] / size, shape[1] / size)
    prep = store.preprocessing
    axis = prep.axis
    sp = spacing_from_affine(np.array(case["affine"]))
    inplane = [a for a in range(3) if a != axis]
    gap = float(np.mean(np.diff(case["slice_indices"]))) if len(case["slice_indices"]) > 1 else 1.0
    plane = Plane.of(prep, [shape[a] for a in inplane], [sp[a] for a in inplane])
    return (sp[axis] * gap, *(sp[a] * shape[a] / r for a, r in zip(inplane, plane.resampled)))


@torch.no_grad()
def evaluate_split(
    model: nn.Module, store: Store, split: str, strategy: Strategy, batch_size: int = 32
) -> list[CaseEval]:
    """Every case of a split, each whole on one rank; returns all cases (on every rank), in order."""
    model.eval()
    cases = store.cases(split)
    mine = []
    for i in range(strategy.rank, len(cases), strategy.world_size):
        c = cases[i]
        # copied out of the read-only memory map: torch warns about tensors over read-only memory
        images = torch.from_numpy(np.array(store.images[c["start"] : c["start"] + c["count"]]))
        pred = torch.cat(
            [
                model(images[j : j + batch_size].to(strategy.device)).argmax(1)
                for j in range(0, len(images), batch_size)
            ]
        )
        ref = torch.from_numpy(np.array(store.masks[c["start"] : c["start"] + c["count"]])).to(
            strategy.device
        )
        mine.append(
            (i, evaluate_case(pred, ref, store.num_classes, store_spacing(c, store), c["id"]))
        )
    everything = [item for part in strategy.gather_objects(mine) for item in part]
    return [result for _, result in sorted(everything, key=lambda t: t[0])]


def _stats(values: list[float]) -> dict[str, float | int]:
    a = np.asarray(values, dtype=np.float64)
    ok = a[~np.isnan(a)]
    same = ok.size > 1 and bool(np.all(ok == ok[0]))  # exactly 0, not the mean's rounding error
    return {
        "mean": float(ok.mean()) if ok.size else float("nan"),
        "sd": 0.0 if same else float(ok.std(ddof=1)) if ok.size > 1 else float("nan"),
        "median": float(np.median(ok)) if ok.size else float("nan"),
        "n": int(ok.size),
        "excluded": int(a.size - ok.size),
    }


def summarize(results: list[CaseEval], labels: dict[str, str]) -> dict[str, Any]:
    k = len(labels)
    fg = list(_foreground(k))
    total = sum((r.counts for r in results), np.zeros((k, k), dtype=np.int64))
    dataset_classes = class_metrics(total)
    cases = []
    for r in results:
        per_class = {labels[str(c)]: {**class_metrics(r.counts)[c], **r.distances[c]} for c in fg}
        row: dict[str, Any] = {"case": r.case, **metrics_from_confusion(r.counts)}
        for m in ("iou", "precision", "f1", *DISTANCE_METRICS):
            row[m] = mean_defined(np.array([v[m] for v in per_class.values()]))
        row["per_class"] = per_class
        cases.append(row)
    slice_dice = [mean_defined(per_class_dice(sc)[fg]) for r in results for sc in r.slice_counts]
    case_summary = {m: _stats([c[m] for c in cases]) for m in CASE_METRICS}
    per_class = {
        labels[str(c)]: {
            m: _stats([row["per_class"][labels[str(c)]][m] for row in cases]) for m in CASE_METRICS
        }
        for c in fg
    }
    return {
        "conventions": CONVENTIONS,
        "dataset": metrics_from_confusion(total),
        "dataset_per_class": {labels[str(c)]: dataset_classes[c] for c in fg},
        "case_summary": case_summary,
        "case_summary_per_class": per_class,
        "foreground_mean": {
            "case_first": {m: case_summary[m]["mean"] for m in CASE_METRICS},
            "label_first": {
                m: mean_defined(np.array([per_class[k][m]["mean"] for k in per_class]))
                for m in CASE_METRICS
            },
        },
        "slice_summary": {"dice": _stats(slice_dice)},
        "cases": cases,
    }


def write_evaluation(evaluation: dict[str, Any], out: Path) -> None:
    """`out` (JSON) and, for a segmentation, the per-case CSV beside it (same name, .csv)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, to_json(evaluation, indent=1))
    if "cases" in evaluation:
        write_case_csv(evaluation, out.with_suffix(".csv"))


def write_case_csv(evaluation: dict[str, Any], path: Path) -> None:
    """One row per case: the foreground means, then per-class columns when there are several classes."""
    rows = evaluation["cases"]
    classes = list(rows[0]["per_class"]) if rows else []
    per_class_cols = (
        [f"{m}[{c}]" for c in classes for m in CASE_METRICS] if len(classes) > 1 else []
    )
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["case", *CASE_METRICS, *per_class_cols])
    for row in rows:
        extra = (
            [row["per_class"][c][m] for c in classes for m in CASE_METRICS]
            if per_class_cols
            else []
        )
        w.writerow([row["case"], *(row[m] for m in CASE_METRICS), *extra])
    write_atomic(path, text.getvalue())


@dataclass
class Example:
    """One case shown as a picture: its slice with the most reference foreground."""

    case: str
    dice: float
    image: np.ndarray  # (C, S, S) float32, the store's preprocessed slice
    reference: np.ndarray  # (S, S) class indices
    prediction: np.ndarray  # (S, S) class indices


@torch.no_grad()
def pick_examples(
    model: nn.Module, store: Store, evaluation: dict[str, Any], max_cases: int = 3
) -> list[Example]:
    """The best, median and worst cases of an evaluation by per-case Dice, each on the slice with
    the most reference foreground, with the model's prediction for that slice (on the CPU)."""
    scored = [c for c in evaluation["cases"] if not np.isnan(c["dice"])] or evaluation["cases"]
    ranked = sorted(scored, key=lambda c: c["dice"], reverse=True)
    picks = [ranked[0], ranked[len(ranked) // 2], ranked[-1]][: min(max_cases, len(ranked))]
    by_id = {c["id"]: c for c in store.cases()}
    examples = []
    for case in picks:
        meta = by_id[case["case"]]
        k = meta["start"] + int(np.argmax(_foreground_per_slice(store, meta)))
        image = np.array(store.images[k])  # a writable copy of the memmap row
        pred = model(torch.from_numpy(image)[None]).argmax(1)[0].numpy()
        examples.append(
            Example(case["case"], case["dice"], image, np.asarray(store.masks[k]), pred)
        )
    return examples


def plot_examples(
    examples: list[Example], out: Path, num_classes: int, title: str | None = None
) -> None:
    """Image / ground truth / prediction, one row per example (pick_examples, validation_examples),
    as a PNG; the masks drawn over the image's first channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        for ax, (name, mask) in zip(
            row, [("image", None), ("ground truth", ex.reference), ("prediction", ex.prediction)]
        ):
            ax.imshow(ex.image[0].T, cmap="gray", origin="lower")
            if mask is not None:
                ax.imshow(
                    np.ma.masked_equal(mask.T, 0),
                    cmap="autumn",
                    alpha=0.5,
                    origin="lower",
                    vmin=0,
                    vmax=max(1, num_classes - 1),
                )
            dice = f" (Dice {ex.dice:.3f})" if name == "prediction" else ""
            ax.set_title(f"{ex.case}: {name}{dice}", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    write_atomic(out, buffer.getvalue())


def _foreground_per_slice(store: Store, case: dict[str, Any]) -> np.ndarray:
    """The reference foreground pixels of each slice of a case (an entry of store.cases())."""
    masks = np.asarray(store.masks[case["start"] : case["start"] + case["count"]])
    return (masks > 0).sum((1, 2))


def validation_slices(store: Store, split: str, count: int) -> list[tuple[str, int]]:
    """A fixed set of up to `count` slices to watch during training: `count` cases spread evenly
    over the split, each on its slice with the most reference foreground; when the split has
    fewer cases, several slices of each (after that one, others spread over the case's slices
    with foreground). [(case id, store row)], case by case."""
    cases = store.cases(split)
    if not cases or count <= 0:
        return []
    picks = np.unique(np.linspace(0, len(cases) - 1, min(count, len(cases))).round().astype(int))
    per_case = [count // len(picks) + (i < count % len(picks)) for i in range(len(picks))]
    out = []
    for i, n in zip(picks, per_case):
        c = cases[int(i)]
        foreground = _foreground_per_slice(store, c)
        best = int(np.argmax(foreground))
        others = [k for k in np.flatnonzero(foreground).tolist() if k != best]
        spread = np.linspace(0, len(others) - 1, min(n - 1, len(others))).round().astype(int)
        rows = [best, *sorted({others[j] for j in spread})] if others else [best]
        out += [(c["id"], c["start"] + k) for k in rows[:n]]
    return out


@torch.no_grad()
def slice_examples(
    model: nn.Module, store: Store, slices: list[tuple[str, int]], device: Any = "cpu"
) -> list[Example]:
    """The model's predictions for store rows [(case id, row)], each with its 2D Dice (the mean over
    the foreground classes present in the reference or the prediction; NaN when none is)."""
    if not slices:
        return []
    images = np.stack([np.array(store.images[k]) for _, k in slices])
    preds = model(torch.from_numpy(images).to(device)).argmax(1).cpu()
    examples = []
    for (case, k), image, pred in zip(slices, images, preds):
        ref = np.asarray(store.masks[k])
        cm = confusion_matrix(pred, torch.from_numpy(ref.astype(np.int64)), store.num_classes)
        dice = mean_defined(per_class_dice(cm.numpy())[1:])
        examples.append(Example(case, dice, image, ref, pred.numpy()))
    return examples


def _load_labels(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A label file as integers (int32, or int64 for values beyond): a NIfTI volume (X, Y, Z)
    with its affine (a 2D NIfTI as one slice), or a 2D picture (H, W) with None. Raises
    DataError naming the file for values that are not whole, finite and ≥ 0, or for a file with
    channels."""
    if is_nifti_name(path):
        data, affine = load_nifti(path, dtype=None)  # the stored integers, not float32's
        if data.ndim == 2:
            data = data[:, :, None]
        if data.ndim != 3:
            hint = (
                " (one channel per class? save the argmax, the class of each voxel)"
                if data.ndim == 4
                else ""
            )
            raise DataError(f"{path}: expected a 3D label volume, got shape {data.shape}{hint}")
    else:
        data, affine = load_mask2d(path), None
        if data.ndim != 2:
            raise DataError(
                f"{path}: expected a single-channel label image, got shape {data.shape}"
            )
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise DataError(f"{path}: non-finite label values (NaN or infinity)")
        if not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: non-integer label values")
    elif data.dtype.kind not in "biu":
        raise DataError(f"{path}: {data.dtype} values; expected integer class labels")
    if data.size and data.min() < 0:
        raise DataError(f"{path}: negative label value {data.min():g}; expected class labels ≥ 0")
    wide = data.size and data.max() > np.iinfo(np.int32).max
    return data.astype(np.int64 if wide else np.int32), affine


def _as_slices(data: np.ndarray, affine: np.ndarray | None) -> tuple[np.ndarray, tuple[float, ...]]:
    """(slices, H, W) with its spacing in that axis order: a volume sliced along its third axis
    (physical spacing), or along its axis of size 1 when it is one slice (X, 1, Z), a picture as
    one slice (pixel units)."""
    if affine is None:
        return data[None], (1.0, 1.0)
    sp = spacing_from_affine(affine)
    axis = next((a for a in (2, 0, 1) if data.shape[a] == 1), 2)
    inplane = [a for a in range(3) if a != axis]
    return np.ascontiguousarray(np.moveaxis(data, axis, 0)), (sp[axis], *(sp[a] for a in inplane))


def _values(a: np.ndarray) -> set[int]:
    """The values an integer array holds (a count per value when they are small: a sort of a
    CT volume's 80 million voxels would take seconds)."""
    if a.size == 0:
        return set()
    if a.max() < 1 << 20:
        return set(np.flatnonzero(np.bincount(a.ravel())).tolist())
    return set(np.unique(a).tolist())


def _aligned(pred: Path, ref: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A prediction and its reference read, the prediction on the reference's grid, both as
    (slices, H, W), with the reference's spacing. Raises DataError naming the file."""
    (p, p_affine), (r, r_affine) = _load_labels(pred), _load_labels(ref)
    if p_affine is not None and r_affine is not None:
        p = onto_grid(
            p,
            p_affine,
            r_affine,
            r.shape,
            name=pred,
            target=ref,
            what="prediction",
            target_what="reference",
        )
    elif p.shape != r.shape:
        raise DataError(f"{pred}: shape {p.shape} does not match reference {ref} {r.shape}")
    (p, _), (r, spacing) = _as_slices(p, r_affine), _as_slices(r, r_affine)
    return p, r, spacing


def mask_files(folder: Path, what: str) -> dict[str, Path]:
    """The mask files of a folder by case key (imgmed.files.by_case). A folder that holds no mask
    file but subfolders that do is read one level down: MONAI's SaveImage writes
    OUT/<case>/<case>_seg.nii.gz. Raises DataError for a folder without masks, and for one
    with masks both in it and in its subfolders: which of them are the cases is a guess, and
    either guess would score a subset without a word."""
    folder = Path(folder)
    if folder.is_dir():
        masks = (*NIFTI_SUFFIXES, *PNG_SUFFIXES)
        top = list_files(folder, masks)
        nested = [f for d in list_folders(folder) for f in list_files(d, masks)]
        if top and nested:
            raise DataError(
                f"{folder}: {what} both in it ({top[0].name}, ...) and in its subfolders "
                f"({nested[0].relative_to(folder)}, ...); keep the cases in one of the two"
            )
        # deeper than the level read: a copy or an older run's cases, never scored
        read = 1 if top else 2
        deeper = _masks_below(folder, masks, read)
        if (top or nested) and deeper is not None:
            raise DataError(
                f"{folder}: {what} {'in it' if top else 'in its subfolders'} and deeper "
                f"({deeper.relative_to(folder)}), which would not be read; keep the cases at "
                "one level"
            )
        if nested:
            return by_case(nested, what)
    return by_case(list_images([folder]), what)


def _masks_below(folder: Path, suffixes: tuple[str, ...], depth: int) -> Path | None:
    """The first visible mask file more than `depth` levels under `folder` (1: a file in it),
    in name order; None when there is none."""
    for sub in list_folders(folder):
        if depth == 1:
            found = next(iter(list_files(sub, suffixes)), None)
            found = found or _masks_below(sub, suffixes, 1)
        else:
            found = _masks_below(sub, suffixes, depth - 1)
        if found is not None:
            return found
    return None


def pair_by_name(
    refs: dict[str, Path], preds: dict[str, Path], pred_dir: Path
) -> list[tuple[Path, Path]]:
    """(reference, prediction) pairs, by case key; when some reference has no prediction of its
    name and every prediction ends in one '_postfix' whose removal pairs them all (MONAI's
    SaveImage writes case_seg.nii.gz, or case_trans), by the names without it, with a warning.
    Raises DataError naming the unpaired files of both sides; warns about predictions
    without a reference."""
    preds = without_postfix(preds, refs, pred_dir, "predictions paired with their references")
    missing = [ref for key, ref in refs.items() if key not in preds]
    unscored = sorted(set(preds) - set(refs))
    if missing:
        others = (
            f"; predictions without a reference: {len(unscored)}, e.g. {preds[unscored[0]].name}"
            if unscored
            else ""
        )
        raise DataError(
            f"{pred_dir}: no prediction for {len(missing)} of {len(refs)} reference(s), e.g. "
            f"{missing[0].name}{others} (a prediction pairs with its reference by name, in any "
            "case and image format)"
        )
    if unscored:
        warnings.warn(
            f"{pred_dir}: {len(unscored)} prediction(s) without a reference not scored, e.g. "
            f"{preds[unscored[0]].name}",
            stacklevel=3,
        )
    return [(ref, preds[key]) for key, ref in refs.items()]


def _label_file(ref_dir: Path) -> tuple[Path, dict[int, str]] | None:
    """The labels declared beside the references or one folder up, and their file: a
    dataset.json with a 'labels' entry (a MONAI datalist, without one, declares nothing), or
    the labels.json of segscale's DICOM layout (masks/ beside it)."""
    for d in (ref_dir, ref_dir.parent):
        for name in ("dataset.json", "labels.json"):
            path = d / name
            if not path.is_file():
                continue
            try:
                if name == "labels.json":
                    return path, labels_json(path)
                meta = read_json(path)
                if isinstance(meta, dict) and "labels" in meta:
                    return path, labels_of(meta, path)
            except DataError as e:
                raise DataError(f"{e}; or give --labels") from None
    return None


def _score_pair(
    pred: Path,
    ref: Path,
    value_to_class: dict[int, int],
    ignore: int | None,
    apart: list[tuple[Path, list[int], list[int]]],
    source: str = "declared",
) -> tuple[CaseEval, int]:
    """One case of evaluate_folders: read, checked against the label values (`value_to_class`:
    raw value → class, 0 the background; `ignore`: the reference's value for unannotated
    voxels, taken out of the counts), scored. Appends to `apart` when the two files' foreground
    values have none in common. Returns the case and its number of unannotated voxels."""
    values = sorted(value_to_class)
    background = {v for v, c in value_to_class.items() if c == 0}
    p, r, spacing = _aligned(pred, ref)
    found_p, found_r = _values(p), _values(r)
    for path, found, allowed in (
        (pred, found_p, set(values)),
        (ref, found_r, set(values) | ({ignore} if ignore is not None else set())),
    ):
        undeclared = sorted(found - allowed)
        if undeclared:
            raise DataError(f"{path}: label values {undeclared} not declared ({source}: {values})")
    fg_p, fg_r = found_p - background, found_r - background - {ignore}
    if fg_p and fg_r and not fg_p & fg_r:
        apart.append((pred, sorted(fg_p), sorted(fg_r)))
    unannotated = r == ignore if ignore is not None else None
    if unannotated is not None:  # background in both, then taken out of the counts
        p, r = np.where(unannotated, 0, p), np.where(unannotated, 0, r)
    classes = [value_to_class[v] for v in values]
    if classes != values:  # every value is in the table: its class
        table, to_class = np.asarray(values), np.asarray(classes)
        p, r = to_class[np.searchsorted(table, p)], to_class[np.searchsorted(table, r)]
    result = evaluate_case(
        torch.from_numpy(p), torch.from_numpy(r), max(classes) + 1, spacing, _stem(ref)
    )
    if unannotated is None:
        return result, 0
    per_slice = unannotated.reshape(len(unannotated), -1).sum(1)
    result.slice_counts[:, 0, 0] -= per_slice
    result.counts[0, 0] -= int(per_slice.sum())
    return result, int(per_slice.sum())


def evaluate_folders(
    pred_dir: Path,
    ref_dir: Path,
    labels: dict[int, str] | None = None,
    label_map: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Score a folder of predicted masks (NIfTI or PNG, e.g. from nnU-Net or MONAI) against the
    reference masks of the same names (compared in any case, and in any image format: a.nii.gz
    pairs with A.nii; see pair_by_name and mask_files for MONAI's names and folders), in the
    files' own geometry and spacing. A NIfTI prediction is matched to its reference in world
    space (segscale.imgmed.geometry): one stored in another axis order is reoriented, one on
    another grid is refused. Cases are read and scored one at a time.

    The label set is declared: `labels` (raw mask value → name), else the `labels` of a
    dataset.json beside the references or one folder up (Decathlon or nnU-Net layout); only
    without either is it inferred from the values in the files (read once more for that), with
    a warning. A value no declared label has is refused, naming the file. Values that are not
    0..K-1 (e.g. PNG 0/255) are mapped to classes in sorted order, and the map is recorded.
    `label_map` (raw value → class, as `prepare --label-map`) declares the classes instead, for
    masks whose background is not 0 (ISBI's membranes 0, cells 255: `{0: 1, 255: 0}`) or
    several values of one class; it is scored as `segscale evaluate RUN` scores that store."""
    if Path(pred_dir).resolve() == Path(ref_dir).resolve():
        warnings.warn(
            f"{pred_dir}: the predictions are the references (one folder): every case scores "
            "as a perfect match",
            stacklevel=2,
        )
    if label_map is not None and labels is not None:
        raise DataError(
            "--labels and --label-map: give one (--label-map names the classes of raw values)"
        )
    refs = mask_files(ref_dir, "references")
    pairs = pair_by_name(refs, mask_files(pred_dir, "predictions"), pred_dir)
    source = "labels given"
    ignore = None
    if label_map is None and labels is None:
        found = _label_file(ref_dir)
        if found is not None:
            source, labels = f"{found[0]}", found[1]
    if label_map is not None:
        source, value_to_class, class_name = "label map given", label_map, class_names(label_map)
    elif labels is None:
        warnings.warn(
            f"{ref_dir}: labels inferred from the values in the files; declare them (--labels, or "
            "a dataset.json beside the references) so that the label set does not depend on "
            "which files share the folder",
            stacklevel=2,
        )
        present: set[int] = {0}
        with progress_bar(True, "reading labels", len(pairs)) as advance:
            for ref, pred in pairs:
                p, r, _ = _aligned(pred, ref)
                present |= _values(p) | _values(r)
                advance()
        values = sorted(present)
        if values == [0]:  # no foreground anywhere: one foreground class, not applicable
            values = [0, 1]
        names = {v: "background" if v == 0 else f"label {v}" for v in values}
        source = "inferred from the files"
    else:
        names = {0: "background", **labels}
        # nnU-Net's "ignore" label marks voxels nobody annotated: scored by neither side
        marked = [v for v, n in names.items() if n == IGNORE]
        if marked[1:] or 0 in marked:
            raise DataError(
                f"labels ({source}): 'ignore' given to {marked}; one value other than the "
                "background (0) may mark the voxels nobody annotated"
            )
        ignore = marked[0] if marked else None
        if ignore is not None:
            del names[ignore]
        values = sorted(names)
        if values == [0]:
            raise DataError(
                f"labels ({source}): no foreground label; 0 is the background (declare the "
                "values to score, e.g. --labels 1 or --labels 1:liver,2:tumour)"
            )
        twice = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
        if twice:
            raise DataError(
                f"labels ({source}): the name(s) {twice} are given to several values; each "
                "class needs its own name"
            )
    if label_map is None:  # each value a class, in sorted order
        value_to_class = {v: i for i, v in enumerate(values)}
        class_name = {i: names[v] for i, v in enumerate(values)}
    results = []
    ignored = 0
    apart: list[tuple[Path, list[int], list[int]]] = []
    with progress_bar(True, "scoring", len(pairs)) as advance:
        for ref, pred in pairs:
            result, unannotated = _score_pair(
                pred, ref, value_to_class, ignore, apart, "--label-map" if label_map else "declared"
            )
            results.append(result)
            ignored += unannotated
            advance()
    if apart:
        pred, p_values, r_values = apart[0]
        warnings.warn(
            f"{pred_dir}: in {len(apart)} of {len(pairs)} case(s) the prediction's foreground "
            f"values and the reference's have none in common, so their overlap is 0 (e.g. "
            f"{pred.name}: {p_values} against {r_values}); saved in two encodings (1-bit 0/1 "
            "against 8-bit 0/255)?",
            stacklevel=2,
        )
    classes = {str(c): name for c, name in class_name.items()}
    return {
        "pred": str(pred_dir),
        "ref": str(ref_dir),
        "labels": classes,
        "labels_source": source,
        "label_values": {str(v): c for v, c in sorted(value_to_class.items())},
        **({"ignore_label": {"value": ignore, "voxels": ignored}} if ignore is not None else {}),
        "workers": 1,
        **summarize(results, classes),
    }


def _stem(path: Path) -> str:
    return strip_suffix(path.name)

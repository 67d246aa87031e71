"""SegEval: metrics from a confusion matrix n[i, j] = pixels of class i predicted as class j.

Dataset-level metrics come from the confusion matrix summed over all pixels (as in the thesis),
which is exact under any sharding: integer counts add. Definitions (thesis §3.3.2.3, Table 5.1),
with t_i = Σ_j n_ij:
    PA    = Σ_i n_ii / Σ_i t_i
    MA    = (1/n_cl) Σ_i n_ii / t_i
    mIoU  = (1/n_cl) Σ_i n_ii / (t_i + Σ_j n_ji − n_ii)
    fwIoU = (Σ_k t_k)^-1 Σ_i t_i n_ii / (t_i + Σ_j n_ji − n_ii)
    Dice_i = 2 n_ii / (2 n_ii + Σ_{j≠i} n_ij + Σ_{j≠i} n_ji)
`dice` is the mean over foreground classes (what medical papers report); `dice_with_background`
is the thesis' formula averaged over all n_cl classes. Sensitivity (TPR) and specificity (TNR) are
one-vs-rest per foreground class, then averaged.

One rule for undefined values, at every level: a class absent from both the reference and the
prediction is not applicable. Every overlap metric of that class (Dice, IoU, F1, precision,
sensitivity, specificity) is NaN, left out of every mean and counted as excluded; as nnU-Net's
evaluator does. A class missed entirely (in the reference, not predicted) scores Dice 0 and F1 0.
F1 is computed as 2TP / (2TP + FP + FN), so it equals Dice wherever either is defined.
"""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    groups: torch.Tensor | None = None,
    num_groups: int = 1,
) -> torch.Tensor:
    """(C, C) int64 counts via one bincount, on the tensors' device. With `groups` (a group index
    per pixel, broadcastable to pred), (num_groups, C, C): one matrix per case or per slice."""
    idx = target.long() * num_classes + pred.long()
    cc = num_classes * num_classes
    if groups is None:
        return torch.bincount(idx.reshape(-1), minlength=cc).reshape(num_classes, num_classes)
    idx = groups.long() * cc + idx
    return torch.bincount(idx.reshape(-1), minlength=num_groups * cc).reshape(
        num_groups, num_classes, num_classes
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def mean_defined(a: np.ndarray) -> float:
    """Mean of the defined (non-NaN) values; NaN, without a warning, when none is defined."""
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def applicable(cm: np.ndarray) -> np.ndarray:
    """Per class: whether it is in the reference or the prediction (else not applicable)."""
    cm = np.asarray(cm)
    return (cm.sum(0) + cm.sum(1)) > 0


def per_class_dice(cm: np.ndarray) -> np.ndarray:
    """Dice per class; NaN where a class is absent from both reference and prediction."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    return _ratio(2 * tp, 2 * tp + (cm.sum(1) - tp) + (cm.sum(0) - tp))


def class_metrics(cm: np.ndarray) -> dict[int, dict[str, float]]:
    """Per-class (one vs rest) overlap metrics; NaN where undefined, and every metric NaN for a
    class absent from both masks (not applicable; see the module's rule)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    dice = per_class_dice(cm)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = dice  # 2TP / (2TP + FP + FN): the harmonic mean of precision and recall, where defined
    iou = _ratio(tp, tp + fn + fp)
    spec = np.where(applicable(cm), _ratio(tn, tn + fp), np.nan)
    return {
        c: {
            "dice": float(dice[c]),
            "iou": float(iou[c]),
            "precision": float(precision[c]),
            "sensitivity": float(recall[c]),
            "specificity": float(spec[c]),
            "f1": float(f1[c]),
        }
        for c in range(len(cm))
    }


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    t = cm.sum(1)  # reference pixels per class
    p = cm.sum(0)  # predicted pixels per class
    total = cm.sum()
    union = t + p - tp
    present = union > 0
    iou = _ratio(tp, union)
    dice = per_class_dice(cm)
    fn, fp = t - tp, p - tp
    tn = total - tp - fn - fp
    fg = slice(1, None) if len(cm) > 1 else slice(None)
    specificity = np.where(present, _ratio(tn, tn + fp), np.nan)
    return {
        "dice": mean_defined(dice[fg]),
        "dice_with_background": mean_defined(dice),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_accuracy": mean_defined(_ratio(tp, t)[present]),
        "mean_iou": mean_defined(iou[present]),
        "fw_iou": float(np.nansum(t * np.nan_to_num(iou)) / total) if total else float("nan"),
        "sensitivity": mean_defined(_ratio(tp, tp + fn)[fg]),
        "specificity": mean_defined(specificity[fg]),
    }


def classification_metrics(cm: np.ndarray) -> dict[str, float]:
    """Slice- or image-level scores from a (C, C) reference × prediction count matrix: accuracy,
    balanced accuracy (mean per-class recall, over the classes the reference has), and for two
    classes the positive class's precision TP/(TP+FP), sensitivity TP/(TP+FN), specificity
    TN/(TN+FP) and F1 2TP/(2TP+FP+FN), each NaN only where its denominator is 0. Not the
    segmentation rule (a class absent from both → every metric NaN): a split without positive
    slices still has a specificity, which a classifier that says "none" gets right."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    out = {
        "accuracy": float(np.trace(cm) / total) if total else float("nan"),
        "balanced_accuracy": mean_defined(_ratio(np.diag(cm), cm.sum(1))),
    }
    if len(cm) == 2:
        (tn, fp), (fn, tp) = cm
        ratios = {
            "precision": (tp, tp + fp),
            "sensitivity": (tp, tp + fn),
            "specificity": (tn, tn + fp),
            "f1": (2 * tp, 2 * tp + fp + fn),
        }
        out.update({k: float(n / d) if d else float("nan") for k, (n, d) in ratios.items()})
    return out

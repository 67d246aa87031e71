"""SegEval: segmentation metrics (the thesis' set, exact under distributed evaluation)."""

from segscale.segeval.confusion import (
    class_metrics,
    classification_metrics,
    confusion_matrix,
    mean_defined,
    metrics_from_confusion,
    per_class_dice,
)
from segscale.segeval.distance import DISTANCE_METRICS, distance_metrics

__all__ = [
    "DISTANCE_METRICS",
    "class_metrics",
    "classification_metrics",
    "confusion_matrix",
    "distance_metrics",
    "mean_defined",
    "metrics_from_confusion",
    "per_class_dice",
]

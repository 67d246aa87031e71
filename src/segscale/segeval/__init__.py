"""SegEval: segmentation metrics (the thesis' set, exact under distributed evaluation)."""

from segscale.segeval.confusion import confusion_matrix, metrics_from_confusion, per_class_dice

__all__ = ["confusion_matrix", "metrics_from_confusion", "per_class_dice"]

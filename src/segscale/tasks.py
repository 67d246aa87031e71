"""Tasks: what a run learns from the store's slices and how it is scored (the thesis' task
definition, injected like the architecture and the dataset). The engine, the launcher, the Trainer
and checkpoints are the same for every task.

A task names its validation metric (`metric`, higher is better: it picks best.pt), turns a batch of
store masks into training targets (`target`), says what output it expects from the model
(`output_shape`, checked before launch), and scores a model on a split (`validate`, `evaluate`).
A task may also name the metrics `validate` returns (`validation_metrics`), so that a callback
reading a metric the task does not give is refused before launch.
Users can plug their own with `task: {name: pkg.mod:Class, kwargs: {...}}`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used: planning a run must not import it
    import torch
    from torch import nn

    from segscale.imgmed.store import Store
    from segscale.parallel import Strategy


# What the engine, the Trainer and evaluate use of a task (a plug-in task has them all).
TASK_API = ("metric", "num_outputs", "labels", "target", "output_shape", "validate", "evaluate")


class Segmentation:
    """A class per pixel, from the store's masks; Dice (foreground mean) selects the best model.
    Full evaluation: SegEval at dataset, case and slice levels (segscale.evaluation)."""

    metric = "dice"
    losses = ("ce", "dice", "dice_ce")

    def num_outputs(self, store: Store) -> int:
        return store.num_classes

    def labels(self, store: Store) -> dict[str, str]:
        return store.meta["labels"]

    def target(self, masks: torch.Tensor) -> torch.Tensor:
        return masks

    def output_shape(self, batch: int, classes: int, size: int) -> tuple[int, ...]:
        return (batch, classes, size, size)

    def validation_metrics(self) -> tuple[str, ...]:
        """The keys of validate's result (each recorded as val_<key>)."""
        import numpy as np

        from segscale.segeval import metrics_from_confusion

        return tuple(metrics_from_confusion(np.zeros((2, 2))))

    def validate(
        self, model: nn.Module, loader: Any, classes: int, cases: int, strategy: Strategy
    ) -> dict[str, float]:
        from segscale.evaluation import confusion_by_case
        from segscale.segeval import metrics_from_confusion

        return metrics_from_confusion(
            confusion_by_case(model, loader, classes, cases, strategy).sum(0)
        )

    def evaluate(
        self, model: nn.Module, store: Store, split: str, strategy: Strategy, batch_size: int
    ) -> dict[str, Any]:
        """SegEval at three levels, each case whole on one rank (see segscale.evaluation)."""
        from segscale.evaluation import evaluate_split, summarize

        results = evaluate_split(model, store, split, strategy, batch_size)
        return summarize(results, store.meta["labels"])


class Classification:
    """One class per slice: whether it shows `foreground` (a class of the store, default any
    non-background class), e.g. "does this slice show the left atrium?". Learned from the same
    prepared store as segmentation, with the same augmentation (the label follows the warped mask).
    Accuracy selects the best model; evaluation adds balanced accuracy and the positive class's
    precision, sensitivity, specificity and F1."""

    metric = "accuracy"
    losses = ("ce",)

    def __init__(self, foreground: int | None = None) -> None:
        if foreground is not None and foreground < 1:
            raise ValueError(f"foreground {foreground}: expected a class index ≥ 1")
        self.foreground = foreground

    def num_outputs(self, store: Store) -> int:
        if self.foreground is not None and self.foreground >= store.num_classes:
            raise ValueError(
                f"foreground {self.foreground}: the store's classes are 0..{store.num_classes - 1}"
            )
        return 2

    def labels(self, store: Store) -> dict[str, str]:
        names = store.meta["labels"]
        if self.foreground:
            shown = names[str(self.foreground)]
        else:  # any foreground: name it when there is only one foreground class
            shown = names["1"] if len(names) == 2 else "foreground"
        return {"0": f"no {shown}", "1": shown}

    def target(self, masks: torch.Tensor) -> torch.Tensor:
        hit = masks == self.foreground if self.foreground else masks > 0
        return hit.flatten(1).any(1).long()

    def output_shape(self, batch: int, classes: int, size: int) -> tuple[int, ...]:
        return (batch, 2)

    def validation_metrics(self) -> tuple[str, ...]:
        """The keys of validate's result (each recorded as val_<key>)."""
        import numpy as np

        from segscale.segeval import classification_metrics

        return tuple(classification_metrics(np.zeros((2, 2))))

    def validate(
        self, model: nn.Module, loader: Any, classes: int, cases: int, strategy: Strategy
    ) -> dict[str, float]:
        from segscale.evaluation import confusion_by_case
        from segscale.segeval import classification_metrics

        counts = confusion_by_case(model, loader, 2, cases, strategy, target=self.target)
        return classification_metrics(counts.sum(0))

    def evaluate(
        self, model: nn.Module, store: Store, split: str, strategy: Strategy, batch_size: int
    ) -> dict[str, Any]:
        """Slice-level scores and the confusion matrix; slices shared among the ranks."""
        from segscale.data import SliceDataset, eval_loader
        from segscale.evaluation import confusion_by_case
        from segscale.segeval import classification_metrics

        data = SliceDataset(store, split)
        loader = eval_loader(data, batch_size, strategy.rank, strategy.world_size)
        cm = confusion_by_case(model, loader, 2, len(data.cases), strategy, target=self.target).sum(
            0
        )
        return {
            "task": "classification",
            "level": "slice",
            "slices": int(cm.sum()),
            "confusion_matrix": {
                "rows": "reference",
                "columns": "prediction",
                "counts": cm.tolist(),
            },
            "dataset": classification_metrics(cm),
        }

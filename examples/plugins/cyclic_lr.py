"""A user learning-rate schedule, plugged in as a callback:

    train:
      callbacks: [{name: examples/plugins/cyclic_lr.py:TriangularLR, kwargs: {cycle_epochs: 2, low: 0.1}}]

Callbacks are duck-typed: segscale calls each hook the object defines. This one wraps the schedule
the config built (scaling rule, warmup, decay) at the start of training, and multiplies it by a
triangular cycle (Smith 2017) between `low` and 1. The Trainer asks `trainer.schedule(step)` every
step, so nothing else changes, and a resumed run gets the same curve.
"""

from __future__ import annotations

from typing import Any


class TriangularLR:
    def __init__(self, cycle_epochs: float = 2.0, low: float = 0.1) -> None:
        if cycle_epochs <= 0 or not 0 <= low <= 1:
            raise ValueError("cycle_epochs must be > 0 and low within [0, 1]")
        self.cycle_epochs, self.low = cycle_epochs, low

    def on_train_start(self, trainer: Any) -> None:
        base = trainer.schedule
        period = self.cycle_epochs * trainer.steps_per_epoch

        def cyclic(step: int) -> float:
            phase = (step % period) / period  # 0 → 1 over one cycle
            return base(step) * (self.low + (1 - self.low) * (1 - abs(2 * phase - 1)))

        trainer.schedule = cyclic

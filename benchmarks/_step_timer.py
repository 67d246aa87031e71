"""A training callback for the benchmarks (loaded by path, like any user's callback): the wall time
of every step after the first epoch, data loading included, from one step's end to the next's.
Rank 0 writes {"step_seconds": [...]} to `out` when training ends. A median of step times shrugs
off the machine's slow spells, which an epoch's mean images/s absorbs whole."""

from __future__ import annotations

import json
import time
from typing import Any


class StepTimer:
    def __init__(self, out: str) -> None:
        self.out = out
        self.step_seconds: list[float] = []
        self.last = 0.0
        self.timing = False

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.timing = epoch > 0  # the first epoch warms up
        self.last = time.perf_counter()

    def on_step_end(self, trainer: Any, step: int) -> None:
        now = time.perf_counter()
        if self.timing:
            self.step_seconds.append(now - self.last)
        self.last = now

    def on_train_end(self, trainer: Any, history: list[dict[str, Any]]) -> None:
        if trainer.strategy.rank == 0:
            with open(self.out, "w") as f:
                json.dump({"step_seconds": self.step_seconds}, f)

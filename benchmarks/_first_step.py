"""A callback for benchmarks/engine_overhead.py: rank 0 writes the wall-clock time after step 1."""

import time


class FirstStep:
    def __init__(self, path: str) -> None:
        self.path = path

    def on_step_end(self, trainer, step: int) -> None:
        if step == 1 and trainer.strategy.rank == 0:
            with open(self.path, "w") as f:
                f.write(repr(time.time()))

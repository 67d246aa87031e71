"""Time-to-Dice snapshots (a segscale callback plugin used by benchmarks/time_to_dice.py).

At the end of every epoch rank 0 saves the weights and the wall time since the benchmark launched
the command (SEGSCALE_BENCH_T0, a time.time() stamp), so startup, data loading and every
synchronisation count. The snapshots are scored after training, outside the measured time, by the
same code as the MONAI script's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from segscale.parallel import unwrap


class Snapshot:
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if trainer.strategy.rank != 0:
            return
        elapsed = time.time() - float(os.environ["SEGSCALE_BENCH_T0"])
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(unwrap(trainer.model).state_dict(), self.out / f"epoch_{record['epoch']:03d}.pt")
        with open(self.out / "times.jsonl", "a") as f:
            line = {
                "epoch": record["epoch"],
                "seconds": elapsed,
                "img_s": record["images_per_second"],
            }
            f.write(json.dumps(line) + "\n")

"""A user's tracker, by path: records what it was given and what it saw to a JSON file."""

import json
from pathlib import Path


class RecordingTracker:
    def __init__(self, run_dir, run_name, params, out: str) -> None:
        self.out = Path(out)
        self.seen = {"run_name": run_name, "lr": params["train.optimizer.lr"], "epochs": []}

    def on_epoch_end(self, trainer, record) -> None:
        self.seen["epochs"].append(record["epoch"])

    def close(self, error=None) -> None:
        self.seen["error"] = type(error).__name__ if error else None
        self.out.write_text(json.dumps(self.seen))

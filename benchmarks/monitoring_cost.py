"""What monitoring costs a training step: the mean step time (every step, logged ones included,
after a warm-up epoch) with the default monitoring (MLflow tracker, step metrics every 50 steps,
system metrics every 10 s, the stop tag polled every 5 s) against no monitoring at all (tracker
none, no step metrics, no sampler), 2 gloo workers at the demo size (ResUNet 16/3, 128², batch 8
per worker), measured side by side in each round. An A/A pair (no monitoring twice) shows how far
this machine's noise alone moves the ratio. Goal: monitored / bare ≤ 1.01.

    python benchmarks/monitoring_cost.py [--steps 100] [--epochs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from segscale.demo import prepare_demo_store

HERE = Path(__file__).resolve().parent


def mean_step_seconds(
    tmp: Path, store: Path, name: str, monitored: bool, steps: int, epochs: int
) -> float:
    timer = tmp / f"{name}.steps.json"
    cfg = {
        "name": name,
        "data": {"store": str(store)},
        "model": {"name": "resunet", "kwargs": {"base_channels": 16, "depth": 3}},
        "train": {
            "epochs": epochs,
            "batch_size": 8,
            "optimizer": {"name": "adam", "lr": 1e-3},
            "steps_per_epoch": steps,
            "val_every": 1000,
            "threads": 1,
            "callbacks": [
                {"name": f"{HERE / '_step_timer.py'}:StepTimer", "kwargs": {"out": str(timer)}}
            ],
        },
        "tracker": "mlflow" if monitored else "none",
        "monitor": {} if monitored else {"log_every": 10**9, "system_every": 0},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        "-m",
        "segscale.cli",
        "train",
        str(path),
        "--run-dir",
        str(tmp / "runs" / name),
        "--workers",
        "2",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    return statistics.fmean(json.loads(timer.read_text())["step_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = prepare_demo_store(tmp / "store", progress=False)
        ratios, noise = [], []
        for r in range(args.rounds):
            bare = mean_step_seconds(tmp, store, f"bare{r}", False, args.steps, args.epochs)
            monitored = mean_step_seconds(tmp, store, f"mon{r}", True, args.steps, args.epochs)
            again = mean_step_seconds(tmp, store, f"again{r}", False, args.steps, args.epochs)
            ratios.append(monitored / bare)
            noise.append(again / bare)
            print(
                f"round {r + 1}: bare {bare * 1000:.1f} ms, monitored {monitored * 1000:.1f} ms "
                f"({monitored / bare:.3f}), bare again {again * 1000:.1f} ms ({again / bare:.3f})",
                flush=True,
            )
    print(
        f"monitored / bare: median {statistics.median(ratios):.3f} over {args.rounds} rounds "
        f"(goal ≤ 1.01); A/A: median {statistics.median(noise):.3f}"
    )


if __name__ == "__main__":
    main()

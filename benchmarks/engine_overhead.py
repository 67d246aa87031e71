"""Auto-CNNp engine overhead: the time segscale adds before training starts, measured side by side.

Wall clock from launching the command to the end of the first training step, 2 gloo workers, the
demo's model and data:
  (a) `segscale train cfg.yaml --workers 2`: config load, validation, plan (every component checked),
      the model's check forward, run folder, the in-process torchrun agent, and in each worker
      (forked from segscale's fork server on Linux) the config loaded again before the Trainer;
  (b) `torchrun --nproc-per-node 2 benchmarks/_plain_ddp.py`: a hand-written DDP script.
The difference (a) − (b) is the engine's cost, negative where it starts faster (goal: at most 139 ms, the thesis' engine time). Also
timed: `segscale plan cfg.yaml` and `segscale --help` alone. Medians of interleaved repeats.
segscale's run uses the default tracker (MLflow, whose import on rank 0's background thread
competes with the first step), or `--tracker none`.

    python benchmarks/engine_overhead.py [--repeats 5] [--tracker mlflow|none]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from segscale.demo import prepare_demo_store

HERE = Path(__file__).resolve().parent
SEGSCALE = [sys.executable, "-m", "segscale.cli"]


def to_first_step(cmd: list[str], marker: Path) -> float:
    marker.unlink(missing_ok=True)
    start = time.time()
    subprocess.run(cmd, check=True, capture_output=True)
    return float(marker.read_text()) - start


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tracker", default="mlflow")
    args = parser.parse_args()
    seg, plain, plan, help_ = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = prepare_demo_store(tmp / "store", progress=False)
        marker = tmp / "first_step"
        cfg = {
            "name": "overhead",
            "tracker": args.tracker,
            "data": {"store": str(store)},
            "model": {"name": "resunet", "kwargs": {"base_channels": 16, "depth": 3}},
            "train": {
                "epochs": 1,
                "batch_size": 8,
                "optimizer": {"name": "adam", "lr": 1e-3},
                "steps_per_epoch": 1,
                "callbacks": [
                    {
                        "name": f"{HERE / '_first_step.py'}:FirstStep",
                        "kwargs": {"path": str(marker)},
                    }
                ],
            },
        }
        config = tmp / "overhead.yaml"
        config.write_text(yaml.safe_dump(cfg))
        plain_cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(HERE / "_plain_ddp.py"),
            "--store",
            str(store),
            "--steps",
            "1",
            "--epochs",
            "1",
            "--first-step-file",
            str(marker),
        ]
        for i in range(args.repeats):  # interleaved
            seg.append(
                to_first_step(
                    [
                        *SEGSCALE,
                        "train",
                        str(config),
                        "--workers",
                        "2",
                        "--run-dir",
                        str(tmp / f"run{i}"),
                    ],
                    marker,
                )
            )
            plain.append(to_first_step(plain_cmd, marker))
            plan.append(wall([*SEGSCALE, "plan", str(config), "--json"]))
            help_.append(wall([*SEGSCALE, "--help"]))
    m = statistics.median
    print(f"{'measure (medians of ' + str(args.repeats) + ')':52s} {'seconds':>8s}  runs")
    for name, xs in [
        ("segscale train --workers 2: launch -> first step", seg),
        ("hand-written torchrun DDP: launch -> first step", plain),
        ("segscale plan", plan),
        ("segscale --help", help_),
    ]:
        print(f"{name:52s} {m(xs):8.3f}  {', '.join(f'{x:.2f}' for x in xs)}")
    print(f"{'engine overhead (a) - (b)':52s} {m(seg) - m(plain):8.3f}  goal <= 0.139")


if __name__ == "__main__":
    main()

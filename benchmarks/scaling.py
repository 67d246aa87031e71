"""Scaling benchmarks of the distributed engine, measured side by side in one run (ratios; absolute
times mean little on a shared machine). On the bundled left-atrium sample at the demo size
(ResUNet 16/3, 128², batch 8 per worker, Adam, Dice+CE, no augmentation), one thread per worker:

1. weak scaling 1 → 2 gloo workers: efficiency = img/s(2) / (2 × img/s(1))      goal ≥ 0.90
2. segscale's step vs a hand-written torch DDP loop (benchmarks/_plain_ddp.py),
   2 workers: step-time ratio segscale / plain                                     goal ≤ 1.02
3. 2 simulated workers vs one process at global batch 16: step-time ratio        goal ≤ 1.05
   (the exact per-micro-batch path, and `simulate_fused`, one forward for both micro-batches)

    python benchmarks/scaling.py [--steps 20] [--epochs 3] [--repeats 3]
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


def segscale_rate(
    tmp: Path, store: Path, name: str, workers: int, steps: int, epochs: int, **train: object
) -> float:
    cfg = {
        "name": name,
        "seed": 0,
        "data": {"store": str(store)},
        "model": {"name": "resunet", "kwargs": {"base_channels": 16, "depth": 3}},
        "train": {
            "epochs": epochs,
            "batch_size": 8,
            "optimizer": {"name": "adam", "lr": 1e-3},
            "steps_per_epoch": steps,
            "val_every": 1000,
            "threads": 1,
            **train,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp / name
    cmd = [
        sys.executable,
        "-m",
        "segscale.cli",
        "train",
        str(path),
        "--run-dir",
        str(run),
        "--workers",
        str(workers),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["images_per_second"] for r in rows[1:]) / (len(rows) - 1)  # epoch 1 warms up


def plain_rate(store: Path, workers: int, steps: int, epochs: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={workers}",
        str(HERE / "_plain_ddp.py"),
        "--store",
        str(store),
        "--steps",
        str(steps),
        "--epochs",
        str(epochs),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds; medians are reported"
    )
    args = parser.parse_args()
    s, e = args.steps, args.epochs
    runs: dict[str, list[float]] = {k: [] for k in ("one", "two", "plain", "big", "sim", "fused")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = prepare_demo_store(tmp / "store", progress=False)
        for i in range(
            args.repeats
        ):  # interleaved, so slow spells of the machine hit every measure
            runs["one"].append(segscale_rate(tmp, store, f"one{i}", 1, s, e))
            runs["two"].append(segscale_rate(tmp, store, f"two{i}", 2, s, e))
            runs["plain"].append(plain_rate(store, 2, s, e))
            runs["big"].append(
                segscale_rate(tmp, store, f"big{i}", 1, s, e, batch_size=16, threads=2)
            )
            runs["sim"].append(
                segscale_rate(tmp, store, f"sim{i}", 1, s, e, simulate_workers=2, threads=2)
            )
            runs["fused"].append(
                segscale_rate(
                    tmp,
                    store,
                    f"fused{i}",
                    1,
                    s,
                    e,
                    simulate_workers=2,
                    simulate_fused=True,
                    threads=2,
                )
            )
    m = {k: statistics.median(v) for k, v in runs.items()}

    def row(name: str, value: float, goal: str = "", key: str | None = None) -> None:
        spread = f"  runs: {', '.join(f'{x:.1f}' for x in runs[key])}" if key else ""
        print(f"{name:56s} {value:8.3f}  {goal:8s}{spread}")

    print(
        f"{'measure (medians of ' + str(args.repeats) + ' interleaved runs)':56s} {'value':>8s}  goal"
    )
    row("img/s, 1 worker, 1 thread", m["one"], key="one")
    row("img/s, 2 workers, 1 thread each", m["two"], key="two")
    row("1. weak-scaling efficiency 1 -> 2 workers", m["two"] / (2 * m["one"]), ">= 0.90")
    row("img/s, 2 workers, plain torch DDP loop", m["plain"], key="plain")
    row("2. step time segscale / plain DDP, 2 workers", m["plain"] / m["two"], "<= 1.02")
    row("img/s, 1 process (2 threads), batch 16", m["big"], key="big")
    row("img/s, 2 simulated workers x 8 (exact path)", m["sim"], key="sim")
    row("3. step time simulated / one process at 16", m["big"] / m["sim"], "<= 1.05")
    row("img/s, 2 simulated workers x 8 (simulate_fused)", m["fused"], key="fused")
    row("3b. step time fused simulation / one process at 16", m["big"] / m["fused"], "<= 1.05")


if __name__ == "__main__":
    main()

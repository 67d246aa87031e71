"""Keeping freed memory in the process (segscale/_memory.py) vs glibc's defaults, side by side:
`segscale train` at the demo size (benchmarks/scaling.py's runs), with and without
SEGSCALE_KEEP_FREED_MEMORY=0, interleaved. Speeds from median step times; ratios > 1: faster.

    python benchmarks/memory_reuse.py [--steps 20] [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from scaling import segscale_rate

from segscale.demo import prepare_demo_store

SETUPS = {  # name: (workers, train overrides)
    "1 process, 2 threads, batch 16": (1, {"threads": 2, "batch_size": 16}),
    "2 simulated workers x 8, 2 threads": (1, {"threads": 2, "simulate_workers": 2}),
    "2 gloo workers x 8, 1 thread each": (2, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = prepare_demo_store(tmp / "store", progress=False)
        for i in range(args.repeats):
            for j, (setup, (workers, train)) in enumerate(SETUPS.items()):
                for keep in (True, False) if i % 2 == 0 else (False, True):  # ABBA
                    env = {} if keep else {"SEGSCALE_KEEP_FREED_MEMORY": "0"}
                    rate = segscale_rate(
                        tmp,
                        store,
                        f"s{j}{keep:d}r{i}",
                        workers,
                        args.steps,
                        args.epochs,
                        env,
                        **train,
                    )
                    rates.setdefault((setup, keep), []).append(rate)
    print(f"{'setup':40s} {'kept img/s':>10s} {'glibc img/s':>11s} {'ratio':>6s}  per round")
    for setup in SETUPS:
        kept, plain = rates[(setup, True)], rates[(setup, False)]
        rounds = ", ".join(f"{k / p:.3f}" for k, p in zip(kept, plain))
        ratio = statistics.median(kept) / statistics.median(plain)
        print(
            f"{setup:40s} {statistics.median(kept):10.1f} {statistics.median(plain):11.1f} "
            f"{ratio:6.3f}  {rounds}"
        )


if __name__ == "__main__":
    main()

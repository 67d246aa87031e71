"""Time-to-Dice: segscale's default vs a straightforward MONAI script, in one run of this command.

Both train on the same prepared left-atrium slices (../shared/data/left_atrium_lge_mri_2018, 128²,
split by case) with 2 gloo workers, one thread each, batch 8 per worker, for the same number of
epochs: (a) `segscale train CONFIG --workers 2` through the CLI, (b) benchmarks/_monai_unet.py
under torchrun. Each saves its weights and the wall time since its command was launched after every
epoch; the snapshots are then scored by one piece of code here (per-case 3D Dice of the foreground on
the test cases, mean over cases), outside the measured time.

Printed: img/s, wall time, Dice after each epoch, the time each first reached Dice 0.85, and the
goal: segscale reaches MONAI's final Dice (± 0.005) in ≤ 1.0× MONAI's wall time.

    python benchmarks/time_to_dice.py [--config examples/la_resunet.yaml] [--epochs 12] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segscale.config import load_config
from segscale.imgmed import Preprocessing, Store, prepare
from segscale.models import create_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data" / "left_atrium_lge_mri_2018"
TARGET = 0.85


def run_segscale(
    config: Path, store: Path, out: Path, epochs: int, workers: int, seed: int
) -> None:
    snap = {"name": f"{HERE / '_ttd_snapshot.py'}:Snapshot", "kwargs": {"out": str(out / "snaps")}}
    overrides = [
        f"data.store={store}",
        f"seed={seed}",
        f"train.epochs={epochs}",
        f"train.val_every={epochs}",  # validation only at the end; scoring happens afterwards
        "train.threads=1",
        f"train.callbacks=[{json.dumps(snap)}]",
    ]
    cmd = [sys.executable, "-m", "segscale.cli", "train", str(config), *overrides]
    cmd += ["--run-dir", str(out / "run"), "--workers", str(workers)]
    _timed(cmd, out)


def run_monai(store: Path, out: Path, epochs: int, workers: int, seed: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={workers}", str(HERE / "_monai_unet.py")]
    cmd += ["--store", str(store), "--out", str(out / "snaps"), "--epochs", str(epochs)]
    cmd += ["--seed", str(seed)]
    _timed(cmd, out)


def _timed(cmd: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = {**os.environ, "SEGSCALE_BENCH_T0": repr(t0), "OMP_NUM_THREADS": "1"}
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])}... failed ({done.returncode}); see {out / 'log.txt'}"
        )
    (out / "wall.json").write_text(json.dumps({"seconds": time.time() - t0}))


def score(model: torch.nn.Module, snaps: Path, store: Store) -> list[dict]:
    """Per-epoch record: wall seconds, img/s and the mean per-case 3D foreground Dice on test."""
    cases = store.cases("test")
    rows = [json.loads(line) for line in (snaps / "times.jsonl").read_text().splitlines()]
    for row in rows:
        model.load_state_dict(torch.load(snaps / f"epoch_{row['epoch']:03d}.pt"))
        model.eval()
        dices = []
        for case in cases:
            sl = slice(case["start"], case["start"] + case["count"])
            x = torch.from_numpy(np.array(store.images[sl]))
            with torch.no_grad():
                pred = torch.cat([model(b).argmax(1) for b in x.split(32)]).numpy() == 1
            ref = np.asarray(store.masks[sl]) == 1
            dices.append(2 * (pred & ref).sum() / max(pred.sum() + ref.sum(), 1))
        row["dice"] = float(np.mean(dices))
    return rows


def first_reaching(rows: list[dict], dice: float) -> float | None:
    return next((r["seconds"] for r in rows if r["dice"] >= dice), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "examples" / "la_resunet.yaml")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=1, help="seeds 0..R-1, MONAI and segscale alternating"
    )
    p.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.config)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        store_path, _ = prepare(
            args.data,
            out / "store",
            Preprocessing(size=128),
            val_fraction=0.1,
            test_fraction=0.25,
            seed=0,
            progress=False,
        )
        store = Store.open(store_path)
        print(
            f"left atrium 128²: {len(store.rows('train'))} training slices, "
            f"{len(store.cases('test'))} test cases; {args.workers} workers, {args.epochs} epochs"
        )
        results: dict[str, list[list[dict]]] = {"monai": [], "segscale": []}
        walls: dict[str, list[float]] = {"monai": [], "segscale": []}
        for seed in range(args.repeats):
            for name in ("monai", "segscale"):
                run = out / f"{name}-{seed}"
                if name == "monai":
                    run_monai(store_path, run, args.epochs, args.workers, seed)
                    sys.path.insert(0, str(HERE))
                    from _monai_unet import monai_unet

                    model = monai_unet()
                else:
                    run_segscale(args.config, store_path, run, args.epochs, args.workers, seed)
                    model = create_model(
                        cfg.model.name, store.in_channels, store.num_classes, **cfg.model.kwargs
                    )
                results[name].append(score(model, run / "snaps", store))
                walls[name].append(json.loads((run / "wall.json").read_text())["seconds"])
        report(results, walls, args.config)


def report(
    results: dict[str, list[list[dict]]], walls: dict[str, list[float]], config: Path
) -> None:
    print(f"\nsegscale: {config.name}; MONAI: benchmarks/_monai_unet.py\n")
    for seed in range(len(walls["monai"])):
        print(f"seed {seed}     " + "".join(f"{n:>24s}" for n in ("monai", "segscale")))
        print("epoch        " + "      seconds  img/s  Dice" * 2)
        m, s = results["monai"][seed], results["segscale"][seed]
        for a, b in zip(m, s):
            print(
                f"{a['epoch']:5d}        "
                + "".join(
                    f"      {r['seconds']:7.1f} {r['img_s']:6.1f} {r['dice']:.3f}" for r in (a, b)
                )
            )
        mw, sw = walls["monai"][seed], walls["segscale"][seed]
        target = m[-1]["dice"] - 0.005
        t_target = first_reaching(s, target)
        print(f"wall time             monai {mw:.1f} s    segscale {sw:.1f} s")
        for name, rows in (("monai", m), ("segscale", s)):
            t = first_reaching(rows, TARGET)
            print(f"first Dice ≥ {TARGET}      {name:9s} " + (f"{t:.1f} s" if t else "never"))
        verdict = (
            f"{t_target:.1f} s = {t_target / mw:.2f}× MONAI's wall time"
            if t_target is not None
            else "never"
        )
        print(
            f"goal: segscale reaches MONAI's final Dice {m[-1]['dice']:.3f} − 0.005 in ≤ 1.0× "
            f"its wall time: {verdict} → {'met' if t_target and t_target <= mw else 'NOT met'}\n"
        )


if __name__ == "__main__":
    main()

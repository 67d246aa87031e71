"""Does the shipped left-atrium model help on another dataset? Fine-tuning from it against
training from scratch, same network, epochs, data and seeds.

Target: the ISBI 2012 EM membranes (30 real 512² images, membranes as the foreground), prepared
at 256². Arms: `scratch` (random init), `pretrained` (model.pretrained: zoo:la-resunet, every
tensor fits: one input channel, two classes), `frozen` (the same, the encoder frozen for the
first quarter of the epochs). Each arm trains with 2 gloo workers and is scored on the test
split; the validation curves go to one figure.

    python benchmarks/transfer_study.py [--data ../shared/data/isbi2012_em_membranes]
        [--epochs 20] [--seeds 0,1] [--out /tmp/transfer] [--figure docs/figures/transfer_isbi.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def segscale(*args: object) -> None:
    done = subprocess.run([sys.executable, "-m", "segscale.cli", *map(str, args)], text=True)
    if done.returncode != 0:
        sys.exit(f"segscale {' '.join(map(str, args))} failed ({done.returncode})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/isbi2012_em_membranes"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--model", default="zoo:la-resunet@1")
    parser.add_argument("--out", type=Path, default=Path("/tmp/transfer"))
    parser.add_argument("--figure", type=Path, default=ROOT / "docs/figures/transfer_isbi.png")
    args = parser.parse_args()
    out = args.out.resolve()
    store = out / "prepared"
    if not (store / "meta.json").is_file():
        segscale("prepare", args.data, store, "--size", 256, "--label-map", "0:1,255:0",
                 "--val", 0.1, "--test", 0.2, "--seed", 0)  # fmt: skip
    arms = {
        "scratch": {},
        "pretrained": {"pretrained": args.model},
        "frozen": {"pretrained": args.model, "freeze": max(1, args.epochs // 4)},
    }
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in map(int, args.seeds.split(",")):
        for arm, how in arms.items():
            run = out / "runs" / f"{arm}-seed{seed}"
            cfg = {
                "name": f"{arm}-seed{seed}",
                "seed": seed,
                "data": {
                    "store": str(store),
                    "augment": {"enabled": True, "rotation": 45, "zoom": [0.8, 1.2], "flip": True},
                },
                "model": {
                    "name": "resunet",
                    "kwargs": {"base_channels": 16, "depth": 3},
                    "pretrained": how.get("pretrained"),
                },
                "train": {
                    "epochs": args.epochs,
                    "batch_size": 4,
                    "optimizer": {"name": "adam", "lr": 0.001},
                    "loss": "dice_ce",
                    "schedule": {"scaling": "linear", "reference_batch": 8, "warmup_epochs": 1,
                                 "decay": "cosine"},
                    "finetune": {"freeze_encoder_epochs": how.get("freeze", 0)},
                },
                "tracker": "none",
            }  # fmt: skip
            if not (run / "evaluation-test.json").is_file():
                path = out / f"{arm}-seed{seed}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                if not (run / "model.pt").is_file():
                    segscale("train", path, "--workers", 2, "--run-dir", run,
                             *(["--resume"] if (run / "checkpoints").is_dir() else []))  # fmt: skip
                segscale("evaluate", run, "--split", "test", "--json", run / "evaluation-test.json")
            evaluation = json.loads((run / "evaluation-test.json").read_text())
            curve = [
                (r["epoch"], r["val_dice"])
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            ]
            results[arm].append(
                {"seed": seed, "test_dice": evaluation["dataset"]["dice"], "curve": curve}
            )
    print("\n| arm | test Dice per seed | mean | validation Dice after epoch 2 (mean) |")
    print("|---|---|---:|---:|")
    for arm, rows in results.items():
        dice = [r["test_dice"] for r in rows]
        early = statistics.fmean(r["curve"][1][1] for r in rows)
        print(
            f"| {arm} | {', '.join(f'{d:.4f}' for d in dice)} | {statistics.fmean(dice):.4f} | {early:.4f} |"
        )
    (out / "transfer.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"scratch": "tab:grey", "pretrained": "tab:blue", "frozen": "tab:orange"}
    for arm, rows in results.items():
        for i, r in enumerate(rows):
            epochs, dice = zip(*r["curve"])
            ax.plot(epochs, dice, color=colours[arm], alpha=0.8, label=arm if i == 0 else None,
                    linestyle="-" if i == 0 else "--")  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (membranes)")
    ax.set_title("ISBI 2012 EM at 256²: from zoo:la-resunet vs from scratch (seeds: solid, dashed)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The scaling study behind docs/scaling-guideline.md: test-split Dice (and mIoU) against the number
of workers K for four lr policies, on real left-atrium MRI slices, in the manner of the thesis'
Fig. 6.4–6.6. Workers are simulated (train.simulate_workers: the exact math of K synchronous
workers in one process), so K up to 18 fits on a laptop.

Policies, each from the one-worker config examples/la_tune.yaml (SGD, base lr η, batch 4 per
worker; the lr scaled linearly to k·η for the global batch 4·K):
  linear     k·η from the first step; step decay × 0.1 at 1/2 and 3/4 of training
  goyal      the same after a 5-epoch gradual warmup from η (linear scaling + gradual warmup)
  grescale   GreScale's defaults (5-epoch gradual warmup, stabilisation, exponential decay)
  tuned      GreScale tuned by `segscale tune` against the one-worker GreScale runs (K ≥ 12, the
             thesis' threshold; below it the guideline keeps the defaults, so tuned = grescale)
Each (policy, K) is trained with every seed; the tuned policy's runs are the tuner's chosen trial
(seed 0) and its validation run (seed 1) when the tuner validated it, else trained here.

    segscale prepare ../shared/data/left_atrium_lge_mri_2018 prepared/la64 --size 64 \\
        --foreground-margin 2 --val 0.15 --test 0.25
    python benchmarks/scale_study.py --store prepared/la64 [--workers 1,4,8,12,16,18]
        [--seeds 2] [--epochs 16] [--max-trials 6] [--out runs/scale_study]

Resumable: finished runs and evaluations are kept; rerun the same command to continue. Writes
OUT/study.json, OUT/study.md and OUT/study.png, and prints each policy's Dice as a ratio to its
one-worker Dice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "la_tune.yaml"
POLICIES = ("linear", "goyal", "grescale", "tuned")
METRICS = ("dice", "mean_iou")


def segscale(*args: object) -> None:
    cmd = [sys.executable, "-m", "segscale.cli", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")


def policy_overrides(policy: str, epochs: int) -> list[str]:
    steps = [round(epochs / 2), round(3 * epochs / 4)]  # after the 5-epoch warmup for 16 epochs
    goyal = ["train.schedule.rule=standard", "train.schedule.decay=step"]
    goyal.append(f"train.schedule.decay_epochs={steps}")
    if policy == "linear":
        return goyal
    if policy == "goyal":
        return [*goyal, "train.schedule.warmup_epochs=5"]
    return []  # grescale: the config's own rule


def train_and_test(run_dir: Path, overrides: list[str], workers: int) -> dict[str, float]:
    """Train (unless finished) and score the test split once; its dataset-level metrics."""
    if not (run_dir / "model.pt").is_file():
        resume = ["--resume"] if (run_dir / "checkpoints").is_dir() else []
        simulate = ["--simulate-workers", workers] if workers > 1 else []
        segscale("train", CONFIG, *overrides, "--run-dir", run_dir, *simulate, *resume)
    return test_scores(run_dir)


def test_scores(run_dir: Path) -> dict[str, float]:
    out = run_dir / "evaluation-test.json"
    if not out.is_file():
        segscale("evaluate", run_dir, "--split", "test", "--json", out)
    dataset = json.loads(out.read_text())["dataset"]
    return {m: dataset[m] for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--workers", default="1,4,8,12,16,18")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/scale_study"))
    args = parser.parse_args()
    ks = [int(k) for k in args.workers.split(",")]
    out = args.out.resolve()
    runs = out / "runs"
    common = [f"data.store={args.store.resolve()}", f"train.epochs={args.epochs}", "tracker=none"]
    results: dict[str, dict[int, list[dict[str, float]]]] = {p: {} for p in POLICIES}
    started = time.monotonic()

    for k in ks:
        for policy in POLICIES[:3]:
            for seed in range(args.seeds):
                run = runs / f"{policy}-k{k}-s{seed}"
                overrides = [*common, f"seed={seed}", *policy_overrides(policy, args.epochs)]
                results[policy].setdefault(k, []).append(train_and_test(run, overrides, k))
                print(f"{run.name}: test Dice {results[policy][k][-1]['dice']:.4f}", flush=True)
        if k < 12:  # the guideline keeps GreScale's defaults below 12 workers
            results["tuned"][k] = results["grescale"][k]
            continue
        tune_dir = out / f"tune-k{k}"
        baselines = [f"--baseline={runs / f'grescale-k1-s{s}'}" for s in range(args.seeds)]
        if not (tune_dir / "tuned.yaml").is_file():
            segscale(
                "tune", CONFIG, *common, "--workers", k, "--simulate", *baselines,
                "--max-trials", args.max_trials, "--out", tune_dir,
            )  # fmt: skip
        state = json.loads((tune_dir / "tune.json").read_text())
        settings = state["decision"]["settings"]
        tuned = []
        for seed in range(args.seeds):
            done = [
                t
                for t in state["trials"]
                if t["settings"] == settings and t["seed"] == seed and t["status"] != "refused"
            ]
            if done and Path(done[0]["run_dir"], "model.pt").is_file():
                tuned.append(test_scores(Path(done[0]["run_dir"])))
            else:
                tuned_cfg = yaml.safe_load((tune_dir / "tuned.yaml").read_text())
                items = [
                    f"train.optimizer.lr={tuned_cfg['train']['optimizer']['lr']}",
                    f"train.optimizer.name={tuned_cfg['train']['optimizer']['name']}",
                    *(f"train.schedule.{key}={value}" for key, value in tuned_cfg["train"]["schedule"].items()
                      if key in ("warmup_epochs", "decay_phase", "decay_coefficient")),
                ]  # fmt: skip
                run = runs / f"tuned-k{k}-s{seed}"
                tuned.append(train_and_test(run, [*common, f"seed={seed}", *items], k))
        results["tuned"][k] = tuned

    write_outputs(out, results, ks, args, time.monotonic() - started)


def summary(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with 2 seeds, the half-range is the distance to either run."""
    mean = sum(values) / len(values)
    return mean, (max(values) - min(values)) / 2


def write_outputs(
    out: Path, results: dict, ks: list[int], args: argparse.Namespace, seconds: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {
        p: {k: {m: summary([r[m] for r in results[p][k]]) for m in METRICS} for k in ks}
        for p in POLICIES
    }
    (out / "study.json").write_text(
        json.dumps(
            {
                "results": results,
                "args": vars(args) | {"store": str(args.store), "out": str(args.out)},
            },
            indent=1,
            default=str,
        )
    )
    lines = [
        f"Test-split Dice (mean ± half-range over {args.seeds} seeds), {args.epochs} epochs, "
        f"simulated workers; ratio to the policy's one-worker Dice in brackets.",
        "",
        "| policy | " + " | ".join(f"K = {k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for p in POLICIES:
        one = table[p][ks[0]]["dice"][0]
        cells = [
            f"{table[p][k]['dice'][0]:.4f} ± {table[p][k]['dice'][1]:.4f} ({table[p][k]['dice'][0] / one:.3f})"
            for k in ks
        ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
        print(f"{p:9s} " + "  ".join(f"K={k}: {table[p][k]['dice'][0] / one:.3f}" for k in ks))
    lines += ["", f"Wall time: {seconds / 60:.0f} min on this machine.", ""]
    (out / "study.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, len(METRICS), figsize=(10, 3.8))
    for ax, m in zip(axes, METRICS):
        for p in POLICIES:
            means = [table[p][k][m][0] for k in ks]
            spreads = [table[p][k][m][1] for k in ks]
            ax.errorbar(ks, means, yerr=spreads, marker="o", capsize=3, label=p)
        ax.set(
            xlabel="workers K (global batch 4·K)",
            ylabel=m.replace("_", " "),
            title=f"test {m.replace('_', ' ')}",
        )
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    print(f"wrote {out / 'study.md'}, study.png ({seconds / 60:.0f} min)")


if __name__ == "__main__":
    main()

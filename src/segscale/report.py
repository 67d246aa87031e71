"""Run reports: a Markdown page with the metrics, training curves and segmentation overlays."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

METRIC_NAMES = {
    "dice": "Dice (foreground)",
    "dice_with_background": "Dice (all classes, thesis)",
    "pixel_accuracy": "Pixel accuracy (PA)",
    "mean_accuracy": "Mean accuracy (MA)",
    "mean_iou": "Mean IoU",
    "fw_iou": "Frequency-weighted IoU",
    "sensitivity": "Sensitivity (TPR)",
    "specificity": "Specificity (TNR)",
}


def metrics_table(evaluation: dict[str, Any]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {METRIC_NAMES.get(k, k)} | {v:.4f} |" for k, v in evaluation["dataset"].items()]
    pc = evaluation["per_case_dice"]
    lines.append(
        f"| per-case 3D Dice, mean ± SD (n={pc['n']}) | {pc['mean']:.4f} ± {pc['sd']:.4f} |"
    )
    return "\n".join(lines)


def print_metrics(evaluation: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation on '{evaluation['split']}' ({len(evaluation['cases'])} cases)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in evaluation["dataset"].items():
        table.add_row(METRIC_NAMES.get(k, k), f"{v:.4f}")
    pc = evaluation["per_case_dice"]
    table.add_row("per-case 3D Dice (mean ± SD)", f"{pc['mean']:.4f} ± {pc['sd']:.4f}")
    cases = Table(title="per case")
    cases.add_column("case")
    cases.add_column("Dice", justify="right")
    for c in evaluation["cases"]:
        cases.add_row(c["case"], f"{c['dice']:.4f}")
    console = Console()
    console.print(table)
    console.print(cases)


def plot_curves(run_dir: Path, out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss", title="training loss")
    val = [r for r in rows if "val_dice" in r]
    ax[1].plot(
        [r["epoch"] for r in val], [r["val_dice"] for r in val], marker="o", color="tab:green"
    )
    ax[1].set(xlabel="epoch", ylabel="Dice", title="validation Dice", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


@torch.no_grad()
def plot_overlays(run_dir: Path, evaluation: dict[str, Any], out: Path, max_cases: int = 3) -> None:
    """Image / ground truth / prediction for the best, median and worst test cases, each on the
    slice with the most ground-truth foreground."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segscale.engine import load_trained_model

    model, plan = load_trained_model(run_dir)
    store = plan.store
    ranked = sorted(evaluation["cases"], key=lambda c: c["dice"], reverse=True)
    picks = [ranked[0], ranked[len(ranked) // 2], ranked[-1]][: min(max_cases, len(ranked))]
    by_id = {c["id"]: c for c in store.cases()}
    fig, axes = plt.subplots(len(picks), 3, figsize=(9, 3 * len(picks)), squeeze=False)
    for row, case in zip(axes, picks):
        meta = by_id[case["case"]]
        masks = np.asarray(store.masks[meta["start"] : meta["start"] + meta["count"]])
        k = meta["start"] + int(np.argmax((masks > 0).sum((1, 2))))
        image = np.array(store.images[k])  # a writable copy of the memmap row
        pred = model(torch.from_numpy(image)[None]).argmax(1)[0].numpy()
        gt = np.asarray(store.masks[k])
        for ax, (title, mask) in zip(
            row, [("image", None), ("ground truth", gt), ("prediction", pred)]
        ):
            ax.imshow(image[0].T, cmap="gray", origin="lower")
            if mask is not None:
                ax.imshow(
                    np.ma.masked_equal(mask.T, 0),
                    cmap="autumn",
                    alpha=0.5,
                    origin="lower",
                    vmin=0,
                    vmax=max(1, plan.num_classes - 1),
                )
            ax.set_title(
                f"{case['case']}: {title}"
                + (f" (Dice {case['dice']:.3f})" if title == "prediction" else ""),
                fontsize=9,
            )
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, run_dir: Path, evaluation: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    has_curves = plot_curves(run_dir, out_dir / "curves.png")
    plot_overlays(run_dir, evaluation, out_dir / "overlays.png")
    env_path = run_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    config = (run_dir / "config.yaml").read_text()
    parts = [
        f"# segscale report: {run_dir.name}",
        "",
        f"Evaluated on the **{evaluation['split']}** split ({len(evaluation['cases'])} held-out cases), "
        f"{evaluation['workers']} worker(s). Dataset-level metrics come from the confusion matrix summed "
        "over all test pixels; per-case Dice is 3D, over each case's slices stacked back into its volume.",
        "",
        metrics_table(evaluation),
        "",
        "## Per case",
        "",
        "| case | Dice | sensitivity | specificity |",
        "|---|---|---|---|",
        *[
            f"| {c['case']} | {c['dice']:.4f} | {c['sensitivity']:.4f} | {c['specificity']:.4f} |"
            for c in evaluation["cases"]
        ],
        "",
        "## Segmentations (best, median and worst case)",
        "",
        "![overlays](overlays.png)",
        "",
    ]
    if has_curves:
        parts += ["## Training", "", "![curves](curves.png)", ""]
    if env:
        parts += [
            "## Environment",
            "",
            "| | |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in env.items()],
            "",
        ]
    parts += ["## Configuration", "", "```yaml", config.rstrip(), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path

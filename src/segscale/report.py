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


CASE_ROWS = {
    "dice": "Dice",
    "hd95": "HD95",
    "assd": "ASSD",
    "avd": "AVD (average Hausdorff)",
    "hausdorff": "Hausdorff",
}


def _pm(stats: dict[str, Any]) -> str:
    excluded = f" ({stats['excluded']} undefined)" if stats["excluded"] else ""
    return f"{stats['mean']:.4f} ± {stats['sd']:.4f}{excluded}"


def summary_rows(evaluation: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows: dataset-level metrics, then per-case and per-slice means ± SD."""
    rows = [
        (f"{METRIC_NAMES.get(k, k)} [dataset]", f"{v:.4f}")
        for k, v in evaluation["dataset"].items()
    ]
    n = evaluation["case_summary"]["dice"]["n"] + evaluation["case_summary"]["dice"]["excluded"]
    rows += [
        (f"{name} [per case, n={n}]", _pm(evaluation["case_summary"][k]))
        for k, name in CASE_ROWS.items()
    ]
    rows.append(("Dice [per slice]", _pm(evaluation["slice_summary"]["dice"])))
    return rows


def metrics_table(evaluation: dict[str, Any]) -> str:
    lines = ["| metric [level] | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary_rows(evaluation)]
    return "\n".join(lines)


def print_metrics(evaluation: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    where = evaluation.get("split", evaluation.get("pred", ""))
    if evaluation.get("task") == "classification":
        table = Table(title=f"classification of '{where}' ({evaluation['slices']} slices)")
        table.add_column("metric [slice level]")
        table.add_column("value", justify="right")
        for name, value in evaluation["dataset"].items():
            table.add_row(name.replace("_", " "), f"{value:.4f}")
        matrix = Table(title="confusion matrix (rows: reference, columns: prediction)")
        names = [evaluation["labels"][k] for k in sorted(evaluation["labels"], key=int)]
        for col in ("", *names):
            matrix.add_column(col, justify="left" if not col else "right")
        for name, row in zip(names, evaluation["confusion_matrix"]["counts"]):
            matrix.add_row(name, *map(str, row))
        Console().print(table, matrix)
        return
    table = Table(title=f"evaluation of '{where}' ({len(evaluation['cases'])} cases)")
    table.add_column("metric [level]")
    table.add_column("value", justify="right")
    for name, value in summary_rows(evaluation):
        table.add_row(escape(name), value)  # "[per case, n=4]" is text, not a rich style
    cases = Table(title="per case (foreground mean; distances in mm or pixels)")
    for col in ("case", "Dice", "HD95", "ASSD"):
        cases.add_column(col, justify="left" if col == "case" else "right")
    for c in evaluation["cases"]:
        cases.add_row(c["case"], f"{c['dice']:.4f}", f"{c['hd95']:.2f}", f"{c['assd']:.2f}")
    console = Console()
    console.print(table)
    console.print(cases)


def plot_case_dice(evaluation: dict[str, Any], out: Path) -> None:
    """Per-case Dice, sorted, with the mean: where people would rather look than read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted(evaluation["cases"], key=lambda c: c["dice"])
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(cases) + 2), 3.2))
    ax.bar(range(len(cases)), [c["dice"] for c in cases], color="tab:blue")
    ax.axhline(evaluation["case_summary"]["dice"]["mean"], color="tab:red", ls="--", label="mean")
    ax.set_xticks(
        range(len(cases)), [c["case"] for c in cases], rotation=60, ha="right", fontsize=7
    )
    ax.set(ylabel="Dice (3D, per case)", ylim=(0, 1), title="per-case Dice")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_confusion(evaluation: dict[str, Any], out: Path) -> None:
    """A classification's confusion matrix as a picture: counts, and each row's share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.array(evaluation["confusion_matrix"]["counts"])
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    names = [evaluation["labels"][k] for k in sorted(evaluation["labels"], key=int)]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 1.6, 1.4 * len(names) + 1.2))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(
                j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", color=color
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    acc = evaluation["dataset"]["accuracy"]
    ax.set(xlabel="prediction", ylabel="reference", title=f"accuracy {acc:.3f}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


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
    plot_case_dice(evaluation, out_dir / "case_dice.png")
    env_path = run_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    config = (run_dir / "config.yaml").read_text()
    parts = [
        f"# segscale report: {run_dir.name}",
        "",
        f"Evaluated on the **{evaluation['split']}** split ({len(evaluation['cases'])} held-out cases), "
        f"{evaluation['workers']} worker(s). Dataset-level metrics come from the confusion matrix summed "
        "over all test pixels; per-case metrics are 3D, over each case's slices stacked back into its "
        "volume, with distances in mm at the prepared resolution (spacing adjusted for the resize); "
        "per-slice Dice is 2D.",
        "",
        metrics_table(evaluation),
        "",
        "## Per case",
        "",
        "| case | Dice | HD95 | ASSD | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
        *[
            f"| {c['case']} | {c['dice']:.4f} | {c['hd95']:.2f} | {c['assd']:.2f} | {c['sensitivity']:.4f} | {c['specificity']:.4f} |"
            for c in evaluation["cases"]
        ],
        "",
        "![per-case Dice](case_dice.png)",
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

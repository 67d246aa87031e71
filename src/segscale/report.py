"""Run reports: a Markdown page with the metrics, training curves and segmentation overlays.
Rendering only: what to show (metrics, example slices with their predictions) comes in."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segscale._files import read_jsonl, save_signed_figure, write_atomic
from segscale.evaluation import Example, plot_examples

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
    """'0.8533 ± 0.0750', with how many values were left out; no SD from fewer than two."""
    excluded = f" ({stats['excluded']} excluded)" if stats["excluded"] else ""
    spread = f" ± {stats['sd']:.4f}" if stats["n"] > 1 else ""
    return f"{stats['mean']:.4f}{spread}{excluded}"


def summary_rows(evaluation: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows: dataset-level metrics, then per-case and per-slice means ± SD."""
    rows = [
        (f"{METRIC_NAMES.get(k, k)} [dataset]", f"{v:.4f}")
        for k, v in evaluation["dataset"].items()
    ]
    n = evaluation["case_summary"]["dice"]["n"] + evaluation["case_summary"]["dice"]["excluded"]
    rows += [
        (f"{name} [per case, {n} cases]", _pm(evaluation["case_summary"][k]))
        for k, name in CASE_ROWS.items()
    ]
    if "foreground_mean" in evaluation:  # the other aggregation order, named
        value = evaluation["foreground_mean"]["label_first"]["dice"]
        rows.append(("Dice [per class over cases, then mean: nnU-Net's]", f"{value:.4f}"))
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
        title = f"classification of '{where}' ({evaluation['slices']} slices)"
        table = Table(title=escape(title))
        table.add_column("metric [slice level]")
        table.add_column("value", justify="right")
        for name, value in evaluation["dataset"].items():
            table.add_row(name.replace("_", " "), f"{value:.4f}")
        matrix = Table(title="confusion matrix (rows: reference, columns: prediction)")
        names = [evaluation["labels"][k] for k in sorted(evaluation["labels"], key=int)]
        for col in ("", *names):
            matrix.add_column(escape(col), justify="left" if not col else "right")
        for name, row in zip(names, evaluation["confusion_matrix"]["counts"]):
            matrix.add_row(escape(name), *map(str, row))
        Console().print(table, matrix)
        absent = [
            n for n, row in zip(names, evaluation["confusion_matrix"]["counts"]) if not sum(row)
        ]
        if absent:  # a split of one class: what a score of it cannot say
            print(
                f"note: no slice of the split is '{absent[0]}'; the scores that need one are "
                "undefined (nan) and the balanced accuracy is the other class's recall",
                file=sys.stderr,
            )
        return
    table = Table(title=escape(f"evaluation of '{where}' ({len(evaluation['cases'])} cases)"))
    table.add_column("metric [level]")
    table.add_column("value", justify="right")
    for name, value in summary_rows(evaluation):
        table.add_row(escape(name), value)  # "[per case, 4 cases]" is text, not a rich style
    # a run is scored in its store (the resized grid), a folder of masks in the files' own
    grid = "the files' own grid" if "pred" in evaluation else "the store's grid, as prepared"
    cases = Table(title=f"per case (foreground mean; in {grid}; distances in mm or pixels)")
    for col in ("case", "Dice", "HD95", "ASSD"):
        cases.add_column(col, justify="left" if col == "case" else "right")
    for c in evaluation["cases"]:
        cases.add_row(escape(c["case"]), f"{c['dice']:.4f}", f"{c['hd95']:.2f}", f"{c['assd']:.2f}")
    console = Console()
    console.print(table)
    console.print(cases)


def plot_case_dice(evaluation: dict[str, Any], out: Path) -> None:
    """Per-case Dice, sorted, with the mean: where people would rather look than read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # cases without an applicable class (Dice NaN) have no bar; they are named last
    cases = sorted(evaluation["cases"], key=lambda c: (np.isnan(c["dice"]), c["dice"]))
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(cases) + 2), 3.2))
    ax.bar(range(len(cases)), [c["dice"] for c in cases], color="tab:blue")
    ax.axhline(evaluation["case_summary"]["dice"]["mean"], color="tab:red", ls="--", label="mean")
    ax.set_xticks(
        range(len(cases)), [c["case"] for c in cases], rotation=60, ha="right", fontsize=7
    )
    ax.set(ylabel="Dice (3D, per case)", ylim=(0, 1), title="per-case Dice")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on one
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


def curve_points(rows: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) series of a run's metrics.jsonl rows: training loss and the task's
    validation metric (`dice`, `accuracy`, ...), whichever epochs have it."""
    return {
        "train_loss": [(r["epoch"], r["train_loss"]) for r in rows],
        f"val_{metric}": [(r["epoch"], r[f"val_{metric}"]) for r in rows if f"val_{metric}" in r],
    }


def plot_curves(run_dir: Path, out: Path, metric: str = "dice") -> bool:
    """Training loss and validation `metric` per epoch from run_dir/metrics.jsonl; False when
    the run has no metrics yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    rows = read_jsonl(path)
    points = curve_points(rows, metric)
    name = METRIC_NAMES.get(metric, metric.replace("_", " "))
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for axis, (key, title, color) in zip(
        ax,
        [
            ("train_loss", "training loss", None),
            (f"val_{metric}", f"validation {name}", "tab:green"),
        ],
    ):
        epochs, values = zip(*points[key]) if points[key] else ((), ())
        axis.plot(epochs, values, marker="o", color=color)
        axis.set(xlabel="epoch", ylabel=title.split(" ", 1)[1], title=title)
    ax[1].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_report(
    out_dir: Path,
    run_dir: Path,
    evaluation: dict[str, Any],
    examples: list[Example],
    num_classes: int,
    metric: str = "dice",
) -> Path:
    """report.md in out_dir with its pictures, for a segmentation run's evaluation; `examples`
    from segscale.evaluation.pick_examples, `metric` the task's validation metric."""
    out_dir.mkdir(parents=True, exist_ok=True)
    has_curves = plot_curves(run_dir, out_dir / "curves.png", metric)
    plot_examples(examples, out_dir / "overlays.png", num_classes)
    plot_case_dice(evaluation, out_dir / "case_dice.png")
    env_path = run_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    config = (run_dir / "config.yaml").read_text()
    parts = [
        f"# segscale report: {yaml.safe_load(config).get('name', run_dir.name)}",
        "",
        f"Evaluated on the **{evaluation['split']}** split ({len(evaluation['cases'])} cases), "
        f"{evaluation['workers']} worker(s). Dataset-level metrics come from the confusion matrix summed "
        "over all the split's pixels; per-case metrics are 3D, over each case's slices stacked back into its "
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
    write_atomic(path, "\n".join(parts))
    return path


# ---------------------------------------------------------------- `segscale tune`

TUNE_COLUMNS = (  # the thesis' Tables 6.1–6.10
    ("dice", "Dice"),
    ("pixel_accuracy", "PA"),
    ("mean_accuracy", "MA"),
    ("mean_iou", "mIoU"),
    ("fw_iou", "fwIoU"),
)


def _percent(value: Any) -> str:
    return "–" if not isinstance(value, int | float) or value != value else f"{100 * value:.2f}"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def tuning_table(state: dict[str, Any], name: str, workers: int, simulated: bool) -> str:
    """tune.md: the baseline runs and every trial in the shape of the thesis' Tables 6.1–6.10
    (validation metrics in %), the decision, the test-split comparison, the compute early
    stopping saved. `state`: OUT/tune.json as segscale.tune writes it."""
    base = state["baselines"]
    dice = [b["scores"]["dice"] for b in base]
    mean = sum(dice) / len(dice)
    how = "simulated in one process (train.simulate_workers)" if simulated else "real workers"
    head = "| Iteration | Action | Changed | " + " | ".join(c for _, c in TUNE_COLUMNS)
    lines = [
        f"# Tuning `{name}` for {workers} workers",
        "",
        f"Workers: {workers}, {how}. Every decision uses the validation split; the test split is "
        "scored once, at the end. Metrics in %.",
        "",
        f"Baseline: one worker, {len(base)} run(s); validation Dice {100 * mean:.2f} "
        f"(spread {100 * (max(dice) - min(dice)):.2f} points, the noise the guideline allows).",
        "",
        "## Validation",
        "",
        head + " | Wall time | Finished early |",
        "|" + "---|" * (len(TUNE_COLUMNS) + 5),
    ]
    for i, b in enumerate(base, 1):
        cells = " | ".join(_percent(b["scores"].get(k)) for k, _ in TUNE_COLUMNS)
        lines.append(
            f"| baseline {i} | one worker | seed {b['seed']} | {cells} | "
            f"{_minutes(b['seconds']) if b['seconds'] else 'given'} | no |"
        )
    saved_epochs, saved_seconds = 0, 0.0
    for t in state["trials"]:
        if t["status"] == "refused":
            cells = " | ".join("–" for _ in TUNE_COLUMNS)
            lines.append(
                f"| {t['index']} | {t['action']} | {t['change']} | {cells} | – | not trained: "
                f"{t['reason']} |"
            )
            continue
        cells = " | ".join(_percent(t["scores"].get(k)) for k, _ in TUNE_COLUMNS)
        early = "diverged" if t["status"] == "diverged" else "no"
        if t["status"] == "finished_early":
            early = f"at epoch {t['epochs']}"
            total = _run_epochs(t)
            if total and t["epochs"]:
                saved_epochs += total - t["epochs"]
                saved_seconds += t["seconds"] / t["epochs"] * (total - t["epochs"])
        lines.append(
            f"| {t['index']} | {t['action']} | {t['change']} | {cells} | "
            f"{_minutes(t['seconds'])} | {early} |"
        )
    decision = state["decision"]
    lines += ["", f"**{decision['action']}**: {decision['reason']}."]
    if decision["trial"] is not None:
        lines.append(f"Chosen: trial {decision['trial']}; its settings are in `tuned.yaml`.")
    elif decision["settings"] is not None:
        lines.append("Its settings are in `tuned.yaml`.")
    if saved_epochs:
        lines.append(
            f"Early stopping saved {saved_epochs} epochs of training (about "
            f"{_minutes(saved_seconds)} at those trials' own pace)."
        )
    lines += [
        f"Training and evaluation, in all: {_minutes(state['seconds'])}.",
        "",
        "## Test split (scored once, at the end)",
        "",
        "| Run | " + " | ".join(c for _, c in TUNE_COLUMNS) + " |",
        "|" + "---|" * (len(TUNE_COLUMNS) + 1),
    ]
    for i, b in enumerate(base, 1):
        if b.get("test"):
            cells = " | ".join(_percent(b["test"].get(k)) for k, _ in TUNE_COLUMNS)
            lines.append(f"| baseline {i} (one worker) | {cells} |")
    for t in state["trials"]:
        chosen = t["index"] == decision["trial"]
        validation = t["action"] == "validate" and t["settings"] == decision["settings"]
        if t.get("test") and (chosen or validation):  # not an earlier decision's
            cells = " | ".join(_percent(t["test"].get(k)) for k, _ in TUNE_COLUMNS)
            what = "its validation run" if validation else "chosen"
            lines.append(f"| trial {t['index']} ({workers} workers, {what}) | {cells} |")
    lines += [
        "",
        "![learning rate and validation Dice of every trial](tune.png)",
        "",
        f"Train with it: `segscale train tuned.yaml --workers {workers}`"
        if state["decision"].get("settings")
        else "No tuned.yaml: the tuning ended without settings that train this config.",
        "",
    ]
    return "\n".join(lines)


def _run_epochs(entry: dict[str, Any]) -> int | None:
    """The epochs a run was configured for (its config.yaml), or None when unreadable."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(entry["run_dir"]) / "config.yaml").read_text())
        return int(cfg["train"]["epochs"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def plot_tuning(state: dict[str, Any], schedules: dict[int, Any], out: Path, mark: str) -> None:
    """tune.png: each trial's lr curve (left) and validation Dice per epoch (right), the
    baseline's runs in grey. `schedules`: trial index → its Schedule (for K workers); `mark`:
    signed into its metadata (tune's, so that a rerun keeps a picture edited since)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lr_ax, dice_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for b in state["baselines"]:
        epochs = sorted(b["curve"], key=int)
        dice_ax.plot([int(e) for e in epochs], [b["curve"][e] for e in epochs], color="0.6", lw=2)
    dice_ax.plot([], [], color="0.6", lw=2, label="baseline (1 worker)")
    for t in state["trials"]:
        if t["index"] not in schedules:
            continue
        s = schedules[t["index"]]
        steps = range(0, s.total_steps, max(1, s.total_steps // 400))
        label = f"{t['index']}: {t['action']}"
        (line,) = lr_ax.plot([x / s.steps_per_epoch for x in steps], [s(x) for x in steps], lw=1)
        epochs = sorted(t["curve"], key=int)
        style = "--" if t["status"] == "finished_early" else "-"
        dice_ax.plot(
            [int(e) for e in epochs],
            [t["curve"][e] for e in epochs],
            style,
            color=line.get_color(),
            marker=".",
            label=label,
        )
    lr_ax.set(xlabel="epoch", ylabel="learning rate", title="lr per trial (K workers)")
    dice_ax.set(xlabel="epoch", ylabel="Dice", title="validation Dice (dashed: finished early)")
    dice_ax.legend(fontsize=7, loc="lower right")
    for ax in (lr_ax, dice_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_signed_figure(fig, out, mark)
    plt.close(fig)

"""`segscale repeat`: the same config trained N times with one source of randomness varied, each
run scored on the same test split, and the spread reported (the thesis' Fig. 5.5: "run each
setting several times and report the spread").

    --vary seed    everything random differs (seed = seed, seed+1, ...)
    --vary init    only the weight initialisation (init_seed); data order and augmentation fixed
    --vary order   only the data order, augmentation and dropout (data_seed); the init fixed
    --vary split   only which training cases validate (data.split_seed); the test split fixed
    --vary fold    k-fold cross-validation, k = --runs: run i validates on fold i (data.folds,
                   data.fold), so each training case is scored once, by the run that did not
                   train on it (nnU-Net's 5-fold cross-validation); the test split fixed

Each run is a normal run folder OUT/run-N (resumable as any run; with the MLflow tracker a child of
one repeat run). The report, OUT/variability.{md,json,png}: per metric the mean, SD, 95% CI of
the mean, min and max over runs; per case the spread of Dice over runs; the agreement between runs
on per-case Dice, ICC(A,1) with its 95% CI, and the two-way ANOVA's F test of a systematic
difference between runs (segscale.stats). The state lives in OUT/repeat.json, so a rerun of the
same command continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segscale._files import (
    EVALUATION,
    REPEAT_STATE,
    job_state,
    keep_edited,
    read_record,
    save_signed_figure,
    signed,
    to_json,
    write_atomic,
)
from segscale.config import RunConfig, apply_override, load_config, validate
from segscale.engine import (
    check_same_store,
    has_started,
    plan,
    prepare_run_dir,
    require_segmentation,
)
from segscale.errors import PREEMPTED_EXIT_CODE, Preempted, SegscaleError, check_seeds
from segscale.imgmed.store import Store
from segscale.launch import launch, start_worker_server
from segscale.stats import agreement, spread
from segscale.tracking import ParentRun, nest_under

STATE = REPEAT_STATE
# --vary → the config key it sets
VARY = {
    "seed": "seed",
    "init": "init_seed",
    "order": "data_seed",
    "split": "data.split_seed",
    "fold": "data.fold",
}
# dataset-level metrics, then per-case means (distances: a case mean is the usual report)
DATASET_METRICS = ("dice", "mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou")
CASE_METRICS = ("hd95", "assd")
OUTPUTS = ("variability.md", "variability.json", "variability.png", STATE)
MARK = "written by segscale repeat"  # signed into variability.md and .png (_files)


@dataclass(frozen=True)
class RepeatOptions:
    runs: int = 5
    vary: str = "seed"
    workers: int = 1

    def signature(self) -> dict[str, Any]:
        return {"runs": self.runs, "vary": self.vary, "workers": self.workers}


def repeat(
    config: Path,
    overrides: list[str] | None,
    options: RepeatOptions,
    out: Path,
    progress: bool = True,
    force: bool = False,
    loaded: RunConfig | None = None,
) -> dict[str, Any]:
    """Train and test `options.runs` runs; returns the variability report (as variability.json).
    `loaded`: the config as `load_config(config, overrides)` returns it, when the caller has
    read it already. A variability.md edited since an earlier run wrote it is refused unless
    `force`. Raises SegscaleError for bad input, Preempted when a run was stopped (rerun to
    continue)."""
    if options.vary not in VARY:
        raise SegscaleError(f"--vary {options.vary}: expected one of {', '.join(VARY)}")
    if options.runs < 2:
        raise SegscaleError(f"--runs {options.runs}: a spread needs at least 2 runs")
    cfg = load_config(config, overrides) if loaded is None else loaded
    require_segmentation(cfg, config, "repeat")
    pinned = [k for k in ("init_seed", "data_seed") if getattr(cfg, k) is not None]
    if options.vary == "seed" and pinned:  # they would not follow the seed: not every seed varied
        raise SegscaleError(
            f"--vary seed: {' and '.join(pinned)} set in the config stay as they are; unset them, "
            f"or vary one part ({', '.join(v for v in VARY if v != 'seed')})"
        )
    if options.vary in ("split", "fold") and cfg.data.val_split is None:  # run 2 on: refused
        raise SegscaleError(
            f"--vary {options.vary} draws which training cases validate: it needs data.val_split "
            "(it is null)"
        )
    if options.vary == "fold" and cfg.data.folds not in (None, options.runs):
        raise SegscaleError(
            f"--vary fold trains one run per fold, --runs {options.runs} of them; the config sets "
            f"data.folds {cfg.data.folds}: give --runs {cfg.data.folds}, or leave folds out"
        )
    # the varied value of run i is base + i (a seed, or the fold's index): checked before any run
    base = {
        "seed": cfg.seed,
        "init": cfg.seed_for("init"),
        "order": cfg.seed_for("data"),
        "split": cfg.data.split_seed or 0,
        "fold": 0,
    }[options.vary]
    check_seeds(base, options.runs, f"--runs {options.runs} --vary {options.vary}")
    # with --vary fold the runs' own data.folds: a fold without a case is refused here, not at run k
    folds = {"folds": options.runs} if options.vary == "fold" else {}
    plan(cfg.model_copy(update={"data": cfg.data.model_copy(update=folds)})).check(options.workers)
    if options.workers > 1:
        start_worker_server()
    out = out.resolve()
    keep_edited(out, STATE, OUTPUTS, ("variability.md", "variability.png"), MARK, force)
    signature = {"config": cfg.digest(), **options.signature()}
    state = job_state(out / STATE, signature, {"runs": {}}, "repeat")
    parent = ParentRun(
        cfg.tracker_config("mlflow"),
        out,
        f"{cfg.name}-repeat",
        {"segscale.repeat": str(out), "segscale.repeat.vary": options.vary},
        state.get("mlflow_run_id"),
    )
    key = VARY[options.vary]
    split = state["split"] = cfg.data.test_split
    if options.vary == "fold":
        state["val_split"] = cfg.data.val_split
    store = Store.open(cfg.data.store)
    try:
        for i in range(options.runs):
            # relative to OUT: a moved or copied repeat folder still finds its runs
            entry = state["runs"].setdefault(str(i + 1), {"run_dir": f"run-{i + 1}"})
            run_dir = out / entry["run_dir"]
            if "test" in entry:  # scored: still on the data it was scored on
                check_same_store(run_dir, store)
                continue
            raw = cfg.model_dump(mode="json")
            # run 1 is the config's own run: with no data.split_seed, the store's own split
            value = (
                None
                if key == "data.split_seed" and cfg.data.split_seed is None and not i
                else base + i
            )
            apply_override(raw, f"{key}={'null' if value is None else value}")
            if options.vary == "fold":
                apply_override(raw, f"data.folds={options.runs}")
            raw["name"] = f"{cfg.name}-run-{i + 1}"
            entry[key] = value
            if parent_id := parent.run_id():
                state["mlflow_run_id"] = parent_id
                nest_under(raw, parent_id)
            run_cfg = validate(raw, source=f"{out.name}/run-{i + 1}")
            if progress:
                shown = "the store's split" if value is None else f"{key} {value}"
                shown += f" of {options.runs}" if options.vary == "fold" else ""
                print(f"[repeat] run {i + 1}/{options.runs}: {shown}", flush=True)
            t0 = time.monotonic()
            started = has_started(run_dir)
            # a finished run-N too: it must be this config's run, trained on this store's data
            prepare_run_dir(run_cfg, run_dir, resume=started)
            if not (run_dir / "model.pt").is_file():
                args = ["train", str(run_dir), *(["--resume"] if started else [])]
                code = launch([*args, *([] if progress else ["--no-progress"])], options.workers)
                if code != 0:
                    _save(out, state)
                    if code == PREEMPTED_EXIT_CODE or code > 128:
                        raise Preempted(
                            f"stopped during run-{i + 1}; rerun the same command to continue"
                        )
                    raise SegscaleError(f"run-{i + 1} failed (exit code {code}); see above")
            evaluation = _evaluate(run_dir, split, options.workers, i)
            if options.vary == "fold":  # its own fold, which it did not train on
                held_out = _evaluate(run_dir, cfg.data.val_split, options.workers, i)
                entry["held_out"] = {c["case"]: c["dice"] for c in held_out["cases"]}
            entry["seconds"] = entry.get("seconds", 0.0) + time.monotonic() - t0
            entry["test"] = {m: evaluation["dataset"].get(m) for m in DATASET_METRICS} | {
                m: evaluation["case_summary"][m]["mean"] for m in CASE_METRICS
            }
            entry["cases"] = {c["case"]: c["dice"] for c in evaluation["cases"]}
            parent.log_metrics({f"test_{m}": v for m, v in entry["test"].items()}, i + 1)
            _save(out, state)
        report = variability(state, cfg.name, options, split)
        write_atomic(out / "variability.json", to_json(report, indent=1))
        text = f"<!-- {MARK} -->\n{variability_markdown(report)}"
        write_atomic(out / "variability.md", signed(text, MARK))  # edited: kept on a rerun
        plot_variability(report, out / "variability.png")
        parent.finish(OUTPUTS, "FINISHED")
    except Preempted:
        parent.finish((), "KILLED")
        raise
    if progress:
        print(f"[repeat] wrote {out / 'variability.md'}, variability.json, variability.png")
    return report


@dataclass(frozen=True)
class RepeatRecord:
    """A `segscale repeat` folder as read back from its OUT/repeat.json: `runs` are the state's
    run entries in run order, `planned` the --runs it was started with."""

    folder: Path
    state: dict[str, Any]
    runs: list[dict[str, Any]]
    planned: int

    @property
    def tested(self) -> list[dict[str, Any]]:
        """The runs scored on the test split (each with its 'test' metrics and per-case Dice)."""
        return [r for r in self.runs if "test" in r]

    def run_dir(self, entry: dict[str, Any]) -> Path:
        """A run's folder where the repeat folder is now (a moved repeat still finds its runs)."""
        return self.folder / Path(entry["run_dir"]).name

    def require_finished(self) -> None:
        """Raises SegscaleError unless every planned run was tested and the report written."""
        tested = len(self.tested)
        if tested < self.planned or not (self.folder / "variability.json").is_file():
            done = f"{tested} of {self.planned} runs tested" + (
                ", no variability.json" if tested >= self.planned else ""
            )
            raise SegscaleError(
                f"{self.folder}: an unfinished repeat ({done}); rerun its `segscale repeat` "
                "command to finish it"
            )


def read_repeat(folder: Path) -> RepeatRecord:
    """The repeat state of `folder` (a `segscale repeat` OUT folder). Raises SegscaleError when
    OUT/repeat.json cannot be read or a run's entry is not what repeat writes."""
    folder = folder.resolve()
    state = read_record(folder / STATE, ("runs",), "repeat state")
    entries = state["runs"]
    try:
        runs = [entries[k] for k in sorted(entries, key=int)]
    except (TypeError, ValueError):
        runs = None

    def numbers(scores: Any) -> bool:  # metric → value, as repeat writes them (NaN allowed)
        return isinstance(scores, dict) and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            for v in scores.values()
        )

    if runs is None or any(
        not isinstance(r, dict)
        or not isinstance(r.get("run_dir"), str)
        or ("test" in r and not (numbers(r["test"]) and numbers(r.get("cases"))))
        for r in runs
    ):
        raise SegscaleError(f"{folder / STATE}: unreadable repeat state (a run's entry)")
    signature = state.get("signature")
    planned = signature.get("runs") if isinstance(signature, dict) else None
    return RepeatRecord(folder, state, runs, planned if isinstance(planned, int) else len(runs))


def finished_runs(folder: Path) -> list[Path]:
    """The run folders of a finished `segscale repeat` folder, in run order (found where the
    folder is now). Raises SegscaleError for an unfinished repeat or a damaged state."""
    record = read_repeat(folder)
    record.require_finished()
    runs = [record.run_dir(r) for r in record.tested]
    lost = [r.name for r in runs if not (r / "model.pt").is_file()]
    if lost:
        raise SegscaleError(
            f"{record.folder}: {', '.join(lost)} has no model.pt (moved or deleted?)"
        )
    return runs


def _evaluate(run_dir: Path, split: str, workers: int, i: int) -> dict[str, Any]:
    """Run i's evaluation on one of its store's splits (`segscale evaluate` on `workers`
    workers), as its evaluation-SPLIT.json. Raises SegscaleError when evaluate fails."""
    result = run_dir / f"evaluation-{split}.json"
    code = launch(["evaluate", str(run_dir), "--split", split, "--out", str(result)], workers)
    if code != 0:
        raise SegscaleError(f"evaluating run-{i + 1} on '{split}' failed (exit {code})")
    return read_record(result, EVALUATION, "evaluation", metrics=True)


def _save(out: Path, state: dict[str, Any]) -> None:
    write_atomic(out / STATE, json.dumps(state, indent=1))


def variability(
    state: dict[str, Any], name: str, options: RepeatOptions, split: str
) -> dict[str, Any]:
    """The report's numbers from the runs' test scores: per metric a Spread, per case the spread
    of Dice over runs, and the runs' agreement on per-case Dice (the cases every run scored)."""
    runs = [state["runs"][str(i + 1)] for i in range(options.runs)]

    def defined(m: str) -> bool:
        return all(
            isinstance(r["test"].get(m), int | float) and r["test"][m] == r["test"][m] for r in runs
        )

    every = (*DATASET_METRICS, *CASE_METRICS)
    metrics = {m: spread([r["test"][m] for r in runs]).as_dict() for m in every if defined(m)}
    cases = sorted(set.intersection(*(set(r["cases"]) for r in runs)))
    scored = [c for c in cases if all(r["cases"][c] == r["cases"][c] for r in runs)]  # not NaN
    matrix = np.array([[r["cases"][c] for r in runs] for c in scored])
    per_case = {c: spread(list(row)).as_dict() for c, row in zip(scored, matrix)}
    agree = agreement(matrix).as_dict() if len(scored) >= 2 else None
    return {
        "name": name,
        "runs": options.runs,
        "vary": options.vary,
        "workers": options.workers,
        "split": split,
        "seeds": [r.get(VARY[options.vary]) for r in runs],
        "metrics": metrics,
        "undefined": [m for m in every if m not in metrics],  # NaN in some run: no spread
        "per_run": [r["test"] for r in runs],
        "cases": per_case,
        "cases_left_out": sorted(set().union(*(set(r["cases"]) for r in runs)) - set(scored)),
        "agreement": agree,
        "seconds": sum(r.get("seconds", 0.0) for r in runs),
        **({"cross_validation": cross_validation(runs, state)} if "val_split" in state else {}),
    }


def cross_validation(runs: list[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    """k-fold cross-validation's score: each training case's Dice from the run whose fold held it
    out, pooled over the folds (nnU-Net's cross-validation summary), each fold's mean, and
    which fold (0..k-1) held each case out. A case without a defined Dice (no foreground in
    either mask) is left out and counted."""
    cases = {c: d for r in runs for c, d in r["held_out"].items()}
    defined = {c: d for c, d in cases.items() if d == d}
    folds = [[d for d in r["held_out"].values() if d == d] for r in runs]
    return {
        "split": state["val_split"],
        "dice": spread(list(defined.values())).as_dict() if defined else None,
        "excluded": sorted(set(cases) - set(defined)),
        "per_fold": [float(np.mean(f)) if f else float("nan") for f in folds],
        "cases": cases,
        "fold_of": {c: i for i, r in enumerate(runs) for c in r["held_out"]},
    }


NAMES = {
    "dice": "Dice",
    "mean_iou": "mIoU",
    "pixel_accuracy": "PA",
    "mean_accuracy": "MA",
    "fw_iou": "fwIoU",
    "hd95": "HD95 (mm, case mean)",
    "assd": "ASSD (mm, case mean)",
}


def variability_markdown(report: dict[str, Any]) -> str:
    what = {
        "seed": "every seed",
        "init": "the weight init only",
        "order": "the data order only",
        "split": "the training/validation partition only",
        "fold": "the cross-validation fold",
    }
    lines = [
        f"# `{report['name']}`: {report['runs']} runs, {what[report['vary']]} varied",
        "",
        f"{report['workers']} worker(s) per run; each run scored on the `{report['split']}` split. "
        f"{VARY[report['vary']]}: "
        + ", ".join("the store's own" if v is None else str(v) for v in report["seeds"])
        + ".",
        "",
        "| metric | mean | SD | 95% CI of the mean | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for m, s in report["metrics"].items():
        lines.append(
            f"| {NAMES.get(m, m)} | {s['mean']:.4f} | {s['sd']:.4f} | "
            f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}] | {s['min']:.4f} | {s['max']:.4f} |"
        )
    if report["undefined"]:
        names = ", ".join(NAMES.get(m, m) for m in report["undefined"])
        lines.append(
            f"\nUndefined in some run (e.g. a distance with an empty prediction): {names}."
        )
    a = report["agreement"]
    lines += ["", "## Agreement between runs on per-case Dice", ""]
    if a is None:
        lines.append("Fewer than 2 cases scored by every run: no agreement to compute.")
    elif a["icc"] != a["icc"]:  # NaN: no variance at all to share between cases and runs
        lines.append(
            "Every run gave every case the same Dice: no spread between runs, so ICC(A,1) and "
            "the F test of the runs are undefined."
        )
    else:
        verdict = "differ systematically" if a["p_runs"] < 0.05 else "show no systematic difference"
        lines += [
            f"ICC(A,1) = {a['icc']:.3f}, 95% CI [{a['ci_low']:.3f}, {a['ci_high']:.3f}] "
            f"({a['cases']} cases × {a['runs']} runs). Two-way random effects, absolute "
            "agreement, single run (McGraw & Wong 1996; Shrout & Fleiss' ICC(2,1)): how far one "
            "run's per-case Dice stands for any other run's, a systematic offset between runs "
            "counting as disagreement.",
            "",
            f"Runs: F = {a['f_runs']:.3g}, p = {a['p_runs']:.3g} (two-way ANOVA, runs × cases): "
            f"the runs {verdict} at the 5% level."
            if a["p_runs"] == a["p_runs"]
            else "Runs: every run gave each case the same Dice (no residual variance, no F test).",
        ]
    cv = report.get("cross_validation")
    if cv is not None:
        lines += ["", f"## {report['runs']}-fold cross-validation", ""]
        if cv["dice"] is None:
            lines.append("No held-out case has a defined Dice.")
        else:
            d = cv["dice"]
            lines.append(
                f"Each of the {d['n']} training cases scored by the run that did not train on it "
                f"(its fold of `{cv['split']}`): Dice {d['mean']:.4f} ± {d['sd']:.4f} (SD over "
                f"cases), 95% CI of the mean [{d['ci_low']:.4f}, {d['ci_high']:.4f}]. Per fold: "
                + ", ".join(f"{v:.4f}" for v in cv["per_fold"])
                + "."
            )
        if cv["excluded"]:
            lines.append(f"\nNo defined Dice (left out): {', '.join(cv['excluded'])}.")
    lines += [
        "",
        "## Per case (Dice over runs)",
        "",
        "| case | mean | SD | min | max |",
        "|---|---|---|---|---|",
    ]
    for c, s in report["cases"].items():
        lines.append(f"| {c} | {s['mean']:.4f} | {s['sd']:.4f} | {s['min']:.4f} | {s['max']:.4f} |")
    if report["cases_left_out"]:
        lines.append(
            f"\nLeft out (not scored by every run): {', '.join(report['cases_left_out'])}."
        )
    lines += ["", "![per metric and per case over runs](variability.png)", ""]
    return "\n".join(lines)


def plot_variability(report: dict[str, Any], out: Path) -> None:
    """Left: each overlap metric over runs (box + the runs as points); middle: per-case Dice over
    runs (each case's min-max as a bar, its mean as a point), cases sorted by mean Dice; right,
    for a cross-validation: each held-out case's Dice by fold, each fold's mean as a line and
    the pooled mean dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overlap = [m for m in DATASET_METRICS if m in report["metrics"]]
    cv = report.get("cross_validation")
    if cv is None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=[1, 1.4])
    else:
        fig, (left, right, folds) = plt.subplots(1, 3, figsize=(15, 3.8), width_ratios=[1, 1.4, 1])
    values = [[r[m] for r in report["per_run"]] for m in overlap]
    left.boxplot(values, tick_labels=[NAMES[m] for m in overlap], showfliers=False)
    rng = np.random.default_rng(0)  # jitter only
    for i, v in enumerate(values, 1):
        left.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=14, color="tab:blue", zorder=3)
    left.set(title=f"test metrics over {report['runs']} runs", ylabel="score")
    left.grid(alpha=0.3, axis="y")
    cases = sorted(report["cases"], key=lambda c: report["cases"][c]["mean"])
    if cases:
        means = [report["cases"][c]["mean"] for c in cases]
        # runs of one score: their mean can round a step past min = max, and a bar of -1e-17
        # is refused by matplotlib (the picture was never drawn)
        lows = [max(0.0, report["cases"][c]["mean"] - report["cases"][c]["min"]) for c in cases]
        highs = [max(0.0, report["cases"][c]["max"] - report["cases"][c]["mean"]) for c in cases]
        right.errorbar(range(len(cases)), means, yerr=[lows, highs], fmt="o", capsize=3)
        right.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=7)
    a = report["agreement"]
    title = "per-case Dice (mean, min–max over runs)"
    if a is not None:
        title += f"\nICC(A,1) {a['icc']:.2f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}]"
    right.set(title=title, ylabel="Dice")
    right.grid(alpha=0.3, axis="y")
    if cv is not None:
        k = len(cv["per_fold"])
        for case, dice in cv["cases"].items():
            if dice == dice:  # an undefined Dice has no point to draw
                x = cv["fold_of"][case] + 1 + rng.uniform(-0.12, 0.12)
                folds.scatter(x, dice, s=14, color="tab:blue", zorder=3)
        for i, mean in enumerate(cv["per_fold"], 1):
            folds.hlines(mean, i - 0.3, i + 0.3, color="tab:orange")
        if cv["dice"] is not None:
            folds.axhline(cv["dice"]["mean"], color="grey", linestyle="--", linewidth=1)
            pooled = f"pooled {cv['dice']['mean']:.3f} ± {cv['dice']['sd']:.3f}"
        else:
            pooled = "no defined Dice"
        folds.set_xticks(range(1, k + 1), [str(i) for i in range(k)])
        folds.set(
            title=f"{k}-fold cross-validation: held-out Dice\n{pooled} (dashed)",
            xlabel="fold",
            ylabel="Dice",
        )
        folds.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_signed_figure(fig, out, MARK)  # a rerun keeps a picture edited since
    plt.close(fig)

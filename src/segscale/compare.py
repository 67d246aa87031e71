"""`segscale compare A B`: two models (run folders) or two configurations (`segscale repeat`
folders) side by side on the same test cases, with their spread and a paired test on per-case
Dice, so that "B beats A" is said only when the data say it.

A run folder contributes its evaluation on the split (RUN_DIR/evaluation-SPLIT.json, from
`segscale evaluate`); a repeat folder its runs' scores: per metric the mean and SD over runs, per
case the mean Dice over runs. The paired tests (segscale.stats.paired: the t test and the
Wilcoxon signed-rank test) run on the cases both scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segscale._files import from_json, read_record, to_json, write_atomic
from segscale.errors import SegscaleError
from segscale.stats import paired, spread

METRICS = ("dice", "mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou", "hd95", "assd")
HIGHER_IS_BETTER = {"hd95": False, "assd": False}


def scores_of(path: Path, split: str) -> dict[str, Any]:
    """{'kind', 'runs', 'metrics': {m: [value per run]}, 'cases': {case: Dice (run mean)}} of a
    run folder or a repeat folder. Raises SegscaleError for anything else, or an unevaluated run."""
    path = path.resolve()
    if (path / "repeat.json").exists():
        state = read_record(path / "repeat.json", ("runs",), "repeat state")
        report = path / "variability.json"
        tested = json.loads(report.read_text()).get("split", "test") if report.is_file() else "test"
        if split != tested:
            raise SegscaleError(
                f"{path}: its runs were scored on '{tested}', not '{split}'; "
                f"compare with --split {tested}"
            )
        runs = [
            r for _, r in sorted(state["runs"].items(), key=lambda kv: int(kv[0])) if "test" in r
        ]
        if not runs:
            raise SegscaleError(f"{path}: no run of this repeat has been tested yet; finish it")
        cases = set.intersection(*(set(r["cases"]) for r in runs))
        return {
            "kind": "repeat",
            "runs": len(runs),
            "metrics": {m: [r["test"][m] for r in runs] for m in METRICS if m in runs[0]["test"]},
            "cases": {c: sum(r["cases"][c] for r in runs) / len(runs) for c in sorted(cases)},
        }
    if not (path / "config.yaml").is_file():
        raise SegscaleError(f"{path}: neither a run folder nor a `segscale repeat` folder")
    evaluation = path / f"evaluation-{split}.json"
    if not evaluation.is_file():
        raise SegscaleError(
            f"{path}: not evaluated on '{split}' (no {evaluation.name}); run "
            f"`segscale evaluate {path} --split {split}` first"
        )
    e = from_json(evaluation.read_text())
    metrics = {m: [e["dataset"][m]] for m in METRICS if m in e["dataset"]}
    metrics |= {
        m: [e["case_summary"][m]["mean"]] for m in ("hd95", "assd") if m in e["case_summary"]
    }
    return {
        "kind": "run",
        "runs": 1,
        "metrics": metrics,
        "cases": {c["case"]: c["dice"] for c in e["cases"]},
    }


def compare(a: Path, b: Path, split: str = "test") -> dict[str, Any]:
    """The comparison of B against A: per metric each side's mean (and SD over runs), the paired
    tests on per-case Dice over the cases both scored (NaN Dice left out), and a verdict."""
    sa, sb = scores_of(a, split), scores_of(b, split)
    table = {}
    for m in METRICS:
        if m in sa["metrics"] and m in sb["metrics"]:
            va, vb = sa["metrics"][m], sb["metrics"][m]
            if all(v == v for v in (*va, *vb)):  # no NaN (a distance of an empty mask)
                table[m] = {"a": spread(va).as_dict(), "b": spread(vb).as_dict()}
    common = sorted(
        c
        for c in set(sa["cases"]) & set(sb["cases"])
        if sa["cases"][c] == sa["cases"][c] and sb["cases"][c] == sb["cases"][c]
    )
    test = None
    if len(common) >= 2:
        test = paired([sa["cases"][c] for c in common], [sb["cases"][c] for c in common]).as_dict()
    return {
        "a": str(a),
        "b": str(b),
        "split": split,
        "runs": {"a": sa["runs"], "b": sb["runs"]},
        "metrics": table,
        "cases": {c: {"a": sa["cases"][c], "b": sb["cases"][c]} for c in common},
        "paired": test,
        "verdict": verdict(test),
    }


def verdict(test: dict[str, Any] | None, alpha: float = 0.05) -> str:
    """What the per-case Dice say, at the `alpha` level of both paired tests."""
    if test is None:
        return "fewer than 2 cases scored by both: no test"
    if test["p_t"] < alpha and test["p_wilcoxon"] < alpha:
        side = "B" if test["mean_difference"] > 0 else "A"
        return f"{side} has the higher per-case Dice (both paired tests p < {alpha})"
    small = " (with under 6 cases the Wilcoxon test cannot reach p < 0.05)" if test["n"] < 6 else ""
    return f"no difference shown at the {alpha} level{small}"


def compare_markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [
        f"# {Path(result['b']).name} (B) against {Path(result['a']).name} (A)",
        "",
        f"Split `{result['split']}`; A: {runs['a']} run(s), B: {runs['b']} run(s) "
        "(mean ± SD over runs).",
        "",
        "| metric | A | B | B − A |",
        "|---|---|---|---|",
    ]
    for m, row in result["metrics"].items():
        a, b = row["a"], row["b"]

        def cell(s: dict[str, Any]) -> str:
            return f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if s["n"] > 1 else "")

        lines.append(f"| {m} | {cell(a)} | {cell(b)} | {b['mean'] - a['mean']:+.4f} |")
    t = result["paired"]
    lines += ["", "## Per-case Dice, paired", ""]
    if t is not None:
        lines += [
            f"{t['n']} cases; B − A: mean {t['mean_difference']:+.4f}, 95% CI "
            f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]; paired t test p = {t['p_t']:.3g}; "
            f"Wilcoxon signed-rank p = {t['p_wilcoxon']:.3g}.",
            "",
        ]
    lines += [f"**Verdict**: {result['verdict']}.", "", "| case | A | B |", "|---|---|---|"]
    lines += [f"| {c} | {v['a']:.4f} | {v['b']:.4f} |" for c, v in result["cases"].items()]
    return "\n".join(lines) + "\n"


def write_comparison(result: dict[str, Any], out: Path) -> None:
    """OUT.md and OUT.json."""
    write_atomic(out.with_suffix(".json"), to_json(result, indent=1))
    write_atomic(out.with_suffix(".md"), compare_markdown(result))

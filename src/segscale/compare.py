"""`segscale compare A B`: two models (run folders) or two configurations (`segscale repeat`
folders) side by side on the same test cases, with their spread and a paired test on per-case
Dice, so that "B beats A" is said only when the data say it.

A run folder contributes its evaluation on the split (RUN_DIR/evaluation-SPLIT.json, from
`segscale evaluate`); a repeat folder its runs' scores: per metric the mean and SD over runs, per
case the mean Dice over runs. The paired tests (segscale.stats.paired: the t test and the
Wilcoxon signed-rank test) run on the cases both scored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from segscale._files import EVALUATION, not_a_run, output_file, read_record, to_json, write_atomic
from segscale.config import load_config
from segscale.engine import require_segmentation
from segscale.errors import SegscaleError
from segscale.repeat import STATE, read_repeat
from segscale.stats import paired, spread

METRICS = ("dice", "mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou", "hd95", "assd")
HIGHER_IS_BETTER = {"hd95": False, "assd": False}


def scores_of(path: Path, split: str) -> dict[str, Any]:
    """{'kind', 'runs', 'planned', 'metrics': {m: [value per run]}, 'cases': {case: Dice (run
    mean)}} of a run folder or a repeat folder. Raises SegscaleError for anything else, a run
    of another task, an unevaluated run, or a record that cannot be read."""
    path = path.resolve()
    if (path / STATE).exists():
        repeat = read_repeat(path)
        tested = _repeat_split(path, repeat.state)
        if split != tested:
            raise SegscaleError(
                f"{path}: its runs were scored on '{tested}', not '{split}'; "
                f"compare with --split {tested}"
            )
        runs = repeat.tested
        if not runs:
            raise SegscaleError(f"{path}: no run of this repeat has been tested yet; finish it")
        cases = set.intersection(*(set(r["cases"]) for r in runs))
        return {
            "kind": "repeat",
            "runs": len(runs),
            "planned": repeat.planned,
            "metrics": {m: [r["test"][m] for r in runs] for m in METRICS if m in runs[0]["test"]},
            "cases": {c: sum(r["cases"][c] for r in runs) / len(runs) for c in sorted(cases)},
        }
    if not (path / "config.yaml").is_file():
        raise not_a_run(path, "a `segscale repeat` folder")
    cfg = load_config(path / "config.yaml")
    require_segmentation(cfg, path, "compare")
    evaluation = path / f"evaluation-{split}.json"
    splits = [s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) if s]
    if not evaluation.is_file() and split not in splits:
        raise SegscaleError(f"--split {split}: not a split of {path} ({', '.join(splits)})")
    if not evaluation.is_file() and not (path / "model.pt").is_file():
        raise SegscaleError(f"{path}: not trained yet (no model.pt); train and evaluate it first")
    if not evaluation.is_file():
        raise SegscaleError(
            f"{path}: not evaluated on '{split}' (no {evaluation.name}); run "
            f"`segscale evaluate {path} --split {split}` first"
        )
    e = read_record(evaluation, EVALUATION, "evaluation", metrics=True)
    # a record written into this folder for another run that is still there (a moved run's
    # own record names its old place, which is gone)
    scored = e.get("run")
    if isinstance(scored, str) and Path(scored).resolve() != path and Path(scored).is_dir():
        raise SegscaleError(
            f"{evaluation}: the evaluation of another run ({scored}); run `segscale evaluate "
            f"{path} --split {split}`"
        )
    metrics = {m: [e["dataset"][m]] for m in METRICS if m in e["dataset"]}
    metrics |= {
        m: [e["case_summary"][m]["mean"]] for m in ("hd95", "assd") if m in e["case_summary"]
    }
    return {
        "kind": "run",
        "runs": 1,
        "planned": 1,
        "metrics": metrics,
        "cases": {c["case"]: c["dice"] for c in e["cases"]},
    }


def _repeat_split(path: Path, state: dict[str, Any]) -> str:
    """The split a repeat's runs were scored on: its state's, else its report's, else its
    first run's config's test split."""
    if isinstance(state.get("split"), str):
        return state["split"]
    if (path / "variability.json").is_file():
        return str(read_record(path / "variability.json", ("split",), "repeat report")["split"])
    first = path / "run-1" / "config.yaml"
    return load_config(first).data.test_split if first.is_file() else "test"


def compare(a: Path, b: Path, split: str = "test") -> dict[str, Any]:
    """The comparison of B against A: per metric each side's mean (and SD over runs), the paired
    tests on per-case Dice over the cases both scored (NaN Dice left out), and a verdict."""
    if Path(a).resolve() == Path(b).resolve():  # p = 1 said nothing of the mistake
        raise SegscaleError(f"{Path(a).resolve()}: given as A and as B; compare two models")
    sa, sb = scores_of(a, split), scores_of(b, split)
    only_a, only_b = (
        sorted(set(sa["cases"]) - set(sb["cases"])),
        sorted(set(sb["cases"]) - set(sa["cases"])),
    )
    if only_a or only_b:  # other stores or splits: neither the table nor the test would mean much
        shown = "; ".join(
            f"only in {side}: {', '.join(names[:4])}" + (", ..." if len(names) > 4 else "")
            for side, names in (("A", only_a), ("B", only_b))
            if names
        )
        raise SegscaleError(
            f"A and B were scored on different '{split}' cases "
            f"({len(set(sa['cases']) & set(sb['cases']))} shared; {shown}); compare runs tested "
            "on the same cases (the same store and split)"
        )
    for side, s, path in (("A", sa, a), ("B", sb, b)):
        if s["runs"] < s["planned"]:
            warnings.warn(
                f"{side} ({path}): an unfinished repeat, {s['runs']} of its {s['planned']} runs "
                "tested",
                stacklevel=2,
            )
    table, undefined = {}, []
    for m in METRICS:
        if m in sa["metrics"] and m in sb["metrics"]:
            va, vb = sa["metrics"][m], sb["metrics"][m]
            if all(v == v for v in (*va, *vb)):  # no NaN (a distance of an empty mask)
                table[m] = {"a": spread(va).as_dict(), "b": spread(vb).as_dict()}
            else:
                undefined.append(m)
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
        "planned": {"a": sa["planned"], "b": sb["planned"]},
        "metrics": table,
        "undefined": undefined,  # NaN in some run of A or B: no mean to compare
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
    runs, planned = result["runs"], result.get("planned", result["runs"])

    def count(side: str) -> str:
        if runs[side] < planned[side]:
            return f"{runs[side]} of {planned[side]} runs (an unfinished repeat)"
        return f"{runs[side]} run(s)"

    lines = [
        f"# {Path(result['b']).name} (B) against {Path(result['a']).name} (A)",
        "",
        f"Split `{result['split']}`; A: {count('a')}, B: {count('b')} (mean ± SD over runs). "
        "HD95 and ASSD: mm, lower is better.",
        "",
        "| metric | A | B | B − A |",
        "|---|---|---|---|",
    ]
    for m, row in result["metrics"].items():
        a, b = row["a"], row["b"]

        def cell(s: dict[str, Any]) -> str:
            return f"{s['mean']:.4f}" + (f" ± {s['sd']:.4f}" if s["n"] > 1 else "")

        lines.append(f"| {m} | {cell(a)} | {cell(b)} | {b['mean'] - a['mean']:+.4f} |")
    if result.get("undefined"):
        lines.append(
            f"\nNot compared (undefined in some run, e.g. a distance with an empty prediction): "
            f"{', '.join(result['undefined'])}."
        )
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


def comparison_files(out: Path) -> tuple[Path, Path]:
    """OUT.md and OUT.json, checked before anything is computed: a .md or .json ending of OUT
    is replaced, any other kept (res.v1 → res.v1.md). A file already there must be an earlier
    comparison (never, say, a run's evaluation-test.json). Raises SegscaleError naming --out."""
    out = Path(out).resolve()  # '.' and '..' are folders: refused
    if out.is_dir():
        raise SegscaleError(f"--out {out}: a folder; give a name (OUT.md and OUT.json are written)")
    stem = out.with_suffix("") if out.suffix in (".md", ".json") else out
    md, js = (output_file(stem.with_name(stem.name + ext)) for ext in (".md", ".json"))
    for path, mark in ((md, "**Verdict**"), (js, '"verdict"')):
        try:
            if path.is_file() and mark not in path.read_text(errors="replace"):
                raise SegscaleError(
                    f"--out {path}: exists and is not a comparison; give another name"
                )
        except OSError as e:
            raise SegscaleError(f"--out {path}: cannot be read ({e.strerror})") from None
    return md, js


def write_comparison(result: dict[str, Any], md: Path, js: Path) -> None:
    write_atomic(js, to_json(result, indent=1))
    write_atomic(md, compare_markdown(result))

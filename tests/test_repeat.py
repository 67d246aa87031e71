"""Repeated runs: the variability statistics against pingouin (an independent implementation,
test-only), and `segscale repeat` end to end on real MRI slices."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
import yaml
from PIL import Image
from scipy import stats as sps

from conftest import prepared_sample, tiny_config
from segscale import worker
from segscale._files import to_json
from segscale.config import load_config, validate
from segscale.engine import prepare_run_dir
from segscale.errors import SegscaleError
from segscale.repeat import RepeatOptions, repeat
from segscale.stats import agreement, spread


def pingouin_icc2(matrix: np.ndarray) -> pd.Series:
    cases, runs = matrix.shape
    long = pd.DataFrame(
        {
            "case": np.repeat(np.arange(cases), runs),
            "run": np.tile(np.arange(runs), cases),
            "dice": matrix.ravel(),
        }
    )
    table = pg.intraclass_corr(long, targets="case", raters="run", ratings="dice")
    return table.set_index("Type").loc["ICC(A,1)"]  # pingouin ≥ 0.7 names it so


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(6, 3), (12, 5), (4, 2)])
def test_icc_and_its_ci_match_pingouin(seed, shape):
    rng = np.random.default_rng(seed)
    cases, runs = shape
    truth = rng.uniform(0.6, 0.95, size=(cases, 1))  # each case's own difficulty
    offsets = rng.normal(0, 0.02, size=(1, runs))  # a run that is better on every case
    matrix = np.clip(truth + offsets + rng.normal(0, 0.03, size=shape), 0, 1)
    mine, theirs = agreement(matrix), pingouin_icc2(matrix)
    assert mine.icc == pytest.approx(theirs["ICC"], abs=1e-12)
    low, high = theirs["CI95"]  # pingouin rounds its CI to 2 decimals
    assert mine.ci_low == pytest.approx(low, abs=0.005 + 1e-9)
    assert mine.ci_high == pytest.approx(high, abs=0.005 + 1e-9)
    # the runs' F test is the two-way ANOVA's: pingouin's F and p for ICC2 are those
    assert mine.f_runs == pytest.approx(mine.ms_runs / mine.ms_error) and theirs[
        "F"
    ] == pytest.approx(mine.ms_cases / mine.ms_error)


def test_identical_runs_agree_perfectly_and_bad_input_is_refused():
    column = np.array([0.7, 0.8, 0.9, 0.85])
    same = agreement(np.stack([column] * 3, axis=1))
    assert (same.icc, same.ci_low, same.ci_high) == (1.0, 1.0, 1.0)
    assert math.isnan(agreement(np.zeros((4, 3))).icc)  # no variance at all: undefined
    with pytest.raises(ValueError, match="cases ≥ 2, runs ≥ 2"):
        agreement(np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        agreement(np.array([[0.5, math.nan], [0.6, 0.7]]))


def test_spread_is_mean_sd_and_the_t_interval():
    values = [0.81, 0.84, 0.79, 0.86, 0.83]
    s = spread(values)
    x = np.array(values)
    half = sps.t.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5)
    assert (s.n, s.min, s.max) == (5, 0.79, 0.86)
    assert s.mean == pytest.approx(x.mean()) and s.sd == pytest.approx(x.std(ddof=1))
    assert (s.ci_low, s.ci_high) == pytest.approx((x.mean() - half, x.mean() + half))
    # pingouin's CI of a mean (one-sample t-test) agrees
    ci = pg.ttest(x, 0)["CI95"].iloc[0]
    assert (s.ci_low, s.ci_high) == pytest.approx(tuple(ci), abs=0.005)
    assert math.isnan(spread([0.5]).sd)


def test_init_and_data_seeds_vary_one_part_each(tmp_path, real_store):
    """init_seed changes the initial weights only; data_seed the batches only."""

    def first_state(**seeds):
        cfg = validate({**tiny_config(real_store, epochs=1, steps_per_epoch=1), **seeds})
        from segscale.engine import plan
        from segscale.parallel import unwrap

        p = plan(cfg)
        strategy = p.strategy()
        trainer = p.trainer(strategy, tmp_path / "r", [], progress=False)
        weights = next(iter(unwrap(trainer.model).state_dict().values())).clone()
        trainer.train_loader.set_epoch(0)
        batch = next(iter(trainer.train_loader))[0][0].clone()
        strategy.close()
        return weights, batch

    w0, b0 = first_state()
    w_init, b_init = first_state(init_seed=7)
    w_data, b_data = first_state(data_seed=7)
    assert not np.array_equal(w0, w_init) and np.array_equal(b0, b_init)
    assert np.array_equal(w0, w_data) and not np.array_equal(b0, b_data)
    w_seed, b_seed = first_state(seed=7)  # seed moves both
    assert not np.array_equal(w0, w_seed) and not np.array_equal(b0, b_seed)


@pytest.fixture(scope="module")
def store10(tmp_path_factory):
    """10 real left-atrium cases, 4 of them in the test split (the ICC needs several)."""
    return prepared_sample(tmp_path_factory.mktemp("store10"), 10, 0.1, 0.4)


def test_repeat_trains_tests_and_reports_the_spread(tmp_path, store10):
    cfg = tiny_config(store10, epochs=3, steps_per_epoch=6)
    cfg["tracker"] = "mlflow"  # the runs grouped under one repeat run
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "rep"
    report = repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False)

    assert report["seeds"] == [0, 1, 2] and report["runs"] == 3
    for i in range(3):  # each a normal run folder, its own data_seed, init fixed
        run_cfg = load_config(out / f"run-{i + 1}" / "config.yaml")
        assert run_cfg.data_seed == i and run_cfg.init_seed is None and run_cfg.seed == 0
        assert (out / f"run-{i + 1}" / "evaluation-test.json").is_file()
    per_run = [r["dice"] for r in report["per_run"]]
    assert report["metrics"]["dice"]["mean"] == pytest.approx(np.mean(per_run))
    assert report["metrics"]["dice"]["min"] == min(per_run)
    # agreement over the test cases every run scored, recomputed from the runs' own CSV-level data
    state = json.loads((out / "repeat.json").read_text())
    cases = sorted(report["cases"])
    matrix = np.array([[state["runs"][str(i)]["cases"][c] for i in (1, 2, 3)] for c in cases])
    assert len(cases) >= 2 and report["agreement"]["cases"] == len(cases)
    assert report["agreement"]["icc"] == pytest.approx(agreement(matrix).icc, nan_ok=True)
    text = (out / "variability.md").read_text()
    assert "ICC(A,1)" in text and "| Dice |" in text and (out / "variability.png").is_file()
    # MLflow: three children of the repeat run, its test Dice per run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("segscale").experiment_id)
    parent = next(r for r in runs if r.info.run_id == state["mlflow_run_id"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and parent.info.status == "FINISHED"
    # the methods section of a repeat: the number of runs and their spread, checked off
    from segscale.methods import methods

    text = methods(out)
    assert "trained 3 times, varying the data order only" in text
    assert (
        f"{report['metrics']['dice']['mean']:.4f} ± {report['metrics']['dice']['sd']:.4f}" in text
    )
    assert "| several runs per setting, their number and spread | yes |" in text
    # a rerun retrains nothing; other options on the same folder are refused
    mtimes = [(out / f"run-{i}" / "model.pt").stat().st_mtime_ns for i in (1, 2, 3)]
    again = repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False)
    assert to_json(again) == to_json(report)  # equal, NaN (as null) included
    assert mtimes == [(out / f"run-{i}" / "model.pt").stat().st_mtime_ns for i in (1, 2, 3)]
    with pytest.raises(SegscaleError, match=r"other settings \(vary differs\)"):
        repeat(path, None, RepeatOptions(runs=3, vary="seed"), out, progress=False)
    # a variability.md edited since is kept (it was replaced); --force replaces it
    written = (out / "variability.md").read_text()
    (out / "variability.md").write_text(written.replace("ICC(A,1)", "ICC"))
    with pytest.raises(SegscaleError, match=r"variability.md: edited since segscale repeat"):
        repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False)
    # ...as is one whose signature line was removed (the user's own now)
    (out / "variability.md").write_text("# my report\n" + written.split("\n", 1)[1])
    with pytest.raises(SegscaleError, match=r"variability.md: not written by segscale repeat"):
        repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False)
    repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False, force=True)
    assert (out / "variability.md").read_text() == written
    # its picture is signed alike: another picture in its place is kept (was: replaced)
    drawn = (out / "variability.png").read_bytes()
    (out / "variability.png").write_bytes(drawn[:-12] + b"mine" + drawn[-8:])
    with pytest.raises(SegscaleError, match=r"variability.png: edited since segscale repeat"):
        repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(out / "variability.png")  # a user's own
    with pytest.raises(SegscaleError, match=r"variability.png: not written by segscale repeat"):
        repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False)
    repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False, force=True)
    assert (out / "variability.png").read_bytes() == drawn  # drawn again, signed alike
    # a folder where an output goes: refused before anything runs, --force or not
    (out / "variability.png").unlink()
    (out / "variability.png").mkdir()
    with pytest.raises(SegscaleError, match=r"variability.png: a folder where segscale repeat"):
        repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False, force=True)
    (out / "variability.png").rmdir()
    # run folders of another config (copied, or a reused --out) are refused, not reported
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copytree(out / "run-1", foreign / "run-1")
    with pytest.raises(SegscaleError, match=r"foreign: not empty, and no repeat started there"):
        repeat(path, ["train.optimizer.lr=0.05"], RepeatOptions(3, "order"), foreign, False)
    # damaged or unfinished records: one line, never a methods text that says "one run"
    from segscale.compare import compare, comparison_files

    broken = tmp_path / "broken"
    shutil.copytree(out, broken, ignore=shutil.ignore_patterns("checkpoints", "*.db"))
    (broken / "variability.json").write_text('{"runs": 3, "va')
    with pytest.raises(SegscaleError, match=r"variability.json: unreadable repeat report"):
        methods(broken)
    (broken / "variability.json").unlink()
    with pytest.raises(SegscaleError, match=r"an unfinished repeat \(3 of 3 runs tested"):
        methods(broken)
    (broken / "run-2" / "evaluation-test.json").write_text("{}")
    with pytest.raises(SegscaleError, match=r"run-2.evaluation-test.json: unreadable evaluation"):
        compare(out / "run-1", broken / "run-2")
    # compare writes only its own files: never over a run's evaluation
    with pytest.raises(SegscaleError, match=r"evaluation-test.md: a record of the run"):
        comparison_files(out / "run-1" / "evaluation-test")
    with pytest.raises(SegscaleError, match=r"exists and is not a comparison"):
        comparison_files(out / "variability")
    with pytest.raises(SegscaleError, match=r"a folder; give a name"):
        comparison_files(Path("."))
    md, js = comparison_files(tmp_path / "res.v1")
    assert (md.name, js.name) == ("res.v1.md", "res.v1.json")
    md, _ = comparison_files(tmp_path / "new" / "cmp")  # its folder made, as evaluate --json's
    assert md.parent.is_dir()


def test_repeat_refuses_what_makes_no_spread(tmp_path, real_store):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(real_store)))
    # seeds the config pins do not follow the seed: "every seed varied" would be false
    with pytest.raises(SegscaleError, match=r"--vary seed: init_seed and data_seed set in the"):
        repeat(path, ["init_seed=3", "data_seed=3"], RepeatOptions(vary="seed"), tmp_path / "o")
    # per-case Dice is what it reports: a classifier is refused before anything trains
    with pytest.raises(SegscaleError, match=r"a classification run; `segscale repeat` works on"):
        repeat(
            path,
            ["task=classification", "model.name=cnn", "train.loss=ce"],
            RepeatOptions(),
            tmp_path / "o",
        )
    # without a validation split, run 2 on would be refused after run 1 had trained
    with pytest.raises(SegscaleError, match=r"--vary split draws which training cases validate"):
        repeat(path, ["data.val_split=null"], RepeatOptions(vary="split"), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(SegscaleError, match="at least 2 runs"):
        repeat(path, None, RepeatOptions(runs=1), tmp_path / "o")
    with pytest.raises(
        SegscaleError, match="--vary grid: expected one of seed, init, order, split"
    ):
        repeat(path, None, RepeatOptions(vary="grid"), tmp_path / "o")


def test_same_seed_gives_bit_identical_runs_in_process(tmp_path, real_store):
    """The premise of varying one seed at a time: with none varied, two runs are identical."""
    import torch

    runs = []
    for name in ("a", "b"):
        cfg = validate({**tiny_config(real_store, epochs=2, steps_per_epoch=2), "data_seed": 3})
        prepare_run_dir(cfg, tmp_path / name, resume=False)
        worker.train(tmp_path / name, progress=False)
        runs.append(torch.load(tmp_path / name / "model.pt"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_every_seed_the_config_takes_trains_and_runs_past_the_largest_are_refused(
    tmp_path, real_store
):
    """seed 2^63-1 passed the config and crashed the worker (an epoch's derived seed went past
    int64); repeat's and tune's seed + i past it were refused only at that run."""
    from segscale.errors import SEED_MAX
    from segscale.repro import derive_seed

    assert derive_seed(5, 2, 1) == (5 * 1_000_003 + 2) * 7919 + 1  # small seeds: as they were
    assert 0 <= derive_seed(SEED_MAX, 7, 3) < 2**63
    cfg = validate({**tiny_config(real_store, epochs=1, steps_per_epoch=1), "seed": SEED_MAX})
    prepare_run_dir(cfg, tmp_path / "top", resume=False)
    worker.train(tmp_path / "top", progress=False)
    assert (tmp_path / "top" / "model.pt").is_file()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_config(real_store), "seed": SEED_MAX - 1}))
    with pytest.raises(SegscaleError, match=r"--runs 3 --vary seed: seeds .* to 922337203685477"):
        repeat(path, None, RepeatOptions(runs=3, vary="seed"), tmp_path / "rep", progress=False)
    assert not (tmp_path / "rep").exists()
    from segscale.tune import TuneOptions, tune

    with pytest.raises(
        SegscaleError,
        match=r"the baselines' \(--baseline-runs\) and a check's \(\+1\): seeds .* go past the largest",
    ):
        tune(path, None, TuneOptions(workers=4, baseline_runs=3, simulate=True), tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_runs_of_one_score_are_drawn_with_no_spread(tmp_path):
    """Three runs that all predicted the same: the per-case mean rounded a step above min = max
    and matplotlib refused the error bar ('yerr' must not contain negative values), after every
    run had trained, on every rerun."""
    from segscale.repeat import plot_variability

    dice = 0.3
    mean = math.nextafter(dice, 1.0)  # as a sum of three, divided, can come out
    report = {
        "metrics": {"dice": {}},
        "per_run": [{"dice": dice}] * 3,
        "runs": 3,
        "cases": {"c0": {"mean": mean, "min": dice, "max": dice}},
        "agreement": None,
    }
    plot_variability(report, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 0


def test_paired_tests_match_pingouin():
    from segscale.stats import paired

    rng = np.random.default_rng(3)
    a = rng.uniform(0.6, 0.9, 12)
    b = a + rng.normal(0.02, 0.02, 12)
    mine = paired(a, b)
    t = pg.ttest(b, a, paired=True)
    assert mine.p_t == pytest.approx(t["p_val"].iloc[0], rel=1e-9)
    assert (mine.ci_low, mine.ci_high) == pytest.approx(tuple(t["CI95"].iloc[0]), abs=0.005)
    w = pg.wilcoxon(b, a)
    assert mine.p_wilcoxon == pytest.approx(w["p_val"].iloc[0], rel=1e-9)
    same = paired(a, a)
    assert same.mean_difference == 0 and same.p_t == 1.0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired([0.5], [0.6])


def test_compare_runs_and_repeats_with_a_paired_test(tmp_path, store10):
    from conftest import cli, trained_run

    a = trained_run(store10, tmp_path / "a", epochs=1, steps_per_epoch=2)
    b = trained_run(store10, tmp_path / "b", epochs=3, steps_per_epoch=6)
    r = cli("compare", a, b, "--out", tmp_path / "cmp")
    assert (
        r.returncode == 2
        and "not evaluated on 'test'" in r.stderr
        and "segscale evaluate" in r.stderr
    )
    (tmp_path / "set-up").mkdir()  # a run not trained yet: evaluating it would fail too
    shutil.copy(a / "config.yaml", tmp_path / "set-up" / "config.yaml")
    r = cli("compare", tmp_path / "set-up", a, "--out", tmp_path / "cmp")
    assert r.returncode == 2 and "set-up: not trained yet (no model.pt)" in r.stderr, r.stderr
    from segscale.compare import compare

    with pytest.raises(
        SegscaleError, match=r"--split banana: not a split of .*a \(train, val, test\)"
    ):
        compare(a, b, "banana")
    with pytest.raises(SegscaleError, match=r"given as A and as B"):
        compare(a, tmp_path / "." / "a")
    for run in (a, b):
        worker.evaluate(run, "test", run / "evaluation-test.json")
    # B's evaluation in A's folder compared B with itself: p = 1, without a word
    saved = (a / "evaluation-test.json").read_bytes()
    shutil.copy(b / "evaluation-test.json", a / "evaluation-test.json")
    with pytest.raises(SegscaleError, match=r"evaluation-test.json: the evaluation of another run"):
        compare(a, b)
    (a / "evaluation-test.json").write_bytes(saved)
    r = cli("compare", a, b, "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    # the methods section of one evaluated run: its metrics, no spread, what to add by hand
    r = cli("methods", b, "--out", tmp_path / "methods.md")
    assert r.returncode == 0 and "to add by hand" in r.stdout, r.stderr
    text = (tmp_path / "methods.md").read_text()
    assert "One run: no spread over runs is reported." in text
    assert "| at least three evaluation metrics | yes |" in text
    assert "| several runs per setting, their number and spread | no |" in text
    assert "batch 4 per worker × 1 worker(s) = global batch 4" in text
    r = cli("methods", tmp_path / "nowhere")
    assert r.returncode == 2 and "nowhere: no such file or folder" in r.stderr
    r = cli("methods", tmp_path)
    assert r.returncode == 2 and "neither a run folder nor" in r.stderr
    # it replaces its own methods.md, and a user's file only with --force
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    r = cli("methods", b, "--out", notes)
    assert r.returncode == 2 and "not an earlier output of segscale methods" in r.stderr
    assert notes.read_text() == "my notes\n"
    assert cli("methods", b, "--out", notes, "--force").returncode == 0
    assert cli("methods", b, "--out", notes).returncode == 0  # its own now
    assert notes.read_text() == text
    result = json.loads((tmp_path / "cmp.json").read_text())
    cases = {c: v for c, v in result["cases"].items()}
    ea = {
        c["case"]: c["dice"] for c in json.loads((a / "evaluation-test.json").read_text())["cases"]
    }
    assert all(v["a"] == ea[c] for c, v in cases.items())
    if result["paired"] is not None:
        assert result["paired"]["n"] == len(cases) and "no difference shown" in result["verdict"]
    assert "Verdict" in (tmp_path / "cmp.md").read_text()
    # a repeat folder: per metric its runs' mean and SD, per case its runs' mean Dice
    rep = tmp_path / "rep"
    rep.mkdir()
    runs = {
        str(i): {
            "run_dir": f"run-{i}",
            "test": {"dice": d, "mean_iou": d},
            "cases": {c: v["b"] - 0.01 * i for c, v in cases.items()},
        }
        for i, d in ((1, 0.7), (2, 0.8))
    }
    (rep / "repeat.json").write_text(json.dumps({"signature": {}, "runs": runs}))
    from segscale.compare import compare, compare_markdown

    result = compare(b, rep)
    assert result["runs"] == {"a": 1, "b": 2}
    assert result["metrics"]["dice"]["b"]["mean"] == pytest.approx(0.75)
    for c, v in result["cases"].items():
        assert v["b"] == pytest.approx(cases[c]["b"] - 0.015)
    # an unfinished repeat says so; other cases are refused (other stores or splits)
    (rep / "repeat.json").write_text(json.dumps({"signature": {"runs": 3}, "runs": runs}))
    with pytest.warns(UserWarning, match=r"B .*an unfinished repeat, 2 of its 3 runs tested"):
        result = compare(b, rep)
    assert "B: 2 of 3 runs (an unfinished repeat)" in compare_markdown(result)
    renamed = {
        k: {**r, "cases": {f"x{c}": d for c, d in r["cases"].items()}} for k, r in runs.items()
    }
    (rep / "repeat.json").write_text(json.dumps({"signature": {}, "runs": renamed}))
    with pytest.raises(SegscaleError, match=r"different 'test' cases \(0 shared; only in A: "):
        compare(b, rep)
    (rep / "repeat.json").write_text(json.dumps({"signature": {}, "runs": runs}))
    with pytest.raises(SegscaleError, match="neither a run folder nor a `segscale repeat` folder"):
        compare(tmp_path, rep)
    with pytest.raises(
        SegscaleError, match="scored on 'test', not 'val'; compare with --split test"
    ):
        compare(rep, b, split="val")
    nan = {**runs, "2": {**runs["2"], "test": {"dice": float("nan"), "mean_iou": 0.8}}}
    (rep / "repeat.json").write_text(json.dumps({"signature": {}, "runs": nan}))
    result = compare(b, rep)  # was: the Dice row left out without a word
    assert "dice" not in result["metrics"] and result["undefined"] == ["dice"]
    assert "Not compared (undefined in some run" in compare_markdown(result)
    for damaged in (  # not what repeat writes: a list of cases, a metric given as text
        {**runs, "2": {**runs["2"], "cases": [0.5]}},
        {**runs, "2": {**runs["2"], "test": {"dice": "0.1", "mean_iou": 0.8}}},
    ):
        (rep / "repeat.json").write_text(json.dumps({"runs": damaged}))
        with pytest.raises(SegscaleError, match=r"repeat.json: unreadable repeat state \(a run's"):
            compare(b, rep)
    (rep / "repeat.json").write_text('{"runs": ')  # torn: one line naming the file
    with pytest.raises(SegscaleError, match=r"repeat.json: unreadable repeat state \(not JSON"):
        compare(b, rep)
    r = cli("methods", b, "--out", tmp_path / "new" / "where.md")  # its folder made
    assert r.returncode == 0 and (tmp_path / "new" / "where.md").is_file()
    (tmp_path / "file").write_text("")
    r = cli("methods", b, "--out", tmp_path / "file" / "where.md")
    assert (
        r.returncode == 2 and "is a file or inside one" in r.stderr and "Traceback" not in r.stderr
    )
    # what the record lacks is said, never guessed; an unfinished run is not described
    from segscale.methods import methods

    bare = tmp_path / "bare"
    shutil.copytree(b, bare, ignore=shutil.ignore_patterns("checkpoints"))
    (bare / "environment.json").unlink()
    text = methods(bare)
    assert "hardware and software were not recorded" in text and "CPU only" not in text
    (bare / "model.pt").unlink()
    with pytest.raises(SegscaleError, match=r"bare: has not finished \(no model.pt\)"):
        methods(bare)


def test_the_environment_record_names_packages_git_store_and_determinism(tmp_path, real_store):
    run = tmp_path / "run"
    cfg = validate({**tiny_config(real_store, epochs=1, steps_per_epoch=1), "init_seed": 5})
    prepare_run_dir(cfg, run, resume=False)
    worker.train(run, progress=False)
    env = json.loads((run / "environment.json").read_text())
    listed = (run / "packages.txt").read_text().splitlines()
    import hashlib

    assert any(line.lower().startswith("torch==") for line in listed)
    assert env["packages_sha256"] == hashlib.sha256("\n".join(listed).encode()).hexdigest()
    assert env["cpu_model"] and env["strategy"] == "allreduce"
    assert (env["init_seed"], env["data_seed"]) == (5, 0)
    meta = json.loads((real_store / "meta.json").read_text())
    assert env["store"]["content_sha256"] == meta["content_hash"]
    assert env["store"]["input_sha256"] == meta["input_hash"]
    assert env["determinism"] == {"requested": True, "bit_identical": True, "why_not": []}
    # the working directory's git state: this checkout's commit, or null outside a repository
    from segscale.repro import git_state

    assert git_state(tmp_path) is None
    here = git_state(Path(__file__).parent)
    assert here is None or len(here["commit"]) == 40


def test_split_seed_redraws_the_validation_cases_and_keeps_the_test_split(store10):
    from segscale.engine import plan

    def ids(p, split):
        return sorted(c["id"] for c in p.store.cases(split))

    base = plan(validate(tiny_config(store10)))
    drawn = [
        plan(validate({**tiny_config(store10), "data": {"store": str(store10), "split_seed": s}}))
        for s in range(6)
    ]
    for p in drawn:
        assert ids(p, "test") == ids(base, "test")  # never touched
        assert len(ids(p, "val")) == len(ids(base, "val"))
        assert sorted(ids(p, "train") + ids(p, "val")) == sorted(
            ids(base, "train") + ids(base, "val")
        )
        # the loaders read the drawn partition: its rows, not the store's own
        assert set(p.store.rows("val")) == {
            r for c in p.store.cases("val") for r in range(c["start"], c["start"] + c["count"])
        }
    assert len({tuple(ids(p, "val")) for p in drawn}) > 1  # the seed moves it
    same = plan(
        validate({**tiny_config(store10), "data": {"store": str(store10), "split_seed": 3}})
    )
    assert ids(same, "val") == ids(drawn[3], "val")  # and is reproducible
    assert (
        validate(tiny_config(store10)).digest()
        == validate(
            {**tiny_config(store10), "data": {"store": str(store10), "split_seed": None}}
        ).digest()
    )


def test_a_run_whose_store_was_prepared_again_is_neither_resumed_nor_scored(tmp_path):
    """Prepared again with another split, the store's test cases may be ones the run trained
    on: resuming it (train --resume, repeat, tune) and scoring it are refused (was: a resumed
    run trained on, and scored on, the new split); its model still segments (the slices are
    the same). With other slices (another size), the model is refused for any use."""
    from conftest import trained_run
    from segscale.engine import load_trained_model
    from segscale.imgmed import Preprocessing, prepare

    store = prepared_sample(tmp_path / "data", 5, 0.2, 0.2)
    run = trained_run(store, tmp_path / "run")
    cfg = load_config(run / "config.yaml")
    prepare_run_dir(cfg, run, resume=True)  # the same store: fine
    load_trained_model(run)
    env = json.loads((run / "environment.json").read_text())["store"]
    assert set(env) >= {"content_sha256", "splits_sha256"}

    def prepare_again(test: float, size: int) -> None:
        shutil.rmtree(store)
        prepare(tmp_path / "data" / "raw", store, Preprocessing(size=size, slices=12), val_fraction=0.2,
                test_fraction=test, seed=0, progress=False)  # fmt: skip

    prepare_again(0.4, 32)  # the same path, another split
    with pytest.raises(SegscaleError, match=r"run: its store .* its split by case differ"):
        prepare_run_dir(cfg, run, resume=True)
    with pytest.raises(SegscaleError, match=r"prepared again since the run started, and its split"):
        worker.evaluate(run, "test", tmp_path / "e.json")
    load_trained_model(run)  # predict, export: the same slices and preprocessing
    from segscale.methods import methods

    with pytest.raises(SegscaleError, match=r"its split by case differ"):
        methods(run)  # it would describe the new split as the run's
    prepare_again(0.2, 48)  # other slices
    with pytest.raises(
        SegscaleError, match=r"prepared again since the run started, and its slices"
    ):
        load_trained_model(run)


def test_a_run_with_its_own_split_seed_resumes_and_is_scored_on_its_unchanged_store(tmp_path):
    """data.split_seed re-draws the training/validation cases from the store: the run records
    the store's split as prepared, so the store check does not take that partition for a store
    prepared again (its resume, evaluation and methods section were refused)."""
    from segscale.imgmed.store import Store
    from segscale.methods import methods

    store = prepared_sample(tmp_path / "data", 8, 0.25, 0.25)
    base = Store.open(store)
    seed = next(
        s
        for s in range(20)
        if base.repartition("train", "val", s).meta["splits"] != base.meta["splits"]
    )
    raw = tiny_config(store, epochs=1, steps_per_epoch=1)
    raw["data"]["split_seed"] = seed
    cfg, run = validate(raw), tmp_path / "redrawn"
    prepare_run_dir(cfg, run, resume=False)
    worker.train(run, progress=False)
    prepare_run_dir(cfg, run, resume=True)
    worker.evaluate(run, "test", run / "evaluation-test.json")
    assert f"split seed {seed}" in methods(run)


def test_folds_deal_every_training_case_into_one_validation_fold(store10):
    """k-fold cross-validation: over the k folds each training or validation case validates
    exactly once; the test split never moves; an unset fold leaves older runs' digest alone."""
    from segscale.engine import plan

    def ids(p, split):
        return sorted(c["id"] for c in p.store.cases(split))

    def fold_plan(folds, fold, **data):
        return plan(
            validate(
                {
                    **tiny_config(store10),
                    "data": {"store": str(store10), "folds": folds, "fold": fold, **data},
                }
            )
        )

    base = plan(validate(tiny_config(store10)))
    pooled = sorted(ids(base, "train") + ids(base, "val"))
    folds = [fold_plan(3, i) for i in range(3)]
    held = [ids(p, "val") for p in folds]
    assert sorted(c for h in held for c in h) == pooled  # each case once
    assert max(map(len, held)) - min(map(len, held)) <= 1
    for p in folds:
        assert ids(p, "test") == ids(base, "test")
        assert sorted(ids(p, "train") + ids(p, "val")) == pooled
    assert any(ids(fold_plan(3, 1, split_seed=s), "val") != held[1] for s in range(1, 5))
    with pytest.raises(SegscaleError, match=rf"{len(pooled)} train and val cases; data.folds 9"):
        fold_plan(9, 0)
    for bad, match in (
        ({"folds": 3, "fold": 3}, "fold 3: expected 0..folds-1"),
        ({"fold": 1}, "fold 1: it needs folds"),
        ({"folds": 3, "val_split": None}, "folds: a fold validates"),
        ({"folds": 3, "val_split": "test"}, "folds deals .* never the test split's"),
        ({"split_seed": 3, "train_split": "test"}, "split_seed deals .* never the test split's"),
    ):
        with pytest.raises(SegscaleError, match=match):
            validate({**tiny_config(store10), "data": {"store": str(store10), **bad}})
    assert (
        validate(tiny_config(store10)).digest()
        == validate(
            {**tiny_config(store10), "data": {"store": str(store10), "folds": None, "fold": 0}}
        ).digest()
    )


def test_repeat_vary_fold_scores_each_training_case_by_the_run_that_held_it_out(tmp_path, store10):
    cfg = tiny_config(store10, epochs=1, steps_per_epoch=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cv"
    report = repeat(path, None, RepeatOptions(runs=3, vary="fold"), out, progress=False)
    cv = report["cross_validation"]
    pooled = []
    for i in range(3):
        run = out / f"run-{i + 1}"
        run_cfg = load_config(run / "config.yaml")
        assert (run_cfg.data.folds, run_cfg.data.fold) == (3, i)
        own = json.loads((run / "evaluation-val.json").read_text())
        for case in own["cases"]:  # its held-out fold, as `segscale evaluate --split val` scores it
            assert cv["cases"][case["case"]] == pytest.approx(case["dice"], nan_ok=True)
            pooled.append(case["case"])
    assert sorted(pooled) == sorted(cv["cases"]) and len(pooled) == len(set(pooled))
    assert {c for c, f in cv["fold_of"].items() if f == 1} == {
        c["case"] for c in json.loads((out / "run-2" / "evaluation-val.json").read_text())["cases"]
    }
    from PIL import Image

    assert Image.open(out / "variability.png").size[0] > 1500  # the third panel: the folds
    defined = [d for d in cv["cases"].values() if d == d]
    assert cv["dice"]["n"] == len(defined)
    assert cv["dice"]["mean"] == pytest.approx(np.mean(defined))
    assert "## 3-fold cross-validation" in (out / "variability.md").read_text()
    assert report["seeds"] == [0, 1, 2]
    from segscale.methods import methods

    text = methods(out)
    assert "varying the validation fold of a k-fold cross-validation" in text
    assert f"3-fold cross-validation: each of the {cv['dice']['n']} training cases" in text
    assert "dealt into 3 folds (split seed 0), fold 0 validating" in methods(out / "run-1")
    with pytest.raises(SegscaleError, match=r"--runs 3 of them; the config sets data.folds 4"):
        repeat(path, ["data.folds=4"], RepeatOptions(runs=3, vary="fold"), tmp_path / "o")
    with pytest.raises(SegscaleError, match=r"data.folds 9 needs at least as many"):
        repeat(path, None, RepeatOptions(runs=9, vary="fold"), tmp_path / "o")


def test_predict_with_a_repeat_folder_is_the_ensemble_of_its_runs(tmp_path):
    """nnU-Net predicts with its 5 folds at once (mean softmax): so does `predict` given the
    folder of `repeat --vary fold`. Checked on pictures already at the store's size, where the
    store's own test slices are what predict feeds the network."""
    import torch
    from PIL import Image

    from conftest import cli
    from segscale.imgmed import Preprocessing, Store, prepare
    from segscale.predict import predict
    from segscale.zoo import load_any_model
    from test_inputs import write_2d

    raw = write_2d(tmp_path / "raw", "L")
    kw = {"val_fraction": 0.25, "test_fraction": 0.5, "progress": False}
    store, _ = prepare(raw, tmp_path / "store", Preprocessing(size=32), **kw)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(store, epochs=40)))  # one step each
    out = tmp_path / "cv"
    repeat(path, None, RepeatOptions(runs=2, vary="fold"), out, progress=False)
    s = Store.open(store)
    test = s.cases("test")
    rows = s.rows("test")
    x = torch.from_numpy(np.asarray(s.images[rows], np.float32))
    with torch.no_grad():
        mean = sum(load_any_model(out / f"run-{i}")[0](x).softmax(1) for i in (1, 2)) / 2
    expected = mean.argmax(1).numpy()
    assert 0 < expected.mean() < 1  # both classes: a mask that can be wrong
    images = [raw / "images" / f"{c['id']}.png" for c in test]
    done = cli("predict", out, *images, "--out", tmp_path / "pred")
    assert done.returncode == 0, done.stderr
    assert "an ensemble of 2 runs: run-1, run-2" in done.stdout
    got = np.stack([np.asarray(Image.open(tmp_path / "pred" / p.name)) for p in images])
    assert np.array_equal(got == 255, expected == 1)  # class 1 is the raw value 255
    # on a picture the model sees resized, the runs are combined on its own grid: where the
    # two runs agree, so does the ensemble, and a run twice over is that run
    Image.open(images[0]).resize((45, 37)).save(tmp_path / "big.png")

    def mask(*runs):
        folder = tmp_path / "_".join(r.name for r in runs)
        return np.asarray(Image.open(predict(list(runs), [tmp_path / "big.png"], folder)[0]))

    one, two = mask(out / "run-1"), mask(out / "run-2")
    both = mask(out / "run-1", out / "run-2")
    assert np.array_equal(both[one == two], one[one == two])
    assert np.array_equal(mask(out / "run-1", out / "run-1"), one)
    # an unfinished repeat is no ensemble
    (out / "variability.json").unlink()
    done = cli("predict", out, images[0], "--out", tmp_path / "pred2")
    assert done.returncode == 2
    assert "an unfinished repeat (2 of 2 runs tested, no variability.json)" in done.stderr
    # a finished repeat whose run was moved away: one line before any ensemble is announced
    (out / "variability.json").write_text("{}")
    shutil.move(out / "run-2", tmp_path / "elsewhere")
    done = cli("predict", out, images[0], "--out", tmp_path / "pred3")
    assert done.returncode == 2 and "run-2 has no model.pt (moved or deleted?)" in done.stderr
    assert "ensemble" not in done.stdout

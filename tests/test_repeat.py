"""Repeated runs: the variability statistics against pingouin (an independent implementation,
test-only), and `segscale repeat` end to end on real MRI slices."""

import json
import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
import yaml
from scipy import stats as sps

from conftest import sample_subset, tiny_config
from segscale import worker
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
    from segscale.imgmed import Preprocessing, prepare

    root = tmp_path_factory.mktemp("store10")
    raw = sample_subset(root / "raw", 10)
    store, _ = prepare(
        raw,
        root / "store",
        Preprocessing(size=32, slices=12),
        val_fraction=0.1,
        test_fraction=0.4,
        seed=0,
        progress=False,
    )
    return store


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
    # a rerun retrains nothing; other options on the same folder are refused
    mtimes = [(out / f"run-{i}" / "model.pt").stat().st_mtime_ns for i in (1, 2, 3)]
    assert repeat(path, None, RepeatOptions(runs=3, vary="order"), out, progress=False) == report
    assert mtimes == [(out / f"run-{i}" / "model.pt").stat().st_mtime_ns for i in (1, 2, 3)]
    with pytest.raises(SegscaleError, match=r"other settings \(vary differ\)"):
        repeat(path, None, RepeatOptions(runs=3, vary="seed"), out, progress=False)


def test_repeat_refuses_what_makes_no_spread(tmp_path, real_store):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(real_store)))
    with pytest.raises(SegscaleError, match="at least 2 runs"):
        repeat(path, None, RepeatOptions(runs=1), tmp_path / "o")
    with pytest.raises(SegscaleError, match="--vary split: expected one of seed, init, order"):
        repeat(path, None, RepeatOptions(vary="split"), tmp_path / "o")


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

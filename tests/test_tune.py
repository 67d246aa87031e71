"""`segscale tune` end to end on real MRI slices (simulated workers, a tiny U-Net), the early stop
it relies on, and a resume after SIGTERM that retrains nothing finished."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cli, tiny_config
from segscale import worker
from segscale.config import load_config, validate
from segscale.engine import prepare_run_dir
from segscale.errors import PREEMPTED_EXIT_CODE, SegscaleError
from segscale.guideline import Guideline, Scores, Settings, Trial
from segscale.methods import methods
from segscale.tune import TuneOptions, tune

FAULTS = f"{ROOT / 'tests' / 'plugins' / 'faults.py'}:SignalAt"


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def early_stop_run(tmp_path: Path, store: Path, name: str, **kwargs) -> Path:
    cfg = tiny_config(store, epochs=4, steps_per_epoch=1)
    cfg["train"]["callbacks"] = [{"name": "early_stop", "kwargs": kwargs}]
    run = tmp_path / name
    prepare_run_dir(validate(cfg), run, resume=False)
    worker.train(run, progress=False)
    return run


def test_early_stop_finishes_a_run_that_stays_under_its_reference(tmp_path, real_store):
    unreachable = {e: 1.0 for e in range(1, 5)}  # Dice 1 at every epoch: always under it
    run = early_stop_run(tmp_path, real_store, "stop", reference=unreachable, patience=2)
    history = rows(run)
    assert [r["epoch"] for r in history] == [1, 2]  # two validations under it: done
    assert "under the reference" in history[-1]["finished_early"]
    assert (run / "model.pt").is_file() and "finished_early" not in history[0]
    # stopped after its last checkpoint but before model.pt: a resume trains nothing more
    (run / "model.pt").unlink()
    worker.train(run, resume=True, progress=False)
    assert [r["epoch"] for r in rows(run)] == [1, 2] and (run / "model.pt").is_file()
    # never during the first `after` epochs; a margin as wide as the reference never stops it
    late = early_stop_run(tmp_path, real_store, "late", reference=unreachable, patience=1, after=2)
    assert [r["epoch"] for r in rows(late)] == [1, 2, 3]
    kept = early_stop_run(tmp_path, real_store, "kept", reference=unreachable, margin=1.0)
    assert [r["epoch"] for r in rows(kept)] == [1, 2, 3, 4]
    assert not any("finished_early" in r for r in rows(kept))


def test_early_stop_without_a_reference_finishes_when_the_metric_stops_improving(
    tmp_path, real_store
):
    """Keras', Lightning's and MONAI's early stopping: `patience` validations in a row that do
    not beat the best by more than `min_delta` (was: a reference curve was required, so
    `early_stop: {patience: 5}`, a user's first try, was refused)."""
    from types import SimpleNamespace

    from segscale.train import EarlyStop

    def verdict(stop, dice, **seen):
        trainer = SimpleNamespace(history=[], reason=None)
        trainer.finish_early = lambda why: setattr(trainer, "reason", why)
        for epoch, value in enumerate(dice, 1):
            record = {"epoch": epoch, "val_dice": value}
            stop.on_validation_end(trainer, record)
            trainer.history.append(record)
            if trainer.reason:
                return epoch, trainer.reason
        return None

    assert verdict(EarlyStop(patience=2), [0.5, 0.6, 0.6, 0.59]) == (
        4,
        "val_dice not improved for 2 validations in a row (best 0.6000 at epoch 2)",
    )
    assert verdict(EarlyStop(patience=2), [0.5, 0.6, 0.6, 0.61, 0.6]) is None
    delta = EarlyStop(patience=2, min_delta=0.05)
    assert verdict(delta, [0.5, 0.52, 0.54, 0.56])[0] == 3  # +0.04 each time: no improvement
    # the reference and the highest value, when they differ, are both named (was: "best 0.5000")
    assert verdict(delta, [0.5, 0.54, 0.53]) == (
        3,
        "val_dice not improved by more than 0.05 for 2 validations in a row (0.5000 at epoch 1, "
        "the last improvement by more than 0.05; best 0.5400 at epoch 2)",
    )
    assert verdict(EarlyStop(patience=1, after=3), [0.5, 0.4, 0.4, 0.4])[0] == 4
    assert verdict(EarlyStop(patience=2), [0.5, float("nan"), float("nan")])[0] == 3
    for bad, match in (
        ({"margin": 0.1}, "margin is below a reference curve; without one, min_delta"),
        ({"reference": {1: 0.5}, "min_delta": 0.1}, "min_delta is without a reference"),
        ({"min_delta": -0.1}, "min_delta -0.1, expected 0 or more"),
        ({"reference": {1: 0.5}, "margin": -1}, "margin -1, expected 0 or more"),
    ):
        with pytest.raises(ValueError, match=match):
            EarlyStop(**bad)
    # end to end: no validation beats the first by more than 1, so it stops at the third
    run = early_stop_run(tmp_path, real_store, "plateau", patience=2, min_delta=1.0)
    history = rows(run)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["finished_early"].startswith("val_dice not improved by more than 1 for 2")


def test_an_early_stop_that_can_never_fire_is_a_warning_before_launch(real_store):
    """A run that validates fewer times than early_stop's patience, or never at an epoch of its
    reference, trained to the end without a word (a silent no-op)."""
    from segscale.engine import plan

    def notes(epochs, val_every=1, log_every=50, **kwargs):
        cfg = tiny_config(real_store, epochs=epochs, val_every=val_every)
        cfg["train"]["callbacks"] = [{"name": "early_stop", "kwargs": kwargs}]
        cfg["monitor"] = {"log_every": log_every}
        return [n for n in plan(validate(cfg)).scale_notes(1) if "early_stop" in n]

    assert notes(5, patience=3) == []  # 4 validations after the first: it can fire
    assert notes(3, patience=3) == [
        "train.callbacks[0] early_stop can never finish this run: patience 3, but only 2 of the "
        "run's 3 validations count after epoch 0 (epochs 2, 3); the first sets the best so far"
    ]
    assert notes(6, val_every=5, patience=2)  # validates at epochs 5 and 6 only
    assert notes(4, after=3, reference={1: 0.5, 4: 0.5}, patience=2)
    assert notes(4, reference={"10": 0.5, "20": 0.5}, patience=1)
    assert notes(4, reference={"4": 0.5}, patience=1) == []
    # epochs as a YAML or JSON file may give them: "1.0" passed plan and failed in train
    assert notes(4, reference={"01": 0.5, 2.0: 0.5, "3.0": 0.5}, patience=3) == []
    from segscale.train import EarlyStop

    assert EarlyStop(reference={"1.0": 0.5, " 2": 0.4}).reference == {1: 0.5, 2: 0.4}
    with pytest.raises(ValueError, match=r"early_stop reference: epoch '1.5', expected a whole"):
        EarlyStop(reference={"1.5": 0.5})
    cfg = tiny_config(real_store, epochs=2)  # 3 steps an epoch
    cfg["monitor"] = {"log_every": 7}
    assert any(
        "log_every 7 is more than the run's 6 steps" in n
        for n in plan(validate(cfg)).scale_notes(1)
    )


def test_early_stop_names_a_metric_the_validation_does_not_give():
    """A task without validation_metrics is not checked before launch: the first validation
    says it (was: a run that never stopped early, without a word)."""
    from segscale.train import EarlyStop

    stop = EarlyStop({1: 0.5}, metric="dcie")
    with pytest.raises(SegscaleError, match=r"metric 'dcie' is not among .*\(dice, mean_iou\)"):
        stop.on_validation_end(
            None, {"epoch": 1, "loss": 0.3, "val_dice": 0.4, "val_mean_iou": 0.3}
        )


def tune_config(tmp_path: Path, store: Path, **extra) -> Path:
    """Adam at a base lr that one worker trains with; × 8 (linear scaling) it overshoots."""
    cfg = tiny_config(
        store,
        epochs=6,
        steps_per_epoch=4,
        optimizer={"name": "adam", "lr": 0.01},
        schedule={"rule": "grescale", "warmup_epochs": 1},
        **extra,
    )
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tune_runs_the_guideline_end_to_end(tmp_path, real_store):
    path = tune_config(tmp_path, real_store)
    cfg = yaml.safe_load(path.read_text())
    cfg["tracker"] = "mlflow"  # trials as children of the tuning run
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    options = TuneOptions(workers=8, simulate=True, min_workers=2, max_trials=3, baseline_runs=2)
    state = tune(path, None, options, out, progress=False)

    # two one-worker baselines with their own seeds, then the guideline's actions in its order
    assert [b["seed"] for b in state["baselines"]] == [0, 1]
    assert all(b["status"] == "finished" for b in state["baselines"])
    trials = state["trials"]
    assert len(trials) <= 3 and trials[0]["action"] == "defaults"
    for t in trials:
        assert t["status"] in ("finished", "finished_early", "diverged")
        run_cfg = load_config(Path(t["run_dir"]) / "config.yaml")
        assert run_cfg.train.simulate_workers == 8 and run_cfg.train.schedule.rule == "grescale"
    # each trial is what the state machine asks for, given the baselines and the trials before
    dice = [b["scores"]["dice"] for b in state["baselines"]]
    mean = {
        m: sum(b["scores"][m] for b in state["baselines"]) / 2
        for m in state["baselines"][0]["scores"]
    }
    guide = Guideline(Scores.of(mean), 8, min_workers=2, noise=max(dice) - min(dice))
    decision, replay = guide.start(Settings(lr=0.01, warmup_epochs=1, optimizer="adam")), []
    for t in trials:
        assert (t["action"], Settings(**t["settings"])) == (decision.action, decision.settings)
        replay.append(Trial(t["action"], Settings(**t["settings"]), Scores.of(t["scores"])))
        decision = guide.next(replay)
    assert state["decision"]["action"] == (decision.action if len(trials) < 3 else "budget") or (
        decision.action in ("done", "exhausted") and state["decision"]["action"] == decision.action
    )
    actions = [t["action"] for t in trials]
    # the test split: scored once, for the baselines and the chosen trial only
    chosen = state["decision"]["trial"]
    assert all(b["test"]["dice"] is not None for b in state["baselines"])
    assert next(t["index"] for t in trials if t.get("test")) == chosen
    # tuned.yaml: the chosen settings for 8 real workers, without the tuner's own parts
    tuned = load_config(out / "tuned.yaml")
    best = next(t for t in trials if t["index"] == chosen)
    assert tuned.workers == 8 and tuned.train.simulate_workers is None
    assert tuned.train.callbacks == [] and tuned.train.optimizer.lr == best["settings"]["lr"]
    assert tuned.train.schedule.rule == "grescale"
    # tune.md: a row per baseline and trial; tune.png drawn
    table = (out / "tune.md").read_text()
    assert table.count("| baseline ") == 2 + 2  # validation rows and test rows
    for t in trials:
        assert f"| {t['index']} | {t['action']} |" in table
    assert (out / "tune.png").stat().st_size > 10_000
    # the chosen trial's methods section says how its hyperparameters were chosen
    text = methods(Path(best["run_dir"]))
    assert f"{len(trials)} trials against 2 one-worker baseline runs" in text
    # MLflow: every run a child of the tuning run, which holds the outputs
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("segscale").experiment_id)
    parent = next(r for r in runs if r.info.run_id == state["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and "trial_val_dice" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 + len(trials)
    assert {r.data.tags.get("segscale.tune.action") for r in children} >= set(actions)
    # a rerun of a finished tuning trains nothing and returns the same decision
    again = tune(path, None, options, out, progress=False)
    assert again["decision"] == state["decision"] and again["trials"] == trials
    # ...and keeps a tuned.yaml edited since (it was replaced without a word); --force replaces it
    written = (out / "tuned.yaml").read_text()
    (out / "tuned.yaml").write_text(written + "# my change\n")
    with pytest.raises(SegscaleError, match=r"tuned.yaml: edited since segscale tune wrote it"):
        tune(path, None, options, out, progress=False)
    assert (out / "tuned.yaml").read_text().endswith("# my change\n")
    # a YAML tool that drops comments takes the signature with them: the user's file now
    (out / "tuned.yaml").write_text(yaml.safe_dump(yaml.safe_load(written)))
    with pytest.raises(SegscaleError, match=r"tuned.yaml: not written by segscale tune"):
        tune(path, None, options, out, progress=False)
    tune(path, None, options, out, progress=False, force=True)
    assert (out / "tuned.yaml").read_text() == written
    # tune.png is signed alike: edited since, it is kept
    drawn = (out / "tune.png").read_bytes()
    (out / "tune.png").write_bytes(drawn[:-12] + b"mine" + drawn[-8:])
    with pytest.raises(SegscaleError, match=r"tune.png: edited since segscale tune wrote it"):
        tune(path, None, options, out, progress=False)


FLAT = """
import torch
from torch import nn

class Flat(nn.Module):  # says background everywhere, whatever it is trained on
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.classes = num_classes

    def forward(self, x):
        rest = x[:, :1].repeat(1, self.classes - 1, 1, 1) * 0
        return torch.cat([torch.full_like(x[:, :1], 10.0), rest], 1) + 0 * self.scale
"""


def test_tune_refuses_what_it_cannot_do(tmp_path, real_store):
    path = tune_config(tmp_path, real_store)
    out = tmp_path / "out"
    with pytest.raises(SegscaleError, match="2 or more workers"):
        tune(path, None, TuneOptions(workers=1), out)
    with pytest.raises(SegscaleError, match="--method"):
        tune(path, None, TuneOptions(workers=4, method="grid"), out)
    with pytest.raises(SegscaleError, match="--max-hours 0: expected a finite positive number"):
        tune(path, None, TuneOptions(workers=4, max_hours=0), out)
    with pytest.raises(SegscaleError, match="--margin -1: expected"):
        tune(path, None, TuneOptions(workers=4, margin=-1), out)
    with pytest.raises(SegscaleError, match="--max-hours nan: expected a finite positive number"):
        tune(path, None, TuneOptions(workers=4, max_hours=math.nan), out)
    with pytest.raises(SegscaleError, match="--margin nan: expected"):
        tune(path, None, TuneOptions(workers=4, margin=math.nan), out)
    with pytest.raises(SegscaleError, match=r"a classification run; `segscale tune` works on"):
        tune(path, ["task=classification", "model.name=cnn", "train.loss=ce"], TuneOptions(4), out)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        SegscaleError, match=r"--out .*a-file/out: is inside .*a-file, a file; give a folder"
    ):
        tune(path, None, TuneOptions(workers=4), tmp_path / "a-file" / "out")
    # a baseline trained with other settings is not this config's baseline
    other = tmp_path / "other"
    cfg = validate(tiny_config(real_store, epochs=1, steps_per_epoch=1))
    prepare_run_dir(cfg, other, resume=False)
    worker.train(other, progress=False)
    with pytest.raises(SegscaleError, match=r"--baseline .*other settings \(.*train.epochs"):
        tune(path, None, TuneOptions(workers=4, baselines=(str(other),)), out)
    twice = TuneOptions(workers=4, baselines=(str(other), str(other) + "/"))
    with pytest.raises(SegscaleError, match=r"--baseline .*other: given twice"):
        tune(path, None, twice, out)
    assert not out.exists()  # refused before its folder was made
    # two copies of one run train identically: their spread would count as none
    import shutil

    shutil.copytree(other, tmp_path / "copy")
    copies = TuneOptions(workers=4, baselines=(str(other), str(tmp_path / "copy")))
    with pytest.raises(
        SegscaleError, match=r"--baseline .*copy: the same seeds as --baseline .*other"
    ):
        tune(path, ["train.epochs=1", "train.steps_per_epoch=1", "train.schedule={}"], copies, out)
    assert not out.exists()
    # a given baseline that learnt nothing (one step) is refused before OUT holds any state
    one_step = ["train.epochs=1", "train.steps_per_epoch=1", "train.schedule={}"]
    with pytest.raises(SegscaleError, match=r"other: validation Dice 0.0000, it learnt nothing"):
        tune(path, one_step, TuneOptions(workers=4, baselines=(str(other),)), out)
    assert not out.exists()
    # a baseline that learnt nothing (Dice 0 at lr 0) is no reference to scale
    (tmp_path / "flat.py").write_text(FLAT)
    with pytest.raises(SegscaleError, match=r"validation Dice 0.0000, it learnt nothing"):
        options = TuneOptions(workers=4, simulate=True, min_workers=2, baseline_runs=1)
        model = [f"model={{name: {tmp_path / 'flat.py'}:Flat}}", "train.epochs=1"]
        tune(path, model, options, tmp_path / "zero", False)
    # settings it ends with that `train` would refuse: no tuned.yaml, and a failure (was: "done")
    short = tmp_path / "short"
    options = TuneOptions(workers=4, simulate=True, min_workers=2, baseline_runs=1, max_trials=1)
    with pytest.raises(SegscaleError, match=r"no tuned settings: .*cannot train this config"):
        tune(path, ["train.schedule={scaling: linear}", "train.epochs=4"], options, short, False)
    assert (short / "tune.md").is_file() and not (short / "tuned.yaml").exists()
    # under --min-workers the defaults are all there is: refused before any baseline trains
    options = TuneOptions(workers=4, simulate=True, baseline_runs=1, max_trials=1)
    with pytest.raises(SegscaleError, match=r"4 workers: under 12, .*cannot train this config"):
        tune(
            path,
            ["train.schedule={scaling: linear}", "train.epochs=4"],
            options,
            tmp_path / "defaults",
            False,
        )
    assert not (tmp_path / "defaults").exists()  # unclaimed: a rerun with more epochs may use it
    # real workers this machine cannot run: refused before a baseline trains
    with pytest.raises(SegscaleError, match=r"500 workers on this machine's \d+ CPU core"):
        tune(path, None, TuneOptions(workers=500, baseline_runs=1), tmp_path / "many", False)
    assert not (tmp_path / "many").exists()
    # a warmup of the config's own, ignored under the standard rule: the hint says so
    with pytest.raises(SegscaleError, match=r"apply with train.schedule.rule=grescale \(it is"):
        tune(
            path,
            ["train.schedule={scaling: linear, warmup_epochs: 1}", "train.epochs=4"],
            options,
            tmp_path / "defaults",
            False,
        )
    # an output folder holding another tuning
    out.mkdir(exist_ok=True)
    (out / "tune.json").write_text("[1, 2]")  # not a tuner's state: one line, not a traceback
    with pytest.raises(SegscaleError, match="unreadable tuning state; use another --out"):
        tune(path, None, TuneOptions(workers=4), out)
    state = {"signature": {"workers": 16}, "baselines": [], "trials": [], "seconds": 0}
    (out / "tune.json").write_text(json.dumps(state))
    with pytest.raises(SegscaleError, match=r"other settings \(.*workers differs?\)"):
        tune(path, None, TuneOptions(workers=4), out)


def test_tune_with_optuna_starts_from_the_defaults_and_keeps_its_study(tmp_path, real_store):
    import optuna

    path, out = tune_config(tmp_path, real_store), tmp_path / "out"
    options = TuneOptions(
        workers=8, simulate=True, min_workers=2, max_trials=3, baseline_runs=1, method="optuna"
    )
    state = tune(path, None, options, out, progress=False)
    trials = state["trials"]
    assert trials[0]["action"] == "defaults" and trials[0]["settings"]["lr"] == 0.01
    searched = [t for t in trials if t["action"] == "optuna"]
    study = optuna.load_study(study_name="segscale-tune", storage=f"sqlite:///{out / 'optuna.db'}")
    done = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    failed = {t.number for t in study.trials if t.state.name == "FAIL"}
    assert len(trials) <= 3 and trials[0]["optuna_number"] == 0
    assert failed == {t["optuna_number"] for t in trials if t["status"] == "refused"}
    for t in [trials[0], *searched]:  # the study knows each trained trial's validation Dice
        if t["status"] != "refused":
            assert done[t["optuna_number"]] == pytest.approx(t["scores"]["dice"])
    for t in searched:  # within the ranges the guideline's steps reach
        assert 0.01 / 32 <= t["settings"]["lr"] <= 0.01


def test_tune_resumes_after_sigterm_without_retraining_finished_runs(tmp_path, real_store):
    marker = tmp_path / "signalled"
    fault = {
        "name": FAULTS,
        "kwargs": {"step": 3, "sig": "SIGTERM", "marker": str(marker), "run": "trial-02"},
    }
    path = tune_config(tmp_path, real_store, callbacks=[fault])
    out = tmp_path / "out"
    args = ["tune", path, "--workers", "8", "--simulate", "--min-workers", "2", "--max-trials", "2"]
    args += ["--baseline-runs", "1", "--out", out]
    first = cli(*args)
    # SIGTERM in trial 2, at step 3 of 6: it checkpoints and the tuner stops with 75
    assert first.returncode == PREEMPTED_EXIT_CODE, first.stderr[-2000:]
    assert marker.exists() and "rerun the same command to continue" in first.stderr
    state = json.loads((out / "tune.json").read_text())
    assert [t["status"] for t in state["trials"]][-1] == "running"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/model.pt")}
    assert {p.parent.name for p in finished} == {"baseline-1", "trial-01"}
    assert (out / "trial-02" / "checkpoints" / "step_00000003.pt").is_file()

    second = cli(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "baseline 1/1" not in second.stdout and "trial 1:" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not retrained
    resumed = rows(out / "trial-02")
    assert [r["epoch"] for r in resumed][:3] == [1, 2, 3]  # one line per epoch: resumed at step 3
    state = json.loads((out / "tune.json").read_text())
    assert state["trials"][-1]["status"] != "running" and state["decision"]["action"]


def test_tune_cli_help_names_its_options():
    r = subprocess.run(
        [sys.executable, "-m", "segscale.cli", "tune", "--help"], capture_output=True, text=True
    )
    for option in ("--workers", "--simulate", "--baseline", "--max-trials", "--max-hours", "--out"):
        assert option in r.stdout

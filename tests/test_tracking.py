"""Trackers: MLflow (the default, a local SQLite store) mirrors a run; users plug in their own."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, tiny_config
from segscale import worker
from segscale.config import validate
from segscale.engine import plan, prepare_run_dir
from segscale.errors import Preempted, SegscaleError

FAULTS = f"{ROOT / 'tests' / 'plugins' / 'faults.py'}:SignalAt"


def make_run(tmp_path: Path, store: Path, tracker, **train) -> Path:
    cfg = tiny_config(store, **train)
    cfg["tracker"] = tracker
    run_dir = tmp_path / "runs" / "tiny"
    prepare_run_dir(validate(cfg), run_dir, resume=False)
    return run_dir


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_mirrors_the_run_in_a_sqlite_store_beside_it(tmp_path, real_store):
    run_dir = make_run(tmp_path, real_store, "mlflow", epochs=3)
    worker.train(run_dir, progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("segscale").experiment_id])
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["model.name"] == "unet" and run.data.params["train.epochs"] == "3"
    assert run.data.tags["segscale.run_dir"] == str(run_dir)
    # how it was scaled: the config's `workers: null` does not say
    assert (
        run.data.tags["segscale.workers"] == "1" and run.data.tags["segscale.global_batch"] == "4"
    )
    rows = jsonl(run_dir)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["train_loss"]) for r in rows]
    assert client.get_metric_history(run.info.run_id, "val_dice")[-1].value == rows[-1]["val_dice"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "environment.json", "metrics.jsonl"} <= artifacts
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # beside the store, not in the cwd


def test_a_preempted_run_is_killed_in_mlflow_and_its_resume_continues_the_same_run(
    tmp_path, real_store
):
    fault = {"name": FAULTS, "kwargs": {"step": 4, "sig": "SIGTERM", "marker": str(tmp_path / "m")}}
    run_dir = make_run(tmp_path, real_store, "mlflow", epochs=3, callbacks=[fault])
    with pytest.raises(Preempted):
        worker.train(run_dir, progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    assert len(client.get_metric_history(run_id, "train_loss")) == 1  # epoch 1 of 3 was logged

    worker.train(run_dir, resume=True, progress=False)  # the marker exists: no second signal
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == [r["step"] for r in jsonl(run_dir)] == [3, 6, 9]


def test_a_broken_store_is_one_warning_and_training_goes_on(tmp_path, real_store):
    (tmp_path / "a-file").write_text("not a folder")
    bad = {"name": "mlflow", "kwargs": {"uri": f"sqlite:///{tmp_path / 'a-file' / 'x.db'}"}}
    run_dir = make_run(tmp_path, real_store, bad)
    with pytest.warns(UserWarning, match=r"mlflow tracking stopped \(sqlite:///.*a-file"):
        worker.train(run_dir, progress=False)
    assert (run_dir / "model.pt").is_file() and len(jsonl(run_dir)) == 2


def test_a_users_tracker_by_path_and_its_kwargs_checked_before_launch(tmp_path, real_store):
    spec = f"{ROOT / 'tests' / 'plugins' / 'recording_tracker.py'}:RecordingTracker"
    out = tmp_path / "seen.json"
    tracker = {"name": spec, "kwargs": {"out": str(out)}}
    run_dir = make_run(tmp_path, real_store, tracker)
    described = plan(validate({**tiny_config(real_store), "tracker": tracker})).describe()
    assert described["training_strategy"]["tracker"]["source"] == "user"
    worker.train(run_dir, progress=False)
    assert json.loads(out.read_text()) == {
        "run_name": "tiny",
        "lr": 0.01,
        "epochs": [1, 2],
        "error": None,
    }
    with pytest.raises(SegscaleError, match=r"tracker .* kwargs \['outt'\]"):
        plan(
            validate({**tiny_config(real_store), "tracker": {"name": spec, "kwargs": {"outt": 1}}})
        )
    with pytest.raises(SegscaleError, match=r"tracker 'mlflow' kwargs \['url'\]"):
        plan(
            validate(
                {**tiny_config(real_store), "tracker": {"name": "mlflow", "kwargs": {"url": 1}}}
            )
        )


def test_a_tracker_built_to_be_checked_is_closed(tmp_path, real_store):
    """plan builds each tracker once to check its kwargs and hooks; a tracker that opened a run
    (a remote one, W&B-like) when built must have it closed, as finished, before launch."""
    spec = f"{ROOT / 'tests' / 'plugins' / 'recording_tracker.py'}:RecordingTracker"
    out = tmp_path / "seen.json"
    cfg = validate(
        {**tiny_config(real_store), "tracker": {"name": spec, "kwargs": {"out": str(out)}}}
    )
    plan(cfg).check(1)
    assert json.loads(out.read_text()) == {
        "run_name": "tiny",
        "lr": 0.01,
        "epochs": [],
        "error": None,
    }


def test_a_tracker_whose_close_takes_no_error_is_one_error_and_no_warning(tmp_path, real_store):
    import warnings

    from segscale.errors import SegscaleError

    plugin = tmp_path / "bare.py"
    plugin.write_text(
        "class Bare:\n"
        "    def __init__(self, run_dir, run_name, params):\n"
        "        pass\n"
        "    def on_epoch_end(self, trainer, record):\n"
        "        pass\n"
        "    def close(self):\n"
        "        pass\n"
    )
    cfg = validate({**tiny_config(real_store), "tracker": {"name": f"{plugin}:Bare"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning beside the error was the finding
        with pytest.raises(SegscaleError, match=r"close\(self\)|close\(\) cannot be called"):
            plan(cfg).check(1)


def test_a_diverged_run_is_failed_in_mlflow_with_its_reason(tmp_path, real_store):
    from segscale.errors import Diverged

    nan = {"name": FAULTS.replace("SignalAt", "NaNAt"), "kwargs": {"step": 2}}
    run_dir = make_run(tmp_path, real_store, "mlflow", epochs=2, callbacks=[nan])
    with pytest.raises(Diverged, match="training diverged at step 3: loss nan"):
        worker.train(run_dir, progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("segscale").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["segscale.failure"].startswith("Diverged: training diverged at step 3")


def tensorboard_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_mlflow_and_tensorboard_together_each_record_the_run(tmp_path, real_store):
    """`tracker: [mlflow, tensorboard]`: both get the epoch rows, step metrics and the picture;
    a preempted run's resume drops TensorBoard's events past its checkpoint (no doubled curve)."""
    fault = {"name": FAULTS, "kwargs": {"step": 4, "sig": "SIGTERM", "marker": str(tmp_path / "m")}}
    run_dir = make_run(tmp_path, real_store, ["mlflow", "tensorboard"], epochs=3, callbacks=[fault])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["monitor"] = {"log_every": 1, "system_every": 0.05}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    described = plan(validate(config)).describe()["training_strategy"]["tracker"]
    assert described["fills"] == ["mlflow", "tensorboard"]
    with pytest.raises(Preempted):
        worker.train(run_dir, progress=False)
    worker.train(run_dir, resume=True, progress=False)

    rows = jsonl(run_dir)
    events = tensorboard_events(run_dir / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (r["step"], pytest.approx(r["train_loss"], rel=1e-6)) for r in rows
    ]
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 10))
    assert len(events.Images("validation")) == 3
    assert any(tag.startswith("system/") for tag in events.Tags()["scalars"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [3, 6, 9]


def test_a_tracker_list_nests_the_mlflow_one_under_a_parent(real_store):
    from segscale.tracking import nest_under

    cfg = validate({**tiny_config(real_store), "tracker": ["tensorboard", "mlflow"]})
    raw = nest_under(cfg.model_dump(mode="json"), "abc")
    assert raw["tracker"] == [
        {"name": "tensorboard", "kwargs": {}},
        {"name": "mlflow", "kwargs": {"parent_run_id": "abc"}},
    ]
    assert cfg.tracker_config("mlflow").name == "mlflow" and cfg.tracker_config("x") is None
    assert validate({**tiny_config(real_store), "tracker": "none"}).tracker[0].name == "none"


def test_tracker_lists_and_values_are_checked_before_launch(tmp_path, real_store):
    for trackers, message in (
        (["mlflow", "mlflow"], "each tracker once"),
        (["none", "tensorboard"], "'none' means no tracker"),
    ):
        with pytest.raises(SegscaleError, match=message):
            validate({**tiny_config(real_store), "tracker": trackers})
    bad = {"name": "mlflow", "kwargs": {"poll_seconds": -1}}
    with pytest.raises(
        SegscaleError, match=r"poll_seconds -1: expected a number of seconds ≥ 0\.05"
    ):
        plan(validate({**tiny_config(real_store), "tracker": bad})).check(1)
    # a store MLflow cannot open was one warning after the whole run had trained untracked
    bad = {"name": "mlflow", "kwargs": {"uri": "bogus://x"}}
    with pytest.raises(SegscaleError, match="uri bogus://x: MLflow has no tracking store"):
        plan(validate({**tiny_config(real_store), "tracker": bad})).check(1)
    # MLflow 3 only reads its file store: a folder was accepted, then nothing was recorded
    for folder in (str(tmp_path), tmp_path.as_uri()):
        bad = {"name": "mlflow", "kwargs": {"uri": folder}}
        with pytest.raises(SegscaleError, match=r"its file store .* no longer writes; expected"):
            plan(validate({**tiny_config(real_store), "tracker": bad})).check(1)
    from segscale.tracking import MLflowTracker

    MLflowTracker(tmp_path / "r", "r", {}, uri="databricks")  # a URI without "://"
    with pytest.raises(ValueError, match=r"uri '': expected an MLflow tracking URI"):
        MLflowTracker(tmp_path / "r", "r", {}, uri="")
    bad = {"name": "mlflow", "kwargs": {"experiment": " "}}
    with pytest.raises(SegscaleError, match="expected an MLflow experiment name"):
        plan(validate({**tiny_config(real_store), "tracker": bad})).check(1)
    with pytest.raises(SegscaleError, match=r"system_every': expected 0 \(off\) or 0\.05 s"):
        validate({**tiny_config(real_store), "monitor": {"system_every": 0.001}})


def test_a_bad_override_is_named_as_such_with_the_values_it_may_take(tmp_path, real_store):
    from segscale.config import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(real_store)))
    with pytest.raises(
        SegscaleError,
        match=r"override 'train.channels_last=maybe': key 'train.channels_last': expected one of "
        r"auto, true, false, got 'maybe'",
    ):
        load_config(path, ["train.channels_last=maybe"])
    with pytest.raises(
        SegscaleError, match=r"freeze_encoder_epochs': expected a whole number, got 1.5$"
    ):
        load_config(path, ["train.finetune.freeze_encoder_epochs=1.5"])


def test_runs_sharing_a_log_dir_stay_apart_and_tracker_places_are_absolute(
    tmp_path, real_store, monkeypatch
):
    """Two runs with one TensorBoard log_dir interleaved their curves, and a resume purged the
    other's events; a relative log_dir or sqlite path moved with the working directory; a file
    as log_dir failed the run after its records were written."""
    monkeypatch.chdir(tmp_path)
    runs = []
    for name, seed in (("a", 0), ("b", 5)):  # one config name, two run folders
        cfg = {**tiny_config(real_store), "seed": seed}
        cfg["tracker"] = {"name": "tensorboard", "kwargs": {"log_dir": "tb"}}
        config = validate(cfg)
        assert config.tracker[0].kwargs["log_dir"] == str(tmp_path / "tb")
        run_dir = tmp_path / "runs" / name
        prepare_run_dir(config, run_dir, resume=False)
        worker.train(run_dir, progress=False)
        runs.append(run_dir)
    for run_dir in runs:
        events = tensorboard_events(tmp_path / "tb" / run_dir.name)
        rows = jsonl(run_dir)
        assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
            (r["step"], pytest.approx(r["train_loss"], rel=1e-6)) for r in rows
        ]
        assert "run/text_summary" in events.Tags()["tensors"]
    # a run folder of the same name elsewhere would write into the first's events: refused
    cfg = {
        **tiny_config(real_store),
        "tracker": {"name": "tensorboard", "kwargs": {"log_dir": "tb"}},
    }
    other = tmp_path / "elsewhere" / "a"
    prepare_run_dir(validate(cfg), other, resume=False)
    with pytest.raises(SegscaleError, match=r"tb/a holds the events of the run .*runs/a; give"):
        worker.train(other, progress=False)
    kept = tensorboard_events(tmp_path / "tb" / "a").Scalars("train_loss")
    assert len(kept) == len(jsonl(runs[0]))  # the first run's events untouched
    # '' is the default place (it became the working directory)
    cfg["tracker"]["kwargs"]["log_dir"] = ""
    assert validate(cfg).tracker[0].kwargs == {}
    uri = validate(
        {
            **tiny_config(real_store),
            "tracker": {"name": "mlflow", "kwargs": {"uri": "sqlite:///m.db"}},
        }
    )
    assert uri.tracker[0].kwargs["uri"] == f"sqlite:///{tmp_path / 'm.db'}"
    (tmp_path / "afile").write_text("x")
    bad = {"name": "tensorboard", "kwargs": {"log_dir": "afile"}}
    with pytest.raises(SegscaleError, match=r"log_dir .*afile/.*: is inside .*afile, a file"):
        plan(validate({**tiny_config(real_store), "tracker": bad})).check(1)


def test_the_ui_warns_when_the_runs_artifacts_are_recorded_elsewhere(tmp_path):
    """A runs folder moved or copied: MLflow keeps each experiment's artifact folder as an
    absolute path, so the UI showed the old folder's pictures without a word."""
    import warnings

    from segscale.tracking import _artifacts_here

    here = (tmp_path / "moved").resolve()
    old = (tmp_path / "runs" / "mlartifacts").as_uri()
    with pytest.warns(UserWarning, match=r"experiment 'segscale' keeps .* outside .*moved"):
        _artifacts_here(here, [("segscale", old)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _artifacts_here(here, [("segscale", (here / "mlartifacts").as_uri())])
        _artifacts_here(here, [("remote", "s3://bucket/artifacts")])

"""Live monitoring: step metrics every log_every steps, every rank's system metrics, and a stop
asked through the MLflow run's tag, on real runs (MLflow's SQLite store, 2 gloo workers)."""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from segscale import worker
from segscale.config import validate
from segscale.engine import prepare_run_dir
from segscale.errors import PREEMPTED_EXIT_CODE


def client_for(run: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")


def test_step_and_system_metrics_reach_mlflow(tmp_path, real_store):
    cfg = tiny_config(real_store, epochs=2, steps_per_epoch=4)
    cfg["tracker"] = "mlflow"
    cfg["monitor"] = {"log_every": 2, "system_every": 0.1}
    run = tmp_path / "run"
    prepare_run_dir(validate(cfg), run, resume=False)
    worker.train(run, progress=False)

    client = client_for(run)
    run_id = (run / "mlflow_run_id").read_text().strip()
    history = {m: client.get_metric_history(run_id, f"step/{m}") for m in ("loss", "grad_norm")}
    assert [h.step for h in history["loss"]] == [2, 4, 6, 8]
    assert all(math.isfinite(h.value) and h.value > 0 for h in history["grad_norm"])
    wait = client.get_metric_history(run_id, "step/data_wait_fraction")
    assert all(0 <= h.value <= 1 for h in wait)
    assert client.get_metric_history(run_id, "step/images_per_second")[0].value > 0
    # every rank's samples, in its file and in MLflow under system/<node>/<rank>/
    node = socket.gethostname()
    samples = (run / "system" / f"{node}-rank0.jsonl").read_text().splitlines()
    assert samples and {"cpu_percent", "rss_gb", "host_memory_percent"} <= set(
        json.loads(samples[0])
    )
    rss = client.get_metric_history(run_id, f"system/{node}/0/rss_gb")
    assert len(rss) == len(samples) and all(0 < h.value < 64 for h in rss)
    # each validation's picture grid: in the run folder, named by its epoch's row, in MLflow
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    pictures = [row["validation_picture"] for row in rows]
    assert pictures == ["pictures/validation_epoch001.png", "pictures/validation_epoch002.png"]
    assert all((run / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
    logged = {a.path for a in client.list_artifacts(run_id, "validation")}
    assert logged == {"validation/validation_epoch001.png", "validation/validation_epoch002.png"}


def test_validation_pictures_show_fixed_slices_with_their_dice(tmp_path, real_store):
    """The watched slices are the same every time, each with its most foreground; the Dice shown
    is the slice's: 1 for a model that predicts the reference, 0 for one that predicts nothing."""
    import numpy as np
    import torch

    from segscale.evaluation import plot_examples, slice_examples, validation_slices
    from segscale.imgmed import Store

    store = Store.open(real_store)
    slices = validation_slices(store, "train", 2)
    assert slices == validation_slices(store, "train", 2) and len(slices) == 2
    # a split of fewer cases than slices asked: several of each, all with foreground, no repeat
    (val_case,) = store.cases("val")
    more = validation_slices(store, "val", 4)
    assert len(more) == len(set(more)) == 4 and {c for c, _ in more} == {val_case["id"]}
    assert all(np.asarray(store.masks[row]).any() for _, row in more)
    first = np.asarray(store.masks[val_case["start"] : val_case["start"] + val_case["count"]])
    assert more[0][1] - val_case["start"] == int(np.argmax((first > 0).sum((1, 2))))
    cases = {c["id"]: c for c in store.cases("train")}
    for case, row in slices:
        c = cases[case]
        fg = (np.asarray(store.masks[c["start"] : c["start"] + c["count"]]) > 0).sum((1, 2))
        assert fg[row - c["start"]] == fg.max() > 0

    masks = {
        row: torch.from_numpy(np.asarray(store.masks[row]).astype(np.int64)) for _, row in slices
    }

    class Oracle(torch.nn.Module):  # one-hot logits of the reference of each row in the batch
        def __init__(self, rows):
            super().__init__()
            self.rows = rows

        def forward(self, x):
            ref = torch.stack([masks[r] for r in self.rows])
            return torch.nn.functional.one_hot(ref, store.num_classes).permute(0, 3, 1, 2).float()

    perfect = slice_examples(Oracle([r for _, r in slices]), store, slices)
    assert [e.dice for e in perfect] == [1.0, 1.0]
    assert all((e.prediction == e.reference).all() for e in perfect)
    background = torch.nn.Conv2d(store.in_channels, store.num_classes, 1)
    torch.nn.init.zeros_(background.weight)
    with torch.no_grad():
        background.bias.copy_(torch.tensor([1.0] + [0.0] * (store.num_classes - 1)))
    assert [e.dice for e in slice_examples(background, store, slices)] == [0.0, 0.0]
    plot_examples(perfect, tmp_path / "grid.png", store.num_classes, "epoch 1")
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_the_interval_loss_is_the_mean_over_its_steps(tmp_path, real_store):
    """log_every = steps per epoch: each interval is an epoch, so its loss is the epoch's."""

    class Rows:
        def __init__(self):
            self.rows = []

        def on_log(self, trainer, row):
            self.rows.append(row)

    from segscale.config import load_config
    from segscale.engine import plan

    cfg = validate(
        {**tiny_config(real_store, epochs=2, steps_per_epoch=3), "monitor": {"log_every": 3}}
    )
    run = tmp_path / "run"
    prepare_run_dir(cfg, run, resume=False)
    p = plan(load_config(run / "config.yaml"))
    strategy = p.strategy()
    rows = Rows()
    history = p.trainer(strategy, run, [rows], progress=False).fit()
    strategy.close()
    assert [r["step"] for r in rows.rows] == [3, 6]
    for row, epoch in zip(rows.rows, history):
        assert row["loss"] == pytest.approx(epoch["train_loss"], rel=1e-9)
        assert row["lr"] == epoch["lr"] and row["epoch"] == epoch["epoch"]


def test_the_mlflow_stop_tag_stops_a_two_worker_run_which_resumes(tmp_path, real_store):
    from conftest import ROOT

    # rank 0 waits at step 3 until the tag is seen (by the tracker's own thread), so the run
    # cannot end before it on a fast machine, nor take long on a slow one
    cfg = tiny_config(real_store, epochs=6, steps_per_epoch=2)
    ready, go = tmp_path / "at-step-3", tmp_path / "go"
    pause = {"step": 3, "ready": str(ready), "go": str(go), "timeout": 120}
    cfg["train"]["callbacks"] = [
        {"name": f"{ROOT / 'tests' / 'plugins' / 'faults.py'}:PauseAt", "kwargs": pause}
    ]
    cfg["tracker"] = {"name": "mlflow", "kwargs": {"poll_seconds": 0.3}}
    cfg["monitor"] = {"log_every": 2, "system_every": 0.2}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "tagged"
    cmd = [sys.executable, "-m", "segscale.cli", "train", path, "--workers", "2", "--run-dir", run]
    proc = subprocess.Popen(
        list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (ready.is_file() and (run / "mlflow_run_id").is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = client_for(run)
    client.set_tag(run_id, "segscale.stop", "true")  # as the MLflow UI does
    while client.get_run(run_id).data.tags["segscale.stop"] != "seen":
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    go.touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "stopped by the MLflow tag segscale.stop" in err
    assert not (run / "model.pt").exists() and list((run / "checkpoints").glob("step_*.pt"))
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.tags["segscale.stop"] == "seen"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs and max(e["epoch"] for e in epochs) < 6  # stopped before the end
    # resumed: not stopped again by the old tag, finished, the same MLflow run
    done = subprocess.run(
        list(map(str, [*cmd, "--resume"])), capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.pt").is_file() and client.get_run(run_id).info.status == "FINISHED"
    # both ranks' system metrics and the step metrics, in the one MLflow run
    node = socket.gethostname()
    logged = client.get_run(run_id).data.metrics
    for rank in (0, 1):
        assert 0 < logged[f"system/{node}/{rank}/rss_gb"] < 64
        assert f"system/{node}/{rank}/cpu_percent" in logged
    assert logged["step/loss"] > 0 and logged["step/images_per_second"] > 0


def stopped_once(tmp_path: Path, store: Path, step: int, **train) -> tuple[Path, Path]:
    """(config, run folder) of a 2-epoch run of 4 steps an epoch, tracked by MLflow with every
    step logged, that `segscale stop --now` stops once, at the end of `step`."""
    from conftest import ROOT

    cfg = tiny_config(store, epochs=2, steps_per_epoch=4, **train)
    stop = {"step": step, "rank": 0, "now": True, "marker": str(tmp_path / "stopped")}
    faults = f"{ROOT / 'tests' / 'plugins' / 'faults.py'}:StopAt"
    cfg["train"]["callbacks"] = [{"name": faults, "kwargs": stop}]
    cfg["tracker"] = {"name": "mlflow", "kwargs": {"poll_seconds": 0.1}}
    cfg["monitor"] = {"log_every": 1, "system_every": 0}
    path, run = tmp_path / "c.yaml", tmp_path / "runs" / "r"
    path.write_text(yaml.safe_dump(cfg))
    return path, run


def test_a_resume_logs_the_steps_past_its_checkpoint_once_and_clears_a_stale_stop_tag(
    tmp_path, real_store
):
    """`segscale stop --now` at step 5 (last checkpoint at 4), then --resume: steps 5.. are
    trained again; MLflow had them twice, the curves doubling back. And a stop tag set on the
    run while it was not running stopped the next resume at once."""
    from conftest import cli

    path, run = stopped_once(tmp_path, real_store, 5, checkpoint_every=2)
    r = cli("train", path, "--run-dir", run)
    assert r.returncode == PREEMPTED_EXIT_CODE, r.stderr[-2000:]
    client, run_id = client_for(run), (run / "mlflow_run_id").read_text().strip()
    first = {m.step: m.value for m in client.get_metric_history(run_id, "step/loss")}
    assert sorted(first) == [1, 2, 3, 4, 5]
    client.set_tag(run_id, "segscale.stop", "true")  # on a run that is not running
    r = cli("train", path, "--run-dir", run, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "segscale.stop = true was set while the run was not running; cleared" in r.stderr
    assert client.get_run(run_id).data.tags["segscale.stop"] == "seen"
    history = client.get_metric_history(run_id, "step/loss")
    assert [m.step for m in history] == list(range(1, 9))  # each step once, in order
    assert {m.step: m.value for m in history if m.step <= 5} == first
    epochs = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in epochs] == [4, 8]


def test_a_stop_at_an_epochs_last_step_keeps_that_epochs_mlflow_row(tmp_path, real_store):
    """Stopped at step 4, the last of epoch 1 (its step row logged, its epoch row not yet):
    the resumed run skipped every row up to step 4, the epoch's too."""
    from conftest import cli

    path, run = stopped_once(tmp_path, real_store, 4)
    assert cli("train", path, "--run-dir", run).returncode == PREEMPTED_EXIT_CODE
    assert cli("train", path, "--run-dir", run, "--resume").returncode == 0
    client, run_id = client_for(run), (run / "mlflow_run_id").read_text().strip()
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [4, 8]
    assert [m.step for m in client.get_metric_history(run_id, "step/loss")] == list(range(1, 9))


def _train_output(cfg_path: Path, run: Path, terminal: bool) -> str:
    """`segscale train` run as a user runs it, its output on a pseudo-terminal or a pipe."""
    import pty

    command = [sys.executable, "-m", "segscale.cli", "train", str(cfg_path), "--run-dir", str(run)]
    env = {**os.environ, "COLUMNS": "120"}
    if not terminal:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_the_console_is_one_live_table_on_a_terminal_and_lines_elsewhere(tmp_path, real_store):
    cfg = tiny_config(real_store, epochs=2, steps_per_epoch=2)
    cfg["monitor"] = {"log_every": 1}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    shown = _train_output(cfg_path, tmp_path / "tty", terminal=True)
    assert "val Dice" in shown and "ETA" in shown and "CPU" in shown
    assert "│   1/2 │" in shown and "│   2/2 │" in shown  # a row per finished epoch
    assert "\x1b[" in shown and "epoch 1/2  loss" not in shown  # redrawn in place, no lines
    final = json.loads((tmp_path / "tty" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{final['train_loss']:.4f}" in shown

    logged = _train_output(cfg_path, tmp_path / "pipe", terminal=False)
    assert "epoch 1/2  loss" in logged and "epoch 2/2  loss" in logged
    assert "\x1b[" not in logged and "│" not in logged


def test_a_system_file_that_cannot_be_written_stops_sampling_with_one_warning(tmp_path):
    import threading
    import warnings

    from segscale.monitor import SystemSampler

    sampler = SystemSampler(tmp_path, rank=0, interval=0.01)
    sampler.path.mkdir(parents=True)  # a folder where its file would be: open() fails
    seen = []
    hook, threading.excepthook = threading.excepthook, lambda args: seen.append(args)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler.start()
            time.sleep(0.2)
            sampler.stop()
    finally:
        threading.excepthook = hook
    assert not seen  # no exception escaped the thread (it used to print a traceback)
    assert any("system sampling stopped" in str(w.message) for w in caught)


def test_more_pictures_than_the_validation_split_can_show_is_a_note(real_store):
    """monitor.pictures above the validation split's slices with foreground drew fewer pictures
    without a word."""
    import numpy as np

    from conftest import tiny_config
    from segscale.config import validate
    from segscale.engine import plan
    from segscale.imgmed import Store

    (case,) = Store.open(real_store).cases("val")
    masks = np.asarray(Store.open(real_store).masks[case["start"] : case["start"] + case["count"]])
    showable = int(masks.reshape(len(masks), -1).any(1).sum())
    for count, notes in ((showable, 0), (showable + 1, 1), (0, 0)):
        cfg = tiny_config(real_store)
        cfg["monitor"] = {"pictures": count}
        found = plan(validate(cfg)).picture_notes()
        assert len(found) == notes, found
    assert (
        found == []
        and f"has {showable} slice(s) to show"
        in plan(validate({**cfg, "monitor": {"pictures": 99}})).picture_notes()[0]
    )

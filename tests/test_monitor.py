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
    # long enough that the tag is seen before the end on a fast machine (about 0.1 s an epoch)
    cfg = tiny_config(real_store, epochs=150, steps_per_epoch=2)
    cfg["tracker"] = {"name": "mlflow", "kwargs": {"poll_seconds": 0.3}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "tagged"
    cmd = [sys.executable, "-m", "segscale.cli", "train", path, "--workers", "2", "--run-dir", run]
    proc = subprocess.Popen(
        list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not ((run / "mlflow_run_id").is_file() and (run / "metrics.jsonl").is_file()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = client_for(run)
    client.set_tag(run_id, "segscale.stop", "true")  # as the MLflow UI does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "stopped by the MLflow tag segscale.stop" in err
    assert not (run / "model.pt").exists() and list((run / "checkpoints").glob("step_*.pt"))
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.tags["segscale.stop"] == "seen"
    stopped_at = len((run / "metrics.jsonl").read_text().splitlines())
    assert stopped_at < 150
    # resumed: not stopped again by the old tag, finished, the same MLflow run
    done = subprocess.run(
        list(map(str, [*cmd, "--resume"])), capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "model.pt").is_file() and client.get_run(run_id).info.status == "FINISHED"

"""Checkpoint/restart: a killed or preempted run ends with the weights of an uninterrupted one."""

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, cli, tiny_config
from segscale import worker
from segscale.config import validate
from segscale.engine import prepare_run_dir
from segscale.errors import PREEMPTED_EXIT_CODE, SegscaleError

FAULTS = f"{ROOT / 'tests' / 'plugins' / 'faults.py'}:SignalAt"


def config(tmp_path: Path, store: Path, name: str, **callback) -> Path:
    cfg = tiny_config(store, epochs=3, steps_per_epoch=5, checkpoint_every=2, keep_checkpoints=2)
    cfg["data"]["augment"] = {"enabled": True, "rotation": 20, "flip": True}
    cfg["model"]["kwargs"]["dropout"] = 0.2  # exercises the per-rank dropout RNG state
    cfg["train"]["callbacks"] = [
        {"name": FAULTS, "kwargs": {"marker": str(tmp_path / f"{name}.fired"), **callback}}
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, run: Path, *args: object) -> subprocess.CompletedProcess:
    return cli("train", config, "--run-dir", run, *args, timeout=600)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (
        torch.load(a / "model.pt", weights_only=True),
        torch.load(b / "model.pt", weights_only=True),
    )
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def reference(tmp_path: Path, store: Path, **callback) -> tuple[Path, Path]:
    """The uninterrupted run of the same config (its fault marker already exists, so nothing fires)."""
    cfg = config(tmp_path, store, "ref", **callback)
    (tmp_path / "ref.fired").touch()
    run = tmp_path / "ref"
    r = train(cfg, run, "--workers", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, run


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_sigkilled_worker_is_restarted_by_torchrun_and_ends_bit_identical(tmp_path, real_store):
    kill = {"step": 7, "sig": "SIGKILL", "rank": 1}  # mid-epoch 2, one step after a checkpoint
    _, ref = reference(tmp_path, real_store, **kill)
    run = tmp_path / "killed"
    r = train(
        config(tmp_path, real_store, "killed", **kill), run, "--workers", 2, "--max-restarts", 1
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "killed.fired").exists()  # the fault did happen
    assert "a worker failed: restarting all workers (restart 1 of 1)" in r.stderr, r.stderr
    assert same_weights(ref, run)
    assert [m["train_loss"] for m in metrics(run)] == [m["train_loss"] for m in metrics(ref)]


@pytest.mark.distributed
def test_sigterm_preemption_checkpoints_exits_75_and_resumes_exactly(tmp_path, real_store):
    term = {"step": 7, "sig": "SIGTERM", "rank": 0, "target": "agent"}
    _, ref = reference(tmp_path, real_store, **term)
    cfg, run = config(tmp_path, real_store, "pre", **term), tmp_path / "pre"
    r = train(cfg, run, "--workers", 2)
    # the agent runs in the CLI process: a signal to it is a signal to `segscale train`, which
    # exits 75 as with one worker when every worker stopped with the checkpoint (was: 143)
    assert r.returncode == PREEMPTED_EXIT_CODE, r.stderr[-3000:]
    assert r.stderr.count("preempted: stopped by a signal") == 1, r.stderr[-3000:]
    assert "death signal" not in r.stderr
    assert not (run / "model.pt").exists()
    r = train(cfg, run, "--workers", 2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_weights(ref, run)


@pytest.mark.distributed
def test_a_preempted_worker_gives_the_run_its_exit_code(tmp_path, real_store):
    """One worker of two gets SIGTERM: both checkpoint at the same step and stop; the launcher
    passes on the workers' code (75), not torchrun's blanket 1."""
    cfg = config(tmp_path, real_store, "one", step=3, sig="SIGTERM", rank=1)
    r = train(cfg, tmp_path / "one", "--workers", 2)
    assert r.returncode == PREEMPTED_EXIT_CODE, r.stderr[-3000:]
    assert "stopped by a signal at step 3" in r.stderr


def in_process_run(tmp_path: Path, store: Path, name: str, **train_kw) -> Path:
    cfg = validate(
        tiny_config(
            store, epochs=2, steps_per_epoch=4, checkpoint_every=2, keep_checkpoints=5, **train_kw
        )
    )
    run = tmp_path / name
    prepare_run_dir(cfg, run, resume=False)
    worker.train(run, progress=False)
    return run


def test_single_process_sigterm_exits_with_the_preemption_code(tmp_path, real_store):
    cfg = tiny_config(real_store, epochs=2, steps_per_epoch=4)
    cfg["train"]["callbacks"] = [
        {"name": FAULTS, "kwargs": {"step": 3, "sig": "SIGTERM", "marker": str(tmp_path / "m")}}
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = train(path, tmp_path / "run")
    assert r.returncode == PREEMPTED_EXIT_CODE, r.stderr[-2000:]
    assert "stopped by a signal at step 3" in r.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == [
        "step_00000003.pt"
    ]


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, real_store):
    full = in_process_run(tmp_path, real_store, "full")
    cut = in_process_run(tmp_path, real_store, "cut")
    latest = cut / "checkpoints" / "step_00000008.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # torn, as by a crash mid-copy
    (cut / "checkpoints" / "step_00000006.pt.sha256").unlink()  # and one whose write never finished
    (cut / "model.pt").unlink()
    with (
        pytest.warns(UserWarning, match=r"skipping .*step_00000008.pt \(checksum mismatch"),
        pytest.warns(UserWarning, match=r"skipping .*step_00000006.pt \(no checksum file"),
    ):
        worker.train(cut, resume=True, progress=False)
    assert same_weights(full, cut)  # resumed from step 4 and still exact
    # the damaged ones are set aside: the newest valid checkpoints are the ones kept
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert "step_00000008.pt.damaged" in names and "step_00000006.pt.damaged" in names
    full_names = sorted(p.name for p in (full / "checkpoints").glob("step_*.pt"))
    assert sorted(p.name for p in (cut / "checkpoints").glob("step_*.pt")) == full_names


def test_checkpoint_of_another_model_is_refused(tmp_path, real_store):
    other = in_process_run(tmp_path, real_store, "other")
    cfg = validate(tiny_config(real_store, epochs=2, steps_per_epoch=4, checkpoint_every=2))
    cfg.model.kwargs["base_channels"] = 8
    run = tmp_path / "mine"
    prepare_run_dir(cfg, run, resume=False)
    (run / "checkpoints").symlink_to(other / "checkpoints")
    with pytest.raises(SegscaleError, match="written by a different configuration or model"):
        worker.train(run, resume=True, progress=False)


def test_a_failed_checkpoint_write_is_a_clear_error_and_leaves_no_partial_file(
    tmp_path, real_store
):
    """A file-size limit makes the OS refuse the write (EFBIG), as a full disk would (ENOSPC)."""
    cfg = tiny_config(real_store, epochs=1, steps_per_epoch=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cmd = [sys.executable, "-m", "segscale.cli", "train", str(path), "--run-dir", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (
        "cannot write" in r.stderr and "File too large" in r.stderr and "Traceback" not in r.stderr
    )
    assert list((run / "checkpoints").iterdir()) == []  # no torn or temporary file left behind


def test_fused_simulation_resumes_mid_epoch_exactly(tmp_path, real_store):
    """Two simulated workers in one pass (ghost BatchNorm): resumed from the mid-epoch checkpoint
    at step 6, the run ends with the uninterrupted run's weights and BatchNorm statistics."""
    fused = {"simulate_workers": 2, "simulate_fused": True}
    full = in_process_run(tmp_path, real_store, "full", **fused)
    cut = in_process_run(tmp_path, real_store, "cut", **fused)
    for path in (cut / "checkpoints").glob("step_00000008.pt*"):
        path.unlink()
    (cut / "model.pt").unlink()
    step6 = cut / "checkpoints" / "step_00000006.pt"
    written = step6.stat().st_mtime_ns
    worker.train(cut, resume=True, progress=False)
    assert step6.stat().st_mtime_ns == written  # resumed after it, not retrained from the start
    assert (cut / "checkpoints" / "step_00000008.pt").exists()
    assert same_weights(full, cut)


def plugin_config(tmp_path: Path, store: Path, plugin: str, kwargs: dict, **train) -> Path:
    """The tiny config with one fault plug-in of tests/plugins/faults.py as its callback."""
    cfg = tiny_config(store, **train)
    cfg["train"]["callbacks"] = [{"name": FAULTS.replace("SignalAt", plugin), "kwargs": kwargs}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.distributed
@pytest.mark.parametrize("kill", [False, True], ids=["raises", "sigkill"])
def test_the_first_failure_is_the_runs_error(tmp_path, real_store, kill):
    """Rank 1 fails at step 3; rank 0 then fails on its closed connection. The run's error is
    rank 1's (was: only rank 0's secondary gloo error, "worker 0 failed ...")."""
    kwargs = {"step": 3, "kill": kill}
    path = plugin_config(tmp_path, real_store, "RaiseAt", kwargs, epochs=1, steps_per_epoch=5)
    r = train(path, tmp_path / "run", "--workers", 2)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    if kill:  # seen by torchrun, or inferred from the silence of a worker that never reported
        assert errors[0].startswith("error: worker 1 ") and "SIGKILL" in errors[0]
    else:  # a user's callback raising: its own line (the hook, the error, where in its code)
        own = "error: callback RaiseAt.on_step_end raised ZeroDivisionError: rank 1 divides by "
        assert errors[0].startswith(own) and "faults.py:" in errors[0]
        assert errors[1].startswith("error: worker 1 on ") and "failed first: callback" in errors[1]
        errors = [errors[1], *errors[2:]]
    # rank 0's own failure, when torchrun did not stop it first, is named as a consequence
    assert all(e.startswith("error: worker 0 failed, after worker 1 (") for e in errors[1:])
    assert len(errors) <= 2 and "Connection" not in errors[0], r.stderr


def test_explain_failure_puts_the_root_cause_first(tmp_path):
    """Reports as workers write them: the earliest error that does not follow from a peer's is
    the root cause, even when a secondary one was written first."""
    from types import SimpleNamespace

    from segscale.launch import explain_failure

    def report(rank, time, error, follows):
        tb = f"Traceback (most recent call last):\n{error}\n"
        data = {"rank": rank, "node": "n1", "attempt": 0, "time": time, "error": error}
        data |= {"user_error": False, "follows_from_peer": follows, "traceback": tb}
        (tmp_path / f"attempt0-rank{rank}.json").write_text(json.dumps(data))

    report(0, 10.0, "RuntimeError: Connection reset by peer", True)
    report(2, 10.5, "RuntimeError: Connection closed by peer", True)
    report(1, 11.0, "ValueError: bad batch", False)
    failed = {r: SimpleNamespace(exitcode=1, message="") for r in (0, 1, 2)}
    lines = explain_failure(failed, tmp_path, range(3)).splitlines()
    assert lines[0] == "error: worker 1 on n1 failed first, with this error:"
    assert "ValueError: bad batch" in lines
    assert lines[-2:] == [
        "error: worker 0 failed, after worker 1 (RuntimeError: Connection reset by peer)",
        "error: worker 2 failed, after worker 1 (RuntimeError: Connection closed by peer)",
    ]


def test_divergence_guard_unit():
    from segscale.train import DivergenceGuard

    guard = DivergenceGuard(factor=10, patience=3, smoothing=0.0)
    assert [guard.update(v) for v in (1.0, 0.5, 0.1, 2.0, 0.1)] == [None] * 5  # one spike
    assert guard.update(2.0) is None and guard.update(2.0) is None
    assert "above 10× its lowest 0.1 for 3 steps" in guard.update(2.0)
    assert DivergenceGuard().update(float("nan")) == "loss nan"


@pytest.mark.parametrize(
    ("checkpoint_every", "kept"), [(None, []), (2, ["step_00000002.pt"])], ids=["epoch", "every-2"]
)
def test_read_every_n_steps_the_guard_names_the_diverged_step_and_saves_nothing_after_it(
    tmp_path, real_store, checkpoint_every, kept
):
    """train.check_every 5 (a GPU runs ahead of the host between reads): the NaN of step 3 is
    read at the next check (step 4's checkpoint, or step 5, the epoch's end), named as step 3,
    and no checkpoint after step 2 is written."""
    from segscale.errors import Diverged

    nan = {"name": FAULTS.replace("SignalAt", "NaNAt"), "kwargs": {"step": 2}}
    cfg = tiny_config(
        real_store,
        epochs=2,
        steps_per_epoch=5,
        check_every=5,
        checkpoint_every=checkpoint_every,
        callbacks=[nan],
    )
    run_dir = tmp_path / "run"
    prepare_run_dir(validate(cfg), run_dir, resume=False)
    with pytest.raises(Diverged, match=r"training diverged at step 3: loss nan, lr 0.01 "):
        worker.train(run_dir, progress=False)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == kept
    assert not (run_dir / "model.pt").exists()


def test_a_resumed_run_diverges_where_the_uninterrupted_one_did(tmp_path, real_store):
    """The guard's state travels in the checkpoint (was: a resume after a divergence took the
    runaway loss as its new baseline, trained on and saved the diverged model, exit 0)."""
    from segscale.errors import Diverged

    cfg = tiny_config(
        real_store, epochs=3, steps_per_epoch=5, checkpoint_every=2, loss="ce",
        optimizer={"name": "sgd", "lr": 30.0},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    prepare_run_dir(validate(cfg), run_dir, resume=False)
    with pytest.raises(Diverged) as first:
        worker.train(run_dir, progress=False)
    assert "training diverged at step 6: smoothed loss" in str(first.value)
    with pytest.raises(Diverged) as again:
        worker.train(run_dir, resume=True, progress=False)  # from step 4's checkpoint
    assert str(again.value) == str(first.value)
    assert not (run_dir / "model.pt").exists()


@pytest.mark.distributed
def test_a_nan_loss_stops_both_workers_at_that_step_keeping_the_checkpoints_before(
    tmp_path, real_store
):
    path = plugin_config(
        tmp_path, real_store, "NaNAt", {"step": 3}, epochs=2, steps_per_epoch=5, checkpoint_every=2
    )
    run = tmp_path / "run"
    r = train(path, run, "--workers", 2)
    assert r.returncode == 3, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: training diverged at step 4: loss nan, lr 0.02 (a too high lr is the usual "
        "cause: lower train.optimizer.lr or lengthen the warmup); the checkpoints before this "
        "step are kept"
    ], r.stderr
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert steps == ["step_00000002.pt"]  # step 4's NaN weights were never saved
    assert not (run / "model.pt").exists()


def test_a_running_training_holds_its_folder_and_stop_tells_running_from_stopped(
    tmp_path, real_store
):
    ready, go = tmp_path / "ready", tmp_path / "go"
    path = plugin_config(
        tmp_path,
        real_store,
        "PauseAt",
        {"step": 1, "ready": str(ready), "go": str(go)},
        epochs=2,
        steps_per_epoch=4,
    )
    run = tmp_path / "run"
    args = [sys.executable, "-m", "segscale.cli", "train", path, "--run-dir", run]
    first = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # paused after step 1, its lock held
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = train(path, run, "--resume")  # a second training into the same folder
        assert second.returncode == 2, second.stderr
        assert re.search(
            rf"{run}: a training is running in it \(pid {first.pid} on ", second.stderr
        )
        asked = cli("stop", run)
        assert asked.returncode == 0, asked.stderr
        go.touch()
        assert first.wait(timeout=300) == PREEMPTED_EXIT_CODE, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert "stopped by `segscale stop` at step 1" in first.stderr.read()  # the paused step
    # stopped: nothing holds the folder, and a stop asked now has nothing to stop
    late = cli("stop", run)
    assert late.returncode == 2 and "no training is running in it" in late.stderr
    resumed = train(path, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "model.pt").is_file() and not (run / "STOP").exists()


def test_the_run_lock_is_released_with_its_holder_not_with_forked_children(tmp_path):
    """A data-loading process forked while rank 0 holds the lock can outlive rank 0 by seconds;
    it must not keep the folder locked (an immediate --resume would be refused)."""
    import multiprocessing

    from segscale._files import held_lock, lock_holder

    lock = tmp_path / ".running"
    with held_lock(lock, what="busy"):
        assert lock_holder(lock).startswith(f"pid {os.getpid()} on ")
        second = held_lock(lock, wait=0.3, what="busy")
        with pytest.raises(SegscaleError, match=r": busy \(pid \d+ on .* since "):
            second.__enter__()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
    try:
        deadline = time.monotonic() + 10  # the child closes its copy as it starts
        while lock_holder(lock) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock_holder(lock) is None and child.is_alive()
    finally:
        child.terminate()
        child.join()


@pytest.mark.distributed
def test_segscale_stop_stops_both_workers_within_a_step_and_resume_finishes(tmp_path, real_store):
    path = plugin_config(tmp_path, real_store, "StopAt", {"step": 2}, epochs=2, steps_per_epoch=4)
    run = tmp_path / "run"
    r = train(path, run, "--workers", 2)
    assert r.returncode == PREEMPTED_EXIT_CODE, r.stderr
    # rank 0 sees the request rank 1 wrote at the end of step 2, or of the next step at the latest
    found = re.search(r"stopped by `segscale stop` at step ([23]); checkpoint saved", r.stderr)
    assert found, r.stderr
    saved = [p.name for p in (run / "checkpoints").glob("step_*.pt")]
    assert saved == [f"step_0000000{found.group(1)}.pt"]
    r = train(path, run, "--workers", 2, "--resume")  # the stopper fired at step 2 only
    assert r.returncode == 0, r.stderr
    assert (run / "model.pt").is_file() and not (run / "STOP").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    r = cli("stop", run)
    assert r.returncode == 2 and "the run has finished" in r.stderr
    r = cli("stop", tmp_path / "nowhere")  # was: "not a run folder (no config.yaml)"
    assert r.returncode == 2 and "nowhere: no such file or folder" in r.stderr


def test_a_started_run_folder_is_continued_only_when_asked(tmp_path, real_store, capsys):
    cfg = validate(tiny_config(real_store))
    run = tmp_path / "run"
    prepare_run_dir(cfg, run, resume=False)
    (run / "checkpoints").mkdir()
    # torchrun's own form, a run folder: without --resume it would have trained from scratch
    # over the folder's checkpoints
    assert worker.main(["train", str(run)]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    (run / "config.yaml").unlink()
    with pytest.raises(SegscaleError, match=r"has checkpoints but no config\.yaml"):
        prepare_run_dir(cfg, run, resume=True)
    assert not (run / "config.yaml").exists()  # the refused config was not written in its place


def test_resuming_on_other_workers_says_so_and_keeps_the_earlier_record(tmp_path, real_store):
    """From an epoch end a run may resume on other workers; the global batch and the scaled lr
    change with it, so `train --resume` warns and environment.json keeps what it trained with
    before (was: silently rewritten as if the whole run had the new setting)."""
    from conftest import trained_run
    from segscale.cli import _say_rescaled
    from segscale.config import load_config
    from segscale.repro import RESUMABLE, earlier_records

    run = trained_run(real_store, tmp_path / "run")
    env = json.loads((run / "environment.json").read_text())
    assert env["workers"] == 1 and env["earlier"] == []
    now = {**env, "workers": 2, "global_batch": 8, "peak_lr": 2 * env["peak_lr"]}
    assert earlier_records(run / "environment.json", now, True) == [
        {k: env.get(k) for k in RESUMABLE}
    ]
    assert earlier_records(run / "environment.json", env, True) == []  # same settings
    assert earlier_records(run / "environment.json", now, False) == []  # a new run
    cfg = load_config(run / "config.yaml")
    with pytest.warns(
        UserWarning, match=r"run trained on 1 worker\(s\) and resumes on 2: the global"
    ):
        _say_rescaled(run, cfg, 2)
    r = cli("train", run / "config.yaml", "--run-dir", run, "--resume")
    assert r.returncode == 0 and "finished already (model.pt); nothing to train" in r.stdout


@pytest.mark.distributed
def test_workers_end_with_a_killed_launcher(tmp_path, real_store):
    """SIGKILL of `segscale train` (the out-of-memory killer, a scheduler after its grace
    period) left its workers training on, then waiting for it forever. They now stop as if
    preempted, with a checkpoint, and nothing the launcher started is left; --resume finishes."""
    import psutil

    ready, go = tmp_path / "ready", tmp_path / "go"
    kwargs = {"step": 2, "ready": str(ready), "go": str(go)}
    path = plugin_config(tmp_path, real_store, "PauseAt", kwargs, epochs=2, steps_per_epoch=4)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "segscale.cli", "train", path, "--run-dir", run, "--workers", 2]
    launcher = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # rank 0 paused after step 2
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        started = psutil.Process(launcher.pid).children(recursive=True)
        launcher.kill()
        launcher.wait()
        go.touch()
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, [p.cmdline()[:4] for p in alive]
    finally:
        for p in psutil.Process().children(recursive=True):  # never leave them to the suite
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt"]
    resumed = train(path, run, "--resume", "--workers", 2)
    assert resumed.returncode == 0, resumed.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_best_pt_is_written_before_the_step_checkpoint_that_records_it(tmp_path):
    """A step checkpoint holds the best metric so far; were it written before best.pt and
    best.pt then failed (a full disk), a resumed run would keep a stale best.pt for good."""
    from segscale.checkpoint import write_checkpoint

    state = {"step": 5, "model": {}, "best_metric": 0.9}
    (tmp_path / "checkpoints" / "best.pt").mkdir(parents=True)  # best.pt cannot be written
    with pytest.raises(SegscaleError, match=r"cannot write .*best.pt"):
        write_checkpoint(tmp_path, state, keep=3, best=True)
    assert not list((tmp_path / "checkpoints").glob("step_*"))
    (tmp_path / "checkpoints" / "best.pt").rmdir()
    path = write_checkpoint(tmp_path, state, keep=3, best=True)
    assert path.read_bytes() == (tmp_path / "checkpoints" / "best.pt").read_bytes()


LATE_STOP = """
from pathlib import Path

class LateStop:  # `segscale stop` arriving after the last check of the run
    def on_validation_end(self, trainer, record):
        if record["epoch"] == trainer.epochs:
            (Path(trainer.run_dir) / "STOP").write_text("graceful")
"""


def test_a_stop_that_comes_after_the_last_check_is_said_and_cleared(tmp_path, real_store):
    (tmp_path / "late.py").write_text(LATE_STOP)
    cfg = tiny_config(real_store, epochs=1, steps_per_epoch=1)
    cfg["train"]["callbacks"] = [f"{tmp_path / 'late.py'}:LateStop"]
    run = tmp_path / "run"
    prepare_run_dir(validate(cfg), run, resume=False)
    with pytest.warns(UserWarning, match="came too late: it has finished"):
        worker.train(run, progress=False)
    assert (run / "model.pt").is_file() and not (run / "STOP").exists()


def test_a_mid_epoch_resume_on_other_workers_is_refused_before_they_start(tmp_path, real_store):
    """It was refused by every worker once started (the error twice, torch's shutdown lines)."""
    run = in_process_run(tmp_path, real_store, "mid")  # checkpoints every 2 of 4 steps per epoch
    for late in ("step_00000004.pt", "step_00000006.pt", "step_00000008.pt"):
        (run / "checkpoints" / late).unlink()
    (run / "model.pt").unlink()
    r = cli("train", run / "config.yaml", "--run-dir", run, "--resume", "--workers", 2)
    assert r.returncode == 2, r.stderr
    assert "the newest checkpoint is mid-epoch from 1 worker(s)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (run / "model.pt").exists()


@pytest.mark.distributed
def test_ctrl_c_to_the_whole_process_group_stops_two_workers_with_a_checkpoint(
    tmp_path, real_store
):
    """Ctrl-C in a terminal (or a scheduler) signals every process of the group: each worker
    got it, then torchrun's agent passed its own copy on, which counted as a second signal and
    aborted (exit 130, no checkpoint). Now: 75 and a checkpoint, as with one worker."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    kwargs = {"step": 2, "ready": str(ready), "go": str(go)}
    path = plugin_config(tmp_path, real_store, "PauseAt", kwargs, epochs=2, steps_per_epoch=4)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "segscale.cli", "train", path, "--run-dir", run, "--workers", 2]
    group = subprocess.Popen(
        list(map(str, args)), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert group.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(group.pid, signal.SIGINT)
        time.sleep(0.5)
        go.touch()
        assert group.wait(timeout=120) == PREEMPTED_EXIT_CODE, group.stderr.read()
    finally:
        if group.poll() is None:
            os.killpg(group.pid, signal.SIGKILL)
    assert "preempted: stopped by a signal at step 2" in group.stderr.read()
    assert (run / "checkpoints" / "step_00000002.pt").is_file()


def test_a_run_resumes_with_other_speed_settings_and_ends_as_the_uninterrupted_one(
    tmp_path, real_store
):
    """data.num_workers (like data.on_device, train.channels_last, train.compile) changes how
    fast, not what: a run stopped mid-epoch with no loader process resumes with one, says so, and
    ends with the weights of the uninterrupted run (was: refused as "other settings")."""
    from segscale.config import load_config

    term = {"step": 7, "sig": "SIGTERM"}
    ref_cfg = config(tmp_path, real_store, "ref", **term)
    (tmp_path / "ref.fired").touch()
    r = train(ref_cfg, tmp_path / "ref")
    assert r.returncode == 0, r.stderr[-3000:]
    cfg, run = config(tmp_path, real_store, "pre", **term), tmp_path / "pre"
    r = train(cfg, run)
    assert r.returncode == PREEMPTED_EXIT_CODE, r.stderr[-3000:]
    r = train(cfg, run, "--resume", "data.num_workers=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumes with other speed settings (data.num_workers differs)" in r.stderr
    assert load_config(run / "config.yaml").data.num_workers == 1
    env = json.loads((run / "environment.json").read_text())
    assert [e["config_digest"] for e in env["earlier"]] == [
        validate(yaml.safe_load(cfg.read_text())).digest()
    ]
    assert [e["loader_workers"] for e in env["earlier"]] == [0] and env["loader_workers"] == 1
    assert env["config_digest"] == load_config(run / "config.yaml").digest()
    assert same_weights(tmp_path / "ref", run)
    # what the run computes still has to match
    r = train(cfg, run, "--resume", "train.epochs=4")
    assert r.returncode != 0 and "started with other settings (train.epochs differs)" in r.stderr


def test_the_resume_digest_leaves_out_only_the_speed_settings(real_store):
    from segscale.config import SPEED_SETTINGS

    base = validate(tiny_config(real_store))
    for key, value in zip(SPEED_SETTINGS, (2, False, True, True, 1, 7, 9), strict=True):
        section, name = key.split(".")
        raw = tiny_config(real_store)
        raw.setdefault(section, {})[name] = value
        other = validate(raw)
        assert other.digest() != base.digest(), key
        assert other.resume_digest() == base.resume_digest(), key
    assert validate(tiny_config(real_store, grad_clip=1.0)).resume_digest() != base.resume_digest()

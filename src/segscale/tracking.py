"""Trackers: where rank 0 records a run besides its own folder (config `tracker:`).

A tracker is built on rank 0 with the run's folder, name and flattened config (`params`) plus its
own kwargs, and is called like a callback (duck-typed hooks: on_train_start, on_epoch_end,
on_train_end), then `close(error)` once the worker stops for any reason. Built-ins: `mlflow` (the
default: a local SQLite store shared by the runs beside this one), `tensorboard` and `none`; a run
may have several (`tracker: [mlflow, tensorboard]`); users name their own class as
'pkg.mod:Class'. The run folder (metrics.jsonl, checkpoints, model.pt) stays the record
that resume and reports read: a tracker only mirrors it, and never fails a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from segscale._files import write_atomic
from segscale.config import MIN_INTERVAL
from segscale.errors import STOP_FILE, Preempted, SegscaleError
from segscale.monitor import SystemFiles

MLFLOW_RUN_ID = "mlflow_run_id"  # in the run folder: a resumed run continues the same MLflow run
STOP_TAG = "segscale.stop"  # set to true on a run in MLflow: it stops as by `segscale stop`
EXPERIMENT_KIND = "mlflow.experimentKind"


class NoTracker:
    """`tracker: none`: the run folder only."""

    def __init__(self, run_dir: Path, run_name: str, params: dict[str, Any]) -> None:
        pass

    def close(self, error: BaseException | None = None) -> None:
        pass


# the tracking stores MLflow 3 writes to (a dialect may follow '+', as in postgresql+psycopg2);
# its file store, a folder or file://, it only reads
MLFLOW_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class MLflowTracker:
    """Mirror the run into MLflow: parameters (the flattened config), one metrics row per epoch at
    its global step, step metrics (step/...) every monitor.log_every steps, every rank's system
    metrics (system/<node>/<rank>/...), each validation's picture grid (artifacts validation/),
    tags (run folder, resume digest: what the run computes), and at the end
    config.yaml, environment.json and metrics.jsonl as artifacts. Status: FINISHED, KILLED
    (preempted or stopped) or FAILED. Every `poll_seconds` it reads the run's tags: segscale.stop
    = true, set in the MLflow UI or through its API, stops the run gracefully (checkpoint, resume
    with --resume), as `segscale stop` does.

    `uri` defaults to `sqlite:///<the run folder's parent>/mlflow.db`, so every run under runs/
    lands in one store (`segscale ui runs/` serves it); the experiment's
    artifacts go beside it in mlartifacts/. All MLflow work happens on one background thread, so
    training never waits for mlflow's import or the store's creation (seconds; docs/performance.md).
    Errors (an unwritable store, a bad URI) become one warning; training goes on.
    `parent_run_id` nests the run under another (MLflow's mlflow.parentRunId tag); `tags` are
    set at its creation."""

    def __init__(
        self,
        run_dir: Path,
        run_name: str,
        params: dict[str, Any],
        uri: str | None = None,
        experiment: str = "segscale",
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        poll_seconds: float = 5.0,
    ) -> None:
        if not MIN_INTERVAL <= poll_seconds < float("inf"):  # below: a busy loop beside training
            raise ValueError(
                f"poll_seconds {poll_seconds}: expected a number of seconds ≥ {MIN_INTERVAL:g}"
            )
        if uri is not None and not uri.strip():
            raise ValueError(
                "uri '': expected an MLflow tracking URI, e.g. sqlite:///PATH/mlflow.db"
            )
        # "databricks" alone is a URI too; a path without a scheme is a folder
        scheme = uri.partition(":")[0].partition("+")[0].lower() if uri else ""
        scheme = "file" if uri and ":" not in uri and scheme != "databricks" else scheme
        if uri is not None and scheme not in MLFLOW_SCHEMES:  # else a warning after the run
            store = (
                "its file store (a folder), which MLflow 3 no longer writes"
                if scheme == "file"
                else f"no tracking store for '{scheme}'"
            )
            raise ValueError(
                f"uri {uri}: MLflow has {store}; expected one of "
                f"{', '.join(s + '://' for s in MLFLOW_SCHEMES)}, e.g. sqlite:///PATH/mlflow.db"
            )
        if not experiment.strip():
            raise ValueError(f"experiment {experiment!r}: expected an MLflow experiment name")
        self.run_dir, self.run_name, self.params = Path(run_dir), run_name, params
        self.poll_seconds = poll_seconds
        self.tags = {"segscale.run_dir": str(self.run_dir), **(tags or {})}
        if parent_run_id:  # nested under it in the UI (`segscale tune`: trials under the tuning)
            self.tags["mlflow.parentRunId"] = parent_run_id
        self.uri = uri or default_uri(self.run_dir.parent)
        self.experiment = experiment
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="segscale-mlflow", daemon=True)
        # the last step an earlier attempt of the run logged, of step rows and of epoch rows
        self._logged_until = {"step": -1, "epoch": -1}

    # ---- hooks (called on rank 0 by the Trainer and the engine)

    def on_train_start(self, trainer: Any) -> None:
        self._thread.start()
        # the digest its checkpoints carry (RunConfig.resume_digest): runs that compute the same;
        # how this attempt is scaled (tags, not params: a resume may change them)
        facts = {f"segscale.{k}": v for k, v in run_facts(self.run_dir).items()}
        self._queue.put(("tags", {"segscale.resume_digest": trainer.config_digest, **facts}))

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        self._queue.put(("metrics", dict(record)))

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        """Step metrics, as step/<name> at their global step."""
        self._queue.put(
            (
                "metrics",
                {"step": row["step"], **{f"step/{k}": v for k, v in row.items() if k != "step"}},
            )
        )

    def close(self, error: BaseException | None = None, timeout: float = 120.0) -> None:
        """End the MLflow run and wait (at most `timeout` s) for the thread to write everything."""
        if not self._thread.is_alive():  # never started, stopped on an error, or already closed
            return
        status = (
            "FINISHED" if error is None else "KILLED" if isinstance(error, Preempted) else "FAILED"
        )
        if status == "FAILED":  # the reason beside the status, e.g. the step a loss diverged at
            reason = f"{type(error).__name__}: {error}"[:5000]  # MLflow's limit on a tag
            self._queue.put(("tags", {"segscale.failure": reason}))
        self._queue.put(("end", status))
        self._thread.join(timeout)
        if self._thread.is_alive():
            warnings.warn(
                f"mlflow: still writing to {self.uri} after {timeout:.0f} s; gave up", stacklevel=2
            )

    # ---- the background thread

    def _work(self) -> None:
        try:
            client, run_id = self._start()
        except Exception as e:  # tracking must never fail training
            self._warn(e)
            return
        system = SystemFiles(self.run_dir)
        polled = time.monotonic()
        while True:
            try:
                kind, item = self._queue.get(timeout=self.poll_seconds)
            except queue.Empty:
                kind, item = "poll", None
            try:
                if time.monotonic() - polled >= self.poll_seconds or kind == "end":
                    polled = time.monotonic()
                    self._log_system(client, run_id, system)
                    if kind != "end":
                        self._check_stop_tag(client, run_id)
                if kind == "poll":
                    continue
                if kind == "tags":
                    for k, v in item.items():
                        client.set_tag(run_id, k, str(v))
                elif kind == "metrics":
                    self._log_metrics(client, run_id, item)
                    picture = item.get("validation_picture")
                    if picture and (self.run_dir / picture).is_file():
                        client.log_artifact(run_id, str(self.run_dir / picture), "validation")
                else:
                    if item == "FINISHED":
                        for name in ("config.yaml", "environment.json", "metrics.jsonl"):
                            if (self.run_dir / name).is_file():
                                client.log_artifact(run_id, str(self.run_dir / name))
                    client.set_terminated(run_id, status=item)
                    return
            except Exception as e:
                self._warn(e)
                return

    def _start(self) -> tuple[Any, str]:
        client = mlflow_client(self.uri)
        saved = self.run_dir / MLFLOW_RUN_ID
        if saved.is_file():  # a resumed run: continue its MLflow run
            run_id = saved.read_text().strip()
            client.update_run(run_id, status="RUNNING")
            # the steps an earlier attempt logged past its last checkpoint are trained again:
            # logged once (the same losses, resumed exactly), so no curve doubles back
            self._logged_until = {  # step rows and epoch rows each: the last step logged
                kind: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
                for kind, key in (("step", "step/loss"), ("epoch", "train_loss"))
            }
            if _asks_to_stop(client.get_run(run_id).data.tags.get(STOP_TAG, "")):
                client.set_tag(run_id, STOP_TAG, "seen")  # asked while it was not running
                warnings.warn(
                    f"the MLflow tag {STOP_TAG} = true was set while the run was not running; "
                    "cleared: it stops a running run",
                    stacklevel=1,
                )
            return client, run_id
        experiment_id = experiment(client, self.experiment, self.run_dir.parent)
        run = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        run_id = run.info.run_id
        from mlflow.entities import Param

        for chunk in _chunks(sorted(self.params.items()), 100):  # MLflow's batch limit
            client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in chunk])
        write_atomic(saved, run_id + "\n")
        return client, run_id

    def _log_system(self, client: Any, run_id: str, system: SystemFiles) -> None:
        """Every rank's new system samples, as system/<node>/<rank>/<metric>."""
        from mlflow.entities import Metric

        metrics = [
            Metric(name, value, int(seconds * 1000), i)
            for name, value, seconds, i in system.metrics()
        ]
        for chunk in _chunks(metrics, 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=chunk)

    def _check_stop_tag(self, client: Any, run_id: str) -> None:
        """The tag segscale.stop = true (set in the MLflow UI or API) asks for a graceful stop: the
        STOP file `segscale stop` writes, which rank 0 checks at every step."""
        value = client.get_run(run_id).data.tags.get(STOP_TAG, "")
        if _asks_to_stop(value) and not (self.run_dir / STOP_FILE).exists():
            write_atomic(self.run_dir / STOP_FILE, f"graceful\nthe MLflow tag {STOP_TAG}\n")
            client.set_tag(run_id, STOP_TAG, "seen")  # a resumed run is not stopped again

    def _log_metrics(self, client: Any, run_id: str, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        kind = "step" if any(k.startswith("step/") for k in record) else "epoch"
        if step <= self._logged_until[kind]:
            return
        metrics = [Metric(k, v, now, step) for k, v in _numbers(record).items()]
        client.log_batch(run_id, metrics=metrics)

    def _warn(self, error: Exception) -> None:
        warnings.warn(f"mlflow tracking stopped ({self.uri}): {error}", stacklevel=1)


def _asks_to_stop(tag: str) -> bool:
    """Whether the value of the tag segscale.stop asks for a stop (true, 1 or yes)."""
    return tag.strip().lower() in ("true", "1", "yes")


OWNER = "segscale-run.txt"  # in LOG_DIR/<run>: the run folder whose events it holds


class TensorBoardTracker:
    """`tracker: tensorboard` (alone or beside mlflow): TensorBoard event files in
    RUN_DIR/tensorboard (or LOG_DIR/<run folder name>: `log_dir` is a folder of runs, as
    TensorBoard's --logdir): the epoch rows at their global step, step metrics as
    step/<name>, every rank's system metrics as system/<node>/<rank>/<name> (at the training step
    they were read, with their own wall time), each validation's picture grid as the image
    `validation`, and the flattened config as text. A resumed run drops the events past its checkpoint's step (purge_step), so curves
    never double back. Needs the tensorboard package: pip install 'segscale[tensorboard]'; view
    with `tensorboard --logdir runs/`. Writing happens on TensorBoard's own writer thread."""

    def __init__(
        self, run_dir: Path, run_name: str, params: dict[str, Any], log_dir: str | None = None
    ) -> None:
        from segscale._files import output_dir

        self.run_dir = Path(run_dir)
        # a log_dir is a folder of runs (TensorBoard's --logdir), one folder per run folder
        where = Path(log_dir) / self.run_dir.name if log_dir else self.run_dir / "tensorboard"
        self.log_dir = output_dir(where, "tracker tensorboard log_dir", of_run=self.run_dir)
        self._owned = None if not log_dir else self.log_dir / OWNER
        self.params = params
        self._writer: Any = None
        self._system = SystemFiles(self.run_dir)
        self._step = 0

    def on_train_start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._owned is not None:  # a shared log_dir: its folder is this run's alone
            owner = self._owned.read_text().strip() if self._owned.is_file() else None
            if owner not in (None, str(self.run_dir.resolve())):
                raise SegscaleError(
                    f"tracker tensorboard: {self.log_dir} holds the events of the run {owner}; "
                    "give this run folder another name, or another log_dir"
                )
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._owned.write_text(f"{self.run_dir.resolve()}\n")

        # resumed at step S: events after S came from steps this run trains again
        self._writer = SummaryWriter(
            str(self.log_dir), purge_step=trainer.step + 1 if trainer.step else None
        )
        if trainer.step:  # resumed: the samples already in the files were logged before
            self._system.read()
            self._writer.add_text("status", f"resumed at step {trainer.step}", trainer.step)
        table = "\n".join(f"| {k} | {_param(v)} |" for k, v in sorted(self.params.items()))
        self._writer.add_text("config", "| setting | value |\n|---|---|\n" + table, trainer.step)
        facts = "\n".join(f"| {k} | {v} |" for k, v in run_facts(self.run_dir).items())
        self._writer.add_text("run", "| this attempt | value |\n|---|---|\n" + facts, trainer.step)

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "step":
                self._writer.add_scalar(f"step/{k}", v, row["step"])
        self._log_system(row["step"])

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for k, v in _numbers(record).items():
            self._writer.add_scalar(k, v, step)
        picture = record.get("validation_picture")
        if picture and (self.run_dir / picture).is_file():
            import numpy as np
            from PIL import Image

            with Image.open(self.run_dir / picture) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._writer.add_image("validation", pixels, step, dataformats="HWC")
        self._log_system(step)
        self._writer.flush()

    def close(self, error: BaseException | None = None) -> None:
        if self._writer is None:
            return
        self._log_system(self._step)
        if error is not None:
            self._writer.add_text("status", f"{type(error).__name__}: {error}")
        self._writer.close()
        self._writer = None

    def _log_system(self, step: int) -> None:
        """The system samples written since the last call, at the training step reached."""
        self._step = step
        for name, value, seconds, _ in self._system.metrics():
            self._writer.add_scalar(name, value, step, walltime=seconds)


RUN_FACTS = (
    "workers",
    "simulated",
    "global_batch",
    "peak_lr",
    "steps_per_epoch",
    "amp",
    "strategy",
)


def run_facts(run_dir: Path) -> dict[str, Any]:
    """How this attempt of a run is scaled (from its environment.json, written before training
    starts): workers, global batch, peak lr, ... The config alone does not say (workers: null
    trains on --workers). {} when the record cannot be read."""
    try:
        record = json.loads((Path(run_dir) / "environment.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: record[k] for k in RUN_FACTS if isinstance(record, dict) and k in record}


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for `uri`, mlflow's and alembic's loggers at WARNING: the import sets
    mlflow's to INFO, and a new store would log each of its migrations."""
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def default_uri(folder: Path) -> str:
    """The MLflow store of the runs in `folder`: folder/mlflow.db."""
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"


def experiment(client: Any, name: str, folder: Path) -> str:
    """The id of the experiment `name`, created with its artifacts in folder/mlartifacts if new."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = (Path(folder) / "mlartifacts").resolve().as_uri()
    # MLflow 3 records what an experiment holds (its kind); these are model-training runs
    return client.create_experiment(
        name, artifact_location=artifacts, tags={EXPERIMENT_KIND: "custom_model_development"}
    )


def _artifacts_here(runs_dir: Path, places: list[tuple[str, str]]) -> None:
    """Warn when an experiment's artifacts (the validation pictures, the model) are recorded in
    another folder than runs_dir: the runs folder was moved or copied, and the UI shows the
    pictures of the old place (none once it is gone)."""
    from urllib.parse import unquote, urlparse

    for name, location in places:
        url = urlparse(location or "")
        if url.scheme not in ("file", ""):
            continue  # a remote artifact store: not a folder of this machine
        folder = Path(unquote(url.path)).resolve()
        if not folder.is_relative_to(runs_dir):
            warnings.warn(
                f"experiment '{name}' keeps its runs' artifacts (pictures, models) in {folder}, "
                f"outside {runs_dir}: the runs folder was moved or copied? The UI shows that "
                "folder's pictures, none once it is gone; MLflow records the place when a run "
                "starts",
                stacklevel=2,
            )


def ui_command(
    runs_dir: Path, host: str = "127.0.0.1", port: int = 5000, allowed_hosts: str = ""
) -> list[str]:
    """The command line that serves the MLflow UI (a tracking server) over the store of the runs in
    `runs_dir` (runs_dir/mlflow.db, its artifacts in runs_dir/mlartifacts), bound to `host`.
    The browser's Host header may name this machine (its host names and addresses), localhost
    or a private address, and `allowed_hosts` (comma-separated, fnmatch patterns, `*` any):
    MLflow 3 answers any other with 403 (DNS-rebinding protection), which refused a UI served on
    0.0.0.0 to every other machine that used the host's name.
    Raises SegscaleError when the folder has no readable store, the full MLflow (its server) is
    not installed (segscale itself needs only mlflow-skinny), or host:port cannot be listened on."""
    import importlib.util
    import socket
    import sqlite3
    import sys

    runs_dir = Path(runs_dir).resolve()
    if not runs_dir.is_dir():
        what = "is a file" if runs_dir.exists() else "does not exist"
        raise SegscaleError(f"{runs_dir}: {what}; give the folder that holds the runs (e.g. runs/)")
    store = runs_dir / "mlflow.db"
    if not store.is_file():
        if (runs_dir / "config.yaml").is_file() and (runs_dir.parent / "mlflow.db").is_file():
            raise SegscaleError(
                f"{runs_dir}: a run folder; its runs' store is in {runs_dir.parent}: "
                f"segscale ui {runs_dir.parent}"
            )
        raise SegscaleError(
            f"{runs_dir}: no MLflow store (mlflow.db) here; give the folder that holds the runs "
            "(e.g. runs/), trained with the default tracker"
        )
    try:  # read-only: a damaged store is one line here, not the server's traceback
        with contextlib.closing(sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)) as db:
            # the artifact folders of experiments with runs: absolute, as MLflow records them
            places = db.execute(
                "SELECT name, artifact_location FROM experiments e WHERE EXISTS "
                "(SELECT 1 FROM runs r WHERE r.experiment_id = e.experiment_id)"
            ).fetchall()
    except sqlite3.Error as e:
        raise SegscaleError(f"{store}: not a readable MLflow store ({e})") from None
    _artifacts_here(runs_dir, places)
    if (
        importlib.util.find_spec("flask") is None
        or importlib.util.find_spec("mlflow.server") is None
    ):
        raise SegscaleError(
            "segscale ui needs the full MLflow (its UI server): pip install 'segscale[ui]'"
        )
    # the server's own failure to listen would be a log line and exit code 0
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            probe.bind(address)
    except OSError as e:
        reason = e.strerror or str(e)
        raise SegscaleError(
            f"--host {host} --port {port}: cannot listen there ({reason})"
        ) from None
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        default_uri(runs_dir),
        "--default-artifact-root",
        (runs_dir / "mlartifacts").as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--allowed-hosts",
        ",".join(_allowed_hosts(host, allowed_hosts)),
    ]


def _allowed_hosts(host: str, extra: str) -> list[str]:
    """The Host headers the UI answers: MLflow's defaults (localhost, private addresses), this
    machine's names and addresses and the bound address, each with any port, and `extra`."""
    import socket

    import psutil
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {host, socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        with contextlib.suppress(OSError):
            names |= {a[4][0] for a in socket.getaddrinfo(name, None)}
    for addresses in psutil.net_if_addrs().values():  # every interface's, as 0.0.0.0 serves
        names |= {
            a.address.split("%")[0]
            for a in addresses
            if a.family in (socket.AF_INET, socket.AF_INET6)
        }
    names -= {"0.0.0.0", "::", ""}
    own = [
        p for n in sorted(names) for p in ((f"[{n}]", f"[[]{n}]:*") if ":" in n else (n, f"{n}:*"))
    ]
    # a name as the browser sends it: with the port, and in lower case
    given = [p for h in extra.split(",") if h.strip() for p in (h.strip(), f"{h.strip()}:*")]
    given += [p.lower() for p in given if p != p.lower()]
    return [*get_default_allowed_hosts(), *own, *given]


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers (not its step, flags or names such as the picture's path)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
    }


def _param(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a parameter value


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def nest_under(raw: dict[str, Any], parent_run_id: str | None) -> dict[str, Any]:
    """A run config's data (RunConfig.model_dump) with its MLflow tracker nested under the run
    `parent_run_id` (MLflow's parent tag), when it has an MLflow tracker and a parent is given."""
    if parent_run_id:
        for tracker in raw["tracker"]:
            if tracker["name"] == "mlflow":
                tracker["kwargs"] = {**tracker["kwargs"], "parent_run_id": parent_run_id}
    return raw


class ParentRun:
    """One MLflow run that groups others (`segscale tune`: its baselines and trials; `segscale
    repeat`: its runs), which name it as their tracker's parent_run_id. It lives in the store of
    the runs in `folder` (or the tracker's `uri`) and is created at the first `run_id()`. With a
    tracker other than mlflow it does nothing; like a tracker it never fails the job it records:
    an error becomes one warning and the recording stops."""

    def __init__(
        self,
        mlflow: Any,
        folder: Path,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None = None,
    ) -> None:
        """`mlflow`: the run config's MLflow tracker (RunConfig.tracker_config('mlflow')), or None."""
        kwargs = mlflow.kwargs if mlflow is not None else {}
        self.enabled = mlflow is not None
        self.uri = kwargs.get("uri") or default_uri(folder)
        self.experiment = kwargs.get("experiment", "segscale")
        self.folder, self.run_name, self.tags, self._run_id = Path(folder), run_name, tags, run_id
        self._client: Any = None
        if run_id is not None:  # a rerun continues the run (a stopped one was marked KILLED)
            self._safely(lambda client: client.update_run(run_id, status="RUNNING"))

    def _safely(self, fn: Any) -> Any:
        if not self.enabled:
            return None
        try:
            if self._client is None:
                self._client = mlflow_client(self.uri)
            return fn(self._client)
        except Exception as e:  # tracking must never fail the job
            warnings.warn(f"mlflow: {self.run_name} is not recorded further: {e}", stacklevel=3)
            self.enabled = False
            return None

    def run_id(self) -> str | None:
        """The parent's MLflow run id (created now if new), or None when not tracked."""
        if self._run_id is None:

            def create(client: Any) -> str:
                exp = experiment(client, self.experiment, self.folder)
                return client.create_run(exp, run_name=self.run_name, tags=self.tags).info.run_id

            self._run_id = self._safely(create)
        return self._run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Finite metrics at `step` (e.g. a trial's index)."""
        run_id = self.run_id()
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v}
        if run_id is not None and finite:
            self._safely(
                lambda c: [c.log_metric(run_id, k, v, step=step) for k, v in finite.items()]
            )

    def tag_child(self, run_dir: Path, tags: dict[str, str]) -> None:
        """Tags on the MLflow run of a child's run folder (its mlflow_run_id file)."""
        saved = Path(run_dir) / MLFLOW_RUN_ID
        if self.enabled and saved.is_file():
            child = saved.read_text().strip()
            self._safely(lambda c: [c.set_tag(child, k, str(v)) for k, v in tags.items()])

    def finish(self, artifacts: list[str] | tuple[str, ...], status: str = "FINISHED") -> None:
        """Log the files of `folder` named in `artifacts` that exist, and end the run."""
        run_id = self._run_id
        if run_id is None:
            return

        def end(client: Any) -> None:
            for name in artifacts:
                if (self.folder / name).is_file():
                    client.log_artifact(run_id, str(self.folder / name))
            client.set_terminated(run_id, status=status)

        self._safely(end)

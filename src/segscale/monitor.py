"""System metrics of every rank, sampled on a background thread into the run folder.

Each rank writes RUN_DIR/system/<node>-rank<R>.jsonl, one JSON line per sample: the time, CPU use
and resident memory of this process (psutil), the host's memory use, disk and network throughput
since the last sample, and, when nvidia-ml-py is installed and the rank runs on a GPU, that GPU's
utilisation, memory, power and temperature (the job's own device only). Training never waits
for it: no collective, no lock, one small write per sample. Rank 0's tracker reads the files
and mirrors them (MLflow: system/<node>/<rank>/<metric>). A multi-node run writes them where
its run folder is; a node-local run folder keeps its node's files.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from segscale._files import to_json

SYSTEM_DIR = "system"


class SystemSampler:
    """Sample this process and its host every `interval` seconds until `stop()`; `device`: the
    torch device this rank trains on (its GPU's metrics when it is CUDA and NVML is there)."""

    def __init__(self, run_dir: Path, rank: int, interval: float, device: Any = None) -> None:
        self.interval, self.rank = interval, rank
        self.node = socket.gethostname()
        self.path = Path(run_dir) / SYSTEM_DIR / f"{self.node}-rank{rank}.jsonl"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="segscale-system", daemon=True)
        self._gpu = _nvml_handle(device)

    def start(self) -> SystemSampler:
        if self.interval > 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample(self, previous: dict[str, float] | None, process: Any) -> dict[str, float]:
        """One sample; throughputs are over the time since `previous` (absent for the first)."""
        import psutil

        now = time.time()
        row: dict[str, float] = {
            "time": now,
            "cpu_percent": process.cpu_percent(None),  # since the last call: all its threads
            "rss_gb": process.memory_info().rss / 2**30,
            "host_memory_percent": psutil.virtual_memory().percent,
        }
        disk, net = psutil.disk_io_counters(), psutil.net_io_counters()
        counters = {
            "disk_read": disk.read_bytes if disk else 0,
            "disk_write": disk.write_bytes if disk else 0,
            "net_sent": net.bytes_sent if net else 0,
            "net_recv": net.bytes_recv if net else 0,
        }
        row.update({f"_{k}": float(v) for k, v in counters.items()})
        if previous is not None:
            seconds = max(now - previous["time"], 1e-9)
            for k in counters:
                row[f"{k}_mb_s"] = (row[f"_{k}"] - previous[f"_{k}"]) / seconds / 1e6
        if self._gpu is not None:
            row.update(_gpu_metrics(self._gpu))
        return row

    def _run(self) -> None:
        import psutil

        process = psutil.Process()
        process.cpu_percent(None)  # the first call only starts the measurement
        previous = None
        try:
            with open(self.path, "a") as f:
                while not self._stop.wait(self.interval):
                    try:
                        row = self.sample(previous, process)
                    except Exception:  # a metric the platform lacks must not end the sampling
                        continue
                    previous = row
                    public = {k: v for k, v in row.items() if not k.startswith("_")}
                    f.write(to_json({"node": self.node, "rank": self.rank, **public}) + "\n")
                    f.flush()
        except OSError as e:  # disk full, a file-size limit: the sampling stops, training goes on
            import warnings

            warnings.warn(f"{self.path}: system sampling stopped ({e.strerror or e})", stacklevel=1)


def _nvml_handle(device: Any) -> Any:
    """The NVML handle of a CUDA device, or None (no GPU, or nvidia-ml-py not installed)."""
    if device is None or getattr(device, "type", None) != "cuda":
        return None
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = torch.cuda.get_device_properties(index).uuid  # the job's own device, by identity
        return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except Exception:  # absent NVML is not an error: no GPU metrics
        return None


def _gpu_metrics(handle: Any) -> dict[str, float]:
    import pynvml

    out: dict[str, float] = {}
    with contextlib.suppress(Exception):
        out["gpu_utilisation_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    with contextlib.suppress(Exception):
        out["gpu_memory_gb"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
    with contextlib.suppress(Exception):
        out["gpu_power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000
    with contextlib.suppress(Exception):
        out["gpu_temperature_c"] = float(
            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        )
    return out


class SystemFiles:
    """Reads the new lines of every rank's system file (for rank 0's tracker), file by file
    from where it stopped; a line still being written is left for the next read."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / SYSTEM_DIR
        self._offsets: dict[Path, int] = {}
        self._index: dict[Path, int] = {}

    def read(self) -> list[tuple[int, dict[str, Any]]]:
        """(sample index within its file, row) for every complete line not read before."""
        out = []
        for path in sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []:
            with open(path, "rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._offsets[path] = self._offsets.get(path, 0) + end
            for line in data[:end].splitlines():
                with contextlib.suppress(ValueError):
                    out.append((self._index.get(path, 0), json.loads(line)))
                    self._index[path] = self._index.get(path, 0) + 1
        return out

    def metrics(self) -> list[tuple[str, float, float, int]]:
        """The new samples as trackers log them: (system/<node>/<rank>/<metric>, value, the
        sample's time in seconds, its index within its file), one per number of each sample."""
        return [
            (f"system/{row['node']}/{row['rank']}/{k}", float(v), row["time"], i)
            for i, row in self.read()
            for k, v in row.items()
            if k not in ("node", "rank", "time") and isinstance(v, int | float)
        ]


PICTURES_DIR = "pictures"


class ValidationPictures:
    """A callback (rank 0) that draws, after each validation, image / ground truth / prediction for
    a fixed set of validation slices (segscale.evaluation.validation_slices) into
    RUN_DIR/pictures/validation_epoch<E>.png, and names the file in the epoch's record
    (`validation_picture`, relative to the run folder) for the trackers. The same slices every
    time, so pictures of successive epochs show the model learning."""

    def __init__(self, store: Any, split: str, count: int, num_classes: int) -> None:
        from segscale.evaluation import validation_slices

        self.store, self.num_classes = store, num_classes
        self.slices = validation_slices(store, split, count)

    def on_validation_end(self, trainer: Any, record: dict[str, Any]) -> None:
        if not self.slices:
            return
        from segscale.evaluation import plot_examples, slice_examples
        from segscale.parallel import unwrap

        model = unwrap(trainer.model)
        was_training = model.training
        model.eval()
        try:
            examples = slice_examples(model, self.store, self.slices, trainer.strategy.device)
        finally:
            model.train(was_training)
        name = f"{PICTURES_DIR}/validation_epoch{record['epoch']:03d}.png"
        metric = record.get(f"val_{trainer.task.metric}")
        title = f"epoch {record['epoch']}" + (
            f": val Dice {metric:.3f}" if metric is not None else ""
        )
        try:
            plot_examples(examples, trainer.run_dir / name, self.num_classes, title)
        except OSError as e:  # a picture is a view of the run: it never stops training
            import warnings

            warnings.warn(
                f"{trainer.run_dir / name}: not written ({e.strerror or e})", stacklevel=1
            )
            return
        record["validation_picture"] = name


class ConsoleView:
    """The live console view of rank 0 on a terminal: one rich table redrawn in place, a row per
    finished epoch (the last `keep`) and one for the epoch in progress: epoch, step, loss, lr,
    validation metric, img/s, ETA, this process's CPU use and its GPU's. It reads the Trainer's
    state when it redraws (4 times a second, on rich's thread): nothing on the training path.
    Used as a context manager around training; prints go above the table."""

    def __init__(self, trainer: Any, console: Any = None, keep: int = 8) -> None:
        from rich.console import Console

        self.trainer, self.keep = trainer, keep
        self.console = console or Console()
        self._live: Any = None
        self._started: tuple[float, int] | None = None
        self._process: Any = None

    def __enter__(self) -> ConsoleView:
        import psutil
        from rich.live import Live

        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self._started = (time.perf_counter(), self.trainer.step)
        self._live = Live(
            get_renderable=self.render, console=self.console, refresh_per_second=4, transient=False
        )
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()

    def render(self) -> Any:
        from rich.markup import escape
        from rich.table import Table

        t = self.trainer
        metric = t.task.metric
        name = "val Dice" if metric == "dice" else f"val {metric.replace('_', ' ')}"
        title = f"{t.run_dir.name}: {t.epochs} epochs, {t.steps_per_epoch} steps each"
        table = Table(title=escape(title))
        for column in ("epoch", "step", "loss", "lr", name, "img/s", "ETA", "CPU", "GPU"):
            table.add_column(column, justify="right")
        for record in t.history[-self.keep :]:
            val = record.get(f"val_{metric}")
            table.add_row(
                f"{record['epoch']}/{t.epochs}",
                str(record["step"]),
                f"{record['train_loss']:.4f}",
                f"{record['lr']:.3g}",
                "" if val is None else f"{val:.4f}",
                f"{record['images_per_second']:.1f}",
                "",
                "",
                "",
            )
        if t.epoch < t.epochs and not t.finished_early:
            row = t.last_log or {}
            table.add_row(
                f"[bold]{t.epoch + 1}/{t.epochs}",
                f"{t.step} ({t.epoch_step}/{t.steps_per_epoch})",
                f"{row['loss']:.4f}" if "loss" in row else "",
                f"{t.schedule(max(t.step - 1, 0)):.3g}",
                "",
                f"{row['images_per_second']:.1f}" if "images_per_second" in row else "",
                self._eta(),
                f"{self._process.cpu_percent(None):.0f}%" if self._process else "",
                _gpu_use(t.strategy.device),
            )
        return table

    def _eta(self) -> str:
        if self._started is None:
            return ""
        start, first = self._started
        t = self.trainer
        done = t.step - first
        if done <= 0:
            return "…"
        left = t.epochs * t.steps_per_epoch - t.step
        seconds = (time.perf_counter() - start) / done * left
        return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else ">1 day"


def _gpu_use(device: Any) -> str:
    """This rank's GPU utilisation (torch.cuda.utilization, through NVML), or '' without one."""
    if getattr(device, "type", None) != "cuda":
        return ""
    try:
        import torch

        return f"{torch.cuda.utilization(device)}%"
    except Exception:  # no NVML: nothing to show
        return ""

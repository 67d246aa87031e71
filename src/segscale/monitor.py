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
        with open(self.path, "a") as f:
            while not self._stop.wait(self.interval):
                try:
                    row = self.sample(previous, process)
                except Exception:  # a metric the platform lacks must not end the sampling
                    continue
                previous = row
                public = {k: v for k, v in row.items() if not k.startswith("_")}
                f.write(json.dumps({"node": self.node, "rank": self.rank, **public}) + "\n")
                f.flush()


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

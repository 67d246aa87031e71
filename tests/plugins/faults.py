"""Fault injection for the fault-tolerance tests, as an ordinary segscale callback plug-in."""

import os
import signal
from pathlib import Path


class SignalAt:
    """Once (guarded by a marker file), at the end of `step` on `rank`, send `sig` to this worker
    ('self') or to the torchrun agent ('agent'); with `run`, only in the run folder of that name."""

    def __init__(
        self,
        step: int,
        sig: str,
        marker: str,
        rank: int = 0,
        target: str = "self",
        run: str | None = None,
    ) -> None:
        self.step, self.sig, self.marker, self.rank, self.target = (
            step,
            sig,
            Path(marker),
            rank,
            target,
        )
        self.run = run

    def on_step_end(self, trainer, step: int) -> None:
        if step != self.step or trainer.strategy.rank != self.rank or self.marker.exists():
            return
        if self.run is not None and trainer.run_dir.name != self.run:
            return
        self.marker.touch()
        os.kill(os.getpid() if self.target == "self" else agent_pid(), getattr(signal, self.sig))


def agent_pid() -> int:
    """The agent: this worker's parent, or its grandparent when a fork server started the worker."""
    parent = os.getppid()
    if b"forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes():
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'
        return int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return parent


class RaiseAt:
    """At the end of `step` on `rank`, raise an error of the user's code, or die by SIGKILL
    (`kill=True`) as the out-of-memory killer ends a process."""

    def __init__(self, step: int, rank: int = 1, kill: bool = False) -> None:
        self.step, self.rank, self.kill = step, rank, kill

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.step and trainer.strategy.rank == self.rank:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise ZeroDivisionError(f"rank {self.rank} divides by zero at step {step}")


class NaNAt:
    """At the end of `step`, turn every weight into NaN: the next step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.step:
            import torch

            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.fill_(float("nan"))


class StopAt:
    """At the end of `step`, on `rank`, ask the run to stop as `segscale stop` does; with
    `marker`, once (the marker file is created then)."""

    def __init__(self, step: int, rank: int = 1, now: bool = False, marker: str = "") -> None:
        self.step, self.rank, self.now, self.marker = step, rank, now, marker

    def on_step_end(self, trainer, step: int) -> None:
        if step == self.step and trainer.strategy.rank == self.rank:
            if self.marker and Path(self.marker).exists():
                return
            (Path(trainer.run_dir) / "STOP").write_text("now" if self.now else "graceful")
            if self.marker:
                Path(self.marker).touch()


class PauseAt:
    """At the end of `step` on rank 0, say so (touch `ready`) and wait until `go` exists."""

    def __init__(self, step: int, ready: str, go: str, timeout: float = 300) -> None:
        self.step, self.ready, self.go, self.timeout = step, Path(ready), Path(go), timeout

    def on_step_end(self, trainer, step: int) -> None:
        import time

        if step != self.step or trainer.strategy.rank != 0:
            return
        self.ready.touch()
        deadline = time.monotonic() + self.timeout
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

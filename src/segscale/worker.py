"""The worker processes: what each of N processes runs, and every torchrun entry point.

`segscale train --workers N` checks the run, then starts `python -m segscale.worker train RUN_DIR`
N times through torch.distributed.run (segscale.launch). torchrun can start the same directly:

    torchrun --nproc-per-node N -m segscale.worker train RUN_DIR
    torchrun --nproc-per-node N [--nnodes M ...] -m segscale.worker train CONFIG [--run-dir DIR]
        [--resume] [key=value ...]

Given a config file, every process loads and checks it itself and writes the run folder's
config.yaml (atomically), so it also works when a scheduler starts each node on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segscale._files import RUN_LOCK, held_lock, not_a_run, to_json, write_atomic
from segscale.config import load_config
from segscale.engine import check_started, plan, prepare_run_dir
from segscale.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    STOP_FILE,
    USER_ERROR_EXIT_CODE,
    Diverged,
    Preempted,
    SegscaleError,
    is_builtin,
    one_line_warning,
    raised_in,
)
from segscale.repro import earlier_records, packages


def train(
    run_dir: Path, resume: bool = False, progress: bool = True, failures: Path | None = None
) -> list[dict[str, Any]]:
    """Train run_dir/config.yaml as one process of N (the torchrun environment says which);
    returns the per-epoch history. Rank 0 writes environment.json and drives the trackers.
    A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) resumes from the newest checkpoint.
    `failures`: a folder where this process reports its error, if it fails, before it tears
    anything down (the launcher names the first failure from these reports).
    Raises SegscaleError for bad input, Preempted after a requested stop's checkpoint."""
    p = plan(load_config(run_dir / "config.yaml"))
    resume = resume or restarted()
    strategy = p.strategy()
    trackers: list[Any] = []
    error: BaseException | None = None
    lock = contextlib.ExitStack()
    sampler = p.system_sampler(run_dir, strategy).start()
    try:
        if strategy.rank == 0:  # the one process that records the run
            # held to the end: a second training in this folder is refused, and `segscale stop`
            # can tell a running training from a stopped one. The wait is for a restarted rank 0,
            # whose predecessor's data-loading processes may still hold the lock for a moment.
            lock.enter_context(held_lock(run_dir / RUN_LOCK, 60, "a training is running in it"))
            (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier attempt
            trackers = [t if is_builtin(t) else TolerantTracker(t) for t in p.trackers(run_dir)]
        trainer = p.trainer(strategy, run_dir, trackers, progress)
        if strategy.rank == 0:
            ops = p.nondeterministic_ops(trainer)  # CUDA with deterministic kernels asked
            if ops and progress:
                print(
                    "warning: deterministic kernels were asked for, but these CUDA ops of a "
                    f"training step have none: {', '.join(ops)}; the run may differ in the last "
                    "bits between repeats (docs/reproducibility.md)",
                    flush=True,
                )
            record = p.record(trainer, ops)
            record["earlier"] = earlier_records(run_dir / "environment.json", record, resume)
            write_atomic(run_dir / "environment.json", to_json(record, indent=1))
            write_atomic(run_dir / "packages.txt", "\n".join(packages()) + "\n")
        return trainer.fit(resume=resume)
    except BaseException as e:
        error = e
        report_failure(e, failures)
        raise
    finally:
        sampler.stop()
        for tracker in trackers:
            tracker.close(error)
        if isinstance(error, Preempted | Diverged):
            # An agreed stop: every rank raised it at the same step. The others wait for rank 0
            # to record it (its trackers' status), because torchrun ends the remaining workers
            # as soon as one exits with a non-zero code.
            with contextlib.suppress(Exception):
                strategy.barrier()
        strategy.close()
        lock.close()


class TolerantTracker:
    """A user's tracker whose errors are warnings, as MLflow's are: a tracking error never fails
    a run. The first hook (or close) that raises is one warning naming it, and the tracker's
    hooks are left out for the rest of the run; its close(error) is still called, to release
    what it holds."""

    def __init__(self, tracker: Any) -> None:
        self._tracker, self._failed = tracker, False

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._tracker, name)  # AttributeError: no such hook, as for the tracker
        if not (callable(found) and (name.startswith("on_") or name == "close")):
            return found

        def call(*args: Any) -> Any:
            if self._failed and name != "close":
                return None
            try:
                return found(*args)
            except (Preempted, Diverged):  # a stop it asks for on purpose
                raise
            except Exception as e:
                if self._failed:  # close after a failed hook: said once already
                    return None
                self._failed = True
                what = f"tracker {type(self._tracker).__name__}.{name}"
                warnings.warn(
                    f"{raised_in(what, e)}; it records nothing more of this run", stacklevel=2
                )
                return None

        return call


def evaluate(run_dir: Path, split: str, out: Path, failures: Path | None = None) -> dict[str, Any]:
    """Evaluate run_dir/model.pt on a split, cases shared among the workers; rank 0 writes `out`
    (JSON) and the per-case CSV beside it. Returns the evaluation on every rank."""
    from segscale.evaluation import write_evaluation

    p = plan(load_config(run_dir / "config.yaml"))
    p.store.rows(split)  # a split with no cases is one line, before anything is written
    process = p.process()
    try:
        model = p.trained_model(run_dir, process.device, splits=True)  # scored: the same split
        evaluation = {
            "run": str(run_dir),
            "split": split,
            "workers": process.world_size,
            "labels": p.task.labels(p.store),
            **p.task.evaluate(model, p.store, split, process, p.cfg.train.batch_size * 2),
        }
        if process.rank == 0:
            write_evaluation(evaluation, out)
        return evaluation
    except BaseException as e:
        report_failure(e, failures)
        raise
    finally:
        process.close()


AGENT_GRACE = 60.0  # seconds a worker has to checkpoint and exit once its agent is gone
_JOB_DONE = threading.Event()  # the worker's job returned: nothing is left to save


def end_with_agent(pid: int | None) -> None:
    """End this worker when the agent that started it dies without stopping it (SIGKILL, the
    out-of-memory killer). torchrun's workers otherwise outlive it: they train on, then wait
    for it forever. A thread waits on the agent's pidfd (no polling, no PID reuse); when it
    ends, this worker gets SIGTERM (a preemption: a checkpoint at the next check, exit 75),
    and AGENT_GRACE seconds later exits at once. `pid`: the launcher's (its --agent argument),
    None when started otherwise; Linux only."""
    import select
    import signal

    if pid is None or not hasattr(os, "pidfd_open") or os.getpid() == pid:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already
        os._exit(1)
    except OSError:  # no pidfd here (an old kernel): not watched
        return

    def watch() -> None:
        select.select([fd], [], [])
        if _JOB_DONE.is_set():  # finished (torchrun keeps it waiting for the agent): just go
            os._exit(0)
        os.kill(os.getpid(), signal.SIGTERM)
        with contextlib.suppress(OSError):  # the launcher held the other end of stderr
            print(f"error: the launcher (pid {pid}) is gone; this worker stops", file=sys.stderr)
        time.sleep(AGENT_GRACE)
        os._exit(1)

    threading.Thread(target=watch, name="segscale-agent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segscale.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a run folder, or a config file (torchrun-native)")
    t.add_argument("target", type=Path, help="a run folder, or a config file (YAML/XML)")
    t.add_argument("overrides", nargs="*", help="key.sub=value (with a config file)")
    t.add_argument("--run-dir", type=Path, help="with a config file (default: runs/<name>)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("evaluate")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--split", required=True)
    e.add_argument("--out", type=Path, required=True)
    for command in (t, e):
        command.add_argument("--failures", type=Path, help="folder for failure reports (launcher)")
        command.add_argument("--agent", type=int, help="the launcher's pid: end with it (launcher)")
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow the options (`CONFIG --run-dir DIR key=value`), as with torchrun
    unknown = [x for x in extra if args.command != "train" or x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "train":
        args.overrides = [*args.overrides, *extra]
    end_with_agent(args.agent)
    warnings.formatwarning = one_line_warning  # type: ignore[assignment]

    if args.command == "evaluate":
        return exit_code(evaluate, args.run_dir, args.split, args.out, args.failures)

    def run() -> None:
        run_dir = args.target
        if args.target.is_file():  # torchrun-native: from the config itself
            cfg = load_config(args.target, args.overrides)
            plan(cfg)
            run_dir = (args.run_dir or Path("runs") / cfg.name).resolve()
            prepare_run_dir(cfg, run_dir, args.resume or restarted(), workers=True)
        elif args.overrides or args.run_dir:
            raise SegscaleError(
                f"{args.target}: overrides and --run-dir go with a config file, not a run folder"
            )
        elif not (run_dir / "config.yaml").is_file():
            raise not_a_run(run_dir)
        else:  # a started run is continued only when asked (--resume, or a torchrun restart)
            check_started(run_dir, args.resume or restarted())
        train(run_dir, args.resume, not args.no_progress, args.failures)

    return exit_code(run, failures=args.failures)


# A worker's error that only follows from another worker's failure: its peer closed the
# connection (gloo), the communicator was aborted (NCCL), or a collective timed out.
_FOLLOWS_FROM_PEER = re.compile(
    r"Connection (closed|reset) by peer|remote worker|communicator was aborted|Broken pipe|"
    r"timed out|Timeout",
    re.IGNORECASE,
)


def report_failure(error: BaseException, folder: Path | None) -> None:
    """Write this worker's error to folder/attempt<A>-rank<R>.json at once, before its cleanup
    closes the process group: the other workers then fail in turn, and the launcher may stop
    this one before its own traceback is printed. A requested stop is no failure."""
    stops = Preempted | Diverged | KeyboardInterrupt | SystemExit  # each says why itself
    if folder is None or isinstance(error, stops):
        return
    rank = int(os.environ.get("RANK", 0))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    report = {
        "rank": rank,
        "node": socket.gethostname(),
        "attempt": attempt,
        "time": time.time(),
        # a user error's message says what it is (a plug-in's names its own error type)
        "error": str(error)
        if isinstance(error, SegscaleError)
        else f"{type(error).__name__}: {error}",
        "user_error": isinstance(error, SegscaleError),
        "follows_from_peer": bool(_FOLLOWS_FROM_PEER.search(str(error))),
        "traceback": "".join(traceback.format_exception(error)),
    }
    with contextlib.suppress(OSError):  # a report must never hide the error itself
        write_atomic(folder / f"attempt{attempt}-rank{rank}.json", json.dumps(report))


def restarted() -> bool:
    """Whether torchrun restarted this worker after a failure: the run continues from its newest
    checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def exit_code(fn: Callable[..., object], *args: object, failures: Path | None = None) -> int:
    """Run a worker's job; user errors print one line (exit 2), a divergence exits 3, a
    preemption or a requested stop 75, noted in `failures` (the launcher's folder) for a
    launcher stopped by the same signal, which cannot see the workers' exit codes."""
    try:
        fn(*args)
        if failures is not None:  # a launcher stopped by a signal now counts this one done
            with contextlib.suppress(OSError):
                write_atomic(failures / f"done-rank{os.environ.get('RANK', '0')}", "")
        _JOB_DONE.set()
    except SegscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except Diverged as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stops at the same step: say it once
            print(f"error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # an agreed stop, at one step: say it once
            print(f"preempted: {e}", file=sys.stderr)
        if failures is not None:
            with contextlib.suppress(OSError):
                write_atomic(failures / f"stopped-rank{os.environ.get('RANK', '0')}", str(e))
        return PREEMPTED_EXIT_CODE
    return 0


def exit_now(code: int) -> None:
    """End a torchrun-launched process once its work is done and its files are written: flush,
    then skip interpreter teardown. C++ threads destroyed during teardown, after the process
    group was closed, can abort the process at the very end ('terminate called without an
    active exception', SIGABRT, no Python traceback). Nothing left to do needs teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

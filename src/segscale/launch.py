"""Start workers: in this process for one worker, else through torch.distributed.run (torchrun's
elastic agent, run in this process), which sets RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous for
every worker process.

On Linux the workers are forked from a fork server (multiprocessing's "forkserver", which torchrun
supports for function entrypoints): a fresh interpreter that imports torch and segscale once,
started early so that it does so on another core while the CLI checks the run. Each worker then
starts with everything imported instead of importing torch and what DistributedDataParallel
imports itself (seconds per worker: docs/performance.md, "Engine overhead"). Forking from the server, not from the CLI, is what makes it safe:
the server never runs an OpenMP parallel region (a child forked after one hangs in libgomp at its
first multi-threaded op) nor touches CUDA (which cannot be used in a child forked after it was)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from segscale.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    SegscaleError,
)


def check_nodes(nodes: int, node_rank: int, rdzv_endpoint: str | None) -> None:
    """Refuse a node layout torchrun cannot start (it would wait for the missing nodes)."""
    if nodes < 1:
        raise SegscaleError(f"--nodes {nodes}: expected at least 1")
    if not 0 <= node_rank < nodes:
        raise SegscaleError(f"--node-rank {node_rank}: expected 0..{nodes - 1} for --nodes {nodes}")
    if nodes > 1 and not rdzv_endpoint:
        raise SegscaleError("--nodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if nodes == 1 and rdzv_endpoint:
        raise SegscaleError(
            "--rdzv-endpoint is for a run on several nodes: give --nodes N too (one node needs none)"
        )
    if rdzv_endpoint is not None:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SegscaleError(
                f"--rdzv-endpoint {rdzv_endpoint}: expected HOST:PORT, e.g. node01:29500"
            )


def torchrun_args(
    worker_args: list[str],
    workers: int,
    nodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    start_method: str = "spawn",
) -> list[str]:
    """torchrun's arguments for `segscale.worker WORKER_ARGS` on `workers` processes: fresh
    interpreters (`python -m segscale.worker`) with start_method "spawn", else function workers
    started by that multiprocessing method."""
    check_nodes(nodes, node_rank, rdzv_endpoint)
    args = [f"--nproc-per-node={workers}"]
    if nodes == 1:
        args.append("--standalone")  # a free local port, no external rendezvous
    else:
        args += [
            f"--nnodes={nodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-conf=join_timeout={RENDEZVOUS_TIMEOUT}",
        ]
    if start_method == "spawn":
        entry = ["-m", "segscale.worker"]
    else:  # torchrun runs this script with runpy in each started process
        entry = [f"--start-method={start_method}", "--run-path", str(FORKED_WORKER)]
    return [*args, f"--max-restarts={max_restarts}", *entry, *worker_args]


FORKED_WORKER = Path(__file__).with_name("_forked_worker.py")
RENDEZVOUS_TIMEOUT = 600  # seconds the nodes of a run have to join it (torch's default)
# What every worker imports, loaded once by the fork server; training workers also import
# torch._dynamo, because the DistributedDataParallel constructor reads one of its settings.
PRELOAD = ["torch", "segscale.engine", "segscale.train", "segscale.worker"]


def start_method() -> str:
    """forkserver on Linux; elsewhere (macOS, Windows) a fork is not safe: fresh interpreters."""
    return "forkserver" if sys.platform == "linux" else "spawn"


def start_worker_server(training: bool = True) -> None:
    """Start the fork server now, if this platform uses one; a no-op once it runs. `segscale train`
    calls this before it reads the config, so that the server's imports overlap the CLI's checks.
    `training`: preload what DDP imports too."""
    if start_method() != "forkserver":
        return
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.set_forkserver_preload([*PRELOAD, *(["torch._dynamo"] if training else [])])
    forkserver.ensure_running()


def launch(
    worker_args: list[str], workers: int = 1, method: str | None = None, **kwargs: object
) -> int:
    """Run `segscale.worker` with worker_args on `workers` processes; returns the exit code.
    `method`: how to start them, "forkserver" or "spawn" (default: start_method())."""
    if workers < 1:
        raise SegscaleError(f"--workers {workers}: expected at least 1")
    if workers == 1 and kwargs.get("nodes", 1) == 1:
        from segscale.worker import main

        try:
            return main(worker_args)
        except Exception as e:  # not a user error: its traceback, summed up as for N workers
            traceback.print_exception(e)
            print(
                f"error: the worker failed, with this error: {type(e).__name__}: {e}",
                file=sys.stderr,
            )
            return 1
    method = method or start_method()
    if method == "forkserver":
        start_worker_server(training=worker_args[0] == "train")
    # torchrun would force OMP_NUM_THREADS=1 (with a warning); give each worker its share instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    if kwargs.get("nodes", 1) != 1:  # torchrun waits for them without a word
        print(
            f"waiting for all {kwargs['nodes']} nodes to join at {kwargs.get('rdzv_endpoint')} "
            f"(up to {RENDEZVOUS_TIMEOUT} s); start the same command on each with its --node-rank",
            file=sys.stderr,
            flush=True,
        )
    failures = Path(tempfile.mkdtemp(prefix="segscale-failures-"))
    # --agent: the workers end with this process if it is killed (segscale.worker.end_with_agent)
    own = ["--failures", str(failures), "--agent", str(os.getpid())]
    try:
        args = torchrun_args([*worker_args, *own], workers, start_method=method, **kwargs)  # type: ignore[arg-type]
        single_node = kwargs.get("nodes", 1) == 1
        return run_elastic(args, failures, range(workers) if single_node else None, workers)
    finally:
        shutil.rmtree(failures, ignore_errors=True)


def run_elastic(
    args: list[str],
    failures: Path | None = None,
    ranks: range | None = None,
    local_workers: int | None = None,
) -> int:
    """torchrun with `args`, its elastic agent in this process: the CLI has already imported torch
    to check the run, and a separate agent process would import it again before the workers even
    start. Returns a failed worker's own exit code (2: a user error, 3: diverged, 75: stopped)
    where torchrun would say 1. When workers fail, names the first failure, its root cause (from the workers'
    reports in `failures`, see segscale.worker.report_failure), and the failures that followed."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import get_args_parser, run

    # the agent logs every failed worker's traceback, the secondary ones included; segscale
    # prints the first failure's instead, and one line for each that followed
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    # the agent's own log: a restart is said in one line; "Received 15 death signal" and the
    # like are not (the workers say what they did)
    server_log = logging.getLogger("torch.distributed.elastic.agent.server.api")
    server_level = server_log.level
    server_log.setLevel(logging.INFO)
    restarts = _SayRestarts()
    server_log.addFilter(restarts)
    # "Terminating process N via signal SIGTERM": the stop or failure is said otherwise
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    spawn_level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        message = explain_failure(e.failures, failures, ranks)
        if message:
            print(message, file=sys.stderr)
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return next((c for c in codes if c > 0), 1)
    except RendezvousTimeoutError:
        print(
            f"error: not every node joined within {RENDEZVOUS_TIMEOUT} s; start the same command "
            "on each node, with its --node-rank and this --rdzv-endpoint",
            file=sys.stderr,
        )
        return USER_ERROR_EXIT_CODE
    except SignalException as e:
        # torchrun passed the signal on; this node's workers said how they ended (the folder
        # is this launcher's own): all stopped with the checkpoint, or all had finished
        notes = failures.glob("*-rank*") if failures else []
        ended = [n for n in (p.name.partition("-")[0] for p in notes) if n in ("done", "stopped")]
        if local_workers and len(ended) == local_workers:
            if set(ended) == {"done"}:
                return 0  # the run had finished when the signal came
            if set(ended) <= {"done", "stopped"}:
                return PREEMPTED_EXIT_CODE  # resumable, as with one worker (rank 0 said where)
        print(f"stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        agent_log.setLevel(level)
        server_log.setLevel(server_level)
        server_log.removeFilter(restarts)
        spawn_log.setLevel(spawn_level)
    return 0


class _SayRestarts(logging.Filter):
    """On torchrun's agent log: one line when it restarts the workers after a failure
    (--max-restarts), else silent below ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "will restart worker group" in str(record.msg) and "attempts left" in str(record.msg):
            _, state, left, total = record.args  # type: ignore[misc]
            print(
                f"a worker {str(state).lower()}: restarting all workers (restart "
                f"{int(total) - int(left) + 1} of {total}); they resume from the newest checkpoint",
                file=sys.stderr,
                flush=True,
            )
        return record.levelno >= logging.ERROR


def explain_failure(
    failed: dict[int, Any], failures: Path | None, ranks: range | None = None
) -> str:
    """The message for a failed multi-worker run: the root cause first, then one line per other
    failure. The root cause is the earliest error that does not follow from another worker's
    (with its traceback); else a worker torchrun saw killed by a signal; else a worker of `ranks`
    (this node's, when known) that stopped without any report, as a SIGKILL leaves it; else the
    earliest error. `failed`: torchrun's ProcessFailure per global rank."""
    reports = []
    for path in sorted(failures.glob("attempt*-rank*.json")) if failures else []:
        with contextlib.suppress(OSError, ValueError):
            reports.append(json.loads(path.read_text()))
    if reports:  # the last attempt's: earlier ones were restarted
        last = max(r["attempt"] for r in reports)
        reports = sorted((r for r in reports if r["attempt"] == last), key=lambda r: r["time"])
    by_rank = {r["rank"]: r for r in reports}
    killed = {rank: f for rank, f in failed.items() if f.exitcode < 0}
    causes = [r for r in reports if not r["follows_from_peer"]]
    lines: list[str] = []
    if causes:
        root: int | None = causes[0]["rank"]
        r = by_rank[root]
        if r["user_error"]:
            lines.append(f"error: worker {root} on {r['node']} failed first: {r['error']}")
        else:
            lines += [
                f"error: worker {root} on {r['node']} failed first, with this error:",
                r["traceback"].rstrip(),
            ]
    elif killed:
        root = min(killed)
        name = _signal_name(-killed[root].exitcode)
        why = (
            " (the system's out-of-memory killer sends it, or a kill -9)"
            if name == "SIGKILL"
            else ""
        )
        lines.append(f"error: worker {root} was killed by signal {name}{why}")
    elif (
        reports
        and ranks is not None
        and (silent := sorted(set(ranks) - set(by_rank) - set(failed)))
    ):
        # others failed because of a peer, and this one never said a word: it was killed
        root = silent[0]
        lines.append(
            f"error: worker {root} stopped without reporting an error: killed by a signal (SIGKILL: "
            "the system's out-of-memory killer, or a kill -9) or crashed in native code"
        )
    elif reports:
        root = reports[0]["rank"]
        lines += [
            f"error: worker {root} failed first, with this error:",
            reports[0]["traceback"].rstrip(),
        ]
    else:
        root = None
    for rank, f in sorted(failed.items()):
        if rank == root:
            continue
        if rank in by_rank:
            what = by_rank[rank]["error"].splitlines()[0][:160]
        elif f.exitcode < 0:
            what = f"killed by signal {_signal_name(-f.exitcode)}"
        elif f.exitcode in SAID_WHY:  # it printed its own one-line reason
            continue
        else:
            what = f"exit code {f.exitcode}: {_first_line(f.message)}"
        follows = f", after worker {root}" if root is not None else ""
        lines.append(f"error: worker {rank} failed{follows} ({what})")
    if not lines and failed and all(f.exitcode in SAID_WHY for f in failed.values()):
        return ""  # every worker said why
    return "\n".join(lines) if lines else "error: a worker failed; see the messages above"


# exit codes of workers that printed their own reason: a user error, a divergence, a stop
SAID_WHY = (USER_ERROR_EXIT_CODE, DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE)


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.valid_signals() else str(number)


def _first_line(message: Any) -> str:
    if isinstance(message, dict):  # torch's error file: {"message": ..., "extraInfo": {...}}
        message = message.get("message", "")
    return str(message).strip().splitlines()[0][:160] if str(message).strip() else "no message"


# a line of every job `segscale launch` writes: writing it again replaces its own script, and
# nothing else without --force
MARK = "# written by segscale launch"


def sbatch_script(
    run_dir: Path, nodes: int, gpus_per_node: int, time: str, partition: str | None, name: str
) -> str:
    """A Slurm job: one torchrun agent per node (srun), rendezvous on the first node's host at
    a port of the job's own (20000 + job id mod 10000: jobs sharing a node do not collide); one
    node needs no rendezvous host (--standalone, as `segscale train`)."""
    # Slurm expands %x patterns in the whole --output path: a literal % in the folder is %%
    log = str(run_dir).replace("%", "%%")
    rendezvous = (
        "  --standalone \\"
        if nodes == 1
        else "  --rdzv-backend=c10d --rdzv-id=$SLURM_JOB_ID "
        "--rdzv-endpoint=$HEAD:$((20000 + SLURM_JOB_ID % 10000)) \\"
    )
    lines = [
        "#!/bin/bash",
        MARK,
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={log}/slurm-%j.out",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "",
        *(
            [
                "# The first node of the allocation hosts the c10d rendezvous.",
                'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                "",
            ]
            if nodes > 1
            else []
        ),
        "# --resume: submitted again (after a time limit or a preemption), the run goes on from",
        "# its newest checkpoint; the first time, there is none and it starts.",
        "srun torchrun \\",
        f"  --nnodes={nodes} --nproc-per-node={gpus_per_node} \\",
        rendezvous,
        f"  -m segscale.worker train {run_dir} --resume --no-progress",
        "",
    ]
    return "\n".join(lines)

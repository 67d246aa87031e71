"""Start workers: in this process for one worker, else through torch.distributed.run (torchrun's
elastic agent, run in this process), which sets RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous for
every worker process."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from segscale.errors import SegscaleError


def torchrun_args(
    worker_args: list[str],
    workers: int,
    nodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
) -> list[str]:
    """torchrun's arguments for `python -m segscale.worker WORKER_ARGS` on `workers` processes."""
    args = [f"--nproc-per-node={workers}"]
    if nodes == 1:
        args.append("--standalone")  # a free local port, no external rendezvous
    else:
        if not rdzv_endpoint:
            raise SegscaleError(
                "--nodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)"
            )
        args += [
            f"--nnodes={nodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
        ]
    return [*args, f"--max-restarts={max_restarts}", "-m", "segscale.worker", *worker_args]


def launch(worker_args: list[str], workers: int = 1, **kwargs: object) -> int:
    """Run `segscale.worker` with worker_args on `workers` processes; returns the exit code."""
    if workers < 1:
        raise SegscaleError(f"--workers {workers}: expected at least 1")
    if workers == 1 and kwargs.get("nodes", 1) == 1:
        from segscale.worker import main

        return main(worker_args)
    # torchrun would force OMP_NUM_THREADS=1 (with a warning); give each worker its share instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return run_elastic(torchrun_args(worker_args, workers, **kwargs))  # type: ignore[arg-type]


def run_elastic(args: list[str]) -> int:
    """torchrun with `args`, its elastic agent in this process: the CLI has already imported torch
    to check the run, and a separate agent process would spend ~2 s importing it again before the
    workers even start. Returns a failed worker's own exit code (2: a user error, 75: preempted)
    where torchrun would say 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        for rank, code in codes.items():
            if code < 0:
                name = signal.Signals(-code).name if -code in signal.valid_signals() else -code
                print(f"error: worker {rank} was killed by signal {name}", file=sys.stderr)
            elif code not in (2, 75):  # those printed their own one-line reason
                print(
                    f"error: worker {rank} failed with exit code {code}; its traceback is above",
                    file=sys.stderr,
                )
        return next((c for c in codes.values() if c > 0), 1)
    except SignalException as e:
        print(f"stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


def sbatch_script(
    run_dir: Path, nodes: int, gpus_per_node: int, time: str, partition: str | None, name: str
) -> str:
    """A Slurm job: one torchrun agent per node (srun), rendezvous on the first node's host."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        *([f"#SBATCH --partition={partition}"] if partition else []),
        "",
        "# The first node of the allocation hosts the c10d rendezvous.",
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "",
        "srun torchrun \\",
        f"  --nnodes={nodes} --nproc-per-node={gpus_per_node} \\",
        "  --rdzv-backend=c10d --rdzv-id=$SLURM_JOB_ID --rdzv-endpoint=$HEAD:29500 \\",
        f"  -m segscale.worker train {run_dir} --no-progress",
        "",
    ]
    return "\n".join(lines)

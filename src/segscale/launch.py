"""Start workers: in this process for one worker, else through torch.distributed.run (torchrun's
elastic agent), which sets RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous for every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from segscale.errors import SegscaleError


def torchrun_command(
    worker_args: list[str],
    workers: int,
    nodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}"]
    if nodes == 1:
        cmd.append("--standalone")  # a free local port, no external rendezvous
    else:
        if not rdzv_endpoint:
            raise SegscaleError(
                "--nodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)"
            )
        cmd += [
            f"--nnodes={nodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
        ]
    cmd += [f"--max-restarts={max_restarts}", "-m", "segscale.worker", *worker_args]
    return cmd


def launch(worker_args: list[str], workers: int = 1, **kwargs: object) -> int:
    """Run `segscale.worker` with worker_args on `workers` processes; returns the exit code."""
    if workers < 1:
        raise SegscaleError(f"--workers {workers}: expected at least 1")
    if workers == 1 and kwargs.get("nodes", 1) == 1:
        from segscale.worker import main

        return main(worker_args)
    env = dict(os.environ)
    # torchrun would force OMP_NUM_THREADS=1 (with a warning); give each worker its share instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    return subprocess.run(torchrun_command(worker_args, workers, **kwargs), env=env).returncode  # type: ignore[arg-type]


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

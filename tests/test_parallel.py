"""The distributed engine on real gloo processes: strategies, simulated scale, multi-node, launchers."""

import copy
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, cli, tiny_config
from segscale import worker
from segscale.config import validate
from segscale.engine import plan, prepare_run_dir
from segscale.errors import SegscaleError
from segscale.launch import torchrun_args


def losses(run_dir: Path) -> np.ndarray:
    return np.array(
        [
            json.loads(line)["train_loss"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
    )


def write_config(tmp_path: Path, store: Path, name: str, norm: str = "batch", **train) -> Path:
    defaults = {
        "epochs": 4,
        "steps_per_epoch": 5,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0},
    }
    cfg = tiny_config(store, **{**defaults, **train})
    cfg["data"]["augment"] = {"enabled": True, "rotation": 20, "flip": True}
    cfg["model"]["kwargs"]["norm"] = norm
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cli(config: Path, run_dir: Path, *args: object) -> None:
    r = cli("train", config, "--run-dir", run_dir, *args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.distributed
def test_simulated_and_local_sgd_reproduce_real_allreduce(tmp_path, real_store):
    """20 steps of 2 real gloo workers vs (a) 2 simulated workers in one process: the same loss
    trajectory (measured ≈2e-8 relative; asserted ≤ 1e-6); (b) local SGD averaging the parameters
    every step with plain SGD, the same math in another rounding order, whose differences grow
    through training (measured ≈1e-4 at step 20; asserted ≤ 1e-3); (c) DDP's tuning options, which
    change how gradients travel but not their sum: bit-identical losses and weights."""
    real = tmp_path / "real"
    train_cli(write_config(tmp_path, real_store, "real"), real, "--workers", 2)

    tuned = tmp_path / "tuned"
    ddp = {"bucket_cap_mb": 0.1, "gradient_as_bucket_view": False, "static_graph": True}
    config = write_config(
        tmp_path, real_store, "tuned", strategy={"name": "allreduce", "kwargs": ddp}
    )
    train_cli(config, tuned, "--workers", 2)
    assert np.array_equal(losses(tuned), losses(real))
    wr, wt = (torch.load(d / "model.pt", weights_only=True) for d in (real, tuned))
    assert all(torch.equal(wt[k], wr[k]) for k in wr)

    # one thread, like each of the 2 real workers: threaded kernels reduce in another order
    sim_config = write_config(tmp_path, real_store, "sim", simulate_workers=2, threads=1)
    sim_cfg = validate(yaml.safe_load(sim_config.read_text()))
    sim = tmp_path / "sim"
    prepare_run_dir(sim_cfg, sim, resume=False)
    worker.train(sim, progress=False)
    assert json.loads((sim / "environment.json").read_text())["global_batch"] == 8

    local = tmp_path / "local"
    train_cli(
        write_config(
            tmp_path, real_store, "local", strategy={"name": "local_sgd", "kwargs": {"period": 1}}
        ),
        local,
        "--workers",
        2,
    )

    a = losses(real)
    assert len(a) == 4 and a[-1] < a[0]
    np.testing.assert_allclose(losses(sim), a, rtol=1e-6)
    np.testing.assert_allclose(losses(local), a, rtol=1e-3)
    assert not np.array_equal(losses(local), a)  # it did run the other code path
    wa, ws = (
        torch.load(real / "model.pt", weights_only=True),
        torch.load(sim / "model.pt", weights_only=True),
    )
    for k in wa:
        if wa[k].is_floating_point() and "running" not in k:  # BN running stats differ by design
            torch.testing.assert_close(ws[k], wa[k], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_fused_simulation_without_batchnorm_matches_up_to_rounding(tmp_path, real_store):
    """simulate_fused with instance norm: the K micro-batches share one forward pass. The math is
    the same; batched kernels round differently and training amplifies it (measured ≈2e-4 relative
    after 20 steps at this learning rate, equal to 1e-6 after the first 5)."""
    real = tmp_path / "real"
    train_cli(write_config(tmp_path, real_store, "real", norm="instance"), real, "--workers", 2)
    sim_config = write_config(
        tmp_path,
        real_store,
        "sim",
        norm="instance",
        simulate_workers=2,
        simulate_fused=True,
        threads=1,
    )
    sim = tmp_path / "sim"
    prepare_run_dir(validate(yaml.safe_load(sim_config.read_text())), sim, resume=False)
    worker.train(sim, progress=False)
    assert json.loads((sim / "environment.json").read_text())["fused_microbatches"] is True
    a, b = losses(real), losses(sim)
    np.testing.assert_allclose(b[0], a[0], rtol=1e-6)
    np.testing.assert_allclose(b, a, rtol=1e-3)


def test_simulate_workers_flag_of_segscale_train(tmp_path, real_store):
    """`segscale train CFG --simulate-workers K` is train.simulate_workers=K, recorded in the run
    folder's config; with --workers > 1 or K < 1 it is refused in one line (exit 2)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(real_store, epochs=1, steps_per_epoch=2)))
    run = tmp_path / "run"
    r = cli("train", config, "--run-dir", run, "--simulate-workers", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    env = json.loads((run / "environment.json").read_text())
    assert (env["simulated"], env["workers"], env["global_batch"]) == (True, 2, 8)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["simulate_workers"] == 2

    r = cli("train", config, "--run-dir", tmp_path / "r2", "--simulate-workers", 2, "--workers", 2)
    assert r.returncode == 2
    assert "simulate_workers runs K workers' math in one process: use --workers 1" in r.stderr
    r = cli("train", config, "--run-dir", tmp_path / "r3", "--simulate-workers", 0)
    assert r.returncode == 2 and "train.simulate_workers" in r.stderr, r.stderr


def test_ghost_batchnorm_normalises_each_micro_batch_alone_bit_for_bit():
    """One pass over K micro-batches gives the very outputs, running statistics and step count of K
    passes through the plain layer; evaluation is the plain layer's; state_dict keys are kept."""
    from segscale.parallel import ghost_batchnorm

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, momentum=None))
    ghost = ghost_batchnorm(copy.deepcopy(plain), 3)
    assert type(ghost[1]).__name__ == "GhostBatchNorm2d"
    assert list(ghost.state_dict()) == list(plain.state_dict())
    x = torch.randn(6, 2, 9, 9)
    out = ghost(x)
    assert torch.equal(out, torch.cat([plain(part) for part in x.chunk(3)]))
    for name, buf in plain.named_buffers():
        assert torch.equal(dict(ghost.named_buffers())[name], buf), name
    assert int(ghost[1].num_batches_tracked) == 3
    ghost.eval(), plain.eval()
    assert torch.equal(ghost(x), plain(x))
    ghost.train()
    with pytest.raises(
        SegscaleError, match="a batch of 5 does not split into 3 equal micro-batches"
    ):
        ghost(x[:5])


@pytest.mark.distributed
def test_fused_simulation_with_batchnorm_matches_the_exact_path(tmp_path, real_store):
    """simulate_fused with BatchNorm (ghost BatchNorm): one pass for both micro-batches, each still
    normalised alone, so losses and running statistics follow the exact path up to rounding.
    Measured: losses 5e-8 relative after 5 steps, 1.5e-5 after 20; weights and running statistics
    within 1e-3. BatchNorm over both micro-batches together (no ghost) is 4e-4 off after 5 steps."""
    runs = {}
    for name, fused in (("exact", False), ("fused", True)):
        config = write_config(
            tmp_path, real_store, name, simulate_workers=2, simulate_fused=fused, threads=1
        )
        runs[name] = run = tmp_path / name
        prepare_run_dir(validate(yaml.safe_load(config.read_text())), run, resume=False)
        worker.train(run, progress=False)
        assert json.loads((run / "environment.json").read_text())["fused_microbatches"] is fused
    a, b = losses(runs["exact"]), losses(runs["fused"])
    np.testing.assert_allclose(b[0], a[0], rtol=1e-6)
    np.testing.assert_allclose(b, a, rtol=1e-4)
    wa = torch.load(runs["exact"] / "model.pt", weights_only=True)
    wb = torch.load(runs["fused"] / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:  # running statistics too: updated once per micro-batch on both paths
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=5e-3)


def test_bf16_compression_on_cpu_workers_is_refused_before_the_process_group(monkeypatch):
    """Started by torchrun directly (no `segscale train` check), each worker refuses in one line
    before it joins a process group, instead of gloo's TypeError in the hook at the first step."""
    from segscale.parallel import AllReduceStrategy

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SegscaleError, match="compression 'bf16' needs GPUs"):
        AllReduceStrategy(device="cpu", compression="bf16")
    # PowerSGD settings torch refuses only when DDP installs the hook (a traceback per worker)
    for kwargs, match in (
        ({"powersgd_start_iter": 1}, r"powersgd_start_iter 1: Expect `start_powerSGD_iter` > 1"),
        ({"powersgd_rank": 0}, r"powersgd_rank 0: expected 1 or more"),
    ):
        with pytest.raises(SegscaleError, match=match):
            AllReduceStrategy(device="cpu", compression="powersgd", **kwargs)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "kwargs",
    [
        {"compression": "fp16"},
        {"compression": "powersgd", "powersgd_rank": 1, "powersgd_start_iter": 2},
    ],
    ids=["fp16", "powersgd"],
)
def test_compression_hooks_train_on_gloo_workers(tmp_path, real_store, kwargs):
    """The compression hooks that gloo carries (bf16 needs NCCL and is refused on CPU)."""
    run = tmp_path / kwargs["compression"]
    train_cli(
        write_config(
            tmp_path, real_store, "p", strategy={"name": "allreduce", "kwargs": kwargs}, amp="bf16"
        ),
        run,
        "--workers",
        2,
    )
    got = losses(run)
    assert np.isfinite(got).all() and got[-1] < got[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_torchrun_agents_as_two_nodes(tmp_path, real_store):
    """Two elastic agents (--nnodes 2) on this machine, rendezvous on 127.0.0.1, one model, through
    the torchrun-native entry point `-m segscale.worker train CONFIG`."""
    config = write_config(tmp_path, real_store, "mn", epochs=1)
    run, port = tmp_path / "mn", free_port()
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={r}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "-m",
                "segscale.worker",
                "train",
                str(config),
                "--run-dir",
                str(run),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-3000:]
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 2 and env["global_batch"] == 8
    assert (run / "model.pt").is_file()


@pytest.mark.distributed
def test_fork_server_and_fresh_interpreter_workers_train_identically(tmp_path, real_store):
    """Workers forked from the fork server (the default on Linux) and workers started as fresh
    interpreters (elsewhere) train bit-identical weights. The config's `workers` applies when
    --workers is not given."""
    cfg = tiny_config(real_store, epochs=2, steps_per_epoch=3)
    cfg["data"]["augment"] = {"enabled": True, "rotation": 20, "flip": True}
    cfg["workers"] = 2
    config = tmp_path / "w.yaml"
    config.write_text(yaml.safe_dump(cfg))
    forked = tmp_path / "forked"
    train_cli(config, forked)
    assert json.loads((forked / "environment.json").read_text())["workers"] == 2

    spawned = tmp_path / "spawned"
    prepare_run_dir(validate(cfg), spawned, resume=False)
    code = (
        "import sys; from segscale.launch import launch; "
        f"sys.exit(launch(['train', {str(spawned)!r}, '--no-progress'], 2, method='spawn'))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(forked).tolist() == losses(spawned).tolist()
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (forked, spawned))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_launch_commands_and_slurm_script(tmp_path, real_store):
    cmd = torchrun_args(["train", "RUN"], 4, nodes=2, node_rank=1, rdzv_endpoint="head:29500")
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--rdzv-endpoint=head:29500" in cmd
    assert cmd[-3:] == ["segscale.worker", "train", "RUN"]
    with pytest.raises(SegscaleError, match="needs --rdzv-endpoint"):
        torchrun_args(["train", "RUN"], 1, nodes=2)
    config = write_config(tmp_path, real_store, "job")
    r = cli(
        "launch",
        "--slurm",
        config,
        "--nodes",
        3,
        "--gpus-per-node",
        4,
        "--run-dir",
        tmp_path / "job",
    )
    assert r.returncode == 0, r.stderr
    # checked for the cluster's 12 workers (global batch 48 on 36 slices), not this machine's
    assert "warning: global batch 48 (train.batch_size 4 × 12 workers)" in r.stderr
    script = (tmp_path / "job" / "job.sbatch").read_text()
    assert (
        "#SBATCH --nodes=3" in script
        and "--nnodes=3 --nproc-per-node=4" in script
        and "srun torchrun" in script
    )
    assert (tmp_path / "job" / "config.yaml").is_file()
    # submitted again after a time limit, the job goes on from its newest checkpoint
    assert f"-m segscale.worker train {tmp_path / 'job'} --resume --no-progress" in script
    with pytest.raises(SegscaleError, match="--rdzv-endpoint nohostport: expected HOST:PORT"):
        torchrun_args(["train", "RUN"], 1, nodes=2, rdzv_endpoint="nohostport")


def test_launch_writes_nothing_a_shell_would_misread_and_checks_as_train_does(tmp_path, real_store):
    config = write_config(tmp_path, real_store, "job")
    for args, message in [
        # a line break in the name would have been a command line of the script
        ([r'name="x\nrm -rf $HOME"'], r"key 'name': must be a plain folder name"),
        (["--run-dir", tmp_path / "sp ace"], r"a path with spaces, quotes or other shell"),
        (["model.kwargs.depth=6"], r"model 'unet'"),  # 32-px slices: train refuses it too
        (["--run-dir", config], r"a file, not a run folder"),
        (["--run-dir", config, "--resume"], r"a file, not a run folder"),  # was: "not started"
        (["--run-dir", real_store, "--resume"], r"is a prepared store"),
        (["--time", "1:00:00\ntouch /tmp/pwned"], r"--time .*: expected a Slurm time"),
        (["--partition", "gpu;rm"], r"--partition .*: expected a partition name"),
    ]:
        r = cli("launch", "--slurm", config, *args)
        assert r.returncode == 2 and re.search(message, r.stderr), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.glob("sp ace*")) and not (ROOT / "runs" / "job").exists()
    # --resume is for a run already started (a job for a new one was written)
    r = cli("launch", "--slurm", config, "--run-dir", tmp_path / "new", "--resume")
    assert r.returncode == 2 and "has not started (no checkpoint)" in r.stderr, r.stderr
    run = tmp_path / "started"
    assert cli("launch", "--slurm", config, "--run-dir", run).returncode == 0
    (run / "checkpoints").mkdir()
    again = cli("launch", "--slurm", config, "--run-dir", run)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    assert cli("launch", "--slurm", config, "--run-dir", run, "--resume").returncode == 0


def test_schedule_plot(tmp_path, real_store):
    config = write_config(
        tmp_path, real_store, "sched", schedule={"warmup_epochs": 1, "decay": "cosine"}
    )
    out = tmp_path / "lr.png"
    r = cli("schedule", config, "--workers", 4, "--out", out)
    assert r.returncode == 0, r.stderr
    assert (
        "peak lr 0.2 " in r.stdout
    )  # 0.05 × 4 workers (linear rule, reference = per-worker batch)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a curve of 4 × 4 workers that `train` refuses was plotted
    r = cli("schedule", config, "--workers", 4, "train.simulate_workers=4", "--out", out)
    assert r.returncode == 2 and "math in one process: use --workers 1" in r.stderr, r.stderr
    # without --workers: as `train` runs the config, its one worker × simulate_workers
    r = cli("schedule", config, "train.simulate_workers=3", "--out", out)
    assert r.returncode == 0 and "peak lr 0.15 (base 0.05, 3 worker(s)" in r.stdout, r.stderr
    r = cli("schedule", config, "workers=2", "train.simulate_workers=3", "--out", out)
    assert r.returncode == 2 and "math in one process" in r.stderr, r.stderr
    # another dataset's steps per epoch: no store is needed (it may not be prepared yet)
    missing = f"data.store={tmp_path / 'not-prepared'}"
    r = cli("schedule", config, missing, "--steps-per-epoch", 50, "--out", out, "--force")
    assert r.returncode == 0 and "peak lr 0.05 " in r.stdout, r.stderr
    r = cli("schedule", config, missing, "--out", out)
    assert r.returncode == 2 and "not a prepared store" in r.stderr, r.stderr


def test_misconfigurations_fail_before_launch(real_store):

    cfg = validate(tiny_config(real_store, sync_batchnorm=True, device="cpu"))
    with pytest.raises(SegscaleError, match="sync_batchnorm needs GPUs"):
        plan(cfg).check(2)
    # a thousand CPU processes: refused, with the simulation named (was: a launcher traceback)
    with pytest.raises(SegscaleError, match=r"1000 workers on this machine's \d+ CPU core"):
        plan(validate(tiny_config(real_store, device="cpu"))).check(1000)
    with pytest.raises(
        SegscaleError, match=r"simulate_fused applies to train\.simulate_workers only"
    ):
        plan(validate(tiny_config(real_store, simulate_fused=True))).check(1)
    with pytest.raises(SegscaleError, match="use --workers 1"):
        plan(validate(tiny_config(real_store, simulate_workers=4))).check(2)
    with pytest.raises(SegscaleError, match="use --nodes 1 --gpus-per-node 1"):  # launch's
        plan(validate(tiny_config(real_store, simulate_workers=4))).check(2, here=False)
    for strategy, what in (
        ({"name": "local_sgd", "kwargs": {"period": 2}}, "'local_sgd'"),
        ({"name": "allreduce", "kwargs": {"compression": "powersgd"}}, "compression 'powersgd'"),
    ):
        with pytest.raises(
            SegscaleError, match=f"not train.strategy {what}: use strategy allreduce"
        ):
            plan(validate(tiny_config(real_store, simulate_workers=2, strategy=strategy)))
    tuned = {"name": "allreduce", "kwargs": {"bucket_cap_mb": 5}}  # how, not what: simulated
    plan(validate(tiny_config(real_store, simulate_workers=2, strategy=tuned)))
    bf16 = {"name": "allreduce", "kwargs": {"compression": "bf16"}}
    with pytest.raises(SegscaleError, match="compression 'bf16' needs GPUs"):
        plan(validate(tiny_config(real_store, strategy=bf16, device="cpu"))).check(2)
    plan(validate(tiny_config(real_store, strategy=bf16, device="cpu"))).check(1)  # no effect

    with pytest.raises(SegscaleError, match=r"strategy 'allreduce' kwargs \['bucket_mb'\]"):
        plan(
            validate(
                tiny_config(real_store, strategy={"name": "allreduce", "kwargs": {"bucket_mb": 5}})
            )
        )
    with pytest.raises(SegscaleError, match="unknown strategy 'alreduce'"):
        plan(validate(tiny_config(real_store, strategy="alreduce")))


def test_schedule_refuses_a_picture_it_cannot_write(tmp_path, real_store):
    config = write_config(tmp_path, real_store, "sched")
    (tmp_path / "file").write_text("")
    for out, message in [
        (tmp_path / "file" / "lr.png", "is a file or inside one"),
        (tmp_path / "lr.txt", "expected a .png, .pdf or .svg"),
    ]:
        r = cli("schedule", config, "--out", out)
        assert r.returncode == 2 and message in r.stderr, r.stderr


CLOSURE_TRANSFORM = """
def make(scale=1.0):
    def transform(image, mask):  # a closure: it cannot be pickled
        return image * scale, mask
    return transform
"""


@pytest.mark.distributed
def test_loader_processes_under_two_workers_train_as_without_them(tmp_path, real_store):
    """data.num_workers with --workers 2: the loader processes start by fork. They were started
    by the workers' fork server and re-ran the worker program (a gloo failure after 60 s, or a
    hang with orphans); a closure transform could not be pickled."""
    (tmp_path / "t.py").write_text(CLOSURE_TRANSFORM)
    config = write_config(tmp_path, real_store, "loaders", epochs=1, steps_per_epoch=3)
    transform = f"data.transform={{name: {tmp_path / 't.py'}:make}}"
    weights = []
    for n in (0, 1):
        run = tmp_path / f"run{n}"
        r = cli(
            "train", config, transform, f"data.num_workers={n}", "--workers", 2, "--run-dir", run
        )
        assert r.returncode == 0, r.stderr[-3000:]
        weights.append(torch.load(run / "model.pt", weights_only=True))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.distributed
def test_a_node_that_waits_alone_says_so_and_gives_up(tmp_path, real_store, monkeypatch, capsys):
    """--nodes 2 with no second node: torchrun waited silently (600 s, then a traceback)."""
    from segscale import launch as launcher
    from segscale.config import load_config
    from segscale.engine import prepare_run_dir

    monkeypatch.setattr(launcher, "RENDEZVOUS_TIMEOUT", 3)
    run = tmp_path / "run"
    prepare_run_dir(load_config(write_config(tmp_path, real_store, "alone")), run, resume=False)
    code = launcher.launch(
        ["train", str(run)], 1, nodes=2, node_rank=0, rdzv_endpoint="127.0.0.1:29987"
    )
    err = capsys.readouterr().err
    assert code == 2 and "waiting for all 2 nodes to join at 127.0.0.1:29987 (up to 3 s)" in err
    assert "error: not every node joined within 3 s" in err
    with pytest.raises(SegscaleError, match="--rdzv-endpoint is for a run on several nodes"):
        launcher.check_nodes(1, 0, "127.0.0.1:29987")


def test_launch_never_writes_over_its_inputs_and_a_job_is_for_one_config(tmp_path, real_store):
    """--out over the config, a store file or a run file was written (rc 0); a folder with a
    '%' broke the Slurm log path; the config's workers were ignored (1 GPU); every job used
    rendezvous port 29500; --resume wrote a job for a finished run; a second launch into a
    folder whose job had not started replaced the queued job's config without a word."""
    config = write_config(tmp_path, real_store, "job")
    run = tmp_path / "run"
    for out, message in (
        (config, r"is the input itself"),
        (real_store / "meta.json", r"is inside the input folder"),
        (run / "config.yaml", r"inside the run folder; its job is job.sbatch"),
        (run, r"inside the run folder"),
    ):
        r = cli("launch", "--slurm", config, "--run-dir", run, "--out", out)
        assert r.returncode == 2 and re.search(message, r.stderr), r.stderr
    assert "SBATCH" not in config.read_text()  # untouched
    odd = tmp_path / "pct%j"
    r = cli("launch", "--slurm", config, "--run-dir", odd, "workers=4", "--nodes", 2)
    assert r.returncode == 0, r.stderr
    # nor into another run's folder, where it would pass for that run's job
    r = cli("launch", "--slurm", config, "--run-dir", run, "--out", odd / "job2.sbatch")
    assert r.returncode == 2 and f"inside the run folder {odd}, another run's" in r.stderr
    script = (odd / "job.sbatch").read_text()
    assert f"#SBATCH --output={tmp_path}/pct%%j/slurm-%j.out" in script
    assert "--nnodes=2 --nproc-per-node=2" in script  # the config's 4 workers on 2 nodes
    assert "--rdzv-endpoint=$HEAD:$((20000 + SLURM_JOB_ID % 10000))" in script
    r = cli("launch", "--slurm", config, "--run-dir", run, "--time", "UNLIMITED")
    assert r.returncode == 0, r.stderr
    r = cli(  # checked as one process, the job's strategy is not "of one worker"
        "launch",
        "--slurm",
        config,
        "--run-dir",
        tmp_path / "pg",
        "--nodes",
        2,
        "train.strategy.kwargs.compression=fp16",
    )
    assert r.returncode == 0 and "no effect with one worker" not in r.stderr, r.stderr
    single = (run / "job.sbatch").read_text()
    assert "--standalone" in single and "HEAD=" not in single and "29500" not in single
    r = cli("launch", "--slurm", config, "--run-dir", run, "train.epochs=9")
    assert r.returncode == 2 and "holds a job not started yet for other settings" in r.stderr
    (run / "model.pt").touch()
    r = cli("launch", "--slurm", config, "--run-dir", run, "--resume")
    assert r.returncode == 2 and "finished already" in r.stderr
    for time in ("1--2", "9-", "1:2:3:4", "99999999999"):
        assert cli("launch", "--slurm", config, "--time", time).returncode == 2, time


def test_a_peak_under_the_base_lr_is_held_not_warmed_down_to():
    """A global batch under reference_batch scales the lr down; the warmup went from the base
    lr down to it (the shipped la_unet example on one worker: 0.001 → 0.0005)."""
    from segscale.config import ScheduleConfig
    from segscale.schedules import build_schedule

    cfg = ScheduleConfig(scaling="linear", reference_batch=16, warmup_epochs=1, decay="none")
    down = build_schedule(cfg, 0.001, 8, 1, 10, 3)
    assert down.peak_lr == pytest.approx(0.0005)
    assert [down(s) for s in (0, 5, 10)] == pytest.approx([0.0005] * 3)
    up = build_schedule(cfg, 0.001, 8, 4, 10, 3)  # global batch 32: the warmup climbs
    assert [up(s) for s in (0, 5, 10)] == pytest.approx([0.001, 0.0015, 0.002])

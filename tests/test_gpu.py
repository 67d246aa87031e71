"""CUDA checks, deselected by default (`pytest -m gpu` on a machine with a GPU)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from segscale import worker
from segscale.config import validate
from segscale.engine import prepare_run_dir

pytestmark = pytest.mark.gpu


def test_cuda_training_and_evaluation_agree_with_cpu_evaluation(tmp_path, real_store):
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    cfg = validate(tiny_config(real_store, device="cuda", epochs=2))
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir, resume=False)
    history = worker.train(run_dir, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    gpu = worker.evaluate(run_dir, "test", tmp_path / "gpu.json")
    cfg_cpu = validate(tiny_config(real_store, device="cpu", epochs=2))
    (run_dir / "config.yaml").write_text(
        (run_dir / "config.yaml").read_text().replace("device: cuda", "device: cpu")
    )
    cpu = worker.evaluate(run_dir, "test", tmp_path / "cpu.json")
    assert (
        cfg_cpu.train.device == "cpu"
        and json.loads((tmp_path / "gpu.json").read_text())["workers"] == 1
    )
    # float kernels differ between devices: a few boundary pixels may flip, no more
    assert gpu["dataset"]["dice"] == pytest.approx(cpu["dataset"]["dice"], abs=5e-3)


def test_cuda_worker_forked_from_the_fork_server_trains_like_a_fresh_interpreter(
    tmp_path, real_store
):
    """`--workers N` on Linux forks each worker from the fork server. The server imports torch
    but never initialises CUDA, so a forked child can: one CUDA worker forked that way trains
    bit-identical weights and losses to one started as a fresh interpreter (deterministic mode)."""
    cfg = validate(tiny_config(real_store, device="cuda", epochs=2))
    runs = {}
    for method in ("forkserver", "spawn"):
        run_dir = runs[method] = tmp_path / method
        prepare_run_dir(cfg, run_dir, resume=False)
        code = (
            "import sys; from segscale.launch import run_elastic, start_worker_server, "
            "torchrun_args; start_worker_server(); sys.exit(run_elastic(torchrun_args("
            f"['train', {str(run_dir)!r}, '--no-progress'], 1, start_method={method!r})))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((run_dir / "environment.json").read_text())["gpus"]
    rows = {m: (d / "metrics.jsonl").read_text().splitlines() for m, d in runs.items()}
    loss = {m: [json.loads(x)["train_loss"] for x in r] for m, r in rows.items()}
    assert loss["forkserver"] == loss["spawn"] and len(loss["spawn"]) == 2
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in runs.values())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_mixed_precision_trains(tmp_path, real_store, amp):
    """Autocast on CUDA (fp16 with its gradient scaler): the loss falls and the weights stay finite."""
    cfg = validate(tiny_config(real_store, device="cuda", epochs=3, amp=amp))
    run_dir = tmp_path / amp
    prepare_run_dir(cfg, run_dir, resume=False)
    history = worker.train(run_dir, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_cuda_cross_entropy_is_reproducible_under_deterministic_mode():
    """CUDA's nll_loss2d sums with atomics even in deterministic mode; segscale's cross-entropy
    gives the same bits on every call there, and torch's value up to float rounding."""
    import torch.nn.functional as F

    from segscale.losses import cross_entropy
    from segscale.repro import deterministic_kernels

    deterministic_kernels()
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(16, 4, 128, 128, device="cuda", generator=g) * 3
    target = torch.randint(0, 4, (16, 128, 128), device="cuda", generator=g)
    values = torch.stack([cross_entropy(logits, target) for _ in range(20)])
    assert torch.equal(values, values[:1].expand(20))
    torch.testing.assert_close(values[0], F.cross_entropy(logits, target), rtol=1e-6, atol=0)


def test_cuda_defaults_are_the_fast_path(tmp_path, real_store):
    """On a GPU a config that says nothing about speed trains in bf16, channels-last, with a fused
    optimiser and the training split on the device, and the run records it."""
    from segscale.config import load_config
    from segscale.engine import plan

    cfg = validate(tiny_config(real_store, device="cuda", epochs=1, steps_per_epoch=2))
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir, resume=False)
    worker.train(run_dir, progress=False)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["amp"] == "bf16" and env["channels_last"] is True and env["data_on_device"] is True
    p = plan(load_config(run_dir / "config.yaml"))
    strategy = p.strategy()
    trainer = p.trainer(strategy, tmp_path / "probe", progress=False)
    assert trainer.optimizer.defaults["fused"] is True
    kernels = [q for q in trainer.model.parameters() if q.dim() == 4 and q.shape[1] > 1]
    assert kernels and all(q.is_contiguous(memory_format=torch.channels_last) for q in kernels)
    strategy.close()


def test_cuda_predict_in_bf16_matches_fp32_masks(tmp_path, real_store):
    import nibabel as nib
    import numpy as np

    from conftest import SAMPLE, trained_run
    from segscale.predict import predict

    run_dir = trained_run(real_store, tmp_path / "run", epochs=2, steps_per_epoch=3)
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    masks = {}
    for amp in ("none", "auto"):
        written = predict(run_dir, [scan], tmp_path / amp, device="cuda", amp=amp)
        assert written.images_per_second > 0
        masks[amp] = np.asarray(nib.load(str(written[0])).dataobj)
    assert (masks["none"] == masks["auto"]).mean() > 0.99


def test_a_cuda_op_without_a_deterministic_kernel_is_named_at_run_start(tmp_path, real_store):
    from conftest import ROOT

    cfg = tiny_config(real_store, device="cuda", epochs=1, steps_per_epoch=1)
    cfg["model"] = {"name": f"{ROOT / 'tests' / 'plugins' / 'bilinear_net.py'}:bilinear_net"}
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "segscale.cli", "train", str(path), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "upsample_bilinear2d_backward" in done.stdout
    record = json.loads((tmp_path / "run" / "environment.json").read_text())["determinism"]
    assert any("upsample_bilinear2d_backward" in op for op in record["nondeterministic_ops"])
    assert record["bit_identical"] is False

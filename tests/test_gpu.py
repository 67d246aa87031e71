"""CUDA checks, deselected by default (`pytest -m gpu` on a machine with a GPU)."""

import json

import pytest
import torch

from conftest import tiny_config
from segscale.config import validate
from segscale.engine import evaluate_worker, prepare_run_dir, train_worker

pytestmark = pytest.mark.gpu


def test_cuda_training_and_evaluation_agree_with_cpu_evaluation(tmp_path, real_store):
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    cfg = validate(tiny_config(real_store, device="cuda", epochs=2))
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir, resume=False)
    history = train_worker(run_dir, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    gpu = evaluate_worker(run_dir, "test", tmp_path / "gpu.json")
    cfg_cpu = validate(tiny_config(real_store, device="cpu", epochs=2))
    (run_dir / "config.yaml").write_text(
        (run_dir / "config.yaml").read_text().replace("device: cuda", "device: cpu")
    )
    cpu = evaluate_worker(run_dir, "test", tmp_path / "cpu.json")
    assert (
        cfg_cpu.train.device == "cpu"
        and json.loads((tmp_path / "gpu.json").read_text())["workers"] == 1
    )
    # float kernels differ between devices: a few boundary pixels may flip, no more
    assert gpu["dataset"]["dice"] == pytest.approx(cpu["dataset"]["dice"], abs=5e-3)

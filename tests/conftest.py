from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(
    *args: object, cwd: Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """`segscale ARGS` in a fresh process, as a user runs it (output captured as text)."""
    return subprocess.run(
        [sys.executable, "-m", "segscale.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


SAMPLE = ROOT / "src" / "segscale" / "resources" / "sample_la"


@pytest.fixture(autouse=True)
def _clean_distributed_state():
    """Tests must not leak process groups or torchrun environment variables into each other."""
    saved = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def write_msd(
    root: Path, num_cases: int = 5, shape=(24, 20, 6), channels: int = 1, seed: int = 0
) -> Path:
    """A small Decathlon-layout dataset of synthetic volumes: a bright ellipsoid labelled 1."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([0.7, 0.8, 2.0, 1.0])
    training = []
    x, y, z = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    for i in range(num_cases):
        cx, cy = rng.uniform(8, 14), rng.uniform(7, 12)
        label = (((x - cx) / 6) ** 2 + ((y - cy) / 5) ** 2 + ((z - 3) / 3) ** 2 < 1).astype(
            np.uint8
        )
        image = (label * 2.0 + rng.normal(0, 0.3, shape)).astype(np.float32)
        if channels > 1:
            image = np.stack([image * (c + 1) for c in range(channels)], axis=-1)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
        training.append(
            {"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
        )
    meta = {
        "name": "synthetic",
        "modality": {str(c): f"mod{c}" for c in range(channels)},
        "labels": {"0": "background", "1": "blob"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    return write_msd(tmp_path / "raw")


def sample_subset(dst: Path, num_cases: int) -> Path:
    """The first cases of the bundled real left-atrium sample, as its own Decathlon folder."""
    meta = json.loads((SAMPLE / "dataset.json").read_text())
    meta["training"] = meta["training"][:num_cases]
    meta["numTraining"] = num_cases
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for entry in meta["training"]:
        for key in ("image", "label"):
            shutil.copy(SAMPLE / entry[key], dst / entry[key])
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def prepared_sample(root: Path, num_cases: int, val_fraction: float, test_fraction: float) -> Path:
    """A store of the bundled sample's first cases, 12 slices each, 32 × 32, split by case."""
    from segscale.imgmed import Preprocessing, prepare

    store, _ = prepare(
        sample_subset(root / "raw", num_cases),
        root / "store",
        Preprocessing(size=32, slices=12),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=0,
        progress=False,
    )
    return store


@pytest.fixture(scope="session")
def real_store(tmp_path_factory) -> Path:
    """A tiny prepared store of real MRI: 5 left-atrium cases, 12 slices each, 32 × 32."""
    return prepared_sample(tmp_path_factory.mktemp("real"), 5, 0.2, 0.2)


def tiny_config(store: Path, **train) -> dict:
    cfg = {
        "name": "tiny",
        "seed": 0,
        "data": {"store": str(store)},
        "model": {"name": "unet", "kwargs": {"base_channels": 4, "depth": 2}},
        "train": {
            "epochs": 2,
            "batch_size": 4,
            "optimizer": {"name": "adam", "lr": 0.01},
            "loss": "dice_ce",
            "steps_per_epoch": 3,
        },
        # MLflow (the default tracker) has its own tests; creating its SQLite store takes 2 s
        "tracker": "none",
    }
    cfg["train"].update(train)
    return cfg


def trained_run(store: Path, run_dir: Path, **train) -> Path:
    """A run of the tiny config trained in this process (one epoch of one step by default)."""
    from segscale import worker
    from segscale.config import validate
    from segscale.engine import prepare_run_dir

    settings = {"epochs": 1, "steps_per_epoch": 1, **train}
    prepare_run_dir(validate(tiny_config(store, **settings)), run_dir, resume=False)
    worker.train(run_dir, progress=False)
    return run_dir

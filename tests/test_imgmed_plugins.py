"""MONAI transforms as a segscale plug-in (MONAI installs here as a test-only dependency)."""

import json

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_config
from segscale import worker
from segscale.config import validate
from segscale.engine import plan, prepare_run_dir
from segscale.errors import SegscaleError
from segscale.registry import TRANSFORMS

PLUGIN = f"{ROOT / 'examples' / 'plugins' / 'monai_augment.py'}:augment"


def test_a_monai_transform_keeps_image_and_mask_aligned():
    t = TRANSFORMS.resolve(PLUGIN)(prob=1.0, rotate_deg=30, scale=0.2)
    t.set_random_state(3)
    mask = torch.zeros(32, 32, dtype=torch.int64)
    mask[8:20, 10:24] = 1
    image = (mask * 4.0)[None]  # a bright square exactly where the mask is
    x, y = t(image, mask)
    assert x.shape == (1, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert not torch.equal(y, mask)  # it moved
    assert x[0][y == 1].mean() > 3.0 and x[0][y == 0].mean() < 1.0  # and the image moved with it
    t.set_random_state(3)
    assert torch.equal(t(image, mask)[1], y)  # reseeded: the same warp


def test_training_with_a_monai_plugin_transform(real_store, tmp_path):
    cfg = tiny_config(real_store, epochs=1, steps_per_epoch=2)
    cfg["data"]["transform"] = {"name": PLUGIN, "kwargs": {"prob": 1.0}}
    p = plan(validate(cfg))
    assert p.describe()["injection"]["transform"]["source"] == "user"
    run = tmp_path / "run"
    prepare_run_dir(p.cfg, run, resume=False)
    history = worker.train(run, progress=False)
    assert np.isfinite(history[-1]["train_loss"])
    assert json.loads((run / "environment.json").read_text())["workers"] == 1
    cfg["data"]["transform"]["kwargs"] = {"probability": 1.0}
    with pytest.raises(
        SegscaleError, match=r"transform .* kwargs \['probability'\].*accepted: prob"
    ):
        plan(validate(cfg))

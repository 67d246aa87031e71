from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, tiny_config
from segscale.config import load_config, validate
from segscale.engine import prepare_run_dir, train_worker
from segscale.errors import DataError
from segscale.imgmed import Preprocessing, prepare
from segscale.predict import predict


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "examples").glob("*.yaml")), ROOT / "src/segscale/resources/demo.yaml"],
    ids=lambda p: p.name,
)
def test_shipped_configs_validate(path: Path):
    cfg = load_config(path)
    assert cfg.name and cfg.train.epochs > 0
    assert (
        "prepare" in path.read_text() or path.name == "demo.yaml"
    )  # each example says how to make its store


def test_png_prediction_round_trips_mask_values_and_size(tmp_path):
    root = tmp_path / "em"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        mask = np.full((40, 36), 255, np.uint8)
        mask[:, 10 + i : 16 + i] = 0
        image = np.where(mask == 0, 60, 200).astype(np.uint8) + rng.integers(
            0, 20, mask.shape, dtype=np.uint8
        )
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    store, _ = prepare(
        root,
        tmp_path / "store",
        Preprocessing(size=32),
        val_fraction=0.2,
        test_fraction=0.2,
        progress=False,
    )
    cfg = tiny_config(store, epochs=1, steps_per_epoch=2)
    run_dir = tmp_path / "run"
    prepare_run_dir(validate(cfg), run_dir, resume=False)
    train_worker(run_dir, progress=False)
    [out] = predict(run_dir, [root / "images" / "s0.png"], tmp_path / "pred")
    mask = np.asarray(Image.open(out))
    assert out.name == "s0.png" and mask.shape == (40, 36)
    assert set(np.unique(mask)) <= {0, 255}  # class indices mapped back to the raw mask values
    with pytest.raises(DataError, match="no such file"):
        predict(run_dir, [tmp_path / "missing.png"], tmp_path / "pred")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 1

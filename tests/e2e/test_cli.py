"""The main job through the real CLI: prepare → train with 2 gloo workers → evaluate → predict."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import sample_subset, tiny_config


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segscale.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
    )


@pytest.mark.distributed
def test_prepare_train_evaluate_predict(tmp_path):
    raw = sample_subset(tmp_path / "raw", 5)
    store = tmp_path / "store"
    r = cli("prepare", raw, store, "--size", 32, "--slices", 12, "--val", 0.2, "--test", 0.2)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "60 slices" in r.stdout
    assert (
        "up to date"
        in cli(
            "prepare", raw, store, "--size", 32, "--slices", 12, "--val", 0.2, "--test", 0.2
        ).stdout
    )

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(store)))
    run = tmp_path / "run"
    r = cli("train", config, "--workers", 2, "--run-dir", run, "train.epochs=2")
    assert r.returncode == 0, r.stderr
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 2 and env["global_batch"] == 8
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    one, two = tmp_path / "eval1.json", tmp_path / "eval2.json"
    assert cli("evaluate", run, "--json", one, "--workers", 1).returncode == 0
    r = cli("evaluate", run, "--json", two, "--workers", 2)
    assert r.returncode == 0, r.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["dataset"] == b["dataset"] and a["cases"] == b["cases"]  # identical, not just close
    assert set(a["dataset"]) >= {
        "dice",
        "pixel_accuracy",
        "mean_accuracy",
        "mean_iou",
        "fw_iou",
        "sensitivity",
        "specificity",
    }
    assert [c["case"] for c in a["cases"]] == json.loads((store / "meta.json").read_text())[
        "splits"
    ]["test"]

    source = raw / "imagesTr" / "la2018_000.nii.gz"
    r = cli("predict", run, source, "--out", tmp_path / "pred")
    assert r.returncode == 0, r.stderr
    mask, image = nib.load(tmp_path / "pred" / "la2018_000.nii.gz"), nib.load(source)
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0]


def test_bad_input_gives_one_clear_line(tmp_path, real_store):
    cfg = tiny_config(real_store)
    cfg["train"]["batch_sizee"] = cfg["train"].pop("batch_size")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert_user_error(
        cli("train", bad), "unknown key 'train.batch_sizee'", "did you mean 'batch_size'", f"{bad}:"
    )

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_config(real_store)))
    assert_user_error(
        cli("train", good, "model.name=unett"), "unknown model 'unett'", "did you mean 'unet'"
    )
    assert_user_error(
        cli("train", good, "train.batch_size=0"), "train.batch_size", "greater than 0"
    )
    assert_user_error(
        cli("train", good, "data.store=/no/such/store"), "/no/such/store: not a prepared store"
    )
    assert_user_error(cli("prepare", tmp_path, tmp_path / "out"), "no dataset.json")
    assert not (tmp_path / "runs").exists()

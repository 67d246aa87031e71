"""The main job through the real CLI: prepare → train with 2 gloo workers → evaluate → predict."""

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import cli, sample_subset, tiny_config


@pytest.mark.distributed
def test_prepare_train_evaluate_predict(tmp_path):
    raw = sample_subset(tmp_path / "raw", 5)
    store = tmp_path / "store"
    args = ("--size", 32, "--slices", 12, "--val", 0.2, "--test", 0.4)
    r = cli("prepare", raw, store, *args)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "60 slices" in r.stdout
    assert "up to date" in cli("prepare", raw, store, *args).stdout

    config = tmp_path / "tiny.yaml"
    cfg = tiny_config(store)
    del cfg["tracker"]  # the default: MLflow in a SQLite store beside the run folder
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    r = cli("train", config, "--workers", 2, "--run-dir", run, "train.epochs=2")
    assert r.returncode == 0, r.stderr
    env = json.loads((run / "environment.json").read_text())
    assert env["world_size"] == 2 and env["global_batch"] == 8
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracked = mlflow.get_run((run / "mlflow_run_id").read_text().strip())
    assert tracked.info.status == "FINISHED" and "val_dice" in tracked.data.metrics

    results = []
    for workers in (1, 2, 3):  # the test split has 2 cases: with 3 workers one rank holds none
        out = tmp_path / f"eval{workers}.json"
        r = cli("evaluate", run, "--json", out, "--workers", workers)
        assert r.returncode == 0, r.stderr
        results.append(json.loads(out.read_text()))
    a = results[0]
    for b in results[1:]:  # identical, not just close
        assert (a["dataset"], a["cases"], a["slice_summary"]) == (
            b["dataset"],
            b["cases"],
            b["slice_summary"],
        )
    assert (
        (tmp_path / "eval1.csv").is_file()
        and (tmp_path / "eval1.png").is_file()
        and (tmp_path / "eval1-overlays.png").is_file()
    )
    assert a["case_summary"]["dice"]["n"] + a["case_summary"]["dice"]["excluded"] == 2, (
        a["cases"],
        json.loads((store / "meta.json").read_text())["splits"],
    )

    # data.test_split is the split `segscale evaluate` scores when --split is not given
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["test_split"] = "val"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    r = cli("evaluate", run)
    assert r.returncode == 0, r.stderr
    val = json.loads((run / "evaluation-val.json").read_text())
    assert val["split"] == "val" and len(val["cases"]) == 1  # 5 cases, 20% for validation
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

    # score the predicted volume in its own geometry against the original label
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "la2018_000.nii.gz").write_bytes(
        (raw / "labelsTr" / "la2018_000.nii.gz").read_bytes()
    )
    r = cli(
        "evaluate",
        "--pred",
        tmp_path / "pred",
        "--ref",
        tmp_path / "ref",
        "--json",
        tmp_path / "files.json",
    )
    assert r.returncode == 0, r.stderr
    files = json.loads((tmp_path / "files.json").read_text())
    assert [c["case"] for c in files["cases"]] == ["la2018_000"] and 0 <= files["cases"][0][
        "dice"
    ] <= 1


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
        cli("train", good, "train.batch_size=0"), "train.batch_size", "expected a value > 0"
    )
    assert_user_error(
        cli("train", good, "data.store=/no/such/store"), "/no/such/store: not a prepared store"
    )
    assert_user_error(cli("prepare", tmp_path, tmp_path / "out"), "no dataset.json")
    assert not (tmp_path / "runs").exists()

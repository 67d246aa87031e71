"""The classification task through the same engine: targets, metrics, a 2-worker run, evaluation."""

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import cli, tiny_config
from segscale.config import validate
from segscale.engine import plan
from segscale.errors import SegscaleError
from segscale.imgmed import Store
from segscale.models import create_model
from segscale.segeval import classification_metrics
from segscale.tasks import Classification


def test_slice_labels_come_from_the_masks():
    masks = torch.zeros(4, 6, 6, dtype=torch.int64)
    masks[1, 2, 3] = 1
    masks[2, 0, 0] = 2
    masks[3, 1:3, 1:3] = 1
    assert Classification().target(masks).tolist() == [0, 1, 1, 1]
    assert Classification(foreground=2).target(masks).tolist() == [0, 0, 1, 0]


def test_classification_metrics_by_hand(capsys):
    cm = np.array([[50, 10], [5, 35]])  # rows: reference, columns: prediction
    m = classification_metrics(cm)
    assert m["accuracy"] == pytest.approx(85 / 100)
    assert m["balanced_accuracy"] == pytest.approx((50 / 60 + 35 / 40) / 2)
    assert m["precision"] == pytest.approx(35 / 45)
    assert m["sensitivity"] == pytest.approx(35 / 40)
    assert m["specificity"] == pytest.approx(50 / 60)
    assert m["f1"] == pytest.approx(2 * 35 / (2 * 35 + 10 + 5))
    # a split without positive slices: a classifier that says "none" has specificity 1, one that
    # says "all" 0 (the first was NaN, the segmentation rule for an absent class)
    for cm, specificity in (([[2, 0], [0, 0]], 1.0), ([[0, 2], [0, 0]], 0.0)):
        m = classification_metrics(np.array(cm))
        assert m["specificity"] == specificity and m["balanced_accuracy"] == specificity
        assert np.isnan(m["sensitivity"])
    # and the printed scores say why
    from segscale.report import print_metrics

    labels = {"0": "no left atrium", "1": "left atrium"}
    print_metrics(
        {
            "task": "classification",
            "split": "test",
            "slices": 2,
            "labels": labels,
            "confusion_matrix": {"counts": [[2, 0], [0, 0]]},
            "dataset": m,
        }
    )
    assert "no slice of the split is 'left atrium'" in capsys.readouterr().err


def classify_config(store, **overrides):
    cfg = tiny_config(store, **{"loss": "ce", **overrides})
    cfg["task"] = "classification"
    cfg["model"] = {"name": "cnn", "kwargs": {"base_channels": 4, "depth": 2}}
    return cfg


def test_mismatches_between_task_model_and_loss_fail_before_launch(real_store):
    with pytest.raises(
        SegscaleError, match=r"train.loss 'dice_ce' does not fit the classification"
    ):
        plan(validate(classify_config(real_store, **{"loss": "dice_ce"})))
    unet = classify_config(real_store)
    unet["model"] = {"name": "unet", "kwargs": {"base_channels": 4, "depth": 2}}
    with pytest.raises(SegscaleError, match=r"outputs \(2, 2, 32, 32\).*needs \(2, 2\)"):
        plan(validate(unet)).check(1)
    bad = classify_config(real_store)
    bad["task"] = {"name": "classification", "kwargs": {"foreground": 5}}
    with pytest.raises(SegscaleError, match=r"foreground 5: the store's classes are 0..1"):
        plan(validate(bad))


@pytest.mark.distributed
def test_a_classifier_trains_on_two_workers_and_evaluates_exactly(tmp_path, real_store):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(classify_config(real_store, epochs=2, steps_per_epoch=3)))
    run = tmp_path / "run"
    r = cli("train", config, "--workers", 2, "--run-dir", run)
    assert r.returncode == 0, r.stderr[-3000:]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= h["val_accuracy"] <= 1 for h in history)
    out = tmp_path / "eval.json"
    r = cli("evaluate", run, "--workers", 2, "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads(out.read_text())
    # the same numbers, computed independently from the saved weights and the store's masks
    store = Store.open(real_store)
    rows = store.rows("test")
    model = create_model("cnn", 1, 2, base_channels=4, depth=2)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    with torch.no_grad():
        pred = model.eval()(torch.from_numpy(np.asarray(store.images[rows]))).argmax(1).numpy()
    truth = (np.asarray(store.masks[rows]) > 0).any((1, 2)).astype(int)
    expected = np.zeros((2, 2), dtype=int)
    np.add.at(expected, (truth, pred), 1)
    assert ev["task"] == "classification" and ev["slices"] == len(rows)
    assert ev["confusion_matrix"]["counts"] == expected.tolist()
    assert ev["dataset"]["accuracy"] == pytest.approx((truth == pred).mean())
    assert "accuracy" in r.stdout and out.with_suffix(".png").stat().st_size > 1000
    r = cli("predict", run, tmp_path, "--out", tmp_path / "masks")
    assert r.returncode == 2 and "a classification run" in r.stderr, r.stderr
    # its methods section: the slice classifier and its slice-level scores (was: a KeyError)
    from segscale.methods import methods

    (run / "evaluation-test.json").write_bytes(out.read_bytes())
    text = methods(run)
    assert "a slice classifier" in text and f"({len(rows)} slices), per slice: accuracy" in text
    assert "| at least three evaluation metrics | yes |" in text
    assert "segscale repeat" not in text and "zoo publish" not in text  # both refuse classifiers


def test_plan_shows_the_task_as_an_extensible_part(real_store):
    described = plan(validate(classify_config(real_store))).describe()
    task = described["injection"]["task"]
    assert task["extensible"] and task["fills"] == "classification" and task["source"] == "built-in"


def test_training_curves_follow_the_task_metric(tmp_path):
    """A classification run's curves show its validation accuracy (there is no val_dice)."""
    from segscale.report import curve_points, plot_curves

    rows = [
        {"epoch": 1, "train_loss": 0.7, "val_accuracy": 0.6},
        {"epoch": 2, "train_loss": 0.5},
        {"epoch": 3, "train_loss": 0.4, "val_accuracy": 0.8},
    ]
    points = curve_points(rows, "accuracy")
    assert points == {
        "train_loss": [(1, 0.7), (2, 0.5), (3, 0.4)],
        "val_accuracy": [(1, 0.6), (3, 0.8)],
    }
    assert curve_points(rows, "dice")["val_dice"] == []
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_curves(tmp_path, tmp_path / "curves.png", "accuracy")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

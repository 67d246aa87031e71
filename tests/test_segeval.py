import numpy as np
import pytest
import torch

from segscale.segeval import confusion_matrix, metrics_from_confusion


def reference_metrics(gt: np.ndarray, pred: np.ndarray, k: int) -> dict:
    """The thesis' formulas written out with set operations per class (an independent path)."""
    dice, iou, acc, sens, spec, t = [], [], [], [], [], []
    for c in range(k):
        g, p = gt == c, pred == c
        inter = np.logical_and(g, p).sum()
        dice.append(2 * inter / (g.sum() + p.sum()) if g.sum() + p.sum() else 1.0)
        iou.append(inter / np.logical_or(g, p).sum())
        acc.append(inter / g.sum())
        sens.append(inter / g.sum())
        spec.append(np.logical_and(~g, ~p).sum() / (~g).sum())
        t.append(g.sum())
    t = np.array(t)
    return {
        "dice": np.mean(dice[1:]),
        "dice_with_background": np.mean(dice),
        "pixel_accuracy": (gt == pred).mean(),
        "mean_accuracy": np.mean(acc),
        "mean_iou": np.mean(iou),
        "fw_iou": (t * np.array(iou)).sum() / t.sum(),
        "sensitivity": np.mean(sens[1:]),
        "specificity": np.mean(spec[1:]),
    }


@pytest.mark.parametrize("k", [2, 4])
def test_metrics_match_the_formulas_on_random_masks(k):
    rng = np.random.default_rng(k)
    gt = rng.integers(0, k, (3, 40, 30))
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, k, gt.shape))
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), k).numpy()
    assert cm.sum() == gt.size and cm[1, 0] == np.sum((gt == 1) & (pred == 0))
    got = metrics_from_confusion(cm)
    want = reference_metrics(gt, pred, k)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_hand_computed_binary_case():
    # 10 pixels: gt has 4 foreground, pred hits 3 of them and adds 1 false positive
    gt = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    m = metrics_from_confusion(confusion_matrix(torch.tensor(pred), torch.tensor(gt), 2).numpy())
    assert m["dice"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(5 / 6)
    assert m["pixel_accuracy"] == pytest.approx(8 / 10)
    assert m["mean_iou"] == pytest.approx((3 / 5 + 5 / 7) / 2)


def test_empty_masks_convention():
    """Foreground absent from both: not applicable (NaN), as in nnU-Net; a miss scores 0."""
    empty = torch.zeros(5, 5, dtype=torch.long)
    both_empty = metrics_from_confusion(confusion_matrix(empty, empty, 2).numpy())
    assert np.isnan(both_empty["dice"]) and both_empty["pixel_accuracy"] == 1.0
    assert both_empty["dice_with_background"] == 1.0  # the background alone is applicable
    one = empty.clone()
    one[0, 0] = 1
    assert metrics_from_confusion(confusion_matrix(one, empty, 2).numpy())["dice"] == 0.0

"""One rule for undefined values, declared label sets, and both aggregation orders, named.

A class absent from both masks is not applicable: every overlap and distance metric of it is NaN,
excluded from means and counted (nnU-Net's evaluator does the same; the values below are what its
rule gives, computed by hand). Defined values are cross-checked against MONAI."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from segscale.errors import DataError
from segscale.evaluation import evaluate_folders

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def blob(shape, box, value):
    a = np.zeros(shape, np.uint8)
    a[box] = value
    return a


def write(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), AFFINE), folder / f"{name}.nii.gz")


@pytest.fixture
def two_labels(tmp_path):
    """Case a: both labels, predicted with errors. Case b: only label 1 in the reference, and an
    empty prediction. Case c: empty in both."""
    shape = (16, 16, 4)
    ref_a = blob(shape, np.s_[2:8, 2:8, 1:3], 1) + blob(shape, np.s_[10:14, 10:14, 1:3], 2)
    pred_a = blob(shape, np.s_[3:8, 2:8, 1:3], 1) + blob(shape, np.s_[10:13, 10:14, 0:3], 2)
    write(tmp_path / "ref", "a", ref_a)
    write(tmp_path / "pred", "a", pred_a)
    write(tmp_path / "ref", "b", blob(shape, np.s_[4:9, 4:9, 1:3], 1))
    write(tmp_path / "pred", "b", np.zeros(shape))
    write(tmp_path / "ref", "c", np.zeros(shape))
    write(tmp_path / "pred", "c", np.zeros(shape))
    return tmp_path, {"a": (pred_a, ref_a)}


def dice(p, r):
    tp, fp, fn = (p & r).sum(), (p & ~r).sum(), (~p & r).sum()
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def test_a_class_absent_from_both_masks_is_excluded_and_counted(two_labels):
    root, arrays = two_labels
    result = evaluate_folders(root / "pred", root / "ref", {1: "atrium", 2: "scar"})
    cases = {c["case"]: c for c in result["cases"]}
    # b: label 1 missed (Dice 0, F1 0, distances undefined); label 2 not applicable
    # (was: label 2 Dice 1 and HD95 0 averaged in, so the row read Dice 0.5, HD95 0.0)
    b = cases["b"]
    assert b["dice"] == 0.0 and b["f1"] == 0.0 and np.isnan(b["hd95"]) and np.isnan(b["assd"])
    assert np.isnan(b["per_class"]["scar"]["dice"]) and np.isnan(b["per_class"]["scar"]["hd95"])
    # c: nothing applicable: every value NaN alike (was: Dice 1 beside IoU NaN)
    c = cases["c"]
    assert all(np.isnan(c[m]) for m in ("dice", "iou", "precision", "f1", "hd95", "avd"))
    s = result["case_summary"]
    assert (s["dice"]["n"], s["dice"]["excluded"]) == (2, 1)  # a and b; c excluded
    assert (s["hd95"]["n"], s["hd95"]["excluded"]) == (1, 2)  # b missed, c not applicable
    scar = result["case_summary_per_class"]["scar"]["dice"]
    assert (scar["n"], scar["excluded"]) == (1, 2)

    pred_a, ref_a = arrays["a"]
    want = [dice(pred_a == k, ref_a == k) for k in (1, 2)]
    assert cases["a"]["per_class"]["atrium"]["dice"] == pytest.approx(want[0], abs=1e-12)
    assert cases["a"]["dice"] == pytest.approx(np.mean(want), abs=1e-12)


def test_defined_dice_values_agree_with_monai(two_labels):
    from monai.metrics import compute_dice

    root, _ = two_labels
    result = evaluate_folders(root / "pred", root / "ref", {1: "atrium", 2: "scar"})
    for case in result["cases"]:
        p = np.asarray(nib.load(root / "pred" / f"{case['case']}.nii.gz").dataobj)
        r = np.asarray(nib.load(root / "ref" / f"{case['case']}.nii.gz").dataobj)
        for k, name in ((1, "atrium"), (2, "scar")):
            pk = torch.from_numpy((p == k)[None, None].astype(np.float32))
            rk = torch.from_numpy((r == k)[None, None].astype(np.float32))
            monai = float(compute_dice(pk, rk, include_background=True, ignore_empty=False))
            ours = case["per_class"][name]["dice"]
            if (p == k).any() or (r == k).any():  # defined: the same number
                assert ours == pytest.approx(monai, abs=1e-6), (case["case"], name)
            else:  # not applicable here; MONAI's ignore_empty=False would say 1
                assert np.isnan(ours) and monai == 1.0


def test_both_aggregation_orders_are_named_and_differ_when_values_are_missing(two_labels):
    root, arrays = two_labels
    result = evaluate_folders(root / "pred", root / "ref", {1: "atrium", 2: "scar"})
    pred_a, ref_a = arrays["a"]
    a1, a2 = (dice(pred_a == k, ref_a == k) for k in (1, 2))
    # case first: mean over cases of each case's foreground mean: a → (a1 + a2) / 2, b → 0
    case_first = ((a1 + a2) / 2 + 0.0) / 2
    # label first (nnU-Net's foreground_mean): atrium over a, b → (a1 + 0) / 2; scar over a → a2
    label_first = ((a1 + 0.0) / 2 + a2) / 2
    fm = result["foreground_mean"]
    assert fm["case_first"]["dice"] == pytest.approx(case_first, abs=1e-12)
    assert fm["label_first"]["dice"] == pytest.approx(label_first, abs=1e-12)
    assert fm["case_first"]["dice"] != pytest.approx(fm["label_first"]["dice"])
    assert "label_first" in result["conventions"]["aggregation"]


def test_a_case_scores_the_same_whatever_shares_its_folder(two_labels, tmp_path):
    """(was: foreground Dice 0.945 alone, 0.973 beside a case containing label 2)"""
    root, _ = two_labels
    alone = tmp_path / "alone"
    for side in ("pred", "ref"):
        (alone / side).mkdir(parents=True)
        (alone / side / "b.nii.gz").write_bytes((root / side / "b.nii.gz").read_bytes())
    with pytest.warns(UserWarning, match="labels inferred from the values in the files"):
        by_itself = evaluate_folders(alone / "pred", alone / "ref")["cases"][0]
    with pytest.warns(UserWarning, match="labels inferred"):
        together = {c["case"]: c for c in evaluate_folders(root / "pred", root / "ref")["cases"]}
    assert by_itself["dice"] == together["b"]["dice"] == 0.0


def test_the_label_set_is_declared_from_dataset_json_or_refused(two_labels):
    root, _ = two_labels
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "atrium": 1, "scar": 2}})
    )
    result = evaluate_folders(root / "pred", root / "ref")  # no warning: declared
    assert result["labels"] == {"0": "background", "1": "atrium", "2": "scar"}
    assert result["labels_source"] == str(root / "dataset.json")
    with pytest.raises(DataError, match=r"pred/a.nii.gz: label values \[2\] not declared"):
        evaluate_folders(root / "pred", root / "ref", {1: "atrium"})


def _strict(text):
    """Parse as RFC 8259 JSON: bare NaN/Infinity tokens, which Python would accept, fail."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_records_are_strict_json_with_null_for_undefined_values(two_labels, tmp_path):
    from segscale._files import from_json
    from segscale.evaluation import write_evaluation

    root, _ = two_labels
    result = evaluate_folders(root / "pred", root / "ref", {1: "atrium", 2: "scar"})
    out = tmp_path / "out" / "evaluation.json"
    write_evaluation(result, out)
    strict = _strict(out.read_text())  # jq, JSON.parse and pandas read it as it is
    c = next(c for c in strict["cases"] if c["case"] == "c")
    assert c["dice"] is None and c["hd95"] is None  # undefined: null, not a NaN token
    assert strict["case_summary"]["dice"]["excluded"] == 1
    back = from_json(out.read_text())  # segscale's readers: null back to NaN
    assert np.isnan(next(c for c in back["cases"] if c["case"] == "c")["dice"])
    assert back["dataset"] == pytest.approx(result["dataset"], nan_ok=True)

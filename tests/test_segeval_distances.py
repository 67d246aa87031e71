"""Distances, per-class metrics and aggregation, cross-checked against medpy and MONAI (test-only
oracles) and a brute-force KD-tree, on random and real masks."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from monai.metrics import compute_hausdorff_distance
from PIL import Image
from scipy.spatial import cKDTree

from conftest import SAMPLE
from segscale.errors import DataError
from segscale.evaluation import CaseEval, evaluate_case, evaluate_folders, summarize, write_case_csv
from segscale.segeval import class_metrics, confusion_matrix, distance_metrics


def blob(shape, center, radii):
    grid = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) < 1


def random_pair(rng, shape):
    a = blob(
        shape, rng.uniform(0.3, 0.7, len(shape)) * shape, rng.uniform(0.1, 0.25, len(shape)) * shape
    )
    b = blob(
        shape, rng.uniform(0.3, 0.7, len(shape)) * shape, rng.uniform(0.1, 0.25, len(shape)) * shape
    )
    b |= blob(
        shape, rng.uniform(0.1, 0.9, len(shape)) * shape, np.full(len(shape), 2.5)
    )  # a stray island
    return a, b


def oracle(a, b, spacing):
    pa, pb = np.argwhere(a) * spacing, np.argwhere(b) * spacing
    avd = max(cKDTree(pb).query(pa)[0].mean(), cKDTree(pa).query(pb)[0].mean())
    hd95 = compute_hausdorff_distance(
        torch.from_numpy(a)[None, None],
        torch.from_numpy(b)[None, None],
        percentile=95,
        spacing=list(spacing),
    ).item()
    return {
        "hausdorff": medpy_binary.hd(a, b, spacing),
        "assd": medpy_binary.assd(a, b, spacing),
        "hd95": hd95,
        "avd": avd,
    }


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape,spacing", [((40, 36, 20), (0.7, 0.9, 2.5)), ((64, 48), (0.5, 1.5))])
def test_distances_match_medpy_monai_and_a_kd_tree(seed, shape, spacing):
    a, b = random_pair(np.random.default_rng(seed), shape)
    got = distance_metrics(a, b, spacing)
    for name, want in oracle(a, b, spacing).items():
        # MONAI computes HD95 in float32: 1e-6 relative is the float32 limit
        assert got[name] == pytest.approx(want, rel=1e-6), name


def test_distances_on_a_real_left_atrium_mask():
    ref = np.asarray(nib.load(SAMPLE / "labelsTr" / "la2018_000.nii.gz").dataobj).astype(bool)
    pred = np.roll(ref, 2, axis=0)
    pred[:, :, 20:23] = False  # a missed band of slices
    spacing = (1.25, 1.25, 1.25)
    got = distance_metrics(pred, ref, spacing)
    for name, want in oracle(pred, ref, spacing).items():
        assert got[name] == pytest.approx(want, rel=1e-6), name
    assert medpy_binary.dc(pred, ref) == pytest.approx(
        class_metrics(
            confusion_matrix(torch.from_numpy(pred).long(), torch.from_numpy(ref).long(), 2).numpy()
        )[1]["dice"],
        abs=1e-12,
    )


def test_overlap_metrics_match_medpy_per_class():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 3, (30, 30, 8))
    pred = np.where(rng.random(ref.shape) < 0.8, ref, rng.integers(0, 3, ref.shape))
    per_class = class_metrics(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(ref), 3).numpy()
    )
    for c in (1, 2):
        p, r = pred == c, ref == c
        assert per_class[c]["dice"] == pytest.approx(medpy_binary.dc(p, r), abs=1e-12)
        assert per_class[c]["precision"] == pytest.approx(medpy_binary.precision(p, r), abs=1e-12)
        assert per_class[c]["sensitivity"] == pytest.approx(medpy_binary.recall(p, r), abs=1e-12)
        assert per_class[c]["specificity"] == pytest.approx(
            medpy_binary.specificity(p, r), abs=1e-12
        )
        assert per_class[c]["f1"] == pytest.approx(per_class[c]["dice"], abs=1e-12)
        assert per_class[c]["iou"] == pytest.approx(medpy_binary.jc(p, r), abs=1e-12)


def test_empty_mask_conventions():
    empty = np.zeros((10, 10, 4), bool)
    full = empty.copy()
    full[3:6, 3:6, 1:3] = True
    both_empty = distance_metrics(empty, empty)  # not applicable
    assert list(both_empty) == ["hausdorff", "hd95", "assd", "avd"]
    assert all(np.isnan(v) for v in both_empty.values())
    assert all(np.isnan(v) for v in distance_metrics(full, empty).values())
    assert all(np.isnan(v) for v in distance_metrics(empty, full).values())


def case(pred: np.ndarray, ref: np.ndarray, name: str, k: int = 2) -> CaseEval:
    return evaluate_case(torch.from_numpy(pred), torch.from_numpy(ref), k, (2.0, 1.0, 1.0), name)


def test_three_levels_and_nan_aware_aggregation(tmp_path):
    ref = np.zeros((3, 12, 12), np.int64)
    ref[1, 3:8, 3:8] = 1
    good = ref.copy()
    missed = np.zeros_like(ref)  # predicts nothing: Dice 0, distances undefined
    results = [case(good, ref, "a"), case(missed, ref, "b")]
    s = summarize(results, {"0": "background", "1": "lesion"})
    assert s["dataset"]["dice"] == pytest.approx(2 * 25 / (25 + 50))  # from the summed counts
    assert s["case_summary"]["dice"] == {
        "mean": 0.5,
        "sd": pytest.approx(np.sqrt(0.5)),
        "median": 0.5,
        "n": 2,
        "excluded": 0,
    }
    assert s["case_summary"]["hd95"]["n"] == 1 and s["case_summary"]["hd95"]["excluded"] == 1
    assert s["case_summary"]["hd95"]["mean"] == 0.0
    # 6 slices: 4 empty in both (not applicable: excluded, counted), 1 perfect, 1 missed
    assert s["slice_summary"]["dice"]["n"] == 2 and s["slice_summary"]["dice"]["excluded"] == 4
    assert s["slice_summary"]["dice"]["mean"] == pytest.approx(1 / 2)
    assert (
        list(s["dataset_per_class"]) == ["lesion"]
        and s["cases"][1]["per_class"]["lesion"]["dice"] == 0.0
    )
    assert (
        "absent from both reference and prediction is not applicable"
        in (s["conventions"]["not_applicable"])
    )
    write_case_csv(s, tmp_path / "cases.csv")
    lines = (tmp_path / "cases.csv").read_text().splitlines()
    assert (
        lines[0].startswith("case,dice,iou,precision")
        and lines[1].startswith("a,1.0")
        and len(lines) == 3
    )


def test_evaluate_folders_in_the_files_geometry(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    pairs = [random_pair(rng, (32, 30, 10)) for _ in range(2)]
    for i, (a, b) in enumerate(pairs):
        nib.save(nib.Nifti1Image(a.astype(np.uint8), affine), tmp_path / "pred" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(b.astype(np.uint8), affine), tmp_path / "ref" / f"c{i}.nii.gz")
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "lesion"})
    assert [c["case"] for c in result["cases"]] == ["c0", "c1"]
    want = oracle(pairs[1][0], pairs[1][1], (0.8, 0.8, 3.0))
    assert result["cases"][1]["hd95"] == pytest.approx(want["hd95"], rel=1e-6)
    assert result["cases"][1]["assd"] == pytest.approx(want["assd"], rel=1e-6)
    assert result["cases"][1]["dice"] == pytest.approx(medpy_binary.dc(*pairs[1]), abs=1e-12)
    json.dumps(result)  # serialisable as is

    # names pair in any case and format (tools differ: C1.NII.GZ from one, c1.nii from another)
    (tmp_path / "pred" / "c1.nii.gz").rename(tmp_path / "pred" / "C1.NII.GZ")
    nib.save(nib.load(tmp_path / "pred" / "c0.nii.gz"), tmp_path / "pred" / "c0.nii")
    (tmp_path / "pred" / "c0.nii.gz").unlink()
    again = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "lesion"})
    assert [c["dice"] for c in again["cases"]] == [c["dice"] for c in result["cases"]]
    # a prediction without a reference is named, not silently dropped
    nib.save(nib.load(tmp_path / "pred" / "c0.nii"), tmp_path / "pred" / "extra.nii.gz")
    with pytest.warns(UserWarning, match=r"1 prediction\(s\) without a reference .* extra.nii.gz"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "lesion"})
    (tmp_path / "pred" / "C1.NII.GZ").unlink()
    with pytest.raises(
        DataError, match=r"pred: no prediction for 1 of 2 reference\(s\), e.g. c1.nii.gz"
    ):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "lesion"})
    nib.save(nib.load(tmp_path / "pred" / "c0.nii"), tmp_path / "pred" / "C0.nii.gz")
    with pytest.raises(DataError, match=r"two predictions for 'c0'"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "lesion"})


def test_evaluate_folders_maps_png_values(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    ref = np.zeros((20, 20), np.uint8)
    ref[5:15, 5:15] = 255
    pred = np.roll(ref, 1, axis=1)
    Image.fromarray(ref).save(tmp_path / "r" / "x.png")
    Image.fromarray(pred).save(tmp_path / "p" / "x.png")
    result = evaluate_folders(tmp_path / "p", tmp_path / "r", {255: "membrane"})
    assert result["label_values"] == {"0": 0, "255": 1}
    assert result["cases"][0]["dice"] == pytest.approx(medpy_binary.dc(pred > 0, ref > 0))
    assert result["cases"][0]["hausdorff"] == pytest.approx(medpy_binary.hd(pred > 0, ref > 0))


def test_evaluate_results_file_is_a_json_name_in_a_folder_that_exists(tmp_path):
    """The .csv and .png beside the results take its name: --json x.csv had the CSV overwrite
    the JSON results; a folder that is a file was a traceback."""
    from conftest import cli

    for d in ("p", "r"):
        (tmp_path / d).mkdir()
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / d / "x.png")
    (tmp_path / "afile").write_text("")

    def scored_into(results):
        return cli("evaluate", "--pred", tmp_path / "p", "--ref", tmp_path / "r", "--json", results)

    r = scored_into(tmp_path / "x.csv")
    assert r.returncode == 2 and "expected a .json file name" in r.stderr
    r = scored_into(tmp_path / "afile" / "r.json")
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr
    r = scored_into(tmp_path / "new" / "ok.json")  # its folder made, as before
    assert r.returncode == 0 and (tmp_path / "new" / "ok.csv").is_file(), r.stderr
    (tmp_path / "environment.json").write_text('{"workers": 1}')  # a record of another kind
    r = scored_into(tmp_path / "environment.json")
    assert r.returncode == 2 and "exists and is not an evaluation" in r.stderr
    r = scored_into(tmp_path / "ok.json")
    assert r.returncode == 0 and (tmp_path / "ok.csv").is_file(), r.stderr
    assert scored_into(tmp_path / "ok.json").returncode == 0  # an earlier evaluation's set
    # a user's table or picture beside a new results file is not replaced (it was)
    for beside in ("mine.csv", "mine.png", "mine-overlays.png"):
        (tmp_path / beside).write_text("user data")
        r = scored_into(tmp_path / "mine.json")
        assert r.returncode == 2 and f"{beside} is there already" in r.stderr, r.stderr
        assert (tmp_path / beside).read_text() == "user data"
        (tmp_path / beside).unlink()
    r = scored_into(tmp_path / "mine.json")
    assert r.returncode == 0, r.stderr
    # ...nor one put beside an earlier evaluation since (its digests are in the .json)
    assert set(json.loads((tmp_path / "mine.json").read_text())["beside"]) == {
        "mine.csv",
        "mine.png",
    }
    for beside, how in (("mine.csv", "changed since"), ("mine-overlays.png", "not written by")):
        (tmp_path / beside).write_text("user data")
        r = scored_into(tmp_path / "mine.json")
        assert r.returncode == 2 and f"{beside} beside it was {how}" in r.stderr, r.stderr
        assert (tmp_path / beside).read_text() == "user data"
        (tmp_path / beside).unlink()
    assert scored_into(tmp_path / "mine.json").returncode == 0  # its .csv missing: written again

"""`segscale evaluate --pred --ref` on folders as real tools write them: each test was a wrong
number with exit 0, a refusal of a good input, or a case lost without a word."""

import json
import os
import unicodedata
import warnings

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import cli
from segscale.errors import DataError
from segscale.evaluation import evaluate_folders


def save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def blob(shape, at, size=4):
    out = np.zeros(shape, np.int16)
    out[tuple(slice(a, a + size) for a in at)] = 1
    return out


def test_labels_past_255_keep_their_own_distances(tmp_path):
    """Labels were cast to 8 bits for the distances: 257 merged into 1, 256..300 had none."""
    ref = np.zeros((80, 60, 8), np.int16)
    for i in range(300):
        x, y = divmod(i, 15)
        ref[4 * x : 4 * x + 4, 4 * y : 4 * y + 4, 2:6] = i + 1
    pred = ref.copy()
    pred[pred == 1] = 0
    pred[1:5, 0:4, 2:6] = np.where(pred[1:5, 0:4, 2:6] == 0, 1, pred[1:5, 0:4, 2:6])
    save(tmp_path / "p" / "a.nii.gz", pred)
    save(tmp_path / "r" / "a.nii.gz", ref)
    labels = {v: f"l{v}" for v in range(1, 301)}
    many = evaluate_folders(tmp_path / "p", tmp_path / "r", labels)["cases"][0]["per_class"]
    save(tmp_path / "p1" / "a.nii.gz", (pred == 1).astype(np.int16))
    save(tmp_path / "r1" / "a.nii.gz", (ref == 1).astype(np.int16))
    one = evaluate_folders(tmp_path / "p1", tmp_path / "r1", {1: "l1"})["cases"][0]["per_class"]
    for m in ("hausdorff", "hd95", "assd", "avd"):
        assert many["l1"][m] == pytest.approx(one["l1"][m])
    assert many["l257"]["hd95"] == 0.0 and many["l300"]["assd"] == 0.0


def test_one_slice_is_scored_in_2d_as_its_picture(tmp_path):
    """An (X, Y, 1) NIfTI scored every voxel as surface (3D slab); a 2D NIfTI was refused."""
    rng = np.random.default_rng(0)
    ref = np.zeros((40, 30), np.uint8)
    ref[5:25, 5:20] = 1
    pred = np.roll(ref, (2, 1), (0, 1)) * (rng.random(ref.shape) > 0.05)
    for name, p, r in (
        ("png", pred, ref),
        ("slab", pred.T[..., None], ref.T[..., None]),
        ("coronal", pred.T[:, None, :], ref.T[:, None, :]),  # (X, 1, Z): one slice too
    ):
        if name == "png":
            (tmp_path / name / "p").mkdir(parents=True)
            (tmp_path / name / "r").mkdir(parents=True)
            Image.fromarray(p.astype(np.uint8)).save(tmp_path / name / "p" / "a.png")
            Image.fromarray(r).save(tmp_path / name / "r" / "a.png")
        else:
            save(tmp_path / name / "p" / "a.nii.gz", p.astype(np.int16))
            save(tmp_path / name / "r" / "a.nii.gz", r.astype(np.int16))
    save(tmp_path / "flat" / "p" / "a.nii.gz", pred.T.astype(np.int16))
    save(tmp_path / "flat" / "r" / "a.nii.gz", ref.T.astype(np.int16))
    scores = {
        n: evaluate_folders(tmp_path / n / "p", tmp_path / n / "r", {1: "x"})["cases"][0]
        for n in ("png", "slab", "coronal", "flat")
    }
    for m in ("dice", "hd95", "assd", "avd"):
        assert scores["slab"][m] == pytest.approx(scores["png"][m])
        assert scores["coronal"][m] == pytest.approx(scores["png"][m])
        assert scores["flat"][m] == pytest.approx(scores["png"][m])
    assert scores["png"]["assd"] > 0.5


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_labels_are_refused(tmp_path, bad):
    """inf became INT64_MIN, a class sorted before the background (exit 0)."""
    ref = blob((16, 16, 8), (4, 4, 2)).astype(np.float32)
    pred = ref.copy()
    pred[0, 0, 0] = bad
    save(tmp_path / "p" / "a.nii.gz", pred)
    save(tmp_path / "r" / "a.nii.gz", ref)
    with pytest.raises(DataError, match=r"a.nii.gz: non-finite label values"):
        evaluate_folders(tmp_path / "p", tmp_path / "r")


def test_labels_are_read_as_the_integers_stored(tmp_path):
    """Labels went through float32: 16777217 was reported as 16777216."""
    ref = blob((8, 8, 4), (2, 2, 0), 3).astype(np.int32) * 16777217
    save(tmp_path / "p" / "a.nii.gz", ref)
    save(tmp_path / "r" / "a.nii.gz", ref)
    result = evaluate_folders(tmp_path / "p", tmp_path / "r", {16777217: "big"})
    assert result["label_values"] == {"0": 0, "16777217": 1}


def test_monai_names_and_folders_pair_and_unpaired_files_are_named(tmp_path):
    """MONAI's SaveImage writes OUT/case/case_seg.nii.gz: 'no NIfTI or PNG files'; flat
    case_seg names: 'no prediction', without naming what the predictions were called."""
    for case in ("c0", "c1"):
        save(tmp_path / "ref" / f"{case}.nii.gz", blob((12, 12, 6), (2, 3, 1)))
        save(tmp_path / "monai" / case / f"{case}_seg.nii.gz", blob((12, 12, 6), (3, 3, 1)))
        save(tmp_path / "flat" / f"{case}_trans.nii.gz", blob((12, 12, 6), (3, 3, 1)))
    for folder, postfix in (("monai", "_seg"), ("flat", "_trans")):
        with pytest.warns(UserWarning, match=f"without '{postfix}'"):
            result = evaluate_folders(tmp_path / folder, tmp_path / "ref", {1: "x"})
        assert [c["case"] for c in result["cases"]] == ["c0", "c1"]
        assert result["dataset"]["dice"] == pytest.approx(0.75)
    save(tmp_path / "odd" / "c0_seg.nii.gz", blob((12, 12, 6), (3, 3, 1)))
    save(tmp_path / "odd" / "c1_mask.nii.gz", blob((12, 12, 6), (3, 3, 1)))
    with pytest.raises(DataError, match=r"predictions without a reference: 2, e.g. c0_seg"):
        evaluate_folders(tmp_path / "odd", tmp_path / "ref", {1: "x"})
    # masks both at the top and one level down: which are the cases is a guess (was: the
    # subfolder's reference left out without a word)
    save(tmp_path / "ref" / "more" / "c2.nii.gz", blob((12, 12, 6), (2, 3, 1)))
    with pytest.raises(DataError, match=r"ref: references both in it \(c0.nii.gz, ...\) and in"):
        evaluate_folders(tmp_path / "monai", tmp_path / "ref", {1: "x"})
    # ...or deeper than the level read (was: x/y/c0.nii.gz ignored without a word)
    (tmp_path / "ref" / "more" / "c2.nii.gz").rename(tmp_path / "c2.nii.gz")
    save(tmp_path / "ref" / "more" / "old" / "c0.nii.gz", blob((12, 12, 6), (2, 3, 1)))
    with pytest.raises(DataError, match=r"references in it and deeper \(more/old/c0.nii.gz\)"):
        evaluate_folders(tmp_path / "monai", tmp_path / "ref", {1: "x"})
    save(tmp_path / "monai" / "c1" / "v1" / "c1_seg.nii.gz", blob((12, 12, 6), (3, 3, 1)))
    with pytest.raises(DataError, match=r"in its subfolders and deeper \(c1/v1/c1_seg.nii.gz\)"):
        evaluate_folders(tmp_path / "monai", tmp_path / "flat", {1: "x"})


def test_names_pair_in_either_unicode_form_and_a_dangling_link_is_named(tmp_path):
    """macOS writes 'ë' decomposed: 'no prediction for patiënt'. A link to a file not fetched
    (git-annex, DataLad) was skipped: its case lost, the warning blaming the prediction."""
    name = "patiënt.nii.gz"
    save(tmp_path / "p" / unicodedata.normalize("NFD", name), blob((8, 8, 4), (2, 2, 0)))
    save(tmp_path / "r" / unicodedata.normalize("NFC", name), blob((8, 8, 4), (2, 2, 0)))
    result = evaluate_folders(tmp_path / "p", tmp_path / "r", {1: "x"})
    assert result["dataset"]["dice"] == 1.0
    os.symlink(tmp_path / "annex" / "key", tmp_path / "r" / "b.nii.gz")
    save(tmp_path / "p" / "b.nii.gz", blob((8, 8, 4), (2, 2, 0)))
    with pytest.raises(DataError, match=r"b.nii.gz: a link to .*annex/key, which does not exist"):
        evaluate_folders(tmp_path / "p", tmp_path / "r", {1: "x"})


def test_an_ignore_label_alone_is_not_another_encoding(tmp_path):
    """A reference holding only nnU-Net's ignore value drew 'saved in two encodings?'."""
    ref = np.zeros((12, 12, 4), np.int16)
    ref[:, :, 3] = 2
    save(tmp_path / "p" / "a.nii.gz", blob((12, 12, 4), (2, 2, 0)))
    save(tmp_path / "r" / "a.nii.gz", ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_folders(tmp_path / "p", tmp_path / "r", {1: "organ", 2: "ignore"})
    assert result["ignore_label"] == {"value": 2, "voxels": 144}


def test_a_datalist_without_labels_declares_nothing(tmp_path):
    """A MONAI datalist one folder up stopped scoring: 'expected a labels mapping'."""
    save(tmp_path / "d" / "p" / "a.nii.gz", blob((8, 8, 4), (2, 2, 0)))
    save(tmp_path / "d" / "r" / "a.nii.gz", blob((8, 8, 4), (2, 2, 0)))
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.warns(UserWarning, match="labels inferred"):
        result = evaluate_folders(tmp_path / "d" / "p", tmp_path / "d" / "r")
    assert result["labels"] == {"0": "background", "1": "label 1"}
    assert result["case_summary"]["dice"]["sd"] != result["case_summary"]["dice"]["sd"]  # n = 1


def test_identical_cases_have_an_sd_of_exactly_zero(tmp_path):
    """(numpy's SD of three equal 0.7s is 1.4e-16)"""
    ref, pred = np.zeros((16, 2, 2), np.int16), np.zeros((16, 2, 2), np.int16)
    ref[0:10, 0, 0], pred[3:13, 0, 0] = 1, 1  # Dice 0.7
    for case in "abc":
        save(tmp_path / "p" / f"{case}.nii.gz", pred)
        save(tmp_path / "r" / f"{case}.nii.gz", ref)
    summary = evaluate_folders(tmp_path / "p", tmp_path / "r", {1: "x"})["case_summary"]
    assert summary["dice"]["sd"] == 0.0 and summary["dice"]["mean"] == pytest.approx(0.7)


def test_the_cli_replaces_its_own_results_and_keeps_them_out_of_its_inputs(tmp_path):
    """A second `evaluate --pred --ref` refused its own evaluation.json; --json inside the
    references wrote a .png that the next evaluation read as a mask; --workers was ignored."""
    for case in "ab":
        save(tmp_path / "p" / f"{case}.nii.gz", blob((10, 10, 4), (2, 2, 0)))
        save(tmp_path / "r" / f"{case}.nii.gz", blob((10, 10, 4), (3, 2, 0)))
    args = ("evaluate", "--pred", tmp_path / "p", "--ref", tmp_path / "r", "--labels", "1")
    for _ in range(2):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "evaluation.json").read_text())["cases"][0]["case"] == "a"
    r = cli(*args, "--json", tmp_path / "r" / "e.json", cwd=tmp_path)
    assert r.returncode == 2 and "is inside the input folder" in r.stderr
    assert not (tmp_path / "r" / "e.png").exists()
    r = cli(*args, cwd=tmp_path / "p")
    assert r.returncode == 2 and "--json (default)" in r.stderr
    r = cli(*args, "--workers", "2", cwd=tmp_path)
    assert r.returncode == 2 and "--workers applies to a run folder" in r.stderr


def test_the_dicom_layouts_labels_json_declares_the_labels(tmp_path):
    """evaluate read only dataset.json: a DICOM dataset's labels.json (nnU-Net's form) beside
    masks/ was ignored and the labels inferred."""
    ref = blob((8, 8, 4), (2, 2, 0)) * 5
    save(tmp_path / "p" / "a.nii.gz", ref)
    save(tmp_path / "d" / "masks" / "a.nii.gz", ref)
    (tmp_path / "d" / "labels.json").write_text(json.dumps({"background": 0, "lesion": 5}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_folders(tmp_path / "p", tmp_path / "d" / "masks")
    assert result["labels"] == {"0": "background", "1": "lesion"}
    assert result["labels_source"].endswith("labels.json") and result["dataset"]["dice"] == 1.0


def test_a_label_map_scores_the_folders_as_evaluate_run_scores_its_store(tmp_path):
    """Masks whose foreground is 0 (ISBI's membranes: `prepare --label-map 0:1,255:0`) came back
    from predict as 0/255 and were scored with 0 as the background: the other class's Dice."""
    from conftest import trained_run
    from segscale.imgmed import Preprocessing, prepare
    from segscale.predict import predict
    from test_inputs import write_2d

    raw = write_2d(tmp_path / "raw", "L")
    label_map = {0: 1, 255: 0}
    store, _ = prepare(
        raw,
        tmp_path / "store",
        Preprocessing(size=32),
        val_fraction=0.25,
        test_fraction=0.5,
        label_map=label_map,
        progress=False,
    )
    run = trained_run(store, tmp_path / "run", steps_per_epoch=3)
    done = cli("evaluate", run, "--split", "")  # was: the test split, without a word
    assert done.returncode == 2 and "--split '': empty" in done.stderr, done.stderr
    done = cli("evaluate", run, "--json", tmp_path / "run.json")
    assert done.returncode == 0, done.stderr
    by_run = json.loads((tmp_path / "run.json").read_text())
    ids = [c["case"] for c in by_run["cases"]]
    predict(run, [raw / "images" / f"{i}.png" for i in ids], tmp_path / "pred")
    (tmp_path / "ref").mkdir()
    for i in ids:
        (tmp_path / "ref" / f"{i}.png").write_bytes((raw / "masks" / f"{i}.png").read_bytes())
    folders = evaluate_folders(tmp_path / "pred", tmp_path / "ref", label_map=label_map)
    assert folders["labels"] == by_run["labels"]
    assert by_run["labels"]["1"] == "class_1 (mask value [0])"
    name = folders["labels"]["1"]
    dice = {c["case"]: c["per_class"][name]["dice"] for c in folders["cases"]}
    assert dice == pytest.approx({c["case"]: c["per_class"][name]["dice"] for c in by_run["cases"]})
    plain = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {255: "square"})
    assert [c["dice"] for c in plain["cases"]] != pytest.approx(list(dice.values()))
    # several raw values of one class; --labels beside it, or with a run, is refused
    save(tmp_path / "p2" / "a.nii.gz", np.array([[[0], [1], [2]], [[2], [0], [0]]], np.int16))
    save(tmp_path / "r2" / "a.nii.gz", np.array([[[0], [2], [1]], [[0], [0], [1]]], np.int16))
    merged = evaluate_folders(tmp_path / "p2", tmp_path / "r2", label_map={0: 0, 1: 1, 2: 1})
    assert merged["cases"][0]["dice"] == pytest.approx(2 * 2 / (3 + 3))
    assert merged["label_values"] == {"0": 0, "1": 1, "2": 1}
    with pytest.raises(DataError, match="--labels and --label-map: give one"):
        evaluate_folders(tmp_path / "p2", tmp_path / "r2", {1: "a"}, {0: 0, 1: 1})
    with pytest.raises(DataError, match=r"classes must be 0..K-1, got \[0, 2\]"):
        evaluate_folders(tmp_path / "p2", tmp_path / "r2", label_map={0: 0, 1: 2, 2: 2})
    done = cli("evaluate", run, "--label-map", "0:1,255:0")
    assert done.returncode == 2 and "--label-map applies to --pred/--ref" in done.stderr

"""More real-world inputs of the same kinds, each once a silent wrong result or a traceback."""

import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import trained_run, write_msd
from segscale.errors import DataError
from segscale.evaluation import evaluate_folders
from segscale.imgmed import Preprocessing, prepare
from segscale.imgmed.check import check_source
from segscale.imgmed.io import load_nifti
from segscale.imgmed.prepare import parse_labels
from segscale.predict import predict
from test_inputs import prepared, write_2d, write_nnunet_v2


def test_a_permuted_label_on_another_grid_is_refused(tmp_path):
    """Axes permuted and a 1% spacing error on one axis (was: accepted, as the moved grid was
    checked with the unpermuted shape)."""
    raw = write_msd(tmp_path / "raw")
    label = raw / "labelsTr" / "case_001.nii.gz"
    img = nib.load(label)
    data = np.ascontiguousarray(np.asanyarray(img.dataobj).transpose(2, 0, 1))
    perm = np.zeros((4, 4))
    perm[2, 0] = perm[0, 1] = perm[1, 2] = perm[3, 3] = 1
    affine = img.affine @ perm
    affine[:3, 1] *= 1.01
    nib.save(nib.Nifti1Image(data, affine), label)
    with pytest.raises(DataError, match="label is not on the voxel grid of its image"):
        prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)


def test_two_files_that_make_one_case_are_refused(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=3)
    meta = json.loads((raw / "dataset.json").read_text())
    gz = raw / "imagesTr" / "case_000.nii.gz"
    (raw / "imagesTr" / "case_000.nii").write_bytes(gzip.decompress(gz.read_bytes()))
    meta["training"].append(
        {"image": "./imagesTr/case_000.nii", "label": meta["training"][0]["label"]}
    )
    meta["numTraining"] = 4
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataError, match=r"case_000.nii and .*case_000.nii.gz: both make case 'case_000'"
    ):
        prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)
    pictures = write_2d(tmp_path / "2d", "L")
    shutil.copy(pictures / "images" / "s0.png", pictures / "images" / "s0.tif")
    with pytest.raises(DataError, match="both make case 's0'"):
        prepared(pictures, tmp_path / "out2")


def test_cases_with_different_channel_counts_are_refused_together(tmp_path):
    pictures = write_2d(tmp_path / "2d", "L")
    Image.open(pictures / "images" / "s2.png").convert("RGB").save(pictures / "images" / "s2.png")
    with pytest.raises(
        DataError, match=r"differ in their number of channels: 1 in 3 cases, 3 in s2"
    ):
        prepared(pictures, tmp_path / "out")
    report = {c.case: c for c in check_source(pictures, progress=False).cases}
    assert report["s2"].refused == "3 channel(s); most cases have 1"


def test_suffixes_in_mixed_case_are_read_and_written_by_content(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=3)
    src = raw / "imagesTr" / "case_000.nii.gz"
    mixed = tmp_path / "b.Nii.Gz"  # nibabel alone would look for b.nii.Gz
    shutil.copy(src, mixed)
    data, _ = load_nifti(mixed)
    assert data.shape == (24, 20, 6)
    store, _ = prepare(raw, tmp_path / "store", Preprocessing(size=16), progress=False)
    run = tmp_path / "run"
    trained_run(store, run)
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(src, scans / "SCAN.NII.GZ")
    [out] = predict(run, [scans], tmp_path / "masks")
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as its name says (was: uncompressed)
    assert load_nifti(out)[0].shape == (24, 20, 6)
    # two inputs that would write one mask are refused before anything is written
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("L", (20, 24)).save(pics / "x.png")
    Image.new("L", (20, 24)).save(pics / "x.tif")
    with pytest.raises(DataError, match=r"x.tif and .*x.png: both would write the mask of case"):
        predict(run, [pics], tmp_path / "masks2")
    # nor two masks of one case under two names, which evaluate (and macOS) take for one: in
    # one call, or one beside an earlier call's
    (pics / "x.tif").unlink()
    Image.new("L", (20, 24)).save(pics / "X.png")
    with pytest.raises(DataError, match=r"both would write the mask of case 'x' \(X.png and x.png"):
        predict(run, [pics / "X.png", pics / "x.png"], tmp_path / "masks2")
    predict(run, [pics / "x.png"], tmp_path / "masks2")
    with pytest.raises(DataError, match=r"x.png: a mask of case 'X' is there under another name"):
        predict(run, [pics / "X.png"], tmp_path / "masks2")
    shutil.copy(src, tmp_path / "scan.nii")
    [volume] = predict(run, [scans], tmp_path / "masks3")
    with pytest.raises(DataError, match=r"SCAN.NII.GZ: a mask of case 'scan' is there under"):
        predict(run, [tmp_path / "scan.nii"], tmp_path / "masks3", force=True)
    assert [p.name for p in (tmp_path / "masks3").iterdir()] == [volume.name]


def test_symlinked_images_keep_their_case_names(tmp_path):
    """DataLad / git-annex / DVC keep images as symlinks into a blob store."""
    raw = write_msd(tmp_path / "raw", num_cases=3)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for i, p in enumerate(sorted((raw / "imagesTr").iterdir())):
        p.rename(blobs / f"blob{i}")
        os.symlink(blobs / f"blob{i}", p)
    store = prepared(raw, tmp_path / "out")
    assert [c["id"] for c in store.cases()] == ["case_000", "case_001", "case_002"]


def test_malformed_dataset_json_and_multipage_pictures_are_one_line(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=3)
    meta = json.loads((raw / "dataset.json").read_text())
    meta["modality"] = {"CT": "CT"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"dataset.json: unexpected content \(ValueError"):
        prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)
    pictures = write_2d(tmp_path / "2d", "L")
    frames = [Image.new("L", (32, 32), v) for v in (0, 1)]
    frames[0].save(pictures / "masks" / "s1.tif", save_all=True, append_images=frames[1:])
    (pictures / "masks" / "s1.png").unlink()
    with pytest.raises(DataError, match=r"s1.tif: 2 frames \(a multi-page or animated picture\)"):
        prepared(pictures, tmp_path / "out2")


def test_evaluate_refuses_negative_values_and_duplicate_names(tmp_path):
    for side, shift in (("ref", 0), ("pred", -1)):
        (tmp_path / side).mkdir()
        a = np.zeros((8, 8, 3), np.int16)
        a[2:5, 2:5, 1] = 1
        nib.save(nib.Nifti1Image(a + shift, np.eye(4)), tmp_path / side / "c.nii.gz")
    with pytest.raises(DataError, match=r"negative label value -1"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "x"})
    with pytest.raises(DataError, match=r"the name\(s\) \['x'\] are given to several values"):
        evaluate_folders(tmp_path / "ref", tmp_path / "ref", {1: "x", 2: "x"})
    with pytest.raises(DataError, match="value 1 given twice"):
        parse_labels("1:a,1:b")
    assert parse_labels("0,1,2") == {0: "background", 1: "label 1", 2: "label 2"}


def test_background_only_folders_have_no_applicable_class(tmp_path):
    for side in ("ref", "pred"):
        (tmp_path / side).mkdir()
        nib.save(
            nib.Nifti1Image(np.zeros((8, 8, 3), np.uint8), np.eye(4)), tmp_path / side / "c.nii.gz"
        )
    with pytest.warns(UserWarning, match="labels inferred"):
        result = evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    assert np.isnan(result["cases"][0]["dice"])  # was: the background scored, Dice 1.0
    assert result["case_summary"]["dice"]["excluded"] == 1


def test_masks_pair_with_images_by_name_in_any_case(tmp_path):
    """(was: 'image without a mask' for s1.png beside masks/S1.PNG)"""
    pictures = write_2d(tmp_path / "2d", "L")
    (pictures / "masks" / "s1.png").rename(pictures / "masks" / "S1.PNG")
    store = prepared(pictures, tmp_path / "out")
    assert sorted(c["id"] for c in store.cases()) == ["s0", "s1", "s2", "s3"]
    shutil.copy(pictures / "masks" / "S1.PNG", pictures / "masks" / "s1.png")
    with pytest.raises(DataError, match=r"two masks for 's1'"):
        prepared(pictures, tmp_path / "out2")


def test_masks_named_with_one_postfix_pair_with_their_images_in_a_warning(tmp_path):
    """Kaggle's and ISIC's 2D datasets name a mask case_mask.png beside images/case.jpg: no
    image had its mask, and the one-line refusal named no mask. As evaluate pairs MONAI's
    case_seg predictions: by the names without the postfix they all share, said in a warning."""
    pictures = write_2d(tmp_path / "2d", "L")
    for p in sorted((pictures / "masks").iterdir()):
        p.rename(p.with_name(f"{p.stem}_mask{p.suffix}"))
    with pytest.warns(
        UserWarning, match=r"masks: masks paired with their images by their names without '_mask'"
    ):
        store = prepared(pictures, tmp_path / "out")
    assert sorted(c["id"] for c in store.cases()) == ["s0", "s1", "s2", "s3"]
    # names no one postfix pairs: refused, naming an image and a mask left without its pair
    (pictures / "masks" / "s0_mask.png").rename(pictures / "masks" / "s0_seg.png")
    for image in (pictures / "images").iterdir():
        image.rename(image.with_name("x" + image.name))
    with pytest.raises(
        DataError,
        match=r"no image has its mask \(.*xs0.png: image without a mask .*; 4 mask\(s\) "
        r"without theirs, e.g. .*s0_seg.png: mask without its image",
    ):
        prepared(pictures, tmp_path / "out2")


def test_jpeg_masks_are_named_in_a_warning(tmp_path):
    pictures = write_2d(tmp_path / "2d", "L")
    for p in (pictures / "masks").iterdir():  # JPEG content under a .png name
        Image.open(p).save(p, format="JPEG", quality=75)
    with (
        pytest.warns(UserWarning, match=r"masks: masks stored as JPEG, whose lossy compression"),
        pytest.raises(DataError),  # edges become many values: refused, after the warning
    ):
        prepared(pictures, tmp_path / "out")


def test_nnunet_v2_channel_files_beyond_channel_names_are_refused(tmp_path):
    """(was: case_000_0001 silently left out of a 1-channel dataset)"""
    raw = write_nnunet_v2(tmp_path / "v2")
    images = raw / "imagesTr"
    shutil.copy(images / "case_000_0000.nii.gz", images / "case_000_0001.nii.gz")
    with pytest.raises(
        DataError,
        match=r"case_000_0001.nii.gz: channel 0001 of case 'case_000', but dataset.json's "
        r"channel_names declares 1 channel\(s\) \(_0000 to _0000\)",
    ):
        prepared(raw, tmp_path / "out")
    (images / "case_000_0001.nii.gz").rename(images / "case_000.nii.gz")
    with pytest.raises(DataError, match=r"case_000.nii.gz: not named <case>_<XXXX>.nii.gz"):
        prepared(raw, tmp_path / "out")


def test_nnunet_region_labels_train_and_score_the_label_values(tmp_path):
    """nnU-Net's region-based dataset.json (BraTS: whole tumour = 1 ∪ 2 ∪ 3, ...): the label files
    hold the values, which segscale trains and scores, one class each (was: 'labels must be
    0..K-1, got [0, 3]')."""
    raw = write_nnunet_v2(tmp_path / "v2")
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": [1], "core": 1}
    meta["regions_class_order"] = [1]
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"'lesion' are regions .* the label values 0, 1, one"):
        store = prepared(raw, tmp_path / "out")
    assert store.meta["labels"] == {"0": "background", "1": "core"}
    meta["labels"] = {"background": 0, "whole": [1, 2], "part": 2}
    (raw / "dataset.json").write_text(json.dumps(meta))
    from segscale.imgmed.sources import declared_labels

    with pytest.warns(UserWarning, match="'whole' are regions"):
        assert declared_labels(raw / "dataset.json") == {0: "background", 2: "part", 1: "label 1"}

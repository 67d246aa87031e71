"""Real-world inputs, third round: what pairs with what (case ids in any case, nnU-Net channel
files, predictions with references), how masks encode their foreground, and what predict may
write. Each test builds real files and runs the public functions."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import trained_run
from segscale.errors import DataError, SegscaleError
from segscale.evaluation import evaluate_folders
from segscale.imgmed.geometry import describe
from segscale.imgmed.io import load_nifti
from segscale.imgmed.prepare import parse_labels
from segscale.predict import predict
from test_inputs import prepared, write_2d, write_nnunet_v2


def nnunet_two_channels(root: Path) -> Path:
    """write_nnunet_v2's dataset with a second channel file per case (the first, doubled)."""
    raw = write_nnunet_v2(root)
    for first in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
        img = nib.load(first)
        data = np.asarray(img.dataobj, dtype=np.float32) * 2
        nib.save(nib.Nifti1Image(data, img.affine), str(first).replace("_0000", "_0001"))
    meta = json.loads((raw / "dataset.json").read_text())
    meta["channel_names"] = {"0": "MRI", "1": "MRI x2"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    return raw


def store_for(raw: Path, out: Path) -> Path:
    """A store with a validation split, for a run."""
    from segscale.imgmed import Preprocessing, prepare

    store, _ = prepare(
        raw, out, Preprocessing(size=16), val_fraction=0.34, test_fraction=0, progress=False
    )
    return store


# ---- one case id, one case: names that differ only in case


def test_files_that_differ_only_in_case_are_one_case_and_refused(tmp_path):
    """(were: two cases sharing one mask or image, which could land in two splits; or one
    file silently dropped)"""
    pictures = write_2d(tmp_path / "2d", "L")
    shutil.copy(pictures / "images" / "s0.png", pictures / "images" / "S0.png")
    with pytest.raises(DataError, match=r"s0.png and .*S0.png: both make case 's0'"):
        prepared(pictures, tmp_path / "a")
    raw = write_nnunet_v2(tmp_path / "v2")
    shutil.copy(
        raw / "imagesTr" / "case_000_0000.nii.gz", raw / "imagesTr" / "CASE_000_0000.nii.gz"
    )
    with pytest.raises(DataError, match=r"two files for one channel of one case"):
        prepared(raw, tmp_path / "b")
    (raw / "imagesTr" / "CASE_000_0000.nii.gz").unlink()
    meta = json.loads((raw / "dataset.json").read_text())
    del meta["numTraining"]
    (raw / "dataset.json").write_text(json.dumps(meta))
    shutil.copy(raw / "labelsTr" / "case_000.nii.gz", raw / "labelsTr" / "CASE_000.nii.gz")
    with pytest.raises(DataError, match=r"both make case"):
        prepared(raw, tmp_path / "c")


def test_a_mask_without_an_image_is_refused(tmp_path):
    pictures = write_2d(tmp_path / "2d", "L")
    shutil.copy(pictures / "masks" / "s0.png", pictures / "masks" / "s9.png")
    with pytest.raises(DataError, match=r"s9.png: mask without its image in .*images"):
        prepared(pictures, tmp_path / "out")


def write_case(root: Path, pred: np.ndarray, ref: np.ndarray, name: str = "a") -> None:
    """root/pred/<name>.nii.gz and root/ref/<name>.nii.gz (identity affine), folders made."""
    for side, mask in (("pred", pred), ("ref", ref)):
        (root / side).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), root / side / f"{name}.nii.gz")


def test_evaluate_refuses_two_references_for_one_case(tmp_path):
    mask = np.zeros((8, 8, 2), np.uint8)
    mask[2:5, 2:5] = 1
    write_case(tmp_path, mask, mask)
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "ref" / "A.nii.gz")
    with pytest.raises(DataError, match=r"two references for 'a'"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "blob"})


# ---- how masks say foreground


def test_binary_masks_saved_two_ways_are_refused_with_the_fix(tmp_path):
    """1-bit pictures read 0/1, 8-bit ones 0/255 (was: three classes, 1 and 255 apart)."""
    one_bit = write_2d(tmp_path / "bits", "1", (0, 1))
    grey = write_2d(tmp_path / "grey", "L")
    for name in ("s1.png", "s3.png"):
        shutil.copy(grey / "masks" / name, one_bit / "masks" / name)
    with pytest.raises(
        DataError, match=r"as 1 in 2 \(e.g. s0.png\) and as 255 in 2 \(e.g. s1.png\).*--label-map"
    ):
        prepared(one_bit, tmp_path / "a")
    from segscale.imgmed import Preprocessing, Store, prepare

    store, _ = prepare(
        one_bit, tmp_path / "b", Preprocessing(size=16), label_map={0: 0, 1: 1, 255: 1},
        val_fraction=0, test_fraction=0, progress=False,
    )  # fmt: skip
    assert Store.open(store).num_classes == 2
    # evaluate: identical shapes, one side 1-bit: no value in common is said, not just Dice 0
    bits = write_2d(tmp_path / "bits2", "1", (0, 1))
    with pytest.warns(
        UserWarning, match=r"in 4 of 4 case\(s\) .* \(e.g. s0.png: \[1\] against \[255\]\)"
    ):
        result = evaluate_folders(bits / "masks", grey / "masks", {1: "a", 255: "b"})
    assert result["dataset"]["dice"] == 0.0
    shutil.copy(grey / "masks" / "s1.png", bits / "masks" / "s1.png")  # one case saved alike
    with pytest.warns(UserWarning, match=r"in 3 of 4 case\(s\)"):
        evaluate_folders(bits / "masks", grey / "masks", {1: "a", 255: "b"})


def test_masks_with_no_foreground_or_drawn_in_alpha_are_refused(tmp_path):
    pictures = write_2d(tmp_path / "alpha", "L")
    for colour in ((255, 255, 255), (255, 0, 0)):  # one colour, the shape in the transparency
        for p in sorted((pictures / "masks").iterdir()):
            alpha = (
                np.asarray(Image.open(p))[..., -1] if colour[1] == 0 else np.asarray(Image.open(p))
            )
            rgba = np.dstack([np.full_like(alpha, c) for c in colour] + [alpha])
            Image.fromarray(rgba, "RGBA").save(p)
        with pytest.raises(DataError, match=r"s0.png: one colour everywhere, with the shape in"):
            prepared(pictures, tmp_path / "a")
    flat = write_2d(tmp_path / "flat", "L", (255, 255))
    with pytest.raises(DataError, match=r"every mask holds only the value 255; nothing to segment"):
        prepared(flat, tmp_path / "b")


def test_labels_without_foreground_and_the_ignore_label(tmp_path):
    ref = np.zeros((10, 10, 3), np.uint8)
    ref[2:6, 2:6] = 1
    ref[7:9, :] = 2  # nobody annotated these rows
    pred = np.where(ref == 1, 1, 0).astype(np.uint8)
    pred[7, :4] = 1  # whatever the prediction says there is not scored
    pred[0, 0, 0] = 1  # one false positive where it is
    write_case(tmp_path, pred, ref)
    with pytest.raises(DataError, match=r"no foreground label; 0 is the background"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", {0: "background"})
    with pytest.raises(DataError, match=r"--labels '': expected values like 1,2"):
        parse_labels("")
    for twice in ({1: "la", 2: "ignore", 3: "ignore"}, {0: "ignore", 1: "la"}):
        with pytest.raises(DataError, match=r"'ignore' given to \[.*\]; one value other than"):
            evaluate_folders(tmp_path / "pred", tmp_path / "ref", twice)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "la", 2: "ignore"})
    assert result["labels"] == {"0": "background", "1": "la"}
    assert result["ignore_label"] == {"value": 2, "voxels": int((ref == 2).sum())}
    la = result["cases"][0]["per_class"]["la"]
    tp, fp = int((ref == 1).sum()), 1
    negatives = int((ref == 0).sum())  # the unannotated voxels are neither side's
    assert la["dice"] == pytest.approx(2 * tp / (2 * tp + fp))
    assert la["specificity"] == pytest.approx((negatives - fp) / negatives)
    raw = write_nnunet_v2(tmp_path / "v2")  # training on it: refused in one line
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"]["ignore"] = 2
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"label 2 is nnU-Net's 'ignore'"):
        prepared(raw, tmp_path / "out")


# ---- channel files


def test_channel_files_of_different_sizes_and_undeclared_colour_are_one_line(tmp_path):
    raw = write_nnunet_v2(tmp_path / "v2png", ".png")
    meta = json.loads((raw / "dataset.json").read_text())
    meta["channel_names"] = {"0": "a", "1": "b"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    for first in sorted((raw / "imagesTr").glob("*_0000.png")):
        shutil.copy(first, str(first).replace("_0000", "_0001"))
    Image.new("L", (20, 11)).save(raw / "imagesTr" / "case_001_0001.png")
    with pytest.raises(DataError, match=r"case_001_0001.png: 11×20 pixels, but case_001_0000.png"):
        prepared(raw, tmp_path / "a")
    # nnU-Net's natural images: one RGB file for channel_names R, G, B
    for second in (raw / "imagesTr").glob("*_0001.png"):
        second.unlink()
    for first in (raw / "imagesTr").glob("*_0000.png"):
        Image.open(first).convert("RGB").save(first)
    meta["channel_names"] = {"0": "R", "1": "G", "2": "B"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    assert prepared(raw, tmp_path / "b").meta["channel_names"] == ["R", "G", "B"]
    meta["channel_names"] = {"0": "R", "1": "G"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"declares 2 channel\(s\) \(R, G\), but the images hold 3"):
        prepared(raw, tmp_path / "c")


def test_itk_vector_images_are_read_as_channels(tmp_path):
    data = np.random.default_rng(0).random((6, 5, 4, 1, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii.gz")
    read, _ = load_nifti(tmp_path / "v.nii.gz")
    assert read.shape == (6, 5, 4, 3) and np.array_equal(read, data[:, :, :, 0, :])


def test_a_refused_grid_names_how_oblique_each_is():
    t = np.radians(30)
    turned = np.eye(4)
    turned[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    assert describe(turned, (4, 4, 4)).endswith("axes RAS, oblique: axes 30°, 30°, 0° off RAS")
    assert "oblique" not in describe(np.eye(4), (4, 4, 4))


# ---- predict: what it reads together, what it may write


def test_predict_groups_nnunet_channel_files_and_names_masks_as_nnunet(tmp_path):
    """A 2-channel nnU-Net v2 model takes imagesTr as laid out (was: '1 channel(s) after
    preprocessing'); masks are named <case>.nii.gz, so evaluate pairs them with labelsTr."""
    raw = nnunet_two_channels(tmp_path / "v2")
    run = trained_run(store_for(raw, tmp_path / "store"), tmp_path / "run")
    written = predict(run, [raw / "imagesTr"], tmp_path / "pred")
    assert [p.name for p in written] == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    assert nib.load(written[0]).shape == nib.load(raw / "labelsTr" / "case_000.nii.gz").shape
    result = evaluate_folders(tmp_path / "pred", raw / "labelsTr")
    assert len(result["cases"]) == 3
    # one folder's files make a case, never two folders' (two patients), and a name never
    # depends on what else is given: the same file alone, or beside others, gives one mask name
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(raw / "imagesTr" / "case_001_0001.nii.gz", other / "case_000_0001.nii.gz")
    given = [raw / "imagesTr" / "case_000_0000.nii.gz", other / "case_000_0001.nii.gz"]
    with pytest.raises(DataError, match=r"case_000_0000.nii.gz: 1 channel\(s\) .* trained on 2"):
        predict(run, given, tmp_path / "pred2")
    shutil.copy(raw / "imagesTr" / "case_000_0000.nii.gz", other / "case_000_0000.nii.gz")
    with pytest.raises(
        DataError, match=r"both would write the mask of case 'case_000' \(case_000.nii.gz in"
    ):
        predict(run, [raw / "imagesTr", other], tmp_path / "pred2")
    four_d = tmp_path / "scan.nii.gz"  # a 4D file beside channel files: each as it is
    img = nib.load(raw / "imagesTr" / "case_002_0000.nii.gz")
    pair = [
        np.asarray(nib.load(raw / "imagesTr" / f"case_002_000{c}.nii.gz").dataobj) for c in (0, 1)
    ]
    nib.save(nib.Nifti1Image(np.stack(pair, -1), img.affine), four_d)
    mixed = predict(run, [*sorted((raw / "imagesTr").glob("case_000_*")), four_d], tmp_path / "mix")
    assert [p.name for p in mixed] == ["case_000.nii.gz", "scan.nii.gz"]
    assert np.array_equal(nib.load(mixed[1]).dataobj, nib.load(written[2]).dataobj)
    (other / "case_000_0001.nii.gz").rename(other / "case_000_0002.nii.gz")
    with pytest.raises(DataError, match=r"other/case_000: channel files _0000, _0002; _0001 is"):
        predict(run, [other], tmp_path / "pred3")
    with pytest.raises(DataError, match=r"trained on 2; give its channels as one 4D file"):
        predict(run, [other / "case_000_0000.nii.gz", raw / "imagesTr" / "case_001_0001.nii.gz"],
                tmp_path / "pred3")  # fmt: skip


def test_predict_never_writes_over_its_inputs_and_checks_before_computing(tmp_path):
    pictures = write_2d(tmp_path / "2d", "L")
    run = trained_run(store_for(pictures, tmp_path / "store"), tmp_path / "run")
    images = pictures / "images"
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    with pytest.raises(
        DataError, match=r"the folder of the input s0.png; masks beside the images they segment"
    ):
        predict(run, [images], images)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    # nor into a folder inside it (the next prepare read images/pred as a DICOM series)
    with pytest.raises(SegscaleError, match=r"images/pred: inside the input folder"):
        predict(run, [images], images / "pred")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    (tmp_path / "out" / "s2.png").mkdir(parents=True)  # in the way of a mask
    with pytest.raises(DataError, match=r"s2.png: in the way of a mask"):
        predict(run, [images], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s2.png"]
    colour = tmp_path / "colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(colour)
    with pytest.raises(DataError, match=r"colour.png: 3 channel"):
        predict(run, [images / "s0.png", colour], tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()  # every folder it made, removed
    # a name that lies about what it holds: refused, as load and imgmed info refuse it (its
    # mask was written as fake.png without a word)
    disguised = tmp_path / "fake.nii.gz"
    disguised.write_bytes((images / "s0.png").read_bytes())
    with pytest.raises(DataError, match=r"fake.nii.gz: named like a nifti file but holds image"):
        predict(run, [disguised], tmp_path / "named")
    # a message of a shared reader names the input it is about, among many
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((32, 32, 3), np.nan, np.float32), np.eye(4)), nan)
    with pytest.raises(
        DataError,
        match=r"nan.nii.gz: image contains \d+ NaN or infinite value\(s\) of \d+ \(the first at",
    ):
        predict(run, [images / "s0.png", nan], tmp_path / "named")


def test_a_missing_channel_file_is_named_as_such(tmp_path):
    """(was: 'label without its image', for a case whose other channel files are there)"""
    raw = nnunet_two_channels(tmp_path / "v2")
    (raw / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(
        DataError, match=r"case_001_0001.nii.gz: missing; case 'case_001' has other channel files"
    ):
        prepared(raw, tmp_path / "out")


# ---- stores, conversions and DICOM (a third break-test)


def test_a_store_follows_its_declarations_and_never_lives_in_its_data(tmp_path):
    """(were: a renamed label kept the old store, 'up to date'; a store written inside images/
    turned the 2D dataset into a DICOM one on the next run)"""
    raw = write_nnunet_v2(tmp_path / "v2")
    first = prepared(raw, tmp_path / "out")
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "atrium": 1}
    (raw / "dataset.json").write_text(json.dumps(meta))
    assert prepared(raw, tmp_path / "out").meta["labels"] == {"0": "background", "1": "atrium"}
    assert first.meta["labels"]["1"] == "blob"
    pictures = write_2d(tmp_path / "2d", "L")
    with pytest.raises(DataError, match=r"images/store: inside .*images, which the dataset's"):
        prepared(pictures, pictures / "images" / "store")


def test_preprocessing_and_label_map_refuse_what_cannot_be_meant():
    from segscale.imgmed import Preprocessing
    from segscale.imgmed.prepare import parse_label_map

    with pytest.raises(DataError, match=r"slices 0: expected at least 1"):
        Preprocessing(slices=0)
    with pytest.raises(DataError, match=r"channels \[1, 1\]: \[1\] given twice"):
        Preprocessing(channels=(1, 1))
    with pytest.raises(DataError, match=r"channels \[-1\]: expected channel indices ≥ 0"):
        Preprocessing(channels=(-1,))
    with pytest.raises(DataError, match=r"raw value\(s\) \[0\] given twice"):
        parse_label_map("0:0,255:1,0:1")


def test_conversions_keep_label_values_and_refuse_what_they_cannot_write(tmp_path):
    from segscale.imgmed.convert import convert

    labels = np.zeros((6, 6, 3), np.int16)
    labels[1:3, 1:3], labels[3:5, 3:5] = 2, 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "l.nii.gz")
    convert(tmp_path / "l.nii.gz", tmp_path / "slices")  # int16 labels (was: 0/128/255)
    convert(tmp_path / "slices", tmp_path / "back.nii.gz")
    assert np.array_equal(np.asarray(nib.load(tmp_path / "back.nii.gz").dataobj), labels)
    grey = (np.arange(108).reshape(6, 6, 3) * 2).astype(np.uint8)
    nib.save(nib.Nifti1Image(grey, np.eye(4)), tmp_path / "u8.nii.gz")
    [first, *_] = convert(tmp_path / "u8.nii.gz", tmp_path / "win", window=(0, 100))
    assert np.asarray(Image.open(first)).max() == 255 and np.asarray(Image.open(first)).min() == 0
    assert json.loads((tmp_path / "win" / "slices.json").read_text())["window"] == [0, 100]
    np.save(tmp_path / "b.npy", labels > 0)
    np.save(tmp_path / "i.npy", labels.astype(np.int64))
    for name in ("b", "i"):  # (were: nibabel tracebacks on bool and int64)
        [out] = convert(tmp_path / f"{name}.npy", tmp_path / f"{name}.nii.gz")
        assert np.array_equal(np.asarray(nib.load(out).dataobj) > 0, labels > 0)
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 5), np.int16), np.eye(4)), tmp_path / "v.nii.gz")
    with pytest.raises(DataError, match=r"a 6×6×5 volume into one picture one.png"):
        convert(tmp_path / "v.nii.gz", tmp_path / "one.png")
    rgb = np.zeros((4, 4, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    with pytest.raises(DataError, match=r"rgb.nii.gz: a \('R', 'G', 'B'\) colour NIfTI"):
        convert(tmp_path / "rgb.nii.gz", tmp_path / "rgb")


def test_dicom_rounded_positions_monochrome1_and_multiframe(tmp_path):
    import pydicom

    from segscale.imgmed.dicom import load_dicom_series
    from test_imgmed_io import write_series

    volume = np.random.default_rng(0).integers(0, 100, (8, 6, 5)).astype(np.int16)
    write_series(tmp_path / "s", volume, step=0.625, slope=1.0, intercept=0.0)
    for f in (tmp_path / "s").iterdir():  # positions written to 0.01 mm, as some scanners do
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [round(float(v), 2) for v in ds.ImagePositionPatient]
        ds.save_as(f)
    read, affine = load_dicom_series(tmp_path / "s")  # (was: 'spacing varies ... missing slices?')
    assert read.shape == (8, 6, 5) and abs(affine[2, 2] - 0.625) < 0.01
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(f)
    inverted, _ = load_dicom_series(tmp_path / "s")
    assert np.array_equal(inverted, -read)  # bright is high, as MONOCHROME2 stores it
    f = next((tmp_path / "s").iterdir())
    ds = pydicom.dcmread(f)
    ds.NumberOfFrames = 2
    ds.save_as(f)
    with pytest.raises(DataError, match=r"a multi-frame \(enhanced\) DICOM; segscale reads one"):
        load_dicom_series(tmp_path / "s")


def test_one_picture_to_nifti_is_a_stack_of_one_and_predict_names_dicom(tmp_path):
    from segscale.imgmed.convert import convert
    from test_imgmed_io import write_series

    picture = np.arange(40 * 32, dtype=np.uint16).reshape(40, 32)
    Image.fromarray(picture).save(tmp_path / "p.png")
    (tmp_path / "stack").mkdir()
    Image.fromarray(picture).save(tmp_path / "stack" / "p.png")
    [one] = convert(tmp_path / "p.png", tmp_path / "one.nii.gz", spacing=(0.5, 0.5, 2.0))
    [stacked] = convert(tmp_path / "stack", tmp_path / "stacked.nii.gz")
    assert nib.load(one).shape == nib.load(stacked).shape == (32, 40, 1)  # (was: 40 × 32)
    assert np.array_equal(nib.load(one).dataobj, nib.load(stacked).dataobj)
    assert np.allclose(np.diag(nib.load(one).affine), (0.5, 0.5, 2.0, 1.0))  # (was: ignored)
    write_series(tmp_path / "series", np.zeros((4, 4, 3), np.int16), names=["a", "b", "c"])
    with pytest.raises(DataError, match=r"no NIfTI or PNG.* \(a DICOM series\? convert it"):
        predict(tmp_path / "run", [tmp_path / "series"], tmp_path / "out")
    with pytest.raises(DataError, match=r"series/a: DICOM; predict reads NIfTI and pictures"):
        predict(tmp_path / "run", [tmp_path / "series" / "a"], tmp_path / "out")


def test_gantry_tilt_and_a_spacing_that_leaves_no_pixels_are_said(tmp_path):
    import pydicom

    from segscale.imgmed import Preprocessing, prepare
    from segscale.imgmed.dicom import load_dicom_series
    from test_imgmed_io import write_series

    t = np.radians(20)  # rows tilted, positions stepping straight along z (a CT gantry tilt)
    write_series(tmp_path / "tilt", np.zeros((6, 5, 4), np.int16),
                 orientation=(1, 0, 0, 0, np.cos(t), -np.sin(t)))  # fmt: skip
    for f in (tmp_path / "tilt").iterdir():
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [-50.0, 30.0, float(ds.ImagePositionPatient[2])]
        ds.save_as(f)
    with pytest.warns(UserWarning, match=r"slices sheared by 20.0° against their normal"):
        load_dicom_series(tmp_path / "tilt")
    raw = write_nnunet_v2(tmp_path / "v2")
    with pytest.warns(UserWarning, match=r"--spacing 100 mm: 3 case\(s\) resample to under 8"):
        prepare(raw, tmp_path / "out", Preprocessing(size=16, spacing=100.0), progress=False)


def test_channels_picked_by_name_are_refused_when_dataset_json_miscounts_them(tmp_path):
    """`--channels mod2` picks by the names dataset.json declares: with four names for images
    of three channels, index 2 may not be mod2's, yet the store was made without a word."""
    from conftest import write_msd
    from segscale.imgmed import Preprocessing, prepare
    from segscale.imgmed.check import check_source

    raw = write_msd(tmp_path / "raw", num_cases=3, channels=3)
    meta = json.loads((raw / "dataset.json").read_text())
    kw = {"val_fraction": 0, "test_fraction": 0, "progress": False}
    store, _ = prepare(raw, tmp_path / "ok", Preprocessing(size=16, channels=(2,)), **kw)
    assert json.loads((store / "meta.json").read_text())["channel_names"] == ["mod2"]
    meta["modality"]["3"] = "mod3"
    (raw / "dataset.json").write_text(json.dumps(meta))
    for channels in (None, (2,)):
        with pytest.raises(
            DataError, match=r"declares 4 channel\(s\) .* images hold 3 \(e.g. case_"
        ):
            prepare(raw, tmp_path / "s", Preprocessing(size=16, channels=channels), **kw)
    # a name past the images' channels: each case refused, and the declared names questioned
    with pytest.raises(DataError, match=r"out of range(.|\n)*declares 4 channel\(s\) .* do they"):
        prepare(raw, tmp_path / "s", Preprocessing(size=16, channels=(3,)), **kw)
    report = check_source(raw, progress=False)
    assert not report.ok
    assert all("3 channel(s); dataset.json declares 4" in c.refused for c in report.cases)

"""`segscale imgmed check` and prepare report every problem of every case in one pass."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import cli, write_msd
from segscale.errors import DataError
from segscale.imgmed import Preprocessing, prepare
from segscale.imgmed.check import check_source
from test_geometry import flip_axes, resave


def defective(root):
    """Five cases: two refused (a label on another grid, an undeclared label value), one with a
    constant image, one stored in another orientation, and junk beside the files."""
    raw = write_msd(root)
    label = raw / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(label).dataobj), np.eye(4)), label)
    label = raw / "labelsTr" / "case_002.nii.gz"
    img = nib.load(label)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), label)
    image = raw / "imagesTr" / "case_003.nii.gz"
    img = nib.load(image)
    nib.save(nib.Nifti1Image(np.full(img.shape, 5.0, np.float32), img.affine), image)
    for folder in ("imagesTr", "labelsTr"):  # the same object, stored LPS-like
        resave(raw / folder / "case_004.nii.gz", lambda a, aff: flip_axes(a, aff, (0, 1)))
    (raw / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (raw / "imagesTr" / "notes.txt").write_text("scanner protocol")
    return raw


def test_check_reports_every_case_and_the_dataset(tmp_path):
    result = check_source(defective(tmp_path / "raw"), progress=False)
    by_case = {c.case: c for c in result.cases}
    assert not result.ok and len(by_case) == 5
    assert "label is not on the voxel grid of its image" in by_case["case_001"].refused
    assert "label values [7] not declared" in by_case["case_002"].refused
    assert by_case["case_003"].notes == ["constant image: no contrast to learn from"]
    assert by_case["case_000"].refused is None and by_case["case_000"].axes == "RAS"
    assert by_case["case_004"].axes == "LPS" and by_case["case_004"].classes == [0, 1]
    assert any(
        n.startswith("mixed orientations: 2 cases RAS, others LPS: case_004") for n in result.notes
    )
    assert [s.split(": ", 1)[1] for s in result.skipped] == [
        "hidden or system file",
        "not an image name (.nii.gz, .nii, .png, .jpg, .jpeg, .tif, .tiff)",
    ]


def test_check_cli_exits_1_with_a_table_when_a_case_would_be_refused(tmp_path):
    raw = defective(tmp_path / "raw")
    r = cli("imgmed", "check", raw)
    assert r.returncode == 1, r.stderr
    assert "2 of 5 cases would be refused" in r.stderr
    # the table numbers each problem; each is one line below it, whole (not folded in a cell)
    lines = r.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(" case_")}
    assert [rows[c][1] for c in sorted(rows)] == ["ok", "refused", "refused", "look", "ok"]
    assert [rows[c][-1] for c in ("case_001", "case_002", "case_003")] == ["#1", "#2", "#3"]
    problems = [line for line in lines if line[:3] in ("#1 ", "#2 ", "#3 ")]
    assert problems[0].startswith("#1 case_001 (refused): ") and problems[0].endswith(
        "resample the label onto the image's grid"
    )
    assert problems[1].startswith("#2 case_002 (refused): ") and "values [7]" in problems[1]
    assert problems[2] == "#3 case_003 (look): constant image: no contrast to learn from"
    assert "Traceback" not in r.stderr


def test_prepare_lists_every_refused_case_at_once(tmp_path):
    raw = defective(tmp_path / "raw")
    with pytest.raises(DataError) as e:
        prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)
    lines = str(e.value).splitlines()
    assert lines[0] == "2 of 5 cases refused (3 prepared cases are kept for the rerun):"
    assert lines[1].startswith("  case_001: ") and lines[2].startswith("  case_002: ")
    assert not (tmp_path / "out").exists()


def test_prepare_reorients_a_dataset_of_mixed_orientations_to_its_majority(tmp_path):
    """A case stored LAS among RAS ones was sliced as stored (mirrored slices), with a warning
    to reorient it by hand: now it is reoriented, exactly, and prepared as its RAS copy is."""
    from segscale.imgmed import Store

    raw = write_msd(tmp_path / "raw")
    plain, _ = prepare(raw, tmp_path / "plain", Preprocessing(size=16), progress=False)
    for folder in ("imagesTr", "labelsTr"):
        resave(raw / folder / "case_004.nii.gz", lambda a, aff: flip_axes(a, aff, (0,)))
        # a header that gives no orientation (nibabel guesses LAS): sliced as stored
        path = raw / folder / "case_003.nii.gz"
        bare = nib.load(path)
        bare.set_qform(None, code=0)
        bare.set_sform(None, code=0)
        nib.save(nib.Nifti1Image(np.asanyarray(bare.dataobj), None, bare.header), path)
    with pytest.warns(UserWarning, match=r"1 of 5 case\(s\) stored .* RAS \(e.g. case_004: LAS\)"):
        mixed, _ = prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)
    a, b = Store.open(plain), Store.open(mixed)
    assert b.orientation == "RAS" and b.meta["orientation"] == "RAS"
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert np.array_equal(np.asarray(a.masks), np.asarray(b.masks))
    assert np.allclose(
        [c["affine"] for c in a.cases() if c["id"] != "case_003"],
        [c["affine"] for c in b.cases() if c["id"] != "case_003"],
        atol=1e-5,
    )
    assert [c["stored_axes"] for c in b.cases()] == ["RAS", "RAS", "RAS", None, "LAS"]
    checked = check_source(raw, progress=False)
    assert checked.notes[0].startswith(
        "mixed orientations: 3 cases RAS, others LAS: case_004; prepare reorients those to RAS"
    )
    assert [c.axes for c in checked.cases if c.case == "case_003"] == ["none"]


def test_every_unreadable_mask_and_unsliceable_image_is_named(tmp_path):
    """Masks without declared labels are scanned first: every bad one is named at once (was: the
    first only); an image prepare cannot slice ((X, Y, Z, 1, C)) is refused by check too."""
    from test_inputs import write_2d

    pictures = write_2d(tmp_path / "2d", "L")
    for name in ("s1.png", "s3.png"):
        (pictures / "masks" / name).write_bytes(b"not a picture")
    with pytest.raises(DataError) as e:
        prepare(pictures, tmp_path / "out", Preprocessing(size=16), progress=False)
    assert [line.split(":")[0].strip() for line in str(e.value).splitlines()[1:]] == ["s1", "s3"]

    raw = write_msd(tmp_path / "raw", num_cases=3)
    image = raw / "imagesTr" / "case_002.nii.gz"
    img = nib.load(image)
    # 5D with 2 time points (ITK's (X, Y, Z, 1, C) vector images are read as channels)
    data = np.asarray(img.dataobj)[:, :, :, None, None].repeat(2, axis=3).repeat(2, axis=4)
    nib.save(nib.Nifti1Image(data, img.affine), image)
    by_case = {c.case: c for c in check_source(raw, progress=False).cases}
    assert "expected a 3D image (or 3D + channels), got shape (24, 20, 6, 2, 2)" in (
        by_case["case_002"].refused
    )


def test_check_lists_every_file_that_makes_no_case_beside_the_cases_it_can_read(tmp_path):
    """Check stopped at the first missing label: a second one, and 5 other refused cases,
    showed only once it was fixed; a label no training entry names got no word."""
    import shutil

    raw = defective(tmp_path / "raw")
    for i in (5, 6):  # two more listed cases, each without its label file
        shutil.copy(raw / "imagesTr" / "case_000.nii.gz", raw / "imagesTr" / f"case_00{i}.nii.gz")
    meta = json.loads((raw / "dataset.json").read_text())
    meta["training"] += [
        {"image": f"./imagesTr/case_00{i}.nii.gz", "label": f"./labelsTr/case_00{i}.nii.gz"}
        for i in (5, 6)
    ]
    (raw / "dataset.json").write_text(json.dumps(meta))
    shutil.copy(raw / "labelsTr" / "case_000.nii.gz", raw / "labelsTr" / "stray.nii.gz")
    result = check_source(raw, progress=False)
    refused = {c.case: c.refused for c in result.cases if c.refused}
    assert "image without a label; expected" in refused["case_005.nii.gz"]
    assert "image without a label; expected" in refused["case_006.nii.gz"]
    assert "stray.nii.gz: label not listed in" in refused["stray.nii.gz"]
    assert "label values [7] not declared" in refused["case_002"]  # still read and checked
    assert len(result.cases) == 8 and sum(c.stray for c in result.cases) == 3
    done = cli("imgmed", "check", raw)  # the files are not counted as cases
    title = " ".join(done.stdout.split())  # (rich wraps the title)
    assert done.returncode == 1 and ": 5 cases, 3 file(s) that make no case" in title
    assert "2 of 5 cases would be refused by prepare; 3 file(s) make no case" in done.stderr
    with pytest.raises(DataError, match=r"3 files make no case \(no case was read\)") as e:
        prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)
    for name in ("case_005.nii.gz: image without", "case_006.nii.gz: image", "stray.nii.gz: label"):
        assert name in str(e.value)  # every one, as imgmed check lists them


def test_two_masks_for_one_case_are_listed_with_the_other_unpaired_files(tmp_path):
    """A second mask (s0.png beside S0.PNG) stopped check at once: no table, the other unpaired
    files unnamed."""
    from test_inputs import write_2d

    raw = write_2d(tmp_path / "raw", "L")
    (raw / "masks" / "s0.png").rename(raw / "masks" / "S0.PNG")
    (raw / "masks" / "s1.png").rename(raw / "masks" / "s0.png")  # s1 loses its mask
    shutil.copy(raw / "masks" / "s0.png", raw / "masks" / "stray.png")  # a mask of no image
    result = check_source(raw, progress=False)
    refused = [c.refused for c in result.cases if c.refused]
    assert any("two masks for 's0'" in r for r in refused)
    assert any("s1.png: image without a mask" in r for r in refused)
    assert any("stray.png: mask without its image" in r for r in refused)
    assert {c.case for c in result.cases if not c.refused} >= {"s2", "s3"}

"""imgmed convert, augment and info on what users hand them: label maps of every storage type, 2D
volumes, bad windows and spacings, folders that already hold files, outputs over inputs."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import write_msd
from segscale.errors import DataError, SegscaleError
from segscale.imgmed import Preprocessing, convert, prepare
from segscale.imgmed.convert import SIDE_CAR

SEGSCALE = [sys.executable, "-m", "segscale.cli"]


def nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def back_through_slices(tmp_path, name, array):
    src = nifti(tmp_path / f"{name}.nii.gz", array)
    convert(src, tmp_path / name)
    convert(tmp_path / name, tmp_path / f"{name}-back.nii.gz")
    return np.asarray(nib.load(tmp_path / f"{name}-back.nii.gz").dataobj)


def small_store(tmp_path):
    """A prepared store of 4 synthetic cases, 16 × 16: 2 train, 1 val, 1 test."""
    raw = write_msd(tmp_path / "raw", num_cases=4)
    store, _ = prepare(
        raw,
        tmp_path / "store",
        Preprocessing(size=16),
        val_fraction=0.25,
        test_fraction=0.25,
        progress=False,
    )
    return store


def test_label_maps_keep_their_values_through_png_slices(tmp_path):
    """Float labels came back as 0/255, a small float mask as all black (its percentile window
    was [0, 0]), int16 {0, 2, 300} as {0, 2, 255}: all windowed as intensities, silently."""
    labels = np.zeros((10, 8, 4), np.float32)
    labels[2:5, 2:5, 1:3] = 1
    assert np.array_equal(back_through_slices(tmp_path, "float01", labels), labels)
    small = np.zeros((30, 30, 2), np.float32)
    small[4:7, 4:7, 0], small[10:13, 10:13, 1] = 1, 1  # 18 voxels: under the 99.5th percentile
    assert np.array_equal(back_through_slices(tmp_path, "small", small), small)
    wide = np.zeros((6, 6, 3), np.int16)
    wide[1:3, 1:3], wide[3:5, 3:5] = 2, 300
    assert np.array_equal(back_through_slices(tmp_path, "wide", wide), wide)
    assert Image.open(tmp_path / "wide" / "wide_000.png").mode.startswith("I;16")
    assert json.loads((tmp_path / "wide" / SIDE_CAR).read_text())["window"] is None


def test_a_2d_volume_and_its_picture_keep_their_axes_both_ways(tmp_path):
    """A 20 × 16 NIfTI became a picture of 20 rows, and back a 16 × 20 volume: x and y swapped."""
    plane = np.zeros((20, 16), np.uint8)
    plane[2, 5] = 200
    convert(nifti(tmp_path / "two.nii.gz", plane), tmp_path / "two.png")
    picture = np.asarray(Image.open(tmp_path / "two.png"))
    assert picture.shape == (16, 20) and picture[5, 2] == 200  # rows of y, columns of x
    convert(tmp_path / "two.png", tmp_path / "back.nii.gz")
    back = np.asarray(nib.load(tmp_path / "back.nii.gz").dataobj)
    assert back.shape == (20, 16, 1) and back[2, 5, 0] == 200


def test_palette_and_1_bit_pictures_keep_their_values_as_arrays(tmp_path):
    indices = np.zeros((8, 8), np.uint8)
    indices[2:4, 2:6] = 2
    pal = Image.fromarray(indices, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    convert(tmp_path / "pal.png", tmp_path / "pal.nii.gz")  # was: "a colour picture"
    assert np.array_equal(np.asarray(nib.load(tmp_path / "pal.nii.gz").dataobj)[..., 0], indices.T)
    Image.fromarray(indices > 0).convert("1").save(tmp_path / "bit.png")
    convert(tmp_path / "bit.png", tmp_path / "bit.npy")  # was 0/255
    assert set(np.unique(np.load(tmp_path / "bit.npy"))) == {0, 1}


@pytest.mark.parametrize(
    "window, spacing, message",
    [
        ((800, 0), None, r"--window 800,0: expected LOW < HIGH, both finite"),
        ((5, 5), None, r"--window 5,5: expected LOW < HIGH"),
        ((float("nan"), 1), None, r"--window nan,1: expected"),
        (None, (-1, 1, 1), r"--spacing -1,1,1: expected positive finite mm"),
        (None, (0, 1, 1), r"--spacing 0,1,1: expected positive finite mm"),
    ],
)
def test_bad_windows_and_spacings_are_refused(tmp_path, window, spacing, message):
    """They gave all-black slices, an affine with a flipped axis, or a nibabel traceback."""
    src = nifti(tmp_path / "v.nii.gz", np.arange(60, dtype=np.float32).reshape(5, 4, 3))
    with pytest.raises(DataError, match=message):
        convert(src, tmp_path / "out", window=window, spacing=spacing)
    assert not (tmp_path / "out").exists()


def test_a_slice_folder_is_written_whole_and_never_mixed_with_other_files(tmp_path, monkeypatch):
    """A re-export that failed half way kept the old slices.json over a mix of new and old
    slices (stacked back "fine", values of both volumes); a second volume's export left the
    first one's slices in the folder."""
    module = sys.modules["segscale.imgmed.convert"]  # the package's `convert` is the function

    tens = nifti(tmp_path / "vol.nii.gz", np.full((4, 4, 6), 10, np.uint8))
    out = tmp_path / "fr"
    convert(tens, out)
    real_save, calls = module.save, []

    def failing_save(array, path, affine=None):
        calls.append(path)
        if len(calls) == 4:
            raise DataError(f"cannot write {path}: No space left on device")
        return real_save(array, path, affine)

    monkeypatch.setattr(module, "save", failing_save)
    two_hundreds = nifti(tmp_path / "vol.nii.gz", np.full((4, 4, 6), 200, np.uint8))
    with pytest.raises(DataError, match="No space left"):
        convert(two_hundreds, out)
    monkeypatch.undo()
    convert(out, tmp_path / "kept.nii.gz")  # the earlier export, whole
    assert np.unique(np.asarray(nib.load(tmp_path / "kept.nii.gz").dataobj)).tolist() == [10]
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
    other = nifti(tmp_path / "other.nii.gz", np.full((4, 4, 3), 7, np.uint8))
    convert(other, out)  # an earlier export is replaced whole, nothing kept aside
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in out.iterdir()) == [
        "other_000.png",
        "other_001.png",
        "other_002.png",
        SIDE_CAR,
    ]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds 1 file\(s\) of no earlier export \(e.g. notes"):
        convert(other, tmp_path / "mine")
    (out / SIDE_CAR).write_text("{")
    with pytest.raises(DataError, match=r"slices.json: damaged"):
        convert(out, tmp_path / "x.nii.gz")


def test_no_command_writes_over_or_into_its_input(tmp_path):
    """augment STORE STORE replaced its source; config convert --out X.xml replaced the XML;
    a NIfTI written into a DICOM series folder made the series unreadable."""
    store = small_store(tmp_path)
    series = tmp_path / "series"
    series.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(series / "a.png")
    vol = nifti(tmp_path / "v.nii.gz", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(SegscaleError, match=r"is inside the input folder"):
        convert(series, series / "out.nii.gz")
    with pytest.raises(SegscaleError, match=r"is the input itself"):
        convert(vol, vol)
    # nor over an existing file without --force (a user's volume or notes were replaced)
    (tmp_path / "notes.npy").write_text("mine")
    with pytest.raises(SegscaleError, match=r"DST .*notes.npy: exists; .*--force to replace it"):
        convert(vol, tmp_path / "notes.npy")
    assert (tmp_path / "notes.npy").read_text() == "mine"
    assert convert(vol, tmp_path / "notes.npy", force=True) == [tmp_path / "notes.npy"]
    xml = tmp_path / "c.xml"
    xml.write_text("<config/>")
    for command in (
        ["imgmed", "augment", store, store, "--to", 500, "--rotation", 10],
        ["imgmed", "augment", store, store / "aug", "--to", 500, "--rotation", 10],
        ["config", "convert", xml, "--out", xml],
    ):
        r = subprocess.run([*SEGSCALE, *map(str, command)], capture_output=True, text=True)
        assert r.returncode == 2 and "write to another path" in r.stderr, r.stderr
    r = subprocess.run(
        [
            *SEGSCALE,
            "imgmed",
            "augment",
            str(store),
            str(tmp_path / "a"),
            "--to",
            "500",
            "--zoom",
            "2,1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "zoom" in r.stderr, r.stderr


def test_augmenting_a_store_without_training_slices_is_refused(tmp_path):
    """The copy rounds never reached the total: a hang."""
    from segscale.config import AugmentConfig
    from segscale.imgmed.augment import augment_store

    store = small_store(tmp_path)
    meta = json.loads((store / "meta.json").read_text())
    for case in meta["cases"]:  # a store edited by hand: every case validates
        case["split"] = "val" if case["split"] == "train" else case["split"]
    meta["splits"]["val"] += meta["splits"]["train"]
    meta["splits"]["train"] = []
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SegscaleError, match=r"no slices to augment|has no cases"):
        augment_store(store, tmp_path / "aug", 100, AugmentConfig(rotation=10), progress=False)


def test_info_shows_every_file_of_a_folder_and_each_problem_in_its_row(tmp_path):
    """A folder of NIfTI files was read as a DICOM series ("not a readable DICOM file ... Use
    force=True"); one bad file of several printed no table at all; NaNs showed clean values."""
    folder = tmp_path / "volumes"
    folder.mkdir()
    with_nan = np.zeros((4, 4, 3), np.float32)
    with_nan[0, 0, 0] = np.nan
    nifti(folder / "a.nii.gz", with_nan)
    nifti(folder / "b.nii.gz", np.ones((3, 3, 3), np.int16))
    (folder / "c.nii.gz").write_bytes(b"")
    r = subprocess.run([*SEGSCALE, "imgmed", "info", str(folder)], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if "│" in line}
    assert set(rows) == {"a.nii.gz", "b.nii.gz", "c.nii.gz"}
    assert "1 NaN or infinite voxel(s)" in rows["a.nii.gz"] and "empty file" in rows["c.nii.gz"]
    study = tmp_path / "study"
    (study / "series1").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no DICOM files here, but 1 folder\(s\) \(series1\)"):
        convert(study, tmp_path / "s.nii.gz")
    (study / "series1" / "x.nii.gz").write_bytes((folder / "b.nii.gz").read_bytes())
    with pytest.raises(DataError, match=r"a folder of nifti files, no DICOM series"):
        convert(study / "series1", tmp_path / "s.nii.gz")


def test_what_a_converted_file_keeps_and_what_cannot_be_read_is_named(tmp_path):
    from segscale.imgmed import load
    from test_imgmed_io import write_series

    # a non-orthogonal orientation was read as a "gantry tilt" of 25.7°
    write_series(tmp_path / "skew", np.zeros((4, 4, 3)), orientation=(1, 0, 0, 0.5, 0.866, 0))
    with pytest.raises(DataError, match=r"is not two orthogonal unit vectors"):
        load(tmp_path / "skew")
    # grey and grey-as-RGB pictures were "pictures of different sizes"
    stack = tmp_path / "stack"
    stack.mkdir()
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(stack / "a1.png")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(stack / "a2.png")
    with pytest.raises(DataError, match=r"grey and colour pictures mixed \(e.g. a2.png"):
        convert(stack, tmp_path / "s.nii.gz")
    # NIfTI to NIfTI kept the voxels and lost the units and the scanner's form codes
    img = nib.Nifti1Image(np.ones((3, 3, 2), np.int16), np.diag([0.5, 0.5, 2.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, tmp_path / "in.nii")
    convert(tmp_path / "in.nii", tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz").header
    assert out.get_xyzt_units() == ("mm", "sec")
    assert int(out["qform_code"]) == 1 and int(out["sform_code"]) == 1
    # ... and a 4D file's time step (TR), which no affine holds
    img = nib.Nifti1Image(np.ones((3, 3, 2, 4), np.int16), np.diag([0.5, 0.5, 2.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.5
    img.header["toffset"] = 0.75
    nib.save(img, tmp_path / "in4.nii")
    convert(tmp_path / "in4.nii", tmp_path / "out4.nii.gz")
    out = nib.load(tmp_path / "out4.nii.gz").header
    assert out.get_zooms() == (0.5, 0.5, 2.0, 2.5) and float(out["toffset"]) == 0.75


def test_whole_values_no_picture_holds_are_refused_and_instance_maps_kept(tmp_path):
    """{0, 1, 70000} came back {0, 70000} (windowed: 0 and 1 merged), negative labels as
    fractions, a 300-instance map windowed to 8 bit; all with exit 0."""
    instances = np.arange(300, dtype=np.int32).reshape(10, 10, 3)
    assert np.array_equal(back_through_slices(tmp_path, "inst", instances), instances)
    for name, values in (("big", (0, 1, 70000)), ("neg", (-5, 0, 3))):
        labels = np.array(values * 8, np.int32).reshape(2, 4, 3)
        with pytest.raises(DataError, match=r"whole values from .* that no picture holds"):
            convert(nifti(tmp_path / f"{name}.nii.gz", labels), tmp_path / name)
        convert(tmp_path / f"{name}.nii.gz", tmp_path / f"{name}-w", window=(-10, 10))  # on purpose


def test_a_volume_is_never_one_colour_picture_and_npy_keeps_the_axes(tmp_path):
    """A volume of 3 or 4 slices was written as an RGB(A) picture; a picture through .npy came
    back with x and y swapped, and so did a 2D NIfTI."""
    for slices in (3, 4):
        src = nifti(tmp_path / f"v{slices}.nii.gz", np.zeros((6, 5, slices), np.float32))
        with pytest.raises(DataError, match=r"volume into one picture"):
            convert(src, tmp_path / f"v{slices}.png")
    picture = np.arange(12, dtype=np.uint8).reshape(3, 4)  # 3 rows, 4 columns
    Image.fromarray(picture).save(tmp_path / "p.png")
    convert(tmp_path / "p.png", tmp_path / "direct.nii.gz")
    convert(tmp_path / "p.png", tmp_path / "p.npy")
    assert np.array_equal(np.load(tmp_path / "p.npy"), picture)  # a picture's rows
    convert(tmp_path / "p.npy", tmp_path / "via.nii.gz")
    direct, via = (
        np.asarray(nib.load(tmp_path / n).dataobj) for n in ("direct.nii.gz", "via.nii.gz")
    )
    assert direct.shape == via.shape == (4, 3, 1) and np.array_equal(direct, via)
    plane = nifti(tmp_path / "plane.nii.gz", np.arange(12, dtype=np.uint8).reshape(4, 3))
    convert(plane, tmp_path / "plane.png")
    convert(plane, tmp_path / "plane.npy")
    convert(tmp_path / "plane.npy", tmp_path / "plane2.png")
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "plane.png")),
        np.asarray(Image.open(tmp_path / "plane2.png")),
    )
    np.save(tmp_path / "half.npy", np.ones((3, 3, 2), np.float16))
    convert(tmp_path / "half.npy", tmp_path / "half.nii.gz")  # was a nibabel traceback
    assert nib.load(tmp_path / "half.nii.gz").get_data_dtype() == np.float32


def test_a_failed_re_export_keeps_the_earlier_export_whole(tmp_path, monkeypatch):
    """Its folder was deleted before the new one was moved in; a deletion that stopped part way
    left 1 of 4 slices and no slices.json, which stacked into a 1-slice volume, exit 0."""
    module = sys.modules["segscale.imgmed.convert"]
    out = tmp_path / "out"
    convert(nifti(tmp_path / "a.nii.gz", np.full((4, 4, 4), 3, np.uint8)), out)
    before = sorted(p.name for p in out.iterdir())
    real_rename, calls = module.Path.rename, []

    def rename(self, target):
        calls.append(self)
        if len(calls) == 2:  # the new folder into place
            raise OSError(1, "Operation not permitted")
        return real_rename(self, target)

    monkeypatch.setattr(module.Path, "rename", rename)
    with pytest.raises(DataError, match="Operation not permitted"):
        convert(nifti(tmp_path / "b.nii.gz", np.full((4, 4, 2), 9, np.uint8)), out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "field, value",
    [
        ("affine", "x"),
        ("affine", [[1, 2], [3]]),
        ("affine", [[0] * 4] * 4),
        ("window", ["a", "b"]),
        ("window", [100, 0]),
        ("files", [3]),
        ("files", ["../a.nii.gz"]),
        ("shape", [4, 4]),
    ],
)
def test_a_damaged_slices_json_is_one_line(tmp_path, field, value):
    out = tmp_path / "s"
    convert(nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 2), np.uint8)), out)
    meta = json.loads((out / SIDE_CAR).read_text())
    meta[field] = value
    (out / SIDE_CAR).write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"slices.json: damaged"):
        convert(out, tmp_path / "back.nii.gz")


def test_exports_and_conversions_never_write_into_their_inputs(tmp_path, real_store):
    """`export --out STORE/images.npy --force` replaced the run's store with TorchScript; a
    DICOM slice converted into its own series folder broke the series."""
    from conftest import trained_run
    from segscale.export import export
    from test_imgmed_io import write_series

    run = trained_run(real_store, tmp_path / "run")
    with pytest.raises(SegscaleError, match=r"--out .*x.pt: inside the prepared store"):
        export(run, "torchscript", real_store / "x.pt", force=True)
    write_series(tmp_path / "series", np.zeros((4, 4, 3)))
    one = sorted((tmp_path / "series").iterdir())[0]
    with pytest.raises(SegscaleError, match=r"is inside the input folder"):
        convert(one, tmp_path / "series" / "x.nii.gz")


def test_options_that_do_not_apply_are_said_and_grey_stored_as_rgb_is_grey(tmp_path):
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    convert(tmp_path / "rgb.png", tmp_path / "g.nii.gz")  # was: "a colour picture"
    assert np.array_equal(np.asarray(nib.load(tmp_path / "g.nii.gz").dataobj)[..., 0], grey.T)
    vol = nifti(tmp_path / "v.nii.gz", np.zeros((4, 4, 2), np.float32))
    with pytest.warns(UserWarning, match=r"--window: v2.nii.gz keeps the values as they are"):
        convert(vol, tmp_path / "v2.nii.gz", window=(0, 1))
    convert(vol, tmp_path / "sl")
    with pytest.warns(UserWarning, match=r"--spacing: .*slices.json gives the geometry"):
        convert(tmp_path / "sl", tmp_path / "back.nii.gz", spacing=(2, 2, 2))

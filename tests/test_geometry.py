"""Two images that must align are matched in world space: prepare (NIfTI and DICOM sources),
evaluate (prediction vs reference) and predict (the output carries the input's header)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import trained_run, write_msd
from segscale.errors import DataError
from segscale.evaluation import evaluate_folders
from segscale.imgmed import Preprocessing, Store, prepare
from segscale.imgmed.geometry import one_slice_on_axis, onto_grid, same_grid
from segscale.predict import predict
from test_imgmed_io import write_series


def prepared_masks(raw: Path, out: Path) -> np.ndarray:
    store, _ = prepare(
        raw, out, Preprocessing(size=16), val_fraction=0, test_fraction=0, progress=False
    )
    return np.asarray(Store.open(store).masks)


def flip_axes(array: np.ndarray, affine: np.ndarray, axes: tuple[int, ...]):
    """The same object stored with `axes` reversed, and the affine that says so."""
    out, aff = array, affine.copy()
    for a in axes:
        out = np.flip(out, a)
        step = np.eye(4)
        step[a, a], step[a, 3] = -1, array.shape[a] - 1
        aff = aff @ step
    return np.ascontiguousarray(out), aff


def swap_xy(array: np.ndarray, affine: np.ndarray):
    """The same object stored with its first two axes swapped, and the affine that says so."""
    perm = np.eye(4)[[1, 0, 2, 3]]
    return np.ascontiguousarray(np.swapaxes(array, 0, 1)), affine @ perm


def resave(path: Path, transform) -> None:
    img = nib.load(path)
    data, affine = transform(np.asanyarray(img.dataobj), img.affine)
    nib.save(nib.Nifti1Image(data, affine), path)


@pytest.mark.parametrize(
    "transform",
    [
        lambda a, aff: flip_axes(a, aff, (0,)),
        lambda a, aff: flip_axes(a, aff, (0, 1)),
        swap_xy,
        lambda a, aff: swap_xy(*flip_axes(a, aff, (2,))),
    ],
    ids=["x-reversed", "LPS-like", "axes-swapped", "swapped-and-z-reversed"],
)
def test_a_label_stored_in_another_axis_order_is_reoriented_onto_its_image(tmp_path, transform):
    """The same object in world space: the store must hold the same masks (was: the mirror image,
    Dice 0 against the truth)."""
    reference = prepared_masks(write_msd(tmp_path / "a"), tmp_path / "store_a")
    raw = write_msd(tmp_path / "b")
    for label in sorted((raw / "labelsTr").iterdir())[:2]:
        resave(label, transform)
    assert np.array_equal(prepared_masks(raw, tmp_path / "store_b"), reference)


@pytest.mark.parametrize(
    "affine, problem",
    [
        (np.diag([3.0, 3.0, 3.0, 1.0]), "label is not on the voxel grid of its image"),
        (
            np.array([[0.7, 0, 0, 10.0], [0, 0.8, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]),
            "label is not on the voxel grid of its image",
        ),
    ],
    ids=["3mm-grid", "origin-shifted-10mm"],
)
def test_a_label_on_another_grid_is_refused_naming_both_files(tmp_path, affine, problem):
    raw = write_msd(tmp_path / "raw")
    label = raw / "labelsTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(label).dataobj), affine), label)
    with pytest.raises(DataError) as e:
        prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{label}: {problem} ({raw / 'imagesTr' / 'case_001.nii.gz'})")
    assert "24×20×6 voxels of 0.7×0.8×2 mm" in msg and "resample the label" in msg
    assert not (tmp_path / "out").exists()


def test_a_dicom_mask_with_reversed_rows_is_reoriented(tmp_path):
    """images/<case>/ DICOM series + masks/<case>.nii.gz whose row axis is stored reversed, with
    an affine that says so: the same store as the mask on the series' own grid."""
    from segscale.imgmed import load

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 500, size=(12, 10, 4))
    mask = np.zeros((12, 10, 4), np.uint8)
    mask[2:7, 1:4, 1:3] = 1  # off-centre: a mirrored copy would not overlap it
    masks = {}
    for name, flip in (("plain", ()), ("reversed", (1,))):
        root = tmp_path / name
        write_series(root / "images" / "p1", volume)
        (root / "masks").mkdir()
        affine = load(root / "images" / "p1").affine
        data, aff = flip_axes(mask, affine, flip)
        nib.save(nib.Nifti1Image(data, aff), root / "masks" / "p1.nii.gz")
        masks[name] = prepared_masks(root, tmp_path / f"store_{name}")
    assert masks["plain"].any() and np.array_equal(masks["reversed"], masks["plain"])


def test_evaluate_matches_a_prediction_to_its_reference_in_world_space(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=2)
    pred, ref = tmp_path / "pred", raw / "labelsTr"
    pred.mkdir()
    for label in sorted(ref.iterdir()):
        img = nib.load(label)
        data, affine = flip_axes(np.asanyarray(img.dataobj), img.affine, (0, 1))
        nib.save(nib.Nifti1Image(data, affine), pred / label.name)
    result = evaluate_folders(pred, ref)
    assert [c["dice"] for c in result["cases"]] == [1.0, 1.0]
    moved = pred / "case_000.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(moved).dataobj), np.eye(4)), moved)
    with pytest.raises(DataError, match=r"case_000.nii.gz: prediction is not on the voxel grid"):
        evaluate_folders(pred, ref)


def test_trailing_singleton_axes_are_read_as_3d_and_written_back(tmp_path):
    """(X, Y, Z, 1) images and labels prepare like (X, Y, Z) ones; an (X, Y, Z, 1) prediction is
    scored against an (X, Y, Z) reference."""
    reference = prepared_masks(write_msd(tmp_path / "a"), tmp_path / "store_a")
    raw = write_msd(tmp_path / "b")
    for folder, extra in (("imagesTr", (None, None)), ("labelsTr", (None,))):
        for path in (raw / folder).iterdir():
            resave(path, lambda a, aff, extra=extra: (a[(..., *extra)], aff))
    with pytest.warns(UserWarning, match=r"trailing axes of size 1 dropped"):
        assert np.array_equal(prepared_masks(raw, tmp_path / "store_b"), reference)
    with pytest.warns(UserWarning, match=r"\(24, 20, 6, 1\) read as \(24, 20, 6\)"):
        result = evaluate_folders(raw / "labelsTr", tmp_path / "a" / "labelsTr")
    assert all(c["dice"] == 1.0 for c in result["cases"])


def test_predict_writes_the_inputs_header_geometry_and_shape(tmp_path):
    """qform and sform both set (codes 1 and 1) and different: the mask keeps both, with their
    codes (was: qform dropped, sform code 2); an (X, Y, Z, 1) input gets an (X, Y, Z, 1) mask."""
    raw = write_msd(tmp_path / "raw")
    store, _ = prepare(raw, tmp_path / "store", Preprocessing(size=16), progress=False)
    run_dir = tmp_path / "run"
    trained_run(store, run_dir)

    image = nib.load(raw / "imagesTr" / "case_000.nii.gz")
    data = np.asarray(image.dataobj, np.float32)[..., None]
    qform = np.diag([0.7, 0.8, 2.0, 1.0])
    sform = qform.copy()
    sform[:3, 3] = (5.0, -3.0, 12.0)
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=1)
    source = tmp_path / "in" / "scan.nii.gz"
    source.parent.mkdir()
    nib.save(img, source)
    with pytest.warns(UserWarning) as said:
        [out] = predict(run_dir, [source], tmp_path / "masks")
    said = " ".join(str(w.message) for w in said)
    assert "trailing axes of size 1 dropped" in said
    assert "its qform and sform disagree (by up to 12 mm" in said  # tools differ on which
    mask = nib.load(out)
    assert mask.shape == (24, 20, 6, 1)
    assert int(mask.header["qform_code"]) == 1 and int(mask.header["sform_code"]) == 1
    np.testing.assert_allclose(mask.get_qform(), qform, atol=1e-6)
    np.testing.assert_allclose(mask.get_sform(), sform, atol=1e-6)


def test_num_training_that_disagrees_with_the_files_is_refused(tmp_path):
    import json

    raw = write_msd(tmp_path / "raw")
    meta = json.loads((raw / "dataset.json").read_text())
    meta["numTraining"] = 7
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"numTraining is 7 but 5 training case\(s\) were found"):
        prepare(raw, tmp_path / "out", Preprocessing(size=16), progress=False)


def test_same_grid_tolerance_is_a_tenth_of_a_voxel():
    a = np.diag([0.5, 0.5, 2.0, 1.0])
    b = a.copy()
    b[0, 3] = 0.049  # under 0.1 × 0.5 mm
    assert same_grid(a, b, (100, 100, 10))
    b[0, 3] = 0.051
    assert not same_grid(a, b, (100, 100, 10))
    c = a.copy()
    c[0, 0] = 0.5005  # 0.05 mm off at the far corner (99 voxels × 0.0005 mm)
    assert same_grid(a, c, (100, 100, 10)) and not same_grid(a, c, (300, 100, 10))
    array = np.arange(24).reshape(2, 3, 4)
    assert onto_grid(array, a, a, (2, 3, 4), name=Path("x"), target=Path("y")) is array


@pytest.mark.parametrize("degrees", [45.0, 30.0, 0.0])
def test_an_oblique_grid_stored_in_another_axis_order_is_reoriented_exactly(degrees):
    """At 45° every axis is as near one world axis as another (nibabel's io_orientation ties;
    was: a label stored with swapped axes refused as 'not on the voxel grid')."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    if degrees == 45.0:
        c = s = np.sqrt(0.5)  # an exact tie, as a header written with 0.7071 in both places has
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.0])
    affine[:3, 3] = (-20.0, 5.0, 3.0)
    label = np.random.default_rng(0).integers(0, 3, (12, 10, 4)).astype(np.uint8)
    for stored, stored_affine in (
        swap_xy(label, affine),
        flip_axes(label, affine, (0, 2)),
        swap_xy(*flip_axes(label, affine, (1,))),
    ):
        back = onto_grid(
            stored, stored_affine, affine, label.shape, name=Path("l"), target=Path("i")
        )
        assert np.array_equal(back, label)
    shifted = affine.copy()
    shifted[:3, 3] += rotation @ np.array([0.4, 0.0, 0.0])  # half a voxel: refused, not moved
    with pytest.raises(DataError, match="not on the voxel grid"):
        onto_grid(label, shifted, affine, label.shape, name=Path("l"), target=Path("i"))


def test_a_one_slice_volume_is_cut_along_its_axis_of_size_one(tmp_path):
    """A one-slice volume stored as (X, 1, Z) was cut along Z into slices one pixel wide; it is
    now the same store as its (X, Z, 1) copy."""

    def one_slice(a, aff):
        return np.ascontiguousarray(a[:, :, 3:4]), aff

    def one_slice_xz(a, aff):
        a, aff = one_slice(a, aff)
        return np.ascontiguousarray(a.transpose(0, 2, 1)), aff @ np.eye(4)[[0, 2, 1, 3]]

    for name, transform in (("a", one_slice), ("b", one_slice_xz)):
        raw = write_msd(tmp_path / name)
        for folder in ("imagesTr", "labelsTr"):
            resave(raw / folder / "case_000.nii.gz", transform)
    assert nib.load(tmp_path / "b" / "labelsTr" / "case_000.nii.gz").shape == (24, 1, 20)
    a = prepared_masks(tmp_path / "a", tmp_path / "store_a")
    assert len(a) == 4 * 6 + 1 and a.any()
    assert np.array_equal(prepared_masks(tmp_path / "b", tmp_path / "store_b"), a)
    # a dataset of coronal slices stored as (X, 1, Z) records the axes it was cut in (RSA, as
    # its (X, Z, 1) copy): the store said RAS, and predict then cut volumes axially
    stores = {}
    for name, transpose in (("c", False), ("d", True)):
        raw = write_msd(tmp_path / name)
        for path in (*(raw / "imagesTr").iterdir(), *(raw / "labelsTr").iterdir()):

            def coronal(a, aff, transpose=transpose):
                a = np.ascontiguousarray(a[:, 10:11, :])
                if transpose:  # (X, Z, 1), the affine saying so
                    return np.ascontiguousarray(a.transpose(0, 2, 1)), aff @ np.eye(4)[[0, 2, 1, 3]]
                return a, aff

            resave(path, coronal)
        prepared_masks(raw, tmp_path / f"store_{name}")
        stores[name] = Store.open(tmp_path / f"store_{name}")
    assert stores["c"].meta["orientation"] == stores["d"].meta["orientation"] == "RSA"
    # beside axial volumes, a coronal slice is said to be one
    raw = write_msd(tmp_path / "e")
    for folder in ("imagesTr", "labelsTr"):
        resave(raw / folder / "case_000.nii.gz", lambda a, aff: (a[:, 10:11, :], aff))
    with pytest.warns(
        UserWarning, match=r"1 one-slice case\(s\) \(e.g. case_000: coronal\) .* \(axial\)"
    ):
        prepared_masks(raw, tmp_path / "store_e")
    assert np.array_equal(np.asarray(stores["c"].masks), np.asarray(stores["d"].masks))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_slice_on_axis_moves_only_the_axis_of_size_one(axis):
    from nibabel.orientations import apply_orientation

    rng = np.random.default_rng(0)
    array = rng.random((4, 1, 5, 2))  # a one-slice volume of two channels
    affine = np.array([[0, 0.8, 0, 3], [0.7, 0, 0, -2], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    moved = one_slice_on_axis(array, affine, axis)
    if axis == 1:
        assert moved is None  # already cut along its axis of size 1
        return
    data, moved_affine, back = moved
    assert data.shape == ((1, 4, 5, 2) if axis == 0 else (4, 5, 1, 2))
    assert np.array_equal(apply_orientation(data, back), array)
    # every voxel keeps its place in the world
    ijk = np.array([[3, 0, 4, 1], [1, 0, 2, 1]]).T
    moved_ijk = ijk.copy()
    moved_ijk[:3] = ijk[:3][[1, 0, 2]] if axis == 0 else ijk[:3][[0, 2, 1]]
    assert np.allclose(moved_affine @ moved_ijk, affine @ ijk)
    assert one_slice_on_axis(rng.random((4, 3, 5)), affine, axis) is None

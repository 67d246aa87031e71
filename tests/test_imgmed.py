import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import write_msd
from segscale.errors import DataError
from segscale.imgmed import Preprocessing, Store, prepare, split_cases
from segscale.imgmed.io import check_nifti
from segscale.imgmed.transforms import Plane, from_slices, slice_indices, to_grid, to_slices


def run(raw: Path, out: Path, **kw):
    kw.setdefault("prep", Preprocessing(size=16))
    return prepare(raw, out, kw.pop("prep"), progress=False, **kw)


def test_prepare_writes_a_store_split_by_case(msd, tmp_path):
    path, written = run(msd, tmp_path / "store", val_fraction=0.2, test_fraction=0.2, seed=3)
    assert written
    store = Store.open(path)
    assert store.images.shape == (5 * 6, 1, 16, 16) and store.images.dtype == np.float32
    assert store.masks.shape == (30, 16, 16) and set(np.unique(store.masks)) == {0, 1}
    splits = store.meta["splits"]
    assert sorted(len(v) for v in splits.values()) == [1, 1, 3]
    ids = [c for v in splits.values() for c in v]
    assert (
        sorted(ids) == sorted(set(ids)) == [f"case_{i:03d}" for i in range(5)]
    )  # no case in two splits
    case = store.cases()[0]
    assert case["shape"] == [24, 20, 6] and case["slice_indices"] == list(range(6))
    assert np.allclose(np.array(case["affine"]), np.diag([0.7, 0.8, 2.0, 1.0]))
    assert store.meta["preprocessing"]["size"] == 16 and len(store.meta["content_hash"]) == 64
    # each row is the z-scored, resized slice of its case
    rows = store.rows("train")
    assert len(rows) == 18 and abs(float(store.images[rows].mean())) < 0.5


def test_split_is_seeded_and_recorded():
    ids = [f"c{i}" for i in range(16)]
    assert split_cases(ids, 0.1, 0.2, 0) == split_cases(ids, 0.1, 0.2, 0)
    assert split_cases(ids, 0.1, 0.2, 0) != split_cases(ids, 0.1, 0.2, 1)
    counts = {
        s: list(split_cases(ids, 0.1, 0.2, 0).values()).count(s) for s in ("train", "val", "test")
    }
    assert counts == {"train": 11, "val": 2, "test": 3}
    with pytest.raises(DataError, match="too few"):
        split_cases(["a", "b"], 0.5, 0.4, 0)


def test_rerun_with_same_inputs_is_a_noop(msd, tmp_path):
    path, _ = run(msd, tmp_path / "store")
    before = (path / "images.npy").stat().st_mtime_ns
    _, written = run(msd, tmp_path / "store")
    assert not written and (path / "images.npy").stat().st_mtime_ns == before
    _, written = run(
        msd, tmp_path / "store", prep=Preprocessing(size=8)
    )  # other parameters: rewritten
    assert written and Store.open(path).images.shape[-1] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "store"]  # no temp folders left


def test_channels_and_slice_count(tmp_path):
    raw = write_msd(tmp_path / "raw4d", channels=2)
    path, _ = run(raw, tmp_path / "s", prep=Preprocessing(size=16, channels=(1,), slices=3))
    store = Store.open(path)
    assert store.in_channels == 1 and store.meta["channel_names"] == ["mod1"]
    assert store.cases()[0]["slice_indices"] == [0, 2, 5]
    assert store.images.shape[0] == 5 * 3
    with pytest.raises(DataError, match=r"channel\(s\) \[2\] out of range"):
        run(raw, tmp_path / "s2", prep=Preprocessing(size=16, channels=(2,)))


def test_slicing_and_resize_invert():
    vol = np.random.default_rng(0).integers(0, 3, (7, 9, 5)).astype(np.uint8)
    for axis in range(3):
        idx = slice_indices(vol.shape[axis], None)
        slices = to_slices(vol[None], axis, idx)[:, 0]
        assert np.array_equal(from_slices(slices, axis), vol)
    mask = np.zeros((1, 20, 20), np.uint8)
    mask[0, 5:15, 4:12] = 1
    up = to_grid(mask, Plane.of(Preprocessing(size=40), (20, 20), None), 40, masks=True)
    back = to_grid(up, Plane.of(Preprocessing(size=20), (40, 40), None), 20, masks=True).numpy()
    assert np.array_equal(back, mask)
    assert slice_indices(88, 70).size == 70


def test_png_folder_with_label_map(tmp_path):
    root = tmp_path / "em"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(
            root / "images" / f"im{i}.png"
        )
        m = np.full((24, 24), 255, np.uint8)
        m[::6] = 0
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    path, _ = run(
        root,
        tmp_path / "s",
        prep=Preprocessing(size=24),
        label_map={0: 1, 255: 0},
        val_fraction=0.25,
        test_fraction=0.25,
    )
    store = Store.open(path)
    assert store.meta["source_kind"] == "png2d" and store.num_classes == 2
    membrane = np.zeros((24, 24), bool)
    membrane[::6] = True
    assert (store.masks[:, membrane] == 1).all() and (store.masks[:, ~membrane] == 0).all()
    assert store.meta["label_values"] == {"0": 1, "255": 0}


# ------------------------------------------------------------------ bad input


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    """No store and no half-written file: only whole chunks of finished cases, kept for resuming."""
    assert not out.exists()
    partial = out.parent / f".{out.name}.partial"
    others = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") and p != partial]
    assert not others
    if partial.exists():
        for chunk in partial.iterdir():
            assert chunk.suffix == ".npz" and not chunk.name.startswith(".")
            np.load(chunk)["images"]  # whole and readable


def test_missing_dataset_json(msd, tmp_path):
    (msd / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"dataset.json: missing"):
        run(msd, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_image_without_label(msd, tmp_path):
    (msd / "labelsTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case_002.nii.gz: image without a label"):
        run(msd, tmp_path / "out")


def test_image_label_shape_mismatch(msd, tmp_path):
    nib.save(
        nib.Nifti1Image(np.zeros((24, 20, 5), np.uint8), np.eye(4)),
        msd / "labelsTr" / "case_004.nii.gz",
    )
    with pytest.raises(
        DataError,
        match=r"case_004.nii.gz: label shape \(24, 20, 5\) does not match image shape \(24, 20, 6\)",
    ):
        run(msd, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_undeclared_label_values(msd, tmp_path):
    label = np.zeros((24, 20, 6), np.uint8)
    label[2, 2, 2] = 3
    affine = nib.load(msd / "imagesTr" / "case_001.nii.gz").affine  # on its image's grid
    nib.save(nib.Nifti1Image(label, affine), msd / "labelsTr" / "case_001.nii.gz")
    with pytest.raises(
        DataError, match=r"case_001.nii.gz: label values \[3\] not declared \(declared: \[0, 1\]"
    ):
        run(msd, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_file_named_nii_gz_that_is_not_nifti(msd, tmp_path):
    (msd / "imagesTr" / "case_000.nii.gz").write_bytes(b"hello, not an image")
    # said as every reader says it (info, predict: by content; prepare, check: by name)
    with pytest.raises(DataError, match=r"case_000.nii.gz: unknown content; expected NIfTI"):
        run(msd, tmp_path / "out")
    from segscale.imgmed.io import load_image2d, load_mask2d

    (tmp_path / "text.png").write_text("hello")  # was: Pillow's "cannot identify image file"
    (tmp_path / "empty.png").touch()
    for reader in (load_image2d, load_mask2d):
        with pytest.raises(DataError, match=r"text.png: unknown content; expected NIfTI"):
            reader(tmp_path / "text.png")
        with pytest.raises(DataError, match=r"empty.png: empty file$"):
            reader(tmp_path / "empty.png")
    with gzip.open(msd / "imagesTr" / "case_000.nii.gz", "wb") as f:
        f.write(b"\x00" * 600)
    with pytest.raises(DataError, match=r"case_000.nii.gz: not a NIfTI file"):
        check_nifti(msd / "imagesTr" / "case_000.nii.gz")


def test_truncated_nifti(msd, tmp_path):
    path = msd / "imagesTr" / "case_003.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"case_003.nii.gz: cannot read NIfTI data"):
        run(msd, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_output_that_is_not_a_store_is_not_overwritten(msd, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not a prepared store"):
        run(msd, out)
    assert (out / "precious.txt").read_text() == "keep me"
    # nor one with a meta.json that cannot be read (it was replaced, the user's files with it)
    for meta in (b"[]", b"{oops", b"\xff\xfe"):
        (out / "meta.json").write_bytes(meta)
        with pytest.raises(DataError, match="is not a prepared store"):
            run(msd, out)
        assert (out / "precious.txt").read_text() == "keep me"


def test_a_damaged_store_or_one_holding_other_files_is_replaced_only_when_it_may_be(msd, tmp_path):
    out = tmp_path / "out"
    run(msd, out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"a store with other files in it \(notes.txt\)"):
        run(msd, out, prep=Preprocessing(size=24))
    (out / "notes.txt").unlink()
    (out / "meta.json").write_bytes(b"\xff\xfe")  # not even UTF-8: was a traceback
    with pytest.raises(DataError, match=r"a damaged store .*--force to replace it"):
        run(msd, out)
    path, written = run(msd, out, force=True)
    assert written and Store.open(path).images.shape[-1] == 16


def test_store_open_errors(tmp_path):
    with pytest.raises(DataError, match="not a prepared store"):
        Store.open(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="format 'other'"):
        Store.open(tmp_path)
    assert os.listdir(tmp_path) == ["meta.json"]

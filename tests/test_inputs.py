"""Real-world input files: hidden and system files, suffixes in any case, names that lie about
the content, nnU-Net v2's file_ending, and 2D masks in every mode segmentation tools write."""

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import cli, tiny_config, trained_run, write_msd
from segscale import worker
from segscale.config import validate
from segscale.engine import prepare_run_dir
from segscale.errors import DataError
from segscale.evaluation import evaluate_folders
from segscale.imgmed import Preprocessing, Store, prepare
from segscale.predict import predict

APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64


def drop_junk(folder: Path) -> None:
    """What copying a folder through macOS or Windows leaves in it."""
    for p in sorted(folder.iterdir()):
        if p.is_file():
            (folder / f"._{p.name}").write_bytes(APPLE_DOUBLE)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")


def prepared(raw: Path, out: Path, size: int = 16) -> Store:
    store, _ = prepare(
        raw, out, Preprocessing(size=size), val_fraction=0, test_fraction=0, progress=False
    )
    return Store.open(store)


def write_nnunet_v2(root: Path, ending: str = ".nii.gz", num_cases: int = 3) -> Path:
    """nnU-Net v2 layout: imagesTr/<case>_0000<ending>, labelsTr/<case><ending>, dataset.json."""
    msd = write_msd(root.with_name(root.name + "_msd"), num_cases=num_cases)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(num_cases):
        name = f"case_{i:03d}"
        for folder, target in (("imagesTr", f"{name}_0000"), ("labelsTr", name)):
            img = nib.load(msd / folder / f"{name}.nii.gz")
            if ending == ".png":  # the middle slice as a 2D case
                data = np.asarray(img.dataobj)[:, :, 3]
                data = data if folder == "labelsTr" else np.clip(data * 60 + 60, 0, 255)
                Image.fromarray(data.astype(np.uint8)).save(root / folder / f"{target}.png")
            else:
                shutil.copy(msd / folder / f"{name}.nii.gz", root / folder / f"{target}{ending}")
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "blob": 1},
        "numTraining": num_cases,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_hidden_and_system_files_are_never_inputs(tmp_path):
    """macOS `._name` companions, .DS_Store and Thumbs.db beside the data: the same store (was:
    exit 2 on the first hidden file) in an nnU-Net v2 folder and a 2D images/ + masks/ folder."""
    clean = prepared(write_nnunet_v2(tmp_path / "v2"), tmp_path / "a")
    raw = write_nnunet_v2(tmp_path / "v2_junk")
    drop_junk(raw / "imagesTr")
    drop_junk(raw / "labelsTr")
    junk = prepared(raw, tmp_path / "b")
    assert np.array_equal(np.asarray(junk.masks), np.asarray(clean.masks))
    assert np.array_equal(np.asarray(junk.images), np.asarray(clean.images))

    pictures = write_2d(tmp_path / "2d", "L")
    drop_junk(pictures / "images")
    drop_junk(pictures / "masks")
    assert len(prepared(pictures, tmp_path / "c").cases()) == 4

    drop_junk(raw / "labelsTr")  # evaluate: the same folder as prediction and reference
    result = evaluate_folders(raw / "labelsTr", raw / "labelsTr")
    assert [c["case"] for c in result["cases"]] == ["case_000", "case_001", "case_002"]


def test_suffixes_match_in_any_case(tmp_path):
    reference = prepared(write_nnunet_v2(tmp_path / "v2"), tmp_path / "a")
    raw = write_nnunet_v2(tmp_path / "v2_upper")
    for p in [*(raw / "imagesTr").iterdir(), *(raw / "labelsTr").iterdir()]:
        p.rename(p.with_name(p.name.replace(".nii.gz", ".NII.GZ")))
    assert np.array_equal(
        np.asarray(prepared(raw, tmp_path / "b").masks), np.asarray(reference.masks)
    )

    pictures = write_2d(tmp_path / "2d", "L")
    for p in (pictures / "masks").iterdir():
        p.rename(p.with_suffix(".PNG"))
    assert len(prepared(pictures, tmp_path / "c").cases()) == 4


def test_nnunet_v2_png_datasets_are_2d_with_their_declared_labels(tmp_path):
    """`"file_ending": ".png"` (was: read as NIfTI and refused)."""
    store = prepared(write_nnunet_v2(tmp_path / "v2png", ".png"), tmp_path / "out")
    assert store.meta["labels"] == {"0": "background", "1": "blob"}
    assert len(store.masks) == 3 and all(c["affine"] is None for c in store.cases())
    assert 0 < np.asarray(store.masks).mean() < 1


def test_gzipped_nifti_named_nii_is_read_by_content(tmp_path):
    """A gzipped NIfTI named .nii (was: nibabel's ImageFileError traceback) in prepare and
    `imgmed info`; a plain NIfTI named .nii.gz likewise."""
    reference = prepared(write_msd(tmp_path / "a"), tmp_path / "store_a")
    raw = write_msd(tmp_path / "b")
    meta = json.loads((raw / "dataset.json").read_text())
    for entry in meta["training"]:
        for key in ("image", "label"):
            path = raw / entry[key]
            renamed = path.with_name(path.name.removesuffix(".gz"))  # gzip bytes, named .nii
            path.rename(renamed)
            entry[key] = entry[key].removesuffix(".gz")
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"named \.nii but gzip-compressed; read by its content"):
        store = prepared(raw, tmp_path / "store_b")
    assert np.array_equal(np.asarray(store.masks), np.asarray(reference.masks))

    r = cli("imgmed", "info", raw / "imagesTr" / "case_000.nii")
    assert r.returncode == 0 and not r.stderr, r.stderr  # said in the file's row
    assert "named .nii but gzip-compressed" in r.stdout, r.stdout
    plain = tmp_path / "plain.nii.gz"
    plain.write_bytes(
        gzip.decompress((tmp_path / "a" / "imagesTr" / "case_000.nii.gz").read_bytes())
    )
    r = cli("imgmed", "info", plain)
    assert r.returncode == 0 and "named .nii.gz but not compressed" in r.stdout, r.stdout


def write_2d(root: Path, mode: str, values=(0, 255)) -> Path:
    """4 pictures 32 × 32 with a foreground square, masks saved in Pillow `mode`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        fg = np.zeros((32, 32), bool)
        fg[4 + i : 14 + i, 6:20] = True  # 140 of 1024 pixels (13.7%)
        image = np.where(fg, 180, 60).astype(np.uint8) + rng.integers(0, 20, (32, 32), np.uint8)
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        raw = np.where(fg, values[1], values[0])
        if mode == "1":
            mask = Image.fromarray(fg)
        elif mode == "P":
            mask = Image.fromarray(raw.astype(np.uint8), "P")
            mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # black, red, green
        elif mode == "I;16":
            mask = Image.fromarray(raw.astype(np.uint16))
        elif mode in ("RGB", "RGBA", "LA"):
            mask = Image.fromarray(raw.astype(np.uint8)).convert(mode)
        else:
            mask = Image.fromarray(raw.astype(np.uint8))
        mask.save(root / "masks" / f"s{i}.png")
    return root


@pytest.mark.parametrize(
    "mode, values",
    [
        ("1", (0, 1)),
        ("L", (0, 255)),
        ("P", (0, 2)),
        ("I;16", (0, 1000)),
        ("RGB", (0, 255)),
        ("RGBA", (0, 255)),
        ("LA", (0, 128)),
    ],
    ids=["1-bit", "grey", "palette", "16-bit", "grey-as-RGB", "grey-as-RGBA", "grey+alpha"],
)
def test_2d_masks_of_every_mode_are_read_as_the_values_a_user_sees(tmp_path, mode, values):
    """1-bit masks (was: the store 100% class 1, labels 'False'/'True'), palette indices, 16-bit
    grey, grey stored as RGB(A): the square is the foreground, 140 pixels of every 1024."""
    root = write_2d(tmp_path / "raw", mode, values)
    assert Image.open(root / "masks" / "s0.png").mode == mode
    store = prepared(root, tmp_path / "out", size=32)
    assert store.meta["label_values"] == {str(values[0]): 0, str(values[1]): 1}
    assert sorted(store.meta["labels"]) == ["0", "1"]
    assert (np.asarray(store.masks) == 1).sum() == 4 * 140


def test_a_colour_mask_is_one_clear_line(tmp_path):
    root = write_2d(tmp_path / "raw", "L")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "masks" / "s2.png")
    with pytest.raises(
        DataError, match=r"s2\.png: a colour mask \(pixel \(0, 0\) is RGB \(200, 30, 30\)\)"
    ):
        prepared(root, tmp_path / "out")


def test_predict_reads_inputs_by_content_and_writes_masks_as_the_user_stored_them(tmp_path):
    """A run trained on 1-bit masks predicts (was: ValueError) 0/1 masks; 16-bit masks come back
    16-bit; predict skips hidden files in an input folder."""
    for mode, values, dtype in (("1", (0, 1), np.uint8), ("I;16", (0, 1000), np.uint16)):
        root = write_2d(tmp_path / mode.replace(";", ""), mode, values)
        store, _ = prepare(root, root / "store", Preprocessing(size=32), progress=False)
        run_dir = root / "run"
        prepare_run_dir(validate(tiny_config(store, epochs=1, steps_per_epoch=1)), run_dir, False)
        worker.train(run_dir, progress=False)
        drop_junk(root / "images")
        written = predict(run_dir, [root / "images"], root / "pred")
        assert [p.name for p in written] == ["s0.png", "s1.png", "s2.png", "s3.png"]
        mask = np.asarray(Image.open(written[0]))
        assert mask.dtype == dtype and set(np.unique(mask)) <= set(values)


def test_predict_takes_a_gzipped_nifti_named_nii(tmp_path):
    raw = write_msd(tmp_path / "raw")
    store, _ = prepare(raw, tmp_path / "store", Preprocessing(size=16), progress=False)
    run_dir = tmp_path / "run"
    trained_run(store, run_dir)
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(raw / "imagesTr" / "case_000.nii.gz", scans / "scan.nii")
    drop_junk(scans)
    with pytest.warns(UserWarning, match="read by its content"):
        [out] = predict(run_dir, [scans], tmp_path / "masks")
    assert out.name == "scan.nii" and nib.load(out).shape == (24, 20, 6)

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, tiny_config
from segscale import worker
from segscale.config import load_config, validate
from segscale.engine import prepare_run_dir
from segscale.errors import DataError
from segscale.imgmed import Preprocessing, prepare
from segscale.predict import predict


@pytest.mark.parametrize(
    "path",
    [*sorted((ROOT / "examples").glob("*.yaml")), ROOT / "src/segscale/resources/demo.yaml"],
    ids=lambda p: p.name,
)
def test_shipped_configs_validate(path: Path):
    cfg = load_config(path)
    assert cfg.name and cfg.train.epochs > 0
    assert (
        "prepare" in path.read_text() or path.name == "demo.yaml"
    )  # each example says how to make its store


def test_png_prediction_round_trips_mask_values_and_size(tmp_path):
    root = tmp_path / "em"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        mask = np.full((40, 36), 255, np.uint8)
        mask[:, 10 + i : 16 + i] = 0
        image = np.where(mask == 0, 60, 200).astype(np.uint8) + rng.integers(
            0, 20, mask.shape, dtype=np.uint8
        )
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    store, _ = prepare(
        root,
        tmp_path / "store",
        Preprocessing(size=32),
        val_fraction=0.2,
        test_fraction=0.2,
        progress=False,
    )
    cfg = tiny_config(store, epochs=1, steps_per_epoch=2)
    run_dir = tmp_path / "run"
    prepare_run_dir(validate(cfg), run_dir, resume=False)
    worker.train(run_dir, progress=False)
    [out] = predict(run_dir, [root / "images" / "s0.png"], tmp_path / "pred")
    mask = np.asarray(Image.open(out))
    assert out.name == "s0.png" and mask.shape == (40, 36)
    assert set(np.unique(mask)) <= {0, 255}  # class indices mapped back to the raw mask values
    with pytest.raises(DataError, match="no such file"):
        predict(run_dir, [tmp_path / "missing.png"], tmp_path / "pred")
    # a picture is read as what it shows: grey with alpha, and grey saved as RGB, are grey
    # (were: read as RGB, refused by a grey model)
    grey = Image.open(root / "images" / "s0.png")
    more = tmp_path / "more"
    more.mkdir()
    grey.convert("LA").save(more / "a_la.png")
    grey.convert("RGB").save(more / "b_rgb.png")
    outs = predict(run_dir, [more], tmp_path / "pred")
    assert [o.name for o in outs] == ["a_la.png", "b_rgb.png"]
    for o in outs:
        assert np.array_equal(np.asarray(Image.open(o)), mask)
    # all or nothing: a later input that fails leaves the output folder as it was
    colour = np.asarray(grey.convert("RGB")).copy()
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(more / "c_colour.png")
    before = sorted(p.name for p in (tmp_path / "pred").iterdir())
    with pytest.raises(DataError, match=r"c_colour.png: 3 channel\(s\) .* trained on 1"):
        predict(run_dir, [more], tmp_path / "pred")
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == before  # nor a hidden folder
    with pytest.raises(DataError, match=r"c_colour\.png"):
        predict(run_dir, [more], tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 1


def test_example_plugins_train_through_the_engine(tmp_path, real_store, monkeypatch):
    """examples/la_plugins.yaml: a user architecture and a user lr-schedule callback, by path."""
    monkeypatch.chdir(ROOT)  # the example names its plugins relative to the repository root
    cfg = load_config(
        ROOT / "examples" / "la_plugins.yaml",
        [f"data.store={real_store}", "train.epochs=2", "train.steps_per_epoch=4"],
    )
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir, resume=False)
    history = worker.train(run_dir, progress=False)
    assert len(history) == 2
    state = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert state["model"]["name"].endswith("tiny_net.py:tiny_net")
    # the callback replaced the schedule: lr follows the triangle (4 steps/epoch, cycle 8 steps)
    lrs = [r["lr"] for r in history]  # lr of the last step of each epoch: steps 3 and 7
    base = 0.001  # adam lr, 1 worker, reference batch = per-worker batch
    assert lrs[0] == pytest.approx(base * (0.1 + 0.9 * (1 - abs(2 * 3 / 8 - 1))))
    assert lrs[1] == pytest.approx(base * (0.1 + 0.9 * (1 - abs(2 * 7 / 8 - 1))))


def test_plan_prints_the_component_tree_with_user_parts(tmp_path, real_store):
    import json
    import subprocess
    import sys

    plugin = ROOT / "examples" / "plugins"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "segscale.cli",
            "plan",
            str(ROOT / "examples" / "la_plugins.yaml"),
            "--json",
            f"data.store={real_store}",
            f"model.name={plugin / 'tiny_net.py'}:tiny_net",
            f"train.callbacks=[{{name: '{plugin / 'cyclic_lr.py'}:TriangularLR'}}]",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    tree = json.loads(r.stdout)
    assert set(tree) == {"training_environment", "training_strategy", "injection"}
    arch = tree["injection"]["architecture"]
    assert arch["extensible"] and arch["source"] == "user" and arch["params"] == {"width": 24}
    assert tree["training_strategy"]["distributed_optimizer"]["source"] == "built-in"
    assert not tree["training_environment"]["communication_init"]["extensible"]
    assert tree["training_strategy"]["checkpoints_and_callbacks"]["fills"][0].endswith(
        "cyclic_lr.py:TriangularLR"
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "segscale.cli",
            "plan",
            str(ROOT / "examples" / "la_plugins.yaml"),
            f"data.store={real_store}",
            f"model.name={plugin / 'tiny_net.py'}:tiny_net",
            "model.kwargs.depth=3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert (
        bad.returncode == 2
        and "kwargs ['depth', 'width']" in bad.stderr
        and "accepted: width, dilations" in bad.stderr
    )


def test_predict_undoes_spacing_resampling_into_the_input_geometry(tmp_path):
    import nibabel as nib

    from conftest import write_msd

    raw = write_msd(tmp_path / "raw", num_cases=4, shape=(30, 26, 6))
    store, _ = prepare(
        raw,
        tmp_path / "store",
        Preprocessing(size=16, spacing=1.0),
        test_fraction=0.25,
        progress=False,
    )
    run_dir = tmp_path / "run"
    prepare_run_dir(validate(tiny_config(store, epochs=1, steps_per_epoch=2)), run_dir, False)
    worker.train(run_dir, progress=False)
    scan = raw / "imagesTr" / "case_000.nii.gz"
    [out] = predict(run_dir, [scan], tmp_path / "pred")
    pred, src = nib.load(str(out)), nib.load(str(scan))
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_predict_reports_its_throughput_and_bf16_agrees_with_fp32(tmp_path, real_store):
    import nibabel as nib

    from conftest import SAMPLE, cli, trained_run

    run_dir = trained_run(real_store, tmp_path / "run", epochs=2, steps_per_epoch=3)
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    masks = {}
    for amp in ("none", "bf16"):
        written = predict(run_dir, [scan], tmp_path / amp, batch_size=7, amp=amp)
        assert written.slices == nib.load(str(scan)).shape[2] and written.images_per_second > 0
        masks[amp] = np.asarray(nib.load(str(written[0])).dataobj)
    # bf16 rounds the logits: a few boundary pixels may flip, no more
    assert (masks["none"] == masks["bf16"]).mean() > 0.99
    done = cli("predict", run_dir, scan, "--out", tmp_path / "cli", "--batch-size", "32")
    assert done.returncode == 0, done.stderr
    assert "img/s on cpu" in done.stdout and "slices in" in done.stdout
    bad = cli("predict", run_dir, scan, "--out", tmp_path / "cli", "--amp", "fp8")
    assert bad.returncode == 2 and "--amp fp8: expected auto, none or bf16" in bad.stderr


def test_a_volume_stored_in_other_axes_is_segmented_in_the_training_orientation(tmp_path):
    """An LPS or axis-swapped copy of a RAS scan (what a DICOM conversion writes) was sliced as
    stored: the network saw mirrored or transposed slices (zoo model: Dice 0.50 against 0.76).
    Now the same world content gives the same mask, written in each input's own grid."""
    import nibabel as nib

    from conftest import SAMPLE

    zoo_model = ROOT / "src/segscale/resources/zoo/la-resunet/1"  # trained, in RAS
    src = nib.load(sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0])
    data, affine = np.asarray(src.dataobj), src.affine
    flip = np.eye(4)
    flip[0, 0], flip[1, 1] = -1, -1
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    copies = {
        "ras": (data, affine),
        "lps": (np.ascontiguousarray(data[::-1, ::-1]), affine @ flip),
        "asr": (np.ascontiguousarray(data.transpose(1, 0, 2)), affine @ swap),
    }
    masks = {}
    for name, (array, aff) in copies.items():
        nib.save(nib.Nifti1Image(array, aff), tmp_path / f"{name}.nii.gz")
        [out] = predict(zoo_model, [tmp_path / f"{name}.nii.gz"], tmp_path / "pred")
        mask = nib.load(out)
        assert mask.shape == array.shape and np.allclose(mask.affine, aff)
        masks[name] = np.asarray(mask.dataobj)
    assert masks["ras"].any()
    assert np.array_equal(masks["lps"][::-1, ::-1], masks["ras"])
    assert np.array_equal(masks["asr"].transpose(1, 0, 2), masks["ras"])
    # a header without orientation (nibabel guesses LAS) is segmented as stored, and says so
    bare = nib.Nifti1Image(data, affine)
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    nib.save(bare, tmp_path / "bare.nii.gz")
    with pytest.warns(UserWarning, match="no orientation in its header"):
        [out] = predict(zoo_model, [tmp_path / "bare.nii.gz"], tmp_path / "pred")
    assert np.array_equal(np.asarray(nib.load(out).dataobj), masks["ras"])
    # a model whose store does not record its orientation (an older entry) says so
    import shutil

    old = tmp_path / "zoo" / "old" / "1"
    shutil.copytree(zoo_model, old)
    meta = json.loads((old / "store" / "meta.json").read_text())
    del meta["orientation"]
    (old / "store" / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"does not record the axes .* 1 volume\(s\) segmented"):
        [out] = predict(old, [tmp_path / "lps.nii.gz"], tmp_path / "old")


def test_predict_keeps_reference_labels_and_says_what_it_cannot_segment(tmp_path):
    """--out labelsTs wrote over the reference labels (nnU-Net names both alike); a zero image
    came back 18% foreground without a word; a 2D NIfTI, a complex one, a .npy and a file given
    twice were refused with the wrong reason or read with numpy's warning."""
    import warnings

    import nibabel as nib

    from conftest import SAMPLE, cli

    zoo_model = ROOT / "src/segscale/resources/zoo/la-resunet/1"
    scan = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    src = nib.load(scan)
    data = np.asarray(src.dataobj)
    (tmp_path / "imagesTs").mkdir()
    nib.save(
        nib.Nifti1Image(data[:, :, 20:24], src.affine), tmp_path / "imagesTs" / "p5_0000.nii.gz"
    )
    labels = tmp_path / "labelsTs"
    labels.mkdir()
    nib.save(nib.Nifti1Image(np.ones((91, 70, 4), np.uint8), src.affine), labels / "p5.nii.gz")
    reference = (labels / "p5.nii.gz").read_bytes()
    done = cli("predict", zoo_model, tmp_path / "imagesTs", "--out", labels)
    assert done.returncode == 2 and "p5.nii.gz (reference labels?" in done.stderr
    assert (labels / "p5.nii.gz").read_bytes() == reference
    for _ in range(2):  # its own masks are replaced without --force
        [mask] = predict(zoo_model, [tmp_path / "imagesTs"], tmp_path / "pred")
    # ...but not the mask of another input whose mask has that name (p5.nii.gz: its mask is
    # p5.nii.gz, as p5_0000.nii.gz's is)
    (tmp_path / "other").mkdir()
    nib.save(nib.Nifti1Image(data[:, :, 20:24], src.affine), tmp_path / "other" / "p5.nii.gz")
    with pytest.raises(DataError, match=r"the mask of another input \(p5_0000.nii.gz\)"):
        predict(zoo_model, [tmp_path / "other"], tmp_path / "pred")
    assert nib.load(mask).header["descrip"].tobytes().rstrip(b"\0").endswith(b"of p5_0000.nii.gz")
    predict(zoo_model, [tmp_path / "other"], tmp_path / "pred", force=True)
    predict(zoo_model, [tmp_path / "other"], tmp_path / "pred")  # now its own
    # a picture named .nii.gz is refused as load refuses it (its mask was written as .png)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "fake.png")
    (tmp_path / "fake.png").rename(tmp_path / "other" / "fake.nii.gz")
    with pytest.raises(DataError, match=r"fake.nii.gz: named like a nifti file but holds image"):
        predict(zoo_model, [tmp_path / "other" / "fake.nii.gz"], tmp_path / "pred")
    done = cli("predict", zoo_model, tmp_path / "imagesTs", "--out", labels, "--force")
    assert done.returncode == 0, done.stderr
    assert np.array_equal(nib.load(labels / "p5.nii.gz").get_fdata(), nib.load(mask).get_fdata())
    # a constant image; a 2D NIfTI (one slice) back in its own shape; the same file twice
    nib.save(nib.Nifti1Image(np.zeros((91, 70, 2), np.int16), src.affine), tmp_path / "zero.nii")
    nib.save(nib.Nifti1Image(data[:, :, 20], src.affine), tmp_path / "flat.nii.gz")
    with pytest.warns(UserWarning, match=r"zero.nii: a constant image \(every voxel 0\)"):
        out = predict(
            zoo_model,
            [tmp_path / "zero.nii", tmp_path / "flat.nii.gz", tmp_path / "flat.nii.gz"],
            tmp_path / "more",
        )
    assert [p.name for p in out] == ["zero.nii", "flat.nii.gz"]
    flat = nib.load(out[1])
    assert flat.shape == (91, 70) and np.allclose(flat.affine, src.affine)
    nib.save(nib.Nifti1Image(data[:, :, 20:21], src.affine), tmp_path / "slab.nii.gz")
    [slab] = predict(zoo_model, [tmp_path / "slab.nii.gz"], tmp_path / "more")
    assert np.asarray(flat.dataobj).any()
    assert np.array_equal(np.asarray(flat.dataobj), np.asarray(nib.load(slab).dataobj)[:, :, 0])
    # that slice stored as (X, 1, Z) was cut along Z into slices one pixel wide
    xz = np.ascontiguousarray(data[:, :, 20:21].transpose(0, 2, 1))
    nib.save(nib.Nifti1Image(xz, src.affine @ np.eye(4)[[0, 2, 1, 3]]), tmp_path / "xz.nii.gz")
    [xz_mask] = predict(zoo_model, [tmp_path / "xz.nii.gz"], tmp_path / "more")
    xz_mask = np.asarray(nib.load(xz_mask).dataobj)
    assert np.array_equal(xz_mask[:, 0, :], np.asarray(flat.dataobj))
    # what predict cannot read says why, naming the file
    nib.save(nib.Nifti1Image(data.astype(np.complex64), src.affine), tmp_path / "c.nii.gz")
    np.save(tmp_path / "a.npy", data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"c.nii.gz: complex values \(complex64\)"):
            predict(zoo_model, [tmp_path / "c.nii.gz"], tmp_path / "bad")
    with pytest.raises(DataError, match=r"a.npy: a numpy array; predict reads NIfTI"):
        predict(zoo_model, [tmp_path / "a.npy"], tmp_path / "bad")


def test_masks_come_back_in_the_training_values_and_channels_are_picked_by_count(tmp_path):
    """Declared labels 0, 4 (BraTS' original 0, 1, 2, 4) were refused ('must be 0..K-1'), and
    where they were mapped, volumes came back as class indices that evaluate scored against
    the raw values (Dice 0.17 for 0.52). A model of `--channels` one of two read index 1 of any
    input: a 4-channel volume's second channel was taken for the one it was trained on."""
    import nibabel as nib

    from conftest import trained_run, write_msd
    from segscale.predict import mask_values

    raw = write_msd(tmp_path / "raw", channels=2)
    meta = json.loads((raw / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "4": "tumour"}
    (raw / "dataset.json").write_text(json.dumps(meta))
    for label in (raw / "labelsTr").iterdir():
        img = nib.load(label)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 4, img.affine), label)
    store, _ = prepare(
        raw, tmp_path / "store", Preprocessing(size=16, channels=(1,)), progress=False
    )
    from segscale.imgmed import Store

    meta = Store.open(store).meta
    assert meta["labels"] == {"0": "background", "1": "tumour"} and meta["label_values"]["4"] == 1
    assert mask_values(meta).tolist() == [0, 4]
    run = trained_run(store, tmp_path / "run", epochs=2, steps_per_epoch=3)
    scan = raw / "imagesTr" / "case_000.nii.gz"
    img = nib.load(scan)
    both = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(both[..., 1], img.affine), tmp_path / "one.nii.gz")
    nib.save(
        nib.Nifti1Image(np.concatenate([both, both], -1), img.affine), tmp_path / "four.nii.gz"
    )
    [a] = predict(run, [scan], tmp_path / "a")
    [b] = predict(run, [tmp_path / "one.nii.gz"], tmp_path / "b")
    assert set(np.unique(np.asarray(nib.load(a).dataobj))) <= {0, 4}
    assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
    with pytest.raises(
        DataError,
        match=r"four.nii.gz: 4 channel\(s\); the model reads mod1 of its training data's 2 \(mod0, mod1\)",
    ):
        predict(run, [tmp_path / "four.nii.gz"], tmp_path / "c")

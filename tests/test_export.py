"""`segscale export`: a run's or a zoo entry's model as ONNX (run in onnxruntime) and TorchScript,
with a dynamic batch size; outputs on real slices equal PyTorch's within a stated tolerance."""

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from conftest import cli, tiny_config, trained_run
from segscale.engine import load_trained_model
from segscale.export import DESCRIPTION, TOLERANCE, export
from segscale.imgmed import Store
from segscale.zoo import publish


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_store):
    return trained_run(real_store, tmp_path_factory.mktemp("export") / "run", epochs=1)


def real_slices(store_path, n: int) -> torch.Tensor:
    store = Store.open(store_path)
    rows = store.rows("test")[:n]
    return torch.from_numpy(np.stack([np.array(store.images[r]) for r in rows]))


def test_onnx_export_runs_in_onnxruntime_like_pytorch_for_any_batch(run, real_store, tmp_path):
    import onnx
    import onnxruntime

    path = export(run, "onnx", tmp_path / "model.onnx")
    model, _ = load_trained_model(run)
    runtime = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # neither the traced batch (2) nor the checked one (3)
        x = real_slices(real_store, n)
        got = torch.from_numpy(runtime.run(None, {"image": x.numpy()})[0])
        with torch.no_grad():
            expected = model(x)
        assert got.shape == expected.shape == (n, 2, 32, 32)
        assert float((got - expected).abs().max()) <= TOLERANCE
        assert torch.equal(got.argmax(1), expected.argmax(1))
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    described = json.loads(meta[DESCRIPTION])
    assert described["input"]["shape"] == ["N", 1, 32, 32]
    assert described["output"]["classes"] == {"0": "background", "1": "left atrium"}
    assert described["preprocessing"]["size"] == 32
    # the axes its slices were cut in; the run's name, not a local path
    assert described["input"]["orientation"] == "RAS" and described["source"] == run.name
    assert described["output"]["mask_values"] == {"0": 0, "1": 1}  # what predict writes
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_torchscript_export_from_a_zoo_entry_through_the_cli(run, real_store, tmp_path):
    publish(run, "tiny-la", tmp_path / "zoo", version="1")
    out = tmp_path / "tiny.pt"
    done = cli(
        "export", "zoo:tiny-la@1", "--format", "torchscript", "--out", out,
        "--zoo", tmp_path / "zoo",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    # the archive's folder is named after the file, not after the temp file it was written as
    with zipfile.ZipFile(out) as archive:
        assert {name.split("/")[0] for name in archive.namelist()} == {"tiny"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    files = {DESCRIPTION: ""}
    scripted = torch.jit.load(str(out), _extra_files=files)
    assert json.loads(files[DESCRIPTION])["model"] == "unet"
    assert json.loads(files[DESCRIPTION])["source"] == "zoo:tiny-la@1"
    model, _ = load_trained_model(run)
    x = real_slices(real_store, 4)
    with torch.no_grad():
        assert float((scripted(x) - model(x)).abs().max()) <= TOLERANCE


def test_bad_exports_are_one_line(run, tmp_path, real_store):
    done = cli("export", run, "--format", "tflite")
    assert (
        done.returncode == 2 and "--format tflite: expected one of onnx, torchscript" in done.stderr
    )
    done = cli(
        "export", tmp_path, "--format", "onnx", "--out", tmp_path / "new" / "deep" / "m.onnx"
    )
    assert done.returncode == 2 and "neither a run folder" in done.stderr
    assert not (tmp_path / "new").exists()  # the folders made for the file are gone with it
    (tmp_path / "folder").mkdir()
    done = cli("export", run, "--out", tmp_path / "folder")
    assert done.returncode == 2 and "a folder; give a file name" in done.stderr
    # an existing file is not replaced without --force; a device never
    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"mine")
    done = cli("export", run, "--format", "torchscript", "--out", mine)
    assert done.returncode == 2 and "exists; give another name or --force" in done.stderr
    assert mine.read_bytes() == b"mine"
    # nor, even with --force, a record of the run it exports (its weights: the run was broken)
    weights = (run / "model.pt").read_bytes()
    done = cli("export", run, "--format", "torchscript", "--out", run / "model.pt", "--force")
    assert done.returncode == 2 and f"a record of the run {run}" in done.stderr
    assert (run / "model.pt").read_bytes() == weights
    (run / "notes.pt").write_bytes(b"notes")  # the user's, beside the run's own files
    done = cli("export", run, "--format", "torchscript", "--out", run / "notes.pt", "--force")
    assert done.returncode == 2 and "a file of" in done.stderr and "itself" in done.stderr
    (run / "notes.pt").unlink()
    # an earlier export is replaced, whatever its name
    for _ in range(2):
        done = cli(
            "export", run, "--format", "torchscript", "--out", run / "v2.torchscript.pt", "--force"
        )
        assert done.returncode == 0, done.stderr
    done = cli("export", run, "--format", "torchscript", "--out", tmp_path / "m.onnx")
    assert (
        done.returncode == 2
        and "a TorchScript export needs a name ending in .pt or .pth" in done.stderr
    )
    # an ONNX file named meta.json (a store's record) was written; a name says what it holds
    done = cli("export", run, "--out", tmp_path / "meta.json", "--force")
    assert done.returncode == 2 and "an ONNX export needs a name ending in .onnx" in done.stderr
    done = cli("export", run, "--format", "torchscript", "--out", "/dev/null", "--force")
    assert done.returncode == 2 and "ending in .pt or .pth" in done.stderr
    # a file or a missing folder as the run: named as such (was: blamed on an --out not given)
    for source, what in (
        (run / "config.yaml", "a file, not a run folder"),
        (tmp_path / "no", "no such file or folder"),
        (real_store, "a prepared store, not a run folder"),
    ):
        done = cli("export", source)
        assert done.returncode == 2 and f"{source}: {what}" in done.stderr, done.stderr
    # nor into another run's folder, where it passed for that run's model; a name's ending is
    # the format's, in its case
    other = tmp_path / "other"  # a started run: its config and environment record
    other.mkdir()
    for record in ("config.yaml", "environment.json"):
        shutil.copy(run / record, other / record)
    done = cli("export", run, "--out", other / "model.onnx")
    assert done.returncode == 2 and f"inside the run folder {other}" in done.stderr
    assert not (other / "model.onnx").exists()
    (other / "environment.json").unlink()  # set up by launch, not started: its folder too
    done = cli("export", run, "--out", other / "exports" / "deep" / "model.onnx")
    assert done.returncode == 2 and f"inside the run folder {other}" in done.stderr
    assert not (other / "exports").exists()  # no folder made for a refused export
    done = cli("export", run, "--out", tmp_path / "m.ONNX")
    assert done.returncode == 2 and "needs a name ending in .onnx" in done.stderr
    (tmp_path / "a-file").write_text("x")
    done = cli("export", run, "--out", tmp_path / "a-file" / "m.onnx")
    assert done.returncode == 2 and "a-file" in done.stderr and "Traceback" not in done.stderr


def test_a_model_torch_cannot_trace_is_one_line(tmp_path, real_store):
    from conftest import ROOT
    from segscale import worker
    from segscale.config import validate
    from segscale.engine import prepare_run_dir

    cfg = tiny_config(real_store, epochs=1, steps_per_epoch=1)
    cfg["model"] = {"name": f"{ROOT / 'tests' / 'plugins' / 'branchy_net.py'}:branchy_net"}
    run = tmp_path / "run"
    prepare_run_dir(validate(cfg), run, resume=False)
    worker.train(run, progress=False)
    done = cli("export", run, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "torch cannot export this model to onnx" in done.stderr
        and "--format torchscript" in done.stderr
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "m.onnx").exists()

"""The model zoo: publish a real run, list and pull it from a folder and over real HTTP, refuse
tampered files and unsafe names, and segment with a zoo model as with its run."""

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SAMPLE, trained_run
from segscale import worker
from segscale.errors import SegscaleError
from segscale.hub import entries, parse_ref, pull
from segscale.zoo import load_model, publish


@pytest.fixture(scope="module")
def published(tmp_path_factory, real_store):
    root = tmp_path_factory.mktemp("zoo")
    run = trained_run(real_store, root / "run", epochs=2, steps_per_epoch=2)
    worker.evaluate(run, "test", run / "evaluation-test.json")
    zoo = root / "zoo"
    entry = publish(run, "tiny-la", zoo, version="1", description="A test model.")
    return run, zoo, entry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_publish_writes_a_verifiable_entry(published):
    run, zoo, entry = published
    index = json.loads((zoo / "index.json").read_text())
    files = index["entries"]["tiny-la"]["1"]["files"]
    assert {"model.safetensors", "config.yaml", "card.md", "segscale-model.json"} <= set(files)
    assert "store/meta.json" in files
    for rel, f in files.items():  # every file hashed as it is on disk
        assert hashlib.sha256((entry / rel).read_bytes()).hexdigest() == f["sha256"]
    info = json.loads((entry / "segscale-model.json").read_text())
    assert info["input"]["channels"] == 1 and info["input"]["channel_names"] == ["LGE-MRI"]
    assert info["classes"] == {"0": "background", "1": "left atrium"}
    evaluation = json.loads((run / "evaluation-test.json").read_text())
    assert info["evaluation"]["dataset"]["dice"] == evaluation["dataset"]["dice"]
    assert f"{evaluation['dataset']['dice']:.4f}" in (entry / "card.md").read_text()
    store_meta = json.loads((entry / "store" / "meta.json").read_text())
    assert "cases" not in store_meta and "source" not in store_meta  # no local paths published
    # the weights are the run's, in safetensors
    model, _ = load_model(entry)
    trained = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    with pytest.raises(SegscaleError, match="already published; give a new --version"):
        publish(run, "tiny-la", zoo, version="1")
    for bad in ("../up", "a/b", ".hidden", "x" * 65):
        with pytest.raises(SegscaleError, match="zoo name"):
            publish(run, bad, zoo)


def test_pull_from_a_folder_verifies_and_caches(published, cache):
    _, zoo, entry = published
    assert [(e["name"], e["version"]) for e in entries(zoo)] == [("tiny-la", "1")]
    local = pull("tiny-la", zoo)
    assert local == cache / "zoo" / "tiny-la" / "1"
    assert (local / "model.safetensors").read_bytes() == (entry / "model.safetensors").read_bytes()
    with pytest.raises(SegscaleError, match=r"no version '2' .*versions: 1"):
        pull("tiny-la@2", zoo)
    with pytest.raises(SegscaleError, match=r"no model 'other' .*models: tiny-la"):
        pull("other", zoo)
    with pytest.raises(SegscaleError, match="zoo version"):
        parse_ref("zoo:tiny-la@../../etc")


def serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_pull_over_http_refuses_a_tampered_file(published, cache, tmp_path):
    import shutil

    _, zoo, _ = published
    copy = tmp_path / "served"
    shutil.copytree(zoo, copy)
    server = serve(copy)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert entries(url)[0]["name"] == "tiny-la"
        assert (pull("zoo:tiny-la@1", url) / "config.yaml").is_file()
        # a file changed on the server: refused, and the cached copy is not replaced by it
        weights = copy / "tiny-la" / "1" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
        shutil.rmtree(cache)
        with pytest.raises(
            SegscaleError, match=r"model.safetensors does not match the zoo's sha256"
        ):
            pull("tiny-la", url)
        assert not (cache / "zoo" / "tiny-la" / "1").exists()
        # an index listing a path outside the entry is refused before anything is fetched
        index = json.loads((copy / "index.json").read_text())
        files = index["entries"]["tiny-la"]["1"]["files"]
        files["../../evil"] = next(iter(files.values()))
        (copy / "index.json").write_text(json.dumps(index))
        with pytest.raises(SegscaleError, match="unsafe path"):
            pull("tiny-la", url)
        with pytest.raises(SegscaleError, match="cannot download"):
            entries(f"{url}/nowhere")
    finally:
        server.shutdown()


def test_predict_with_a_zoo_model_matches_its_run(published, tmp_path):
    run, zoo, _ = published
    volume = SAMPLE / "imagesTr" / sorted(p.name for p in (SAMPLE / "imagesTr").iterdir())[0]
    env = {**os.environ, "SEGSCALE_CACHE": str(tmp_path / "cache")}

    def predict(source: str, out: Path) -> np.ndarray:
        r = subprocess.run(
            [sys.executable, "-m", "segscale.cli", "predict", source, volume, "--out", out]
            + (["--zoo", str(zoo)] if source.startswith("zoo:") else []),
            capture_output=True,
            text=True,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return np.asarray(nib.load(out / volume.name).dataobj)

    from_zoo = predict("zoo:tiny-la@1", tmp_path / "zoo-out")
    from_run = predict(str(run), tmp_path / "run-out")
    assert from_zoo.shape == nib.load(volume).shape[:3] and np.array_equal(from_zoo, from_run)


def test_publishing_an_mlflow_tracked_run_registers_the_model_there(tmp_path, real_store):
    from mlflow.tracking import MlflowClient

    from conftest import cli, tiny_config
    from segscale.config import validate
    from segscale.engine import prepare_run_dir

    cfg = tiny_config(real_store, epochs=1, steps_per_epoch=1)
    cfg["tracker"] = "mlflow"
    run = tmp_path / "runs" / "tracked"
    prepare_run_dir(validate(cfg), run, resume=False)
    worker.train(run, progress=False)
    done = cli("zoo", "publish", run, "--name", "tracked-la", "--zoo", tmp_path / "zoo")
    assert done.returncode == 0, done.stderr
    assert "registered as model tracked-la, version 1" in done.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    (version,) = client.search_model_versions("name = 'tracked-la'")
    assert version.run_id == run_id and version.tags["segscale.zoo_version"] == "1"
    logged = {a.path for a in client.list_artifacts(run_id, "zoo/tracked-la-1")}
    assert "zoo/tracked-la-1/model.safetensors" in logged
    local = client.download_artifacts(run_id, "zoo/tracked-la-1/model.safetensors", str(tmp_path))
    entry = tmp_path / "zoo" / "tracked-la" / "1" / "model.safetensors"
    assert Path(local).read_bytes() == entry.read_bytes()


def test_the_shipped_left_atrium_model_is_found_verified_and_segments(tmp_path, monkeypatch):
    """With no network and no SEGSCALE_ZOO: `zoo list` shows la-resunet, a pull verifies every
    file, and it segments a scan of one of its own test cases (la2018_011; the bundled sample's
    1.25 mm copy of it) close to the expert mask."""
    from conftest import cli
    from segscale.segeval import confusion_matrix, per_class_dice

    monkeypatch.delenv("SEGSCALE_ZOO", raising=False)
    monkeypatch.setenv("SEGSCALE_CACHE", str(tmp_path / "cache"))
    listed = cli("zoo", "list")
    assert listed.returncode == 0 and "la-resunet" in listed.stdout
    [shipped] = [e for e in entries() if e["name"] == "la-resunet"]
    assert shipped["version"] == "1" and shipped["dice"] > 0.8
    entry = pull("zoo:la-resunet@1")
    info = json.loads((entry / "segscale-model.json").read_text())
    assert info["classes"] == {"0": "background", "1": "left atrium"}
    assert "research" in info["licence"] and "Xiong" in (entry / "card.md").read_text()
    scan = SAMPLE / "imagesTr" / "la2018_011.nii.gz"
    done = cli("predict", "zoo:la-resunet@1", scan, "--out", tmp_path / "masks")
    assert done.returncode == 0, done.stderr
    pred = np.asarray(nib.load(str(tmp_path / "masks" / scan.name)).dataobj)
    ref = np.asarray(nib.load(str(SAMPLE / "labelsTr" / scan.name)).dataobj)
    dice = per_class_dice(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(ref), 2).numpy()
    )
    assert pred.shape == ref.shape and dice[1] > 0.7

"""The model zoo: publish a real run, list and pull it from a folder and over real HTTP, refuse
tampered files and unsafe names, and segment with a zoo model as with its run."""

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT, SAMPLE, trained_run
from segscale import worker
from segscale.errors import SegscaleError
from segscale.hub import entries, parse_ref, pull
from segscale.zoo import load_model, publish, spdx_licence


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
    assert store_meta["orientation"] == "RAS"  # what predict reorients a volume to
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
    # a stray file where the entry is cached is replaced (was: a staging folder's rename error)
    import shutil

    shutil.rmtree(local)
    local.write_text("not an entry")
    assert pull("tiny-la", zoo) == local and (local / "model.safetensors").is_file()
    shutil.rmtree(local.parent)  # and one in the place of the model's folder
    local.parent.write_text("not a folder")
    assert pull("tiny-la", zoo) == local and (local / "model.safetensors").is_file()
    (cache / "empty").mkdir()
    with pytest.raises(SegscaleError, match=r"empty: not a zoo \(no index.json\)"):
        entries(cache / "empty")
    # a missing folder, a store or a file: said so (was: the OS's message on index.json)
    (cache / "store").mkdir()
    (cache / "store" / "meta.json").write_text("{}")
    (cache / "a-file").write_text("x")
    for name, what in (
        ("missing", "no such folder"),
        ("store", "a prepared store, not a zoo"),
        ("a-file", "a file, not a zoo folder"),
    ):
        with pytest.raises(SegscaleError, match=rf"zoo .*{name}: {what}"):
            entries(cache / name)


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
    # the same entry published into a second zoo is logged beside the first, not over it
    done = cli("zoo", "publish", run, "--name", "tracked-la", "--zoo", tmp_path / "zoo2")
    assert done.returncode == 0, done.stderr
    assert {a.path for a in client.list_artifacts(run_id, "zoo")} == {
        "zoo/tracked-la-1",
        "zoo/tracked-la-1-2",
    }


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
    # an entry holds a config.yaml as a run does: named for what it is
    done = cli("stop", entry)
    assert done.returncode == 2 and "a zoo entry (a published model); nothing trains" in done.stderr
    from segscale.engine import check_run_dir, trained_weights

    with pytest.raises(SegscaleError, match=r"a zoo entry \(a published model\), not a run folder"):
        check_run_dir(entry)  # train --run-dir wrote into it, and the zoo's checks then failed
    with pytest.raises(SegscaleError, match=r"a zoo entry .* read by `segscale predict zoo:NAME`"):
        trained_weights(entry)  # evaluate: "no model.pt; train the run to the end first"
    other = tmp_path / "other-entry"  # another entry (a zoo folder's): its model.pt would pass
    shutil.copytree(entry, other)
    done = cli("export", entry, "--format", "torchscript", "--out", other / "m.pt")
    assert done.returncode == 2 and f"inside the zoo entry {other}" in done.stderr, done.stderr
    scan = SAMPLE / "imagesTr" / "la2018_011.nii.gz"
    done = cli("predict", "zoo:la-resunet@1", scan, "--out", tmp_path / "masks")
    assert done.returncode == 0, done.stderr
    pred = np.asarray(nib.load(str(tmp_path / "masks" / scan.name)).dataobj)
    ref = np.asarray(nib.load(str(SAMPLE / "labelsTr" / scan.name)).dataobj)
    dice = per_class_dice(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(ref), 2).numpy()
    )
    assert pred.shape == ref.shape and dice[1] > 0.7


def copied_zoo(published, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(published[1], copy)
    return copy


def rewrite(zoo: Path, change) -> None:
    index = json.loads((zoo / "index.json").read_text())
    change(index)
    (zoo / "index.json").write_text(json.dumps(index))


def test_an_index_is_checked_as_input(published, cache, tmp_path):
    """A version from the index becomes a cache folder: '../..' must never (was: the folder it
    named was deleted and replaced); malformed indexes are one line (were: tracebacks)."""
    zoo = copied_zoo(published, tmp_path)
    victim = cache / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    record = json.loads((zoo / "index.json").read_text())["entries"]["tiny-la"]["1"]
    rewrite(zoo, lambda i: i["entries"]["tiny-la"].update({"./../../victim": record}))
    with pytest.raises(SegscaleError, match=r"not a valid zoo index \(zoo version '\./\.\./"):
        pull("tiny-la", zoo)
    assert (victim / "keep.txt").read_text() == "precious"

    def config_listed_also_as(name: str):  # the entry's config.yaml listed a second time
        def change(index: dict) -> None:
            files = index["entries"]["tiny-la"]["1"]["files"]
            files[name] = files["config.yaml"]

        return change

    broken_indexes = (
        (lambda i: i.pop("entries"), "'entries' is not an object"),
        (lambda i: i.update(entries=[]), "'entries' is not an object"),
        (lambda i: i["entries"].update({"tiny-la": {"1": 5}}), "tiny-la@1 has no summary"),
        (lambda i: i["entries"]["tiny-la"]["1"].update(files={}), "lists no model.safetensors"),
        (  # zoo list showed it with a traceback
            lambda i: i["entries"]["tiny-la"]["1"]["summary"].update(channels=5),
            "summary 'channels' is 5; expected a list of channel names",
        ),
        (
            lambda i: i["entries"]["tiny-la"]["1"]["files"]["model.safetensors"].update(size=-1),
            "model.safetensors's size is -1; expected bytes ≥ 0",
        ),
        (
            lambda i: i["entries"]["tiny-la"]["1"]["files"]["model.safetensors"].update(
                sha256="abc"
            ),
            "model.safetensors's sha256 is not 64 lower-case hex digits",
        ),
        (
            lambda i: i["entries"]["tiny-la"]["1"]["summary"].update(dice=2.0),
            "summary 'dice' is 2.0; expected a test Dice in",
        ),
        (  # was refused only when the download got there
            lambda i: i["entries"]["tiny-la"]["1"]["files"].update(
                store={"sha256": "0" * 64, "size": 1}
            ),
            "lists store as a file and as a folder of files",
        ),
        (  # one file twice: Linux keeps two, macOS one (was: listed and pulled)
            config_listed_also_as("Config.yaml"),
            "lists 'config.yaml' and 'Config.yaml': one file on a disk that ignores case",
        ),
        (
            config_listed_also_as("./config.yaml"),
            "lists './config.yaml'; expected a plain relative path",
        ),
        (
            config_listed_also_as("config.yaml\u0000"),
            "lists 'config.yaml\\\\x00'; expected a plain relative path",
        ),
        (
            config_listed_also_as("config.yaml."),
            "lists 'config.yaml.'; expected a plain relative path",
        ),
        (
            config_listed_also_as("ｃonfig.yaml"),
            "lists 'config.yaml' and 'ｃonfig.yaml': one file on a disk that ignores case",
        ),
    )
    for n, (broken, message) in enumerate(broken_indexes):
        zoo = copied_zoo(published, tmp_path / f"broken-{n}")
        rewrite(zoo, broken)
        with pytest.raises(SegscaleError, match=f"not a valid zoo index .*{message}"):
            entries(zoo)
        with pytest.raises(SegscaleError, match=f"not a valid zoo index .*{message}"):
            pull("tiny-la", zoo)


def test_a_zoo_entry_that_names_code_is_not_built(published, cache, tmp_path):
    """An entry's config naming 'file.py:attr' as its model would run that file on predict
    (was: it ran); publishing a run whose model is a user's file is refused too."""
    import yaml

    zoo = copied_zoo(published, tmp_path)
    entry = zoo / "tiny-la" / "1"
    marker = tmp_path / "ran"
    (entry / "evil.py").write_text(f"open({str(marker)!r}, 'w')\ndef make(*a, **k): pass\n")
    config = yaml.safe_load((entry / "config.yaml").read_text())
    config["model"]["name"] = "evil.py:make"
    (entry / "config.yaml").write_text(yaml.safe_dump(config))

    def update(index):
        files = index["entries"]["tiny-la"]["1"]["files"]
        for rel in ("config.yaml", "evil.py"):
            data = (entry / rel).read_bytes()
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    rewrite(zoo, update)
    with pytest.raises(SegscaleError, match=r"model.name '.*evil.py:make' names code"):
        load_model(pull("tiny-la", zoo))
    assert not marker.exists()
    run = published[0]
    plugin = tmp_path / "run-plugin"
    import shutil

    shutil.copytree(run, plugin)
    config = yaml.safe_load((plugin / "config.yaml").read_text())
    config["model"]["name"] = f"{ROOT / 'tests' / 'plugins' / 'bilinear_net.py'}:bilinear_net"
    (plugin / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SegscaleError, match=r"model.name '.*bilinear_net' is your own code"):
        publish(plugin, "mine", tmp_path / "z3")
    assert not (tmp_path / "z3").exists()


def test_publish_checks_the_weights_and_keeps_the_index_whole(published, tmp_path, real_store):
    import shutil

    import yaml

    run = published[0]
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    config = yaml.safe_load((edited / "config.yaml").read_text())
    config["model"]["kwargs"]["base_channels"] = 8  # no longer the weights' architecture
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SegscaleError, match=r"model.pt: does not fit .*config.yaml's model: size"):
        publish(edited, "edited", tmp_path / "z1")
    assert not (tmp_path / "z1").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "model.pt").write_bytes((run / "model.pt").read_bytes()[:1000])
    with pytest.raises(SegscaleError, match=r"model.pt: not readable weights \(checksum mismatch"):
        publish(damaged, "damaged", tmp_path / "z1")
    # an index that cannot be written: nothing published, a retry is not blocked by a stray entry
    zoo = tmp_path / "z2"
    (zoo / "index.json").mkdir(parents=True)
    with pytest.raises(SegscaleError, match=r"index.json: cannot write it .*nothing published"):
        publish(run, "t", zoo)
    assert not (zoo / "t").exists()
    with pytest.raises(SegscaleError, match="publish writes into a folder"):
        publish(run, "t", "http://127.0.0.1:9/zoo")
    # versions: 1.0 is version 1; 3.0 is newer than 3.0rc1; published files readable by others
    zoo = tmp_path / "z4"
    publish(run, "t", zoo, version="1")
    with pytest.raises(
        SegscaleError, match=r"t@1 is already published \(the same version as 1.0\)"
    ):
        publish(run, "t", zoo, version="1.0")
    publish(run, "t", zoo, version="3.0rc1")
    publish(run, "t", zoo, version="3.0")
    assert [e["version"] for e in entries(zoo)] == ["1", "3.0rc1", "3.0"]
    assert pull("t@1.0", zoo).name == "1" and pull("t", zoo).name == "3.0"  # as publish counts
    assert (zoo / "t" / "3.0" / "model.safetensors").stat().st_mode & 0o044 == 0o044
    assert (zoo / "t" / "3.0").stat().st_mode & 0o055 == 0o055
    # names that one case-insensitive file system (macOS, Windows) would hold in one folder
    with pytest.raises(SegscaleError, match=r"holds 't', which differs from 'T' only in case"):
        publish(run, "T", zoo, version="9")
    # the licence is an SPDX expression, written in its canonical spelling
    for bad in ("not a licence!!", "proprietary", "CC-BY-4", " "):
        with pytest.raises(SegscaleError, match=r"not an SPDX licence expression"):
            publish(run, "t", zoo, version="10", licence=bad)
    publish(run, "t", zoo, version="10", licence="cc-by-4.0")
    publish(run, "t", zoo, version="11", licence="MIT OR LicenseRef-mine")
    licences = [e["licence"] for e in entries(zoo) if e["name"] == "t"][-2:]
    assert licences == ["CC-BY-4.0", "MIT OR LicenseRef-mine"]
    # SPDX identifiers are case-insensitive: written in SPDX's spelling
    assert spdx_licence("mit or licenseref-Mine") == "MIT OR LicenseRef-Mine"
    assert spdx_licence("licenseref-x") == "LicenseRef-x"
    # an alias that is no SPDX id is not taken for the licence it happens to map to
    with pytest.raises(SegscaleError, match=r"'GPL' is not an SPDX identifier \(read as GPL-1"):
        spdx_licence("GPL OR MIT")
    assert spdx_licence("gpl-2.0+") == "GPL-2.0-or-later"  # a deprecated id: one licence
    with pytest.raises(SegscaleError, match=r"zoo entry 't@': an empty version"):
        pull("t@", zoo)
    # a run folder, a store, the zoo inside the installed package: not zoos to publish into
    import segscale

    for folder in (run, real_store):
        with pytest.raises(
            SegscaleError, match=r"a run folder or a prepared store, not a zoo|is a "
        ):
            publish(run, "t2", folder)
    with pytest.raises(SegscaleError, match=r"--zoo .*t: inside the zoo .*z4; publish into"):
        publish(run, "t2", zoo / "t")  # an entry's folder: a zoo nested in an entry
    shipped = Path(segscale.__file__).parent / "resources" / "zoo"
    with pytest.raises(SegscaleError, match="the zoo shipped inside segscale"):
        publish(run, "t2", shipped)


def test_a_slow_server_is_given_up_on(published, cache, tmp_path, monkeypatch):
    """The 60 s timeout is per read: a server sending a byte every few seconds held `zoo list`
    for days. A download averaging under SLOWEST after its first minute is refused (the minute
    and the rate scaled down here)."""
    import time as clock

    from segscale import hub

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"{")
                self.wfile.flush()
                clock.sleep(0.1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    real = clock.monotonic
    monkeypatch.setattr(hub.time, "monotonic", lambda: real() * 200)  # a minute in 0.3 s
    try:
        with pytest.raises(SegscaleError, match=r"too slow \(under 10000 B/s\)"):
            entries(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    for zoo, message in (("", "give a zoo folder"), ("ftp://x/y", "ftp:// is not supported"),
                         ("http://[::1", "not a valid URL")):  # fmt: skip
        with pytest.raises(SegscaleError, match=message):
            entries(zoo)

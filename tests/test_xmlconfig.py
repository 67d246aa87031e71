"""Auto-CNNp XML configs (the thesis' Listing 4.1) load into the same validated config as YAML."""

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from segscale.config import load_config
from segscale.errors import ConfigError

EXAMPLE = ROOT / "examples" / "brats_unet_autocnnp.xml"


def test_listing_4_1_loads_into_the_run_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(EXAMPLE)
    assert cfg.name == "brats-unet-autocnnp" and cfg.workers == 3
    assert cfg.model.name == "unet" and cfg.train.strategy.name == "allreduce"
    assert (cfg.train.optimizer.name, cfg.train.optimizer.lr) == ("sgd", 1e-5)
    assert (cfg.train.loss.name, cfg.train.batch_size, cfg.train.epochs) == ("dice", 10, 120)
    assert cfg.train.callbacks[0].name == "examples/plugins/cyclic_lr.py:TriangularLR"
    assert cfg.data.store == ROOT / "prepared" / "brats_t1gd"
    assert load_config(EXAMPLE, ["train.epochs=3"]).train.epochs == 3


def test_convert_to_yaml_round_trips(tmp_path):
    out = tmp_path / "c.yaml"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "segscale.cli",
            "config",
            "convert",
            str(EXAMPLE),
            "--to",
            "yaml",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(out.read_text())["workers"] == 3
    a, b = load_config(out), load_config(EXAMPLE)
    assert a.model_dump(exclude={"data"}) == b.model_dump(exclude={"data"})


def write(tmp_path, body: str):
    path = tmp_path / "c.xml"
    path.write_text(body)
    return path


def test_entities_are_refused(tmp_path):
    bomb = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<system_config><task name="imaging_segmentation"><CNN_archi><name>&lol2;</name></CNN_archi></task></system_config>"""
    with pytest.raises(ConfigError, match="refused"):
        load_config(write(tmp_path, bomb))


def test_bad_xml_configs_say_what_and_where(tmp_path):
    base = EXAMPLE.read_text()
    with pytest.raises(
        ConfigError,
        match=r"unknown hyperparameter 'minibach_size' \(did you mean 'minibatch_size'\?\)",
    ):
        load_config(write(tmp_path, base.replace('"minibatch_size"', '"minibach_size"')))
    with pytest.raises(ConfigError, match="device_placement 'round_robin'"):
        load_config(
            write(tmp_path, base.replace("<value>local_rank</value>", "<value>round_robin</value>"))
        )
    with pytest.raises(ConfigError, match="not a valid int"):
        load_config(write(tmp_path, base.replace(">10<", ">ten<")))
    with pytest.raises(ConfigError, match="not well-formed XML"):
        load_config(write(tmp_path, "<system_config><task>"))
    with pytest.raises(ConfigError, match=r"key 'train.batch_size'.*greater than 0"):
        load_config(write(tmp_path, base.replace(">10<", ">0<")))

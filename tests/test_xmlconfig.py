"""Auto-CNNp XML configs (the thesis' Listing 4.1) load into the same validated config as YAML."""

import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from segscale.config import load_config
from segscale.errors import ConfigError, SegscaleError

EXAMPLE = ROOT / "examples" / "brats_unet_autocnnp.xml"


def test_listing_4_1_loads_into_the_run_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(EXAMPLE)
    assert cfg.name == "brats-unet-autocnnp" and cfg.workers == 3
    assert cfg.model.name == "unet" and cfg.train.strategy.name == "allreduce"
    assert (cfg.train.optimizer.name, cfg.train.optimizer.lr) == ("sgd", 1e-5)
    assert (cfg.train.loss.name, cfg.train.batch_size, cfg.train.epochs) == ("dice", 10, 120)
    # the plug-in file is found from the working directory, and named absolutely from then on
    assert cfg.train.callbacks[0].name == f"{ROOT}/examples/plugins/cyclic_lr.py:TriangularLR"
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
    written = yaml.safe_load(out.read_text())
    assert written["workers"] == 3
    # paths as the XML wrote them, relative to the working directory: the YAML is as portable
    assert written["data"]["store"] == "prepared/brats_t1gd"
    assert written["train"]["callbacks"][0]["name"] == "examples/plugins/cyclic_lr.py:TriangularLR"
    assert load_config(out).model_dump() == load_config(EXAMPLE).model_dump()


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
    # numbers as XML writes them: Python's own parse also took '1_0' and Arabic-Indic digits
    for ten in ("ten", "1_0", "\u0661\u0660", "1e1"):
        with pytest.raises(
            ConfigError,
            match=r"minibatch_size\">: key 'train.batch_size': expected a whole number, got",
        ):
            load_config(write(tmp_path, base.replace(">10<", f">{ten}<")))
    with pytest.raises(ConfigError, match="not well-formed XML"):
        load_config(write(tmp_path, "<system_config><task>"))
    # errors name the file's element, beside the key it sets
    with pytest.raises(
        ConfigError,
        match=r"\.xml <property name=\"minibatch_size\">: key 'train.batch_size': expected a value > 0",
    ):
        load_config(write(tmp_path, base.replace(">10<", ">0<")))
    with pytest.raises(ConfigError, match=r"\.xml <parallelism-degree>: key 'workers'"):
        load_config(write(tmp_path, base.replace(">3</parallelism", ">x</parallelism")))
    # read as whole numbers are written (was: 1_0 taken as 10, here and in <task seed=...>)
    with pytest.raises(ConfigError, match=r"<parallelism-degree>: key 'workers': expected a whole"):
        load_config(write(tmp_path, base.replace(">3</parallelism", ">1_0</parallelism")))
    with pytest.raises(ConfigError, match=r"<task seed=\"...\">: key 'seed': expected a whole"):
        load_config(
            write(tmp_path, base.replace('run="brats-unet-autocnnp"', 'run="b" seed="1_0"'))
        )
    # start_epoch too: 00 is 0 (was refused as not 0), x is no number (was: "runs start at 0")
    start = '<property name="start_epoch">0<'
    assert start in base
    load_config(write(tmp_path, base.replace(start, start.replace(">0<", ">00<"))))
    for bad in ("x", ""):
        with pytest.raises(
            ConfigError, match=r"start_epoch\">: key 'start_epoch': expected a whole"
        ):
            load_config(write(tmp_path, base.replace(start, start.replace(">0<", f">{bad}<"))))
    with pytest.raises(ConfigError, match=r"start_epoch: runs start at 0; continue a run with"):
        load_config(write(tmp_path, base.replace(start, start.replace(">0<", ">+3<"))))
    adam = base.replace("SGD", "adam").replace(
        '<property name="lr">', '<property name="momentum">0.9</property><property name="lr">'
    )
    with pytest.raises(
        ConfigError, match=r"\.xml <property name=\"momentum\">: key 'train.optimizer': adam has"
    ):
        load_config(write(tmp_path, adam))
    # an override is named where it set the value; the file's element where it did
    with pytest.raises(ConfigError, match=r"^override 'train.batch_size=0': key"):
        load_config(write(tmp_path, base), ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"\.xml <property name=\"momentum\">: key"):
        load_config(write(tmp_path, adam), ["train.optimizer.lr=0.1"])


THESIS_LISTING = """<system_config>
  <task name="imaging_segmentation" run="thesis">
    <parallelism-degree>1</parallelism-degree>
    <CNN_archi><path>{path}</path></CNN_archi>
    <CNN-Parallelism-Generator>
      <module name="train_env_def">
        <action class="non_extensible" type="device_placement"><value>local_rank</value></action>
      </module>
      <module name="train_srategy_def">
        <action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>
      </module>
    </CNN-Parallelism-Generator>
    <data><store>{store}</store></data>
    <hyperparameters>
      <property name="lr">0.01</property> <property name="optimiser">SGD</property>
      <property name="loss">dice</property> <property name="minibatch_size">4</property>
      <property name="start_epoch">0</property> <property name="end_epoch">1</property>
    </hyperparameters>
  </task>
</system_config>
"""

NETWORK = """import torch


def conv(cin, cout):
    return torch.nn.Conv2d(cin, cout, 3, padding=1)


class UNet(torch.nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(conv(in_channels, 4), torch.nn.ReLU(), conv(4, num_classes))

    def forward(self, x):
        return self.body(x)
"""


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "<hyperparameters>",
            "<hyperparameters><param name='lr'>9</param>",
            r"unknown element <param> in <hyperparameters>",
        ),
        (
            "<name>unet</name>",
            "<name>unet</name><kwargs>x</kwargs>",
            r"unknown element <kwargs> in <CNN_archi>",
        ),
        (
            '<module name="train_strategy_def">',
            '<modul name="x"/><module name="train_strategy_def">',
            r"unknown element <modul> \(did you mean .module.\?\) in <CNN-Parallelism-Generator>",
        ),
        ('type="dist_strategy"', 'typ="dist_strategy"', r"<action>: unknown attribute 'typ'"),
        (
            'run="brats-unet-autocnnp"',
            'run="b" sed="5"',
            r"<task>: unknown attribute 'sed' \(did you mean 'seed'\?\)",
        ),
        (
            "</task>",
            "</task><task name='imaging_segmentation'/>",
            r"<task> given twice in <system_config>",
        ),
        (
            "<hyperparameters>",
            "<hyperparameters/><hyperparameters>",
            r"<hyperparameters> given twice",
        ),
        (
            '<property name="lr">1e-5</property>',
            '<property name="lr">1e-5</property><property name="lr">9</property>',
            r"hyperparameter 'lr' given twice",
        ),
        (
            "<name>unet</name>",
            "<name>unet</name><path>x.py</path>",
            r"<name> \(built-in\) or <path> .*not both",
        ),
        ("<data>", "<data><store>prepared/x</store>", r"give <store> alone"),
        ('type="dist_strategy"', "", r"an <action> without type="),
        (
            '<property name="optimiser">SGD</property>',
            '<property name="optimiser">SGD</property><property name="optimizer">adam</property>',
            r"'optimizer' sets train.optimizer.name, which 'optimiser' sets already",
        ),
        (
            'run="brats-unet-autocnnp"',
            'run="brats-unet-autocnnp" seed="abc"',
            r"<task seed=\"...\">: key 'seed'",
        ),
        # each was written into the YAML without a word: the second strategy dropped, a
        # callback named 'file.py:None', an empty strategy name
        (
            "<value>ring_allreduce</value>",
            "<value>ring_allreduce</value><value>local_sgd</value>",
            r"action 'dist_strategy': 2 <value>s; it takes one",
        ),
        ('name="TriangularLR"', "", r"Tr_Checkpoint: each <value name=.* needs its class name"),
        ("<value>ring_allreduce</value>", "<value></value>", r"dist_strategy: an empty <value>"),
        (
            "<value>ring_allreduce</value>",
            '<value name="foo">ring_allreduce</value>',
            r"action 'dist_strategy': <value name=...> names a plug-in class of Tr_Checkpoint",
        ),
        (
            "<valid><path>prepared/brats_t1gd</path></valid>",
            "<valid><path></path></valid>",
            r"<data><valid><path> is empty",
        ),
        # read by nothing, and accepted without a word: a class no action has, stray text, an
        # empty parallelism degree (the default worker count taken instead)
        (
            'class="extensible" type="dist_strategy"',
            'class="bogus" type="dist_strategy"',
            r"action 'dist_strategy': class=\"bogus\"; it is extensible",
        ),
        (
            'class="non_extensible" type="device_placement"',
            'class="extensible" type="device_placement"',
            r"action 'device_placement': class=\"extensible\"; it is non_extensible",
        ),
        ("<CNN_archi><name>", "<CNN_archi>junk<name>", r"<CNN_archi>: stray text 'junk'"),
        ("</name></CNN_archi>", "</name>tail</CNN_archi>", r"stray text 'tail' after <name>"),
        (
            "<parallelism-degree>3</parallelism-degree>",
            "<parallelism-degree> </parallelism-degree>",
            r"<parallelism-degree>: empty",
        ),
    ],
)
def test_an_xml_config_holds_nothing_that_would_be_dropped_without_a_word(
    tmp_path, monkeypatch, old, new, message
):
    monkeypatch.chdir(ROOT)
    body = EXAMPLE.read_text()
    assert old in body
    path = write(tmp_path, body.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("<name>unet</name>", "<name>unetz</name>", r"<CNN_archi>: unknown model 'unetz'"),
        (">dice<", ">dicez<", r"<property name=\"loss\">: unknown loss 'dicez'"),
        (">SGD<", ">SGDz<", r"<property name=\"optimiser\">: unknown optimizer 'sgdz'"),
        ("ring_allreduce", "ringz", r"<action type=\"dist_strategy\">: unknown strategy 'ringz'"),
        ('"TriangularLR"', '"TriangularLRz"', r"<action type=\"Tr_Checkpoint\">: .*TriangularLRz"),
    ],
)
def test_an_unknown_part_names_the_element_that_set_it(tmp_path, monkeypatch, old, new, message):
    from segscale.engine import check_components

    monkeypatch.chdir(ROOT)
    body = EXAMPLE.read_text()
    assert old in body
    path = write(tmp_path, body.replace(old, new, 1))
    with pytest.raises(SegscaleError, match=f"^{re.escape(str(path))} {message}"):
        check_components(load_config(path))


def test_the_thesis_data_paths_name_the_stores_they_give(tmp_path, monkeypatch):
    """<train>, <valid> and <test> naming other stores was told to 'give <store>', though the
    thesis' form is read: the message names each path."""
    monkeypatch.chdir(ROOT)
    body = EXAMPLE.read_text()
    old = "<valid><path>prepared/brats_t1gd</path></valid>"
    assert old in body
    path = write(tmp_path, body.replace(old, "<valid><path>prepared/other</path></valid>"))
    with pytest.raises(ConfigError, match=r"<train> prepared/brats_t1gd, <valid> prepared/other"):
        load_config(path)
    # one folder however its path is written (was: "a different store")
    for same in ("prepared/brats_t1gd/", "./prepared/brats_t1gd", ROOT / "prepared/brats_t1gd"):
        load_config(write(tmp_path, body.replace(old, f"<valid><path>{same}</path></valid>")))
    data = body[body.index("<data>") : body.index("</data>") + 7]
    path = write(tmp_path, body.replace(data, "<data></data>"))
    with pytest.raises(ConfigError, match=r"<data>: no store; give <store>path</store>"):
        load_config(path)


def test_the_thesis_listing_as_written_plans_and_trains(tmp_path, real_store):
    """`<CNN_archi><path>.../U-Net.py</path>` (a file, no factory name) and the module spelt
    `train_srategy_def`, as Listing 4.1 writes them (was: 'name the factory too')."""
    from segscale import worker
    from segscale.engine import plan, prepare_run_dir

    network = tmp_path / "archi" / "U-Net.py"
    network.parent.mkdir()
    network.write_text(NETWORK)
    xml = tmp_path / "thesis.xml"
    xml.write_text(THESIS_LISTING.format(path=network, store=real_store))
    cfg = load_config(xml, ["train.steps_per_epoch=1", "tracker=none"])
    p = plan(cfg)
    p.check(1)
    assert type(p.model()).__name__ == "UNet"
    prepare_run_dir(cfg, tmp_path / "run", resume=False)
    assert len(worker.train(tmp_path / "run", progress=False)) == 1

    xml.write_text(THESIS_LISTING.format(path="unet", store=real_store))  # a built-in name
    assert load_config(xml).model.name == "unet"

    two = tmp_path / "archi" / "two.py"
    two.write_text(NETWORK + "\n\nclass Other(UNet):\n    pass\n")
    xml.write_text(THESIS_LISTING.format(path=two, store=real_store))
    with pytest.raises(SegscaleError, match=r"two.py: defines UNet, Other; name the factory"):
        plan(load_config(xml))


def test_a_seed_given_twice_in_xml_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    body = EXAMPLE.read_text().replace('run="brats-unet-autocnnp"', 'run="b" seed="3"')
    body = body.replace("<hyperparameters>", '<hyperparameters><property name="seed">7</property>')
    with pytest.raises(ConfigError, match=r"'seed' sets seed, which <task seed=...> sets already"):
        load_config(write(tmp_path, body))


def test_config_convert_checks_the_names_it_writes(tmp_path):
    """The help says "validated YAML", yet an unknown model, optimiser, loss or strategy was
    written with exit 0 and refused only by `plan`; FCN was kept upper-case (refused) while SGD
    was lowered."""
    body = EXAMPLE.read_text()
    for old, new, message in (
        ("<name>unet</name>", "<name>unett</name>", r"unknown model 'unett' \(did you mean 'unet'"),
        (">SGD<", ">rmspropx<", r"unknown optimizer 'rmspropx'"),
        ("<value>ring_allreduce</value>", "<value>horovod</value>", r"unknown strategy 'horovod'"),
    ):
        assert old in body
        path = write(tmp_path, body.replace(old, new))
        r = subprocess.run(
            [sys.executable, "-m", "segscale.cli", "config", "convert", str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 2 and re.search(message, r.stderr), r.stderr
    path = write(
        tmp_path,
        body.replace("<name>unet</name>", "<name>FCN</name>").replace(
            "<value>ring_allreduce</value>", "<value>RING_ALLREDUCE</value>"
        ),
    )
    r = subprocess.run(
        [sys.executable, "-m", "segscale.cli", "config", "convert", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    written = yaml.safe_load(r.stdout)
    assert written["model"]["name"] == "fcn" and written["train"]["strategy"]["name"] == "allreduce"
    from segscale.xmlconfig import _builtin_lower

    assert _builtin_lower("archi/Net.PY") == "archi/Net.PY" and _builtin_lower("SGD") == "sgd"

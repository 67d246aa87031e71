import inspect
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import tiny_config
from segscale.errors import SegscaleError
from segscale.models import UNet, create_model
from segscale.registry import (
    LOSSES,
    MODELS,
    OPTIMIZERS,
    STRATEGIES,
    source_signature,
)


def test_builtin_module_and_file_paths(tmp_path):
    assert MODELS.resolve("unet") is UNet
    assert MODELS.resolve("segscale.models.unet:UNet") is UNet
    plugin = tmp_path / "net.py"
    plugin.write_text(
        "import torch\ndef make(in_channels, num_classes, width=3):\n    return torch.nn.Conv2d(in_channels, num_classes, width, padding=1)\n"
    )
    model = create_model(f"{plugin}:make", 2, 3, width=5)
    assert model.kernel_size == (5, 5) and model.in_channels == 2 and model.out_channels == 3


def test_unknown_names_and_paths_are_clear():
    with pytest.raises(SegscaleError, match=r"unknown model 'unnet' \(did you mean 'unet'\?\)"):
        MODELS.resolve("unnet")
    with pytest.raises(SegscaleError, match=r"cannot import module 'no_such_pkg\.mod'"):
        MODELS.resolve("no_such_pkg.mod:f")
    with pytest.raises(SegscaleError, match="has no attribute 'Nope'"):
        MODELS.resolve("segscale.models.unet:Nope")
    with pytest.raises(SegscaleError, match="plugin file not found"):
        MODELS.resolve("/no/such/file.py:f")


def test_kwargs_that_do_not_bind_are_refused(real_store):
    from segscale.config import validate
    from segscale.engine import plan

    unet = tiny_config(real_store)
    unet["model"] = {"name": "unet", "kwargs": {"base_width": 8}}
    with pytest.raises(
        SegscaleError, match=r"model 'unet' kwargs \['base_width'\].*accepted: .*base_channels"
    ):
        plan(validate(unet))


@pytest.mark.parametrize("registry", [MODELS, LOSSES, OPTIMIZERS, STRATEGIES], ids=lambda r: r.kind)
def test_builtin_signatures_read_from_source_match_the_imported_objects(registry):
    """Built-ins are checked from their source (no torch import); that reading must agree with
    inspect on the real object: names, kinds and which parameters have defaults."""

    def shape(sig):
        return [(p.name, p.kind, p.default is p.empty) for p in sig.parameters.values()]

    for name in registry.names():
        path = registry.path(name)
        assert path is not None  # declared by path, imported on first use
        from_source = source_signature(path)
        if path.startswith("segscale."):
            assert from_source is not None, path
            assert shape(from_source) == shape(inspect.signature(registry.resolve(name))), path


def test_planning_a_run_imports_no_torch(real_store, tmp_path):
    """`segscale plan` checks every built-in component without importing torch (~2 s), the
    tracker (MLflow, ~1 s) or the image readers."""
    config = tmp_path / "c.yaml"
    cfg = tiny_config(real_store, loss="ce")
    cfg["task"] = "classification"
    cfg["model"] = {"name": "cnn", "kwargs": {}}
    config.write_text(yaml.safe_dump(cfg))
    code = (
        "import sys\n"
        "from segscale.config import load_config\n"
        "from segscale.engine import plan\n"
        f"plan(load_config({str(config)!r})).describe()\n"
        "heavy = {'torch', 'mlflow', 'nibabel', 'pydicom', 'PIL'} & set(sys.modules)\n"
        "assert not heavy, f'{heavy} imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bad_model_option_values_fail_before_any_worker_starts(real_store, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(real_store)))
    cmd = [sys.executable, "-m", "segscale.cli", "train", str(config), "model.name=resunet"]
    cmd.append("model.kwargs={act: gelu}")
    r = subprocess.run(
        [*cmd, "--workers", "2", "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "unknown act 'gelu'" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_user_optimizer_by_path(real_store, tmp_path):
    plugin = tmp_path / "opt.py"
    plugin.write_text(
        "import torch\n"
        "def rmsprop(params, cfg):\n"
        "    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum)\n"
    )
    from segscale.config import validate
    from segscale.engine import plan

    cfg = tiny_config(real_store)
    cfg["train"]["optimizer"] = {"name": f"{plugin}:rmsprop", "lr": 0.01}
    p = plan(validate(cfg))
    assert p.describe()["training_strategy"]["optimizer"]["source"] == "user"
    model = create_model("unet", 1, 2, base_channels=4, depth=2)
    opt = OPTIMIZERS.resolve(p.cfg.train.optimizer.name)(model.parameters(), p.cfg.train.optimizer)
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["momentum"] == 0.9
    cfg["train"]["optimizer"]["name"] = "adamm"
    with pytest.raises(SegscaleError, match=r"unknown optimizer 'adamm' \(did you mean 'adam'\?\)"):
        plan(validate(cfg))


def test_kwargs_of_the_wrong_type_are_refused_before_anything_is_built(real_store, tmp_path):
    """A kwarg that does not fit its annotation is one line naming it, read from the source of
    built-ins (plan imports no torch) and from the signature of a user's plug-in (was: whatever
    the factory raised once called, e.g. "AttributeError: 'float' object has no attribute
    'items'" for early_stop's reference curve given as one number)."""
    from segscale.config import validate
    from segscale.engine import plan

    def planned(**parts):
        cfg = tiny_config(real_store)
        for key, value in parts.items():
            section, _, name = key.rpartition(".")
            (cfg[section] if section else cfg)[name] = value
        return plan(validate(cfg))

    early = {"name": "early_stop", "kwargs": {"reference": 0.5}}
    with pytest.raises(SegscaleError, match=r"callback 'early_stop' kwargs: reference 0.5 does "):
        planned(**{"train.callbacks": [early]})
    early["kwargs"] = {"reference": {1: 0.5}, "patience": 2.5}
    with pytest.raises(
        SegscaleError, match=r"patience 2.5 does not fit int \(expected a whole number\)"
    ):
        planned(**{"train.callbacks": [early]})
    with pytest.raises(SegscaleError, match=r"model 'unet' kwargs: base_channels 'abc' does not"):
        planned(model={"name": "unet", "kwargs": {"base_channels": "abc"}})
    # read leniently, a quoted number reached the factory as text: a crash after the first epoch
    for given in ({"margin": "0.1"}, {"patience": "3"}, {"margin": {1: "0.1"}}, {"after": True}):
        early["kwargs"] = {"reference": {1: 0.5}, **given}
        with pytest.raises(
            SegscaleError, match=r"it would reach the factory as (str|bool|dict); write"
        ):
            planned(**{"train.callbacks": [early]})
    early["kwargs"] = {"reference": {"1": 0.5, 2: 1}, "margin": {1: 0}, "patience": 2}
    planned(**{"train.callbacks": [early]})  # lax, as the config: 1 fits float, "1" a key
    plugin = tmp_path / "net.py"
    plugin.write_text(
        "from __future__ import annotations\n"
        "import torch\n"
        "def net(in_channels, num_classes, width: int = 4, scale: torch.Tensor | None = None,"
        " sizes: tuple[int, int] = (1, 2)):\n"
        "    return torch.nn.Conv2d(in_channels, num_classes, 1)\n"
    )
    # text read as a Path or an Enum is what such a plug-in takes (was refused as "a quoted
    # number"); None for an argument whose default is None, as research code writes it
    typed = tmp_path / "typed.py"
    typed.write_text(
        "import enum\nfrom pathlib import Path\nimport torch\n"
        "class Mode(str, enum.Enum):\n    slow = 'slow'\n"
        "def net(in_channels, num_classes, path: Path = Path('.'), mode: Mode = Mode.slow,"
        " width: float = None):\n    return torch.nn.Conv2d(in_channels, num_classes, 1)\n"
    )
    planned(model={"name": f"{typed}:net", "kwargs": {"path": "out/dir", "mode": "slow"}})
    planned(model={"name": f"{typed}:net", "kwargs": {"width": None}})
    with pytest.raises(SegscaleError, match=r"base_channels 8.0 does not fit int .* write 8\)"):
        planned(model={"name": "unet", "kwargs": {"base_channels": 8.0}})  # torch's error later
    # a type beyond plain data is the plug-in's to check; a YAML list fits a tuple
    planned(model={"name": f"{plugin}:net", "kwargs": {"scale": "x", "sizes": [3, 4]}})
    with pytest.raises(SegscaleError, match=r"net' kwargs: width \[4\] does not fit int"):
        planned(model={"name": f"{plugin}:net", "kwargs": {"width": [4]}})
    # the fix is said as YAML writes it: [1, 2], not (1, 2), which YAML reads as text
    with pytest.raises(SegscaleError, match=r"sizes \[1, '2'\] .* as list; write \[1, 2\]\)"):
        planned(model={"name": f"{plugin}:net", "kwargs": {"sizes": [1, "2"]}})

import pytest

from segscale.errors import SegscaleError
from segscale.models import UNet, create_model
from segscale.registry import MODELS, Registry


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


def test_kwargs_that_do_not_bind_are_refused():
    with pytest.raises(
        SegscaleError, match=r"model 'unet' kwargs \['base_width'\].*accepted: .*base_channels"
    ):
        create_model("unet", 1, 2, base_width=8)


def test_duplicate_registration_is_an_error():
    reg = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)

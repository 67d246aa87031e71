import pytest
import torch

from segscale.errors import SegscaleError
from segscale.models import FCN8s, create_model
from segscale.registry import MODELS

TINY = {
    "unet": {"base_channels": 4, "depth": 3},
    "resunet": {"base_channels": 4, "depth": 3},
    "fcn": {"width": 1 / 16, "fc_channels": 16},
    "cnn": {"base_channels": 4, "depth": 2},
}
CLASSIFIERS = {"cnn"}  # one class per image, not per pixel


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_runs_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, 2, 3, **TINY[name])
    x = torch.randn(2, 2, 64, 48)
    out = model(x)
    assert out.shape == ((2, 3) if name in CLASSIFIERS else (2, 3, 64, 48))
    out.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_unet_default_widths_follow_ronneberger():
    model = create_model("unet", 1, 2)
    widths = [block[0].out_channels for block in model.down]
    assert widths == [64, 128, 256, 512, 1024]


def test_unet_rejects_sizes_not_divisible_by_its_depth():
    with pytest.raises(ValueError, match="divisible by 8"):
        create_model("unet", 1, 2, base_channels=4, depth=3)(torch.zeros(1, 1, 36, 40))


def test_fcn_has_sixteen_conv_layers_and_handles_any_size():
    model = FCN8s(1, 2, width=1 / 16, fc_channels=8)
    convs = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m not in (model.score_pool3, model.score_pool4)
    ]
    assert len(convs) == 16
    assert model(torch.zeros(1, 1, 50, 70)).shape == (1, 2, 50, 70)


def test_fcn_loads_torchvision_vgg16_weights(tmp_path):
    """A state dict with torchvision's vgg16() key layout initialises the encoder (grey input:
    the RGB filters averaged); fc6/fc7 are taken when their sizes match."""
    source = FCN8s(3, 2, fc_channels=64)
    state = {f"features.{k}": v.clone() for k, v in source.features.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(64, 512 * 7 * 7)
    state["classifier.0.bias"] = torch.randn(64)
    state["classifier.3.weight"] = torch.randn(64, 64)
    state["classifier.3.bias"] = torch.randn(64)
    torch.save(state, tmp_path / "vgg16.pth")
    model = FCN8s(1, 2, fc_channels=64, pretrained=str(tmp_path / "vgg16.pth"))
    assert torch.equal(model.features[2].weight, state["features.2.weight"])
    assert torch.allclose(
        model.features[0].weight, state["features.0.weight"].mean(1, keepdim=True) * 3
    )
    assert torch.equal(model.fc6[0].weight.flatten(1), state["classifier.0.weight"])
    with pytest.raises(SegscaleError, match=r"width must be 1\.0"):
        FCN8s(3, 2, width=0.5, fc_channels=64, pretrained=str(tmp_path / "vgg16.pth"))
    with pytest.raises(SegscaleError, match="not found"):
        FCN8s(3, 2, pretrained=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("act", ["relu", "prelu", "leaky_relu"])
@pytest.mark.parametrize("decoder_convs", [1, 2])
def test_resunet_activation_and_decoder_options(act, decoder_convs):
    model = create_model(
        "resunet", 1, 2, base_channels=4, depth=2, act=act, decoder_convs=decoder_convs
    )
    convs_per_decoder_unit = sum(isinstance(m, torch.nn.Conv2d) for m in model.up[0][3].body)
    assert convs_per_decoder_unit == decoder_convs
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_resunet_rejects_unknown_options_when_built():
    with pytest.raises(SegscaleError, match=r"unknown act .gelu. \(relu \| prelu \| leaky_relu\)"):
        create_model("resunet", 1, 2, act="gelu")
    with pytest.raises(SegscaleError, match="decoder_convs must be 1 or 2"):
        create_model("resunet", 1, 2, decoder_convs=3)


def test_a_unet_too_deep_or_too_wide_to_build_is_refused_before_it_fills_memory():
    with pytest.raises(SegscaleError, match="depth must be 1 to 10"):
        create_model("unet", 1, 2, base_channels=4, depth=20)
    with pytest.raises(SegscaleError, match="65536 channels at the bottom; at most 16384"):
        create_model("resunet", 1, 2, base_channels=64, depth=10)

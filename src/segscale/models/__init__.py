"""The model registry: every factory takes in_channels and num_classes, plus its own kwargs."""

from __future__ import annotations

from typing import Any

from torch import nn

from segscale.errors import SegscaleError
from segscale.models.fcn import FCN8s
from segscale.models.unet import ResUNet, UNet
from segscale.registry import MODELS, check_kwargs

MODELS.register("unet")(UNet)
MODELS.register("resunet")(ResUNet)
MODELS.register("fcn")(FCN8s)


def create_model(spec: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    factory = MODELS.resolve(spec)
    check_kwargs(factory, kwargs, spec)
    model = factory(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise SegscaleError(
            f"model '{spec}' returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


__all__ = ["FCN8s", "ResUNet", "UNet", "create_model"]

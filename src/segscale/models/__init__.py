"""Models: every factory takes in_channels and num_classes, plus its own kwargs (the built-in
names are in segscale.registry.MODELS)."""

from __future__ import annotations

from typing import Any

from torch import nn

from segscale.errors import SegscaleError
from segscale.models.cnn import SmallCNN
from segscale.models.fcn import FCN8s
from segscale.models.unet import ResUNet, UNet
from segscale.registry import MODELS


def create_model(spec: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered or user model. Its kwargs were checked against the factory's signature
    by segscale.engine.plan; a bad option value (ValueError, TypeError) is a user error here."""
    try:
        model = MODELS.resolve(spec)(in_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise SegscaleError(f"model '{spec}' kwargs {kwargs}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SegscaleError(
            f"model '{spec}' returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


__all__ = ["FCN8s", "ResUNet", "SmallCNN", "UNet", "create_model"]

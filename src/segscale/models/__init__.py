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
    except SegscaleError:
        raise
    except (TypeError, ValueError) as e:  # an option value the factory refuses
        raise SegscaleError(f"model '{spec}' kwargs {kwargs}: {e}") from None
    except Exception as e:  # whatever else a user's factory raises: one line, not a traceback
        raise SegscaleError(f"model '{spec}' kwargs {kwargs}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SegscaleError(
            f"model '{spec}' returned {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a model's encoder: the submodules its `encoder_modules` attribute names
    (the built-in models declare theirs), else its submodule called `encoder`. Raises
    SegscaleError when the model declares neither."""
    names = getattr(model, "encoder_modules", None)
    if names is None and isinstance(getattr(model, "encoder", None), nn.Module):
        names = ("encoder",)
    if not names:
        raise SegscaleError(
            f"{type(model).__name__} has no encoder that segscale can find: give the class an "
            "`encoder_modules` tuple naming its encoder submodules, or a submodule `encoder`"
        )
    params: list[nn.Parameter] = []
    for name in names:
        try:
            params.extend(model.get_submodule(name).parameters())
        except AttributeError:
            raise SegscaleError(
                f"{type(model).__name__}.encoder_modules names '{name}', which it does not have"
            ) from None
    return params


__all__ = ["FCN8s", "ResUNet", "SmallCNN", "UNet", "create_model", "encoder_parameters"]

"""A user architecture, plugged in by path: `model: {name: examples/plugins/tiny_net.py:tiny_net}`.

Any factory taking in_channels and num_classes (plus its own keyword arguments) and returning a
torch.nn.Module works; segscale fills in_channels and num_classes from the prepared store.
"""

from torch import nn


def tiny_net(
    in_channels: int, num_classes: int, width: int = 16, dilations: tuple[int, ...] = (1, 2, 4, 8)
) -> nn.Module:
    """A small context-aggregation network: dilated 3×3 convolutions at full resolution (no pooling,
    so any input size works), then a 1×1 classifier."""
    layers: list[nn.Module] = []
    channels = in_channels
    for d in dilations:
        layers += [
            nn.Conv2d(channels, width, 3, padding=d, dilation=d),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        channels = width
    layers.append(nn.Conv2d(width, num_classes, 1))
    return nn.Sequential(*layers)

"""U-Nets: the thesis' Ronneberger-style U-Net, and a lighter residual variant."""

from __future__ import annotations

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}' (batch | instance | none)")


def _act(kind: str, channels: int) -> nn.Module:
    # ReLU by default: PReLU's backward is a large share of a CPU training step, for no Dice gain
    # (docs/performance.md, "Time-to-Dice")
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    raise ValueError(f"unknown act '{kind}' (relu | prelu | leaky_relu)")


class DoubleConv(nn.Sequential):
    """(3×3 conv → norm → ReLU) × 2, as in Ronneberger et al. (with padding, so sizes match)."""

    def __init__(self, cin: int, cout: int, norm: str, dropout: float = 0.0) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout else nn.Identity(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        )


def _check_size(base_channels: int, depth: int) -> None:
    """Refuse a U-Net that cannot be built or used: depth 1 to 10 (2^10 takes a 1024-px side down
    to 1) and at most 16384 channels at the bottom (base·2^depth), past which its weights alone
    fill any memory. Raises ValueError."""
    if not 1 <= depth <= 10 or base_channels < 1:
        raise ValueError("depth must be 1 to 10 and base_channels at least 1")
    if base_channels * 2**depth > 16384:
        raise ValueError(
            f"base_channels {base_channels} and depth {depth} give {base_channels * 2**depth} "
            "channels at the bottom; at most 16384"
        )


class UNet(nn.Module):
    """Ronneberger U-Net: `depth` max-pool downsamplings, widths base·2^i (64 → 1024 by default),
    transposed-conv upsampling and skip concatenation. Input sides must be divisible by 2^depth."""

    encoder_modules = ("down",)  # the contracting path, bottleneck included (train.finetune)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        base_channels: int = 64,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_size(base_channels, depth)
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList([DoubleConv(in_channels, widths[0], norm)])
        for i in range(depth):  # dropout at the bottom, as in the original U-Net
            self.down.append(
                DoubleConv(widths[i], widths[i + 1], norm, dropout if i == depth - 1 else 0)
            )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.decode = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i], norm) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x, 2**self.depth)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, decode in zip(self.up, self.decode):
            x = decode(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


class ResUnit(nn.Module):
    """`convs` 3×3 convs (1 or 2) with a residual shortcut; the first may stride 2 to downsample."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        norm: str,
        dropout: float,
        act: str = "relu",
        convs: int = 2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            _norm(norm, cout),
        ]
        if convs == 2:
            layers += [
                _act(act, cout),
                nn.Dropout2d(dropout) if dropout else nn.Identity(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                _norm(norm, cout),
            ]
        self.body = nn.Sequential(*layers)
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Conv2d(
                cin,
                cout,
                1 if stride == 1 else 3,
                stride=stride,
                padding=0 if stride == 1 else 1,
                bias=False,
            )
        )
        self.act = _act(act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class ResUNet(nn.Module):
    """A light residual U-Net for fast training (the default for users; `unet` stays for the
    thesis' experiments). The first unit already strides by 2 and the last stage upsamples straight
    to a thin full-resolution head, so almost no convolution runs at full resolution: several
    times more images per second than the Ronneberger U-Net of the same width. Encoder units have
    two convolutions, decoder units `decoder_convs` (one by default: as accurate in
    benchmarks/time_to_dice.py, and faster)."""

    encoder_modules = ("down", "bottom")  # the encoder and its bottleneck (train.finetune)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        base_channels: int = 16,
        depth: int = 3,
        norm: str = "instance",
        act: str = "relu",
        dropout: float = 0.0,
        decoder_convs: int = 1,
    ) -> None:
        super().__init__()
        _check_size(base_channels, depth)
        if decoder_convs not in (1, 2):
            raise ValueError(f"decoder_convs must be 1 or 2, not {decoder_convs}")
        _norm(norm, 1), _act(act, 1)  # fail on a bad name here, not deep in the layers
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList(
            ResUnit(in_channels if i == 0 else widths[i - 1], widths[i], 2, norm, dropout, act)
            for i in range(depth)
        )
        self.bottom = ResUnit(widths[depth - 1], widths[depth], 1, norm, dropout, act)
        self.up = nn.ModuleList()
        cin = widths[depth]
        for i in reversed(range(1, depth)):  # concat(skip_i, x) → upsample to level i-1
            w = widths[i - 1]
            self.up.append(
                nn.Sequential(
                    nn.ConvTranspose2d(cin + widths[i], w, 2, stride=2, bias=False),
                    _norm(norm, w),
                    _act(act, w),
                    ResUnit(w, w, 1, norm, 0.0, act, convs=decoder_convs),
                )
            )
            cin = w
        self.head = nn.Sequential(
            nn.ConvTranspose2d(cin + widths[0], base_channels, 2, stride=2),
            _act(act, base_channels),
            nn.Conv2d(base_channels, num_classes, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(x, 2**self.depth)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.bottom(x)
        for up in self.up:
            x = up(torch.cat([skips.pop(), x], dim=1))
        return self.head(torch.cat([skips.pop(), x], dim=1))


def _check_divisible(x: torch.Tensor, factor: int) -> None:
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(
            f"input {h}×{w}: sides must be divisible by {factor} (2^depth); choose another --size"
        )

"""FCN-8s with a VGG-16 encoder (Long et al. 2015), the thesis' Dist-FCN network.

Sixteen convolution layers (13 VGG-16 + fc6 + fc7 as convolutions + the class scorer), dropout on
fc6/fc7, FCN-8s skips from pool3 and pool4, and transposed-convolution upsampling initialised to
bilinear. The encoder's module layout matches torchvision's `vgg16().features`, so an ImageNet
VGG-16 state_dict file (e.g. torchvision's vgg16-397923af.pth) loads as transfer learning init.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segscale.errors import SegscaleError

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
POOL3, POOL4 = 16, 23  # indices of the 3rd and 4th max-pool in torchvision's vgg16().features


def _bilinear_kernel(channels: int, k: int) -> torch.Tensor:
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = torch.arange(k, dtype=torch.float32)
    filt = 1 - (og - center).abs() / factor
    kernel = filt[:, None] * filt[None, :]
    weight = torch.zeros(channels, channels, k, k)
    weight[range(channels), range(channels)] = kernel
    return weight


class FCN8s(nn.Module):
    encoder_modules = ("features", "fc6", "fc7")  # VGG-16's layers (train.finetune)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: float = 1.0,
        fc_channels: int = 4096,
        dropout: float = 0.5,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        widths = []
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                widths.append(c)
            else:
                w = max(1, round(int(v) * width))
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        c3, c4, c5 = widths[2], widths[3], widths[4]
        self.fc6 = nn.Sequential(
            nn.Conv2d(c5, fc_channels, 7, padding=3), nn.ReLU(inplace=True), nn.Dropout2d(dropout)
        )
        self.fc7 = nn.Sequential(
            nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout)
        )
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        self.up2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
        self.up2_pool4 = nn.ConvTranspose2d(
            num_classes, num_classes, 4, stride=2, padding=1, bias=False
        )
        self.up8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, padding=4, bias=False)
        for up in (self.up2, self.up2_pool4, self.up8):
            up.weight.data.copy_(_bilinear_kernel(num_classes, up.kernel_size[0]))
        # Skip scorers start at zero (as in FCN), so training begins from the coarse prediction.
        for s in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(s.weight)
            nn.init.zeros_(s.bias)
        if pretrained:
            self.load_vgg16(pretrained)

    def load_vgg16(self, path: str | Path) -> None:
        """Initialise the encoder (and fc6/fc7 when shapes allow) from a torchvision VGG-16 state_dict."""
        path = Path(path)
        if not path.is_file():
            raise SegscaleError(f"pretrained VGG-16 weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = self.features.state_dict()
        new = {}
        for key, value in own.items():
            src = state.get(f"features.{key}")
            if src is None:
                raise SegscaleError(
                    f"{path}: no 'features.{key}'; expected a torchvision vgg16 state_dict"
                )
            if key == "0.weight" and src.shape[1] != value.shape[1]:
                # Grey or multi-channel input: spread the RGB filters' mean over the channels.
                src = src.mean(1, keepdim=True).repeat(1, value.shape[1], 1, 1) * 3 / value.shape[1]
            if src.shape != value.shape:
                raise SegscaleError(
                    f"{path}: features.{key} has shape {tuple(src.shape)}, model needs {tuple(value.shape)} (width must be 1.0)"
                )
            new[key] = src
        self.features.load_state_dict(new)
        fc6, fc7 = self.fc6[0], self.fc7[0]
        w6, w7 = state.get("classifier.0.weight"), state.get("classifier.3.weight")
        if (
            w6 is not None
            and w6.numel() == fc6.weight.numel()
            and w7 is not None
            and w7.numel() == fc7.weight.numel()
        ):
            fc6.weight.data.copy_(w6.view_as(fc6.weight))
            fc6.bias.data.copy_(state["classifier.0.bias"])
            fc7.weight.data.copy_(w7.view_as(fc7.weight))
            fc7.bias.data.copy_(state["classifier.3.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 32, (-w) % 32  # five pools: pad to a multiple of 32, crop at the end
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        pool3 = self.features[: POOL3 + 1](x)
        pool4 = self.features[POOL3 + 1 : POOL4 + 1](pool3)
        pool5 = self.features[POOL4 + 1 :](pool4)
        score = self.up2(self.score_fr(self.fc7(self.fc6(pool5))))
        score = self.up2_pool4(score + self.score_pool4(pool4))
        score = self.up8(score + self.score_pool3(pool3))
        return score[..., :h, :w]

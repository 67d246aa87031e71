"""A segmentation network whose forward branches on a value of its input: torch.export (ONNX)
cannot trace that data-dependent control flow; tracing (TorchScript) follows one branch."""

import torch
from torch import nn


class BranchyNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.b = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > 0:
            return self.a(x)
        return self.b(x)


def branchy_net(in_channels: int, num_classes: int) -> nn.Module:
    return BranchyNet(in_channels, num_classes)

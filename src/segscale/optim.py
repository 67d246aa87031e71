"""The built-in optimisers (segscale.registry.OPTIMIZERS): factories of (parameters, config)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def sgd(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def adam(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def adamw(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

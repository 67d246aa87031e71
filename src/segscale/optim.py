"""The built-in optimisers (segscale.registry.OPTIMIZERS): factories of (parameters, config).

`config` is the run's OptimizerConfig: lr, weight_decay and, for SGD, momentum and nesterov;
its `kwargs` go to the torch optimizer as they are (betas, eps, foreach, ...), so every option
the torch class has can be set. A kwarg it does not take raises TypeError, which the engine
reports before any worker starts.
"""

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
        **cfg.kwargs,
    )


def adam(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.kwargs)


def adamw(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.kwargs)

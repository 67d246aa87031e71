"""The built-in optimisers (segscale.registry.OPTIMIZERS): factories of (parameters, config).

`config` is the run's OptimizerConfig: lr, weight_decay and, for SGD, momentum and nesterov;
its `kwargs` go to the torch optimizer as they are (betas, eps, foreach, ...), so every option
the torch class has can be set. A kwarg it does not take raises TypeError, which the engine
reports before any worker starts. On GPUs the built-ins use torch's fused implementation unless
the kwargs choose one (`fused` or `foreach`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _fused(params: Iterable[Any], cfg: Any) -> tuple[list[Any], dict[str, Any]]:
    """The parameters as a list, and the kwargs with fused=True when every parameter is on a GPU
    and the user chose neither `fused` nor `foreach`: one kernel for the whole update instead of
    one per tensor (torch's fastest implementation; on CPU torch picks its own)."""
    params = list(params)
    tensors = [q for g in params for q in (g["params"] if isinstance(g, dict) else [g])]
    kwargs = dict(cfg.kwargs)
    if tensors and all(q.is_cuda for q in tensors) and not {"fused", "foreach"} & set(kwargs):
        kwargs["fused"] = True
    return params, kwargs


def sgd(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    params, kwargs = _fused(params, cfg)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        **kwargs,
    )


def adam(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    params, kwargs = _fused(params, cfg)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)


def adamw(params: Iterable[torch.Tensor], cfg: Any) -> torch.optim.Optimizer:
    params, kwargs = _fused(params, cfg)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)

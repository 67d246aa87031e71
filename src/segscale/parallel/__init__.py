"""Distributed strategies: one small protocol; the built-in names are in segscale.registry."""

from segscale.parallel.base import AllReduceStrategy, ProcessEnv, Strategy, create_strategy, unwrap
from segscale.parallel.local_sgd import LocalSGDStrategy
from segscale.parallel.simulate import SimulatedStrategy, ghost_batchnorm

__all__ = [
    "AllReduceStrategy",
    "LocalSGDStrategy",
    "ProcessEnv",
    "SimulatedStrategy",
    "Strategy",
    "create_strategy",
    "ghost_batchnorm",
    "unwrap",
]

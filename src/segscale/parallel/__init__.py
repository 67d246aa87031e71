"""Distributed strategies: one small protocol, each strategy registered by name."""

from segscale.parallel.base import AllReduceStrategy, Strategy, create_strategy, unwrap

__all__ = ["AllReduceStrategy", "Strategy", "create_strategy", "unwrap"]

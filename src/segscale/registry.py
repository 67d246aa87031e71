"""One plugin mechanism: a registry per kind of component, plus `module:attr` paths.

MODELS.register("unet")(UNet)           # or as a decorator
MODELS.resolve("unet")                  # a built-in name
MODELS.resolve("my_pkg.nets:make_net")  # an importable module
MODELS.resolve("plugins/net.py:Net")    # a file, loaded by path
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segscale.errors import SegscaleError, did_you_mean


class Registry:
    """A named dict of factories with a decorator to fill it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def resolve(self, spec: str) -> Any:
        """The object a spec names: a registered name, `pkg.mod:attr` or `path/file.py:attr`."""
        if spec in self._entries:
            return self._entries[spec]
        if ":" not in spec:
            raise SegscaleError(
                f"unknown {self.kind} '{spec}'{did_you_mean(spec, self._entries)}; "
                f"expected one of {', '.join(self.names())} or a 'module:attr' path"
            )
        return load_attr(spec)


def load_attr(spec: str) -> Any:
    """Import `pkg.mod:attr` or `path/to/file.py:attr` (dots in attr walk into the object)."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise SegscaleError(f"'{spec}' is not a 'module:attr' or 'file.py:attr' path")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise SegscaleError(f"plugin file not found: {path} (from '{spec}')")
        name = f"segscale_plugin_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(name, path)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise SegscaleError(f"cannot import module '{where}' (from '{spec}'): {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SegscaleError(f"'{where}' has no attribute '{attr}' (from '{spec}')")
        obj = getattr(obj, part)
    return obj


MODELS = Registry("model")
LOSSES = Registry("loss")
OPTIMIZERS = Registry("optimizer")
STRATEGIES = Registry("strategy")
CALLBACKS = Registry("callback")


FIXED_ARGUMENTS = {
    "model": {"in_channels": 1, "num_classes": 2},
    "strategy": {"device": "cpu", "threads": None},
}


def check_kwargs(factory: Any, kwargs: dict[str, Any], spec: str, kind: str = "model") -> None:
    """Fail before anything starts when kwargs don't bind to the factory's signature. Models also
    receive in_channels and num_classes (from the store), strategies the device (from the config)."""
    fixed = FIXED_ARGUMENTS.get(kind, {})
    try:
        inspect.signature(factory).bind(**fixed, **kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(factory).parameters if p not in ("self", *fixed)]
        raise SegscaleError(
            f"{kind} '{spec}' kwargs {sorted(kwargs)}: {e}; accepted: {', '.join(params)}"
        ) from None

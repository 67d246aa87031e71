"""One plugin mechanism: a registry per kind of component, plus `module:attr` paths.

MODELS.resolve("unet")                  # a built-in name
MODELS.resolve("my_pkg.nets:make_net")  # an importable module
MODELS.resolve("plugins/net.py:Net")    # a file, loaded by path

Built-ins are registered by path and imported when first resolved: checking a config that names
them (`segscale plan`, the launcher) reads their signatures from source and never imports torch,
whose import takes seconds.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from segscale.errors import SegscaleError, did_you_mean, expected_by, shown


class Registry:
    """A named dict of factories: the built-ins, given as 'module:attr' strings and imported on
    first use. Users name their own by path instead of registering them."""

    def __init__(
        self, kind: str, builtins: dict[str, str] | None = None, called_with: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = dict(builtins or {})
        # what the built part is called with, for kinds whose part may be a plain function
        # (loss(logits, target)) as well as a factory of one (Loss(**kwargs))
        self.called_with = called_with

    def is_the_part(self, spec: str, kwargs: Mapping[str, Any]) -> bool:
        """Whether a user's function `spec` is the part itself, called as
        f(*called_with, **kwargs) (`def loss(logits, target, smooth=1.0)`), rather than a
        factory f(**kwargs) that builds it: kwargs alone do not bind to it, and they do after
        the called_with arguments. A class is always a factory; a callable object (a MONAI
        DiceLoss() instance, a functools.partial) is read as a function."""
        if not self.called_with or spec in self._entries:
            return False
        found = self.resolve(spec)
        if inspect.isclass(found):
            return False
        signature = inspect.signature(found)
        try:
            signature.bind(**kwargs)
            return False
        except TypeError:
            pass
        try:
            signature.bind(*[None] * len(self.called_with), **kwargs)
            return True
        except TypeError:
            return False

    def forms(self) -> str:
        """How a plug-in of this kind may be written, for errors: '' for kinds with one form."""
        if not self.called_with:
            return ""
        args = ", ".join(self.called_with)
        return (
            f" (a {self.kind} is a factory f(**kwargs) that returns a callable({args}), or a "
            f"function f({args}, **kwargs))"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def resolve(self, spec: str) -> Any:
        """The object a spec names: a registered name, `pkg.mod:attr` or `path/file.py:attr`."""
        if spec in self._entries:
            entry = self._entries[spec]
            return load_attr(entry) if isinstance(entry, str) else entry
        self._check_spec(spec)
        found = load_attr(spec)
        if not callable(found):
            raise SegscaleError(
                f"{self.kind} '{spec}' is a {type(found).__name__}, not something to call (a "
                "class or a factory function)"
            )
        return found

    def check(self, spec: str) -> None:
        """Fail now if `spec` names nothing: a built-in name is taken as is (not imported), a
        user's path is imported."""
        if spec not in self._entries:
            self.resolve(spec)

    def path(self, name: str) -> str | None:
        """The 'module:attr' a built-in name stands for (None for objects registered directly)."""
        entry = self._entries.get(name)
        return entry if isinstance(entry, str) else None

    def signature(self, spec: str) -> inspect.Signature:
        """The factory's signature; for a built-in not imported yet, read from its source."""
        entry = self._entries.get(spec)
        if isinstance(entry, str):
            found = source_signature(entry)
            if found is not None:
                return found
        return inspect.signature(self.resolve(spec))

    def _check_spec(self, spec: str) -> None:
        if ":" not in spec and not spec.endswith(".py"):
            known = f"one of {', '.join(self.names())} or " if self._entries else ""
            raise SegscaleError(
                f"unknown {self.kind} '{spec}'{did_you_mean(spec, self._entries)}; "
                f"expected {known}a 'module:attr' path"
            )


def source_signature(path: str) -> inspect.Signature | None:
    """The signature of segscale's own `module:attr` (a function, or a class with its own
    __init__), parsed from the source file without importing it; None when it can't be."""
    module, _, attr = path.partition(":")
    if not module.startswith("segscale."):
        return None
    base = Path(__file__).parent.joinpath(*module.split(".")[1:])
    file = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    if not file.is_file():
        return None
    for node in ast.parse(file.read_text()).body:
        if getattr(node, "name", None) != attr:
            continue
        if isinstance(node, ast.FunctionDef):
            return _signature_of(node.args, skip_first=False)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return _signature_of(item.args, skip_first=True)
    return None  # e.g. an inherited __init__: import it instead


def _signature_of(args: ast.arguments, skip_first: bool) -> inspect.Signature:
    P = inspect.Parameter
    positional = [(a, P.POSITIONAL_ONLY) for a in args.posonlyargs]
    positional += [(a, P.POSITIONAL_OR_KEYWORD) for a in args.args]
    if skip_first:
        positional = positional[1:]
    defaults = [P.empty] * (len(positional) - len(args.defaults)) + args.defaults
    params = [
        P(a.arg, kind, default=_default(d), annotation=_annotation(a))
        for (a, kind), d in zip(positional, defaults)
    ]
    if args.vararg:
        params.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    params += [
        P(a.arg, P.KEYWORD_ONLY, default=_default(d), annotation=_annotation(a))
        for a, d in zip(args.kwonlyargs, args.kw_defaults)
    ]
    if args.kwarg:
        params.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def _default(node: Any) -> Any:
    """A default's value when it is a literal (None, a number, a string, a tuple of them...),
    else ... (there is one, its value unknown without importing); empty when there is none."""
    if node is None or node is inspect.Parameter.empty:
        return inspect.Parameter.empty
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):  # a name or a call: known only on import
        return ...


def _annotation(arg: ast.arg) -> Any:
    """An argument's annotation as its source text (what `from __future__ import annotations`
    keeps), or empty."""
    return inspect.Parameter.empty if arg.annotation is None else ast.unparse(arg.annotation)


# the names a kwargs annotation may use to be checked (check_kwargs): plain data types only;
# an annotation naming anything else (a tensor, a module, a class of the plug-in) is not checked
_DATA_TYPES: dict[str, Any] = {
    **{t.__name__: t for t in (int, float, str, bool, dict, list, tuple, set, object)},
    "None": None,
    "Any": Any,
    "Literal": Literal,
    "Optional": Optional,
    "Union": Union,
    "Sequence": Sequence,
    "Mapping": Mapping,
}


def _check_types(what: str, signature: inspect.Signature, kwargs: dict[str, Any]) -> None:
    """Refuse a kwarg whose value does not fit its annotation (pydantic's lax mode, the one the
    config itself is read with: 1 fits float, [1, 2] fits tuple), e.g. early_stop's reference
    curve given as one number. Annotations beyond plain data types are not checked."""
    from pydantic import TypeAdapter, ValidationError

    for name, value in kwargs.items():
        param = signature.parameters.get(name)
        annotation = inspect.Parameter.empty if param is None else param.annotation
        if annotation is inspect.Parameter.empty or (value is None and param.default is None):
            continue  # `x: float = None`, as research code writes an optional argument
        text = annotation if isinstance(annotation, str) else None
        try:
            if text is not None:  # source text: evaluated with plain data types in scope only
                annotation = eval(text, {"__builtins__": {}}, _DATA_TYPES)
            adapter = TypeAdapter(annotation)
        except Exception:  # another type, or one pydantic cannot check: left to the factory
            continue
        expected = text or getattr(annotation, "__name__", str(annotation))
        try:
            fitted = adapter.validate_python(value)
        except ValidationError as e:
            raise SegscaleError(
                f"{what}: {name} {shown(value)} does not fit {expected} "
                f"({expected_by(e.errors()[0])})"
            ) from None
        if _retyped(value, fitted):  # the factory gets the value as given, not as pydantic read it
            raise SegscaleError(
                f"{what}: {name} {shown(value)} does not fit {expected} (it would reach the "
                # as YAML writes it: a tuple is a list there, (1, 2) would be text
                f"factory as {type(value).__name__}; write {json.dumps(fitted, default=str)[:200]})"
            )


def _retyped(given: Any, fitted: Any) -> bool:
    """Whether lax validation read `given` as a number of another kind: text or a bool as a
    number ("3" → 3, true → 1), a float as an int (8.0 → 8), anywhere inside lists and dicts.
    (Text read as a Path or an Enum is what plug-ins annotated with them take.)"""
    number = isinstance(fitted, int | float) and not isinstance(fitted, bool)
    if isinstance(given, str | bool) or (isinstance(given, float) and isinstance(fitted, int)):
        return number and type(fitted) is not type(given)
    if isinstance(given, dict) and isinstance(fitted, dict) and len(given) == len(fitted):
        return any(_retyped(a, b) for a, b in zip(given.values(), fitted.values(), strict=True))
    if isinstance(given, list | tuple) and isinstance(fitted, list | tuple):
        return len(given) == len(fitted) and any(
            _retyped(a, b) for a, b in zip(given, fitted, strict=True)
        )
    return False


def load_attr(spec: str) -> Any:
    """Import `pkg.mod:attr` or `path/to/file.py:attr` (dots in attr walk into the object). A bare
    `path/to/file.py` names the one factory the file defines (see `_the_factory`). A file's
    folder is added to the end of sys.path, so it imports the modules beside it."""
    where, _, attr = spec.rpartition(":")
    if not where and spec.endswith(".py"):
        where, attr = spec, ""
    elif not where or not attr:
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
            # as `python file.py` would: modules beside it import (an archi/ folder of a model
            # and its blocks); appended, so it never shadows an installed package
            if str(path.parent) not in sys.path:
                sys.path.append(str(path.parent))
            try:
                file_spec.loader.exec_module(module)
            except Exception as e:  # a syntax error, a missing import, a raise at import time
                del sys.modules[name]
                raise SegscaleError(
                    f"plugin file {path} (from '{spec}') fails to load: {type(e).__name__}: {e}"
                ) from None
    else:
        try:
            module = importlib.import_module(where)
        except SegscaleError:
            raise
        except Exception as e:  # ImportError, or the module's own error at import time
            raise SegscaleError(
                f"cannot import module '{where}' (from '{spec}'): {type(e).__name__}: {e}"
            ) from None
    if not attr:
        return _the_factory(module, where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SegscaleError(f"'{where}' has no attribute '{attr}' (from '{spec}')")
        obj = getattr(obj, part)
    return obj


def _the_factory(module: Any, where: str) -> Any:
    """The one factory a plugin file defines, for a path given without ':attr' (the thesis'
    `<CNN_archi><path>archi/U-Net.py</path>`): its torch.nn.Module subclass when it defines
    exactly one, else its one public class or function. Raises SegscaleError listing them when
    there are several, or when there is none."""
    defined = [
        obj
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]
    nn = sys.modules.get("torch.nn")
    networks = [o for o in defined if inspect.isclass(o) and nn and issubclass(o, nn.Module)]
    found = networks if len(networks) == 1 else defined
    if len(found) == 1:
        return found[0]
    names = ", ".join(o.__name__ for o in (networks or defined))
    raise SegscaleError(
        f"{where}: defines {names or 'no class or function'}; name the factory as '{where}:NAME'"
    )


MODELS = Registry(
    "model",
    {
        "unet": "segscale.models.unet:UNet",
        "resunet": "segscale.models.unet:ResUNet",
        "fcn": "segscale.models.fcn:FCN8s",
        "cnn": "segscale.models.cnn:SmallCNN",
    },
)
LOSSES = Registry(
    "loss",
    {
        "ce": "segscale.losses:CrossEntropyLoss",
        "dice": "segscale.losses:DiceLoss",
        "dice_ce": "segscale.losses:DiceCELoss",
    },
    called_with=("logits", "target"),
)
OPTIMIZERS = Registry(
    "optimizer",
    {"sgd": "segscale.optim:sgd", "adam": "segscale.optim:adam", "adamw": "segscale.optim:adamw"},
)
STRATEGIES = Registry(
    "strategy",
    {
        "allreduce": "segscale.parallel.base:AllReduceStrategy",
        "local_sgd": "segscale.parallel.local_sgd:LocalSGDStrategy",
    },
)
CALLBACKS = Registry("callback", {"early_stop": "segscale.train:EarlyStop"})
TRACKERS = Registry(
    "tracker",
    {
        "mlflow": "segscale.tracking:MLflowTracker",
        "tensorboard": "segscale.tracking:TensorBoardTracker",
        "none": "segscale.tracking:NoTracker",
    },
)
# users' per-sample transforms, by path
TRANSFORMS = Registry("transform", called_with=("image", "mask"))
TASKS = Registry(
    "task",
    {
        "segmentation": "segscale.tasks:Segmentation",
        "classification": "segscale.tasks:Classification",
    },
)


def _as_the_part(
    registry: Registry, spec: str, signature: inspect.Signature, kwargs: dict[str, Any]
) -> TypeError | None:
    """Why kwargs do not bind to a function written as the part itself (it takes the
    called_with arguments first: `def loss(logits, target, weight)`), where binding it as a
    factory would only say "missing 'logits'"; None for anything else."""
    n = len(registry.called_with)
    positional = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if not n or spec in registry or inspect.isclass(registry.resolve(spec)) or len(positional) < n:
        return None
    try:
        signature.bind(*[None] * n, **kwargs)
    except TypeError as e:
        return e
    return None


def check_kwargs(
    registry: Registry, spec: str, kwargs: dict[str, Any], fixed: dict[str, Any] | None = None
) -> None:
    """Fail before anything starts when kwargs don't bind to the factory's signature, beside the
    `fixed` arguments the engine passes itself (e.g. a model's in_channels and num_classes)."""
    fixed = fixed or {}
    taken = sorted(set(fixed) & set(kwargs))
    if taken:
        raise SegscaleError(
            f"{registry.kind} '{spec}' kwargs {sorted(kwargs)}: {', '.join(taken)} segscale passes "
            "itself (from the store and the run); drop it from kwargs"
        )
    signature = registry.signature(spec)
    called = registry.called_with if registry.is_the_part(spec, kwargs) else ()
    try:
        signature.bind(*[None] * len(called), **fixed, **kwargs)
    except TypeError as e:
        e = _as_the_part(registry, spec, signature, kwargs) or e
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unexpected and unexpected[1] in fixed:  # not a part of this kind at all
            raise SegscaleError(
                f"{registry.kind} '{spec}' takes no '{unexpected[1]}', which segscale passes to "
                f"every {registry.kind} ({', '.join(fixed)}): is it a {registry.kind}?"
                f"{registry.forms()}"
            ) from None
        params = [p for p in signature.parameters if p not in ("self", *fixed)]
        raise SegscaleError(
            f"{registry.kind} '{spec}' kwargs {sorted(kwargs)}: {e}; "
            f"accepted: {', '.join(params) or 'none'}{registry.forms()}"
        ) from None
    _check_types(f"{registry.kind} '{spec}' kwargs", signature, kwargs)

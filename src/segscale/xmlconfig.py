"""Auto-CNNp training config files in XML (the thesis' Listing 4.1), read into the same validated
RunConfig as YAML. Parsed with defusedxml: entity expansion and external entities are refused.

    <system_config>
      <task name="imaging_segmentation" run="brain-unet" seed="0">
        <parallelism-degree>3</parallelism-degree>
        <CNN_archi><name>unet</name></CNN_archi>   (or <path>archi/net.py[:factory]</path>)
        <CNN-Parallelism-Generator>
          <module name="train_env_def">
            <action class="non_extensible" type="device_placement"><value>local_rank</value></action>
            <action class="non_extensible" type="memory_allocation"><value>soft_placement</value></action>
          </module>
          <module name="train_strategy_def">
            <action class="extensible" type="dist_strategy"><value>ring_allreduce</value></action>
            <action class="extensible" type="Tr_Checkpoint">
              <value name="LRSchedule"><path>plugins/ckpt1.py</path></value>
            </action>
          </module>
        </CNN-Parallelism-Generator>
        <data><store>prepared/brain</store></data>
        <hyperparameters>
          <property name="lr">1e-5</property> <property name="optimiser">SGD</property>
          <property name="loss">dice</property> <property name="minibatch_size">10</property>
          <property name="start_epoch">0</property> <property name="end_epoch">120</property>
        </hyperparameters>
      </task>
    </system_config>
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from segscale.errors import ConfigError, did_you_mean

STRATEGY_NAMES = {"ring_allreduce": "allreduce", "allreduce": "allreduce", "local_sgd": "local_sgd"}


def _builtin_lower(name: str) -> str:
    """SGD → sgd, as the thesis' files write built-in names; a plug-in's path as written."""
    path = ":" in name or "/" in name or name.lower().endswith(".py")
    return name if path else name.lower()


def _number(kind: type) -> Any:
    """int or float of a number as XML files write it: ASCII digits, a sign, a point and an
    exponent; not what Python's own parse also takes ('1_0', Arabic-Indic digits, ' 1 ')."""
    pattern = r"[+-]?\d+" if kind is int else r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"

    def parse(text: str) -> Any:
        if not re.fullmatch(pattern, text, re.ASCII):
            raise ValueError(text)
        return kind(text)

    parse.__name__ = kind.__name__  # said in the error: "expected a whole number" for int
    return parse


def _read(cast: Any, text: str, where: str, key: str, path: Path) -> Any:
    """An attribute's or element's value (`where`: the element, as errors name it) read by
    `cast` (_number(int), _number(float), _builtin_lower); its range is validated as the YAML's
    `key`. Raises ConfigError, worded as validation words it, for a number cast refuses."""
    try:
        return cast(text.strip())
    except ValueError:
        expected = {"int": "a whole number", "float": "a number"}.get(
            cast.__name__, f"a {cast.__name__}"
        )
        raise ConfigError(
            f"{path} {where}: key '{key}': expected {expected}, got '{shown_text(text)}'"
        ) from None


PROPERTIES = {
    "lr": ("train.optimizer.lr", _number(float)),
    "optimiser": ("train.optimizer.name", _builtin_lower),
    "optimizer": ("train.optimizer.name", _builtin_lower),
    "momentum": ("train.optimizer.momentum", _number(float)),
    "loss": ("train.loss", _builtin_lower),
    "minibatch_size": ("train.batch_size", _number(int)),
    "end_epoch": ("train.epochs", _number(int)),
    "seed": ("seed", _number(int)),
}


def read_xml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw config dict (validated later, like YAML; the parallelism degree as written, as
    `workers`) and where each key came from in the file ({'train.batch_size':
    '<property name="minibatch_size">'}), for errors in the file's own terms."""
    import defusedxml.ElementTree as ET
    from defusedxml import DefusedXmlException

    try:
        root = ET.parse(str(path)).getroot()
    except DefusedXmlException as e:
        raise ConfigError(
            f"{path}: refused: {e} (entities and external references are not allowed)"
        ) from None
    except ET.ParseError as e:
        raise ConfigError(f"{path}:{e.position[0]}: not well-formed XML: {e}") from None
    task = root.find("task") if root.tag == "system_config" else None
    if task is None:
        raise ConfigError(f"{path}: expected <system_config><task name=...> at the top")

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{path}: {msg}")

    # a misspelt or repeated element or attribute would otherwise be dropped without a word
    _check_tree(root, ((), {"task": (_TASK, True)}), "system_config", fail)
    archi, data = task.find("CNN_archi"), task.find("data")
    if archi is not None and archi.find("name") is not None and archi.find("path") is not None:
        raise fail("<CNN_archi>: give <name> (built-in) or <path> (file.py:factory), not both")
    if data is not None and data.find("store") is not None and len(data) > 1:
        raise fail("<data>: give <store> alone (one prepared store holds train, val and test)")
    for what, items in (
        ("hyperparameter", [q.get("name") for q in task.iter("property")]),
        ("action type", [a.get("type") for a in task.iter("action")]),
    ):
        twice = sorted({i for i in items if items.count(i) > 1 and i is not None})
        if twice:
            raise fail(f"{what} '{twice[0]}' given twice")

    kinds = {"imaging_segmentation": "segmentation", "imaging_classification": "classification"}
    kind = task.get("name", "imaging_segmentation")
    if kind not in (*kinds, *kinds.values()):
        raise fail(f"task '{kind}': expected {' | '.join(kinds)}")
    raw: dict[str, Any] = {
        # a file name may hold what a run name may not (a space): those become '-'
        "name": task.get("run", re.sub(r"[^\w.-]", "-", path.stem)),
        "seed": _read(_number(int), task.get("seed", "0"), '<task seed="...">', "seed", path),
        "task": kinds.get(kind, kind),
        "train": {"optimizer": {}},
    }
    origins = {
        "name": '<task run="...">'
        if task.get("run") is not None
        else f"(the file name {path.name})",
        "seed": '<task seed="...">',
        "task": '<task name="...">',
        "workers": "<parallelism-degree>",
        "model": "<CNN_archi>",
        "data": "<data>",
    }
    degree = task.findtext("parallelism-degree")
    if degree is not None and not degree.strip():  # an empty element, not a missing one
        raise fail("<parallelism-degree>: empty; give the number of workers, or leave it out")
    if degree is not None:
        raw["workers"] = _read(_number(int), degree, "<parallelism-degree>", "workers", path)
    archi = task.find("CNN_archi")
    if archi is None or not (archi.findtext("name") or archi.findtext("path")):
        raise fail("<CNN_archi> needs a <name> (built-in) or a <path> (file.py:factory)")
    # <path> as the thesis writes it: a file (its one network is used), file.py:factory, or a
    # built-in name
    model = _builtin_lower((archi.findtext("name") or archi.findtext("path") or "").strip())
    raw["model"] = {"name": model}
    data = task.find("data")
    store = data.findtext("store") if data is not None else None
    if data is not None and store is None:  # the thesis' train/valid/test paths: one store here
        given = {s: data.findtext(f"{s}/path") for s in ("train", "valid", "test")}
        empty = [s for s, p in given.items() if p is not None and not p.strip()]
        if empty:  # said, not skipped: the split's store was meant to be there
            raise fail(f"<data><{empty[0]}><path> is empty; give the prepared store's folder")
        # one folder however written (prepared/x/, ./prepared/x, its absolute path, a link to
        # it), as the config resolves it: against the working directory; kept as first written
        paths: dict[str, str] = {}
        for p in given.values():
            if p and p.strip():
                paths.setdefault(os.path.realpath(p.strip()), os.path.normpath(p.strip()))
        if len(paths) > 1:
            named = ", ".join(f"<{s}> {p.strip()}" for s, p in given.items() if p and p.strip())
            raise fail(
                f"<data>: {named}: segscale reads one prepared store that holds the train, val "
                "and test splits; give each <path> that store, or <store>path</store> alone"
            )
        if not paths:
            raise fail(
                "<data>: no store; give <store>path</store> (one prepared store with train/val/"
                "test splits), or <train><path>...</path></train> as the thesis wrote it"
            )
        [store] = paths.values()
    if not store:
        raise fail("<data><store>: missing (the output of `segscale prepare`)")
    raw["data"] = {"store": store.strip()}
    _generator(task, raw, fail, origins)
    _hyperparameters(task, raw, fail, origins, path)
    return raw, origins


# The elements and attributes an Auto-CNNp file may hold: element → (its attributes, {child:
# (the child's own schema, whether it may appear at most once)}); text-only elements have none.
_Schema = tuple[tuple[str, ...], dict[str, tuple[Any, bool]]]
_TEXT: _Schema = ((), {})
_PATHS: _Schema = ((), {"path": (_TEXT, True)})
_VALUE: _Schema = (("name",), {"path": (_TEXT, True)})
_ACTION: _Schema = (("class", "type"), {"value": (_VALUE, False)})
_TASK: _Schema = (
    ("name", "run", "seed"),
    {
        "parallelism-degree": (_TEXT, True),
        "CNN_archi": (((), {"name": (_TEXT, True), "path": (_TEXT, True)}), True),
        "CNN-Parallelism-Generator": (
            ((), {"module": ((("name",), {"action": (_ACTION, False)}), False)}),
            True,
        ),
        "data": (
            (
                (),
                {"store": (_TEXT, True), **{s: (_PATHS, True) for s in ("train", "valid", "test")}},
            ),
            True,
        ),
        "hyperparameters": (((), {"property": ((("name",), {}), False)}), True),
    },
)


def _check_tree(element: Any, schema: _Schema, where: str, fail: Any) -> None:
    attributes, children = schema
    for name in element.attrib:
        if name not in attributes:
            expected = ", ".join(attributes) or "none"
            raise fail(
                f"<{where}>: unknown attribute '{name}'{did_you_mean(name, attributes)}; "
                f"expected {expected}"
            )
    if len(element) and _text(element.text):  # text beside elements is read by nothing
        raise fail(f"<{where}>: stray text '{shown_text(element.text)}'; it holds elements only")
    seen: set[str] = set()
    for child in element:
        if _text(child.tail):
            raise fail(f"<{where}>: stray text '{shown_text(child.tail)}' after <{child.tag}>")
        tag = child.tag
        if tag not in children:
            expected = ", ".join(f"<{t}>" for t in children) or "text only"
            raise fail(
                f"unknown element <{tag}>{did_you_mean(str(tag), children)} in <{where}>; "
                f"expected {expected}"
            )
        sub, once = children[tag]
        if once and tag in seen:
            raise fail(f"<{tag}> given twice in <{where}>")
        seen.add(tag)
        _check_tree(child, sub, tag, fail)


def _text(text: str | None) -> bool:
    return bool(text and text.strip())


def shown_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:40] + "..."


# an action's class says whether users may replace what fills it (the thesis' Listing 4.1)
ACTION_CLASS = {
    "device_placement": "non_extensible",
    "memory_allocation": "non_extensible",
    "dist_strategy": "extensible",
    "Tr_Checkpoint": "extensible",
}


def _generator(task: Any, raw: dict[str, Any], fail: Any, origins: dict[str, str]) -> None:
    gen = task.find("CNN-Parallelism-Generator")
    for action in gen.iter("action") if gen is not None else []:
        kind, value = action.get("type"), action.find("value")
        given = action.get("class")
        if kind in ACTION_CLASS and given is not None and given != ACTION_CLASS[kind]:
            raise fail(
                f"action '{kind}': class=\"{given}\"; it is {ACTION_CLASS[kind]} (expected "
                f'class="{ACTION_CLASS[kind]}", or no class)'
            )
        text = (value.text or "").strip() if value is not None else ""
        values = action.findall("value")
        if kind != "Tr_Checkpoint" and len(values) > 1:  # the second would be dropped
            raise fail(f"action '{kind}': {len(values)} <value>s; it takes one")
        if kind != "Tr_Checkpoint" and any(v.get("name") is not None for v in values):
            raise fail(
                f"action '{kind}': <value name=...> names a plug-in class of Tr_Checkpoint; "
                f"give {kind}'s value as the <value>'s text"
            )
        if kind == "device_placement" and text != "local_rank":
            raise fail(
                f"device_placement '{text}': segscale places one process per device by local rank"
            )
        elif kind == "memory_allocation" and text not in ("soft_placement", ""):
            raise fail(
                f"memory_allocation '{text}': only soft_placement (allocate as needed) is supported"
            )
        elif kind == "dist_strategy":
            if not text:
                raise fail(
                    f"dist_strategy: an empty <value>; expected one of {', '.join(STRATEGY_NAMES)}"
                )
            raw["train"]["strategy"] = STRATEGY_NAMES.get(text.lower(), _builtin_lower(text))
            origins["train.strategy"] = '<action type="dist_strategy">'
        elif kind == "Tr_Checkpoint":
            for v in values:
                path, name = (v.findtext("path") or "").strip(), (v.get("name") or "").strip()
                if not path or not name:
                    raise fail(
                        'Tr_Checkpoint: each <value name="Class"> needs its class name and '
                        "a <path> to the file that defines it"
                    )
                raw["train"].setdefault("callbacks", []).append({"name": f"{path}:{name}"})
            origins["train.callbacks"] = '<action type="Tr_Checkpoint">'
        elif kind not in ("device_placement", "memory_allocation"):
            types = ["device_placement", "memory_allocation", "dist_strategy", "Tr_Checkpoint"]
            named = f"action type '{kind}'" if kind else "an <action> without type="
            raise fail(f"{named}{did_you_mean(kind or '', types)}; expected {', '.join(types)}")


def _hyperparameters(
    task: Any, raw: dict[str, Any], fail: Any, origins: dict[str, str], path: Path
) -> None:
    given = {"seed": "<task seed=...>"} if task.get("seed") is not None else {}
    for prop in task.findall("hyperparameters/property"):
        name, text = prop.get("name", ""), (prop.text or "").strip()
        where = f'<property name="{name}">'
        if name == "start_epoch":  # read as a number (00, +0 are 0; empty is none), then: only 0
            if _read(_number(int), text, where, "start_epoch", path) != 0:
                raise fail("start_epoch: runs start at 0; continue a run with --resume")
            continue
        if name not in PROPERTIES:
            raise fail(
                f"unknown hyperparameter '{name}'{did_you_mean(name, PROPERTIES)}; known: {', '.join(PROPERTIES)}"
            )
        key, cast = PROPERTIES[name]
        if key in given:  # optimiser and optimizer, or seed= and a seed property
            raise fail(f"hyperparameter '{name}' sets {key}, which {given[key]} sets already")
        given[key] = f"'{name}'"
        origins[key] = where
        value = _read(cast, text, where, key, path)
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

"""The model zoo: publish a finished run as a verifiable entry, and build an entry's model to
segment with (reading indexes and pulling entries, verified, is segscale.hub).

A zoo is a folder, or any static HTTP(S) location serving one (a GitHub release, a bucket,
`python -m http.server`):

    index.json                       {"format": "segscale-zoo/1", "entries": {NAME: {VERSION: {
                                        "files": {path: {"sha256", "size"}}, "summary": {...}}}}}
    NAME/VERSION/model.safetensors   the weights (safetensors: no pickle, nothing executes)
    NAME/VERSION/config.yaml         the run's resolved config, data.store → store
    NAME/VERSION/store/              the prepared store's description (meta.json: preprocessing,
                                     labels, channels) and empty arrays of its shapes, so the engine
                                     builds the model and its preprocessing exactly as for the run
    NAME/VERSION/segscale-model.json everything needed to use the model: channels, preprocessing,
                                     classes, training data, evaluation, versions, licence, hashes
    NAME/VERSION/card.md             the model card
"""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from segscale._files import (
    _umask,
    file_sha256,
    not_a_run,
    output_dir,
    read_record,
    to_json,
    write_atomic,
)
from segscale.config import RunConfig, load_config, validate
from segscale.engine import Plan, fit_weights, inference_plan, load_trained_model
from segscale.errors import SegscaleError
from segscale.hub import (
    ENTRY_META,
    FORMAT,
    INDEX,
    WEIGHTS,
    _is_url,
    check_model_source,
    check_name,
    read_index,
    same_version,
)
from segscale.transfer import recorded_source

# ---------------------------------------------------------------- publish


def publish(
    run_dir: Path,
    name: str,
    zoo: str | Path,
    version: str = "1",
    licence: str = "CC-BY-4.0",
    description: str = "",
) -> Path:
    """Write run_dir's model as zoo entry NAME/VERSION in the folder `zoo` and add it to the index;
    returns the entry's folder. Raises SegscaleError for an unfinished or non-segmentation run, a
    bad name, or an entry that already exists (publish a new --version)."""
    from safetensors.torch import save_file

    import segscale

    check_name(name, version)
    licence = spdx_licence(licence)
    if _is_url(zoo):
        raise SegscaleError(
            f"--zoo {zoo}: publish writes into a folder; publish locally, then copy the folder "
            "to where the zoo is served"
        )
    run_dir, zoo = Path(run_dir).resolve(), output_dir(Path(zoo), "--zoo")
    _a_zoo_folder(zoo)
    cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if cfg is None:
        raise not_a_run(run_dir)
    if cfg.task.name != "segmentation":
        raise SegscaleError(f"{run_dir}: a {cfg.task.name} run; the zoo holds segmentation models")
    built_in_only(cfg, run_dir, "is your own code; its users would have to run it")
    model, p = load_trained_model(run_dir)  # weights that fit the config, or one line
    index = read_index(zoo) if (zoo / INDEX).is_file() else {"format": FORMAT, "entries": {}}
    # Tiny beside tiny: one folder on macOS and Windows file systems (and caches)
    alike = [n for n in index["entries"] if n.lower() == name.lower() and n != name]
    if alike:
        raise SegscaleError(
            f"{zoo}: holds '{alike[0]}', which differs from '{name}' only in case; give another "
            f"--name, or publish a new version of {alike[0]}"
        )
    taken = [v for v in index["entries"].get(name, {}) if same_version(v, version)]
    if taken:
        raise SegscaleError(
            f"{zoo}: {name}@{taken[0]} is already published"
            + (f" (the same version as {version})" if taken[0] != version else "")
            + "; give a new --version"
        )
    entry = zoo / name / version
    if entry.exists():
        raise SegscaleError(f"{entry}: exists but is not in {zoo / INDEX}; remove it first")
    made = [f for f in (zoo.resolve(), *zoo.resolve().parents) if not f.exists()]
    try:
        zoo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=zoo.resolve()))
    except OSError as e:
        raise SegscaleError(f"--zoo {zoo}: cannot write there ({e.strerror})") from None
    try:
        state = model.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / WEIGHTS))
        meta = {**p.store.meta, "orientation": p.store.orientation}  # (from its cases, which stay)
        splits = {s: len(p.store.cases(s)) for s in sorted({c["split"] for c in meta["cases"]})}
        for private in ("cases", "source", "input_hash"):  # local paths and case lists stay home
            meta.pop(private, None)
        meta["cases_per_split"] = splits
        (staging / "store").mkdir()
        write_atomic(staging / "store" / "meta.json", json.dumps(meta, indent=1))
        size = p.store.images.shape[-1]
        np.save(
            staging / "store" / "images.npy", np.zeros((0, p.in_channels, size, size), np.float32)
        )
        np.save(staging / "store" / "masks.npy", np.zeros((0, size, size), np.uint8))
        raw = cfg.model_dump(mode="json")
        raw["data"]["store"] = "store"
        raw["tracker"] = "none"
        # the weights are the entry's own: what they were fine-tuned from is a record (a local
        # path would be published, and resolved by nobody), kept in fine_tuned_from
        raw["model"]["pretrained"] = None
        write_atomic(staging / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
        evaluation = _evaluation(run_dir, cfg.data.test_split)
        info = {
            "name": name,
            "version": version,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "description": description,
            "licence": licence,
            "task": "segmentation",
            "architecture": {"name": cfg.model.name, **cfg.model.kwargs},
            "input": {
                "channels": p.in_channels,
                "channel_names": meta.get("channel_names", []),
                "size": size,
                "preprocessing": meta["preprocessing"],
            },
            "classes": meta["labels"],
            "training_data": {
                "name": meta.get("name"),
                "kind": meta.get("source_kind"),
                "cases_per_split": splits,
                "epochs": cfg.train.epochs,
                "seed": cfg.seed,
            },
            "evaluation": evaluation,
            "fine_tuned_from": recorded_source(run_dir, cfg.model.pretrained)[0],
            "versions": {"segscale": segscale.__version__, "torch": torch.__version__},
        }
        write_atomic(staging / "card.md", model_card(info))
        files = {
            str(f.relative_to(staging)): {"sha256": file_sha256(f), "size": f.stat().st_size}
            for f in sorted(staging.rglob("*"))
            if f.is_file()
        }
        info["files"] = files
        write_atomic(staging / ENTRY_META, to_json(info, indent=1))
        files[ENTRY_META] = {
            "sha256": file_sha256(staging / ENTRY_META),
            "size": (staging / ENTRY_META).stat().st_size,
        }
        for path in (staging, *staging.rglob("*")):  # mkdtemp's 0700: others could not read
            path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(entry)  # the entry appears whole, or not at all
    except BaseException:
        for folder in made:  # innermost first: the folders publish created, when still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "classes": list(info["classes"].values()),
        "channels": info["input"]["channel_names"],
        "size": size,
        "architecture": cfg.model.name,
        "dice": (evaluation or {}).get("dataset", {}).get("dice"),
        "licence": licence,
        "created": info["created"],
    }
    index["entries"].setdefault(name, {})[version] = {"files": files, "summary": summary}
    try:
        write_atomic(zoo / INDEX, json.dumps(index, indent=1))
    except OSError as e:  # the entry without its line in the index would block a retry
        shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):
            entry.parent.rmdir()
        raise SegscaleError(
            f"{zoo / INDEX}: cannot write it ({e.strerror}); nothing published"
        ) from None
    return entry


def spdx_licence(licence: str) -> str:
    """`licence` as an SPDX licence expression in its canonical spelling (cc-by-4.0 →
    CC-BY-4.0; `MIT OR Apache-2.0`), read by license-expression against the SPDX list; SPDX's
    own `LicenseRef-<name>` stands for a licence of the publisher's. Raises SegscaleError for
    anything else: a zoo's users decide by it whether they may use the weights."""
    import re

    from license_expression import Licensing, get_spdx_licensing

    own = re.compile(r"LicenseRef-[A-Za-z0-9.-]+")
    # identifiers are case-insensitive in SPDX (operators are written upper case, as
    # license-expression spells them); LicenseRef- is written as SPDX spells it
    licence = re.sub(r"(?i)\blicenseref-", "LicenseRef-", licence)
    if own.fullmatch(licence.strip()):
        return licence.strip()
    try:  # it raises (not returns) on some characters
        info = get_spdx_licensing().validate(licence)
        unknown = [s for s in info.invalid_symbols if not own.fullmatch(str(s))]
        errors = unknown or [e for e in info.errors if "Unknown license key" not in e]
    except Exception:
        info, errors = None, [licence]
    if info is None or errors or not licence.strip():
        raise SegscaleError(
            f"--licence {licence!r}: not an SPDX licence expression (e.g. CC-BY-4.0, Apache-2.0, "
            "MIT OR Apache-2.0; LicenseRef-<name> for a licence of your own)"
        )
    # with a LicenseRef- (not on the SPDX list) validate gives no normalised form; parse does
    expression = get_spdx_licensing().parse(licence)
    for given in Licensing().license_symbols(Licensing().parse(licence), decompose=True):
        written = str(given.key)
        if own.fullmatch(written):
            continue
        key = str(get_spdx_licensing().parse(written))
        # an alias license-expression knows beyond SPDX's ids may stand for a licence the user
        # did not mean: 'GPL' is read as GPL-1.0-or-later; a deprecated id with its version
        # ('GPL-2.0', 'GPL-2.0+') names one
        versioned = any(c.isdigit() for c in written) and key.lower().startswith(
            written.rstrip("+").lower()
        )
        if written and written.lower() != key.lower() and not versioned:
            raise SegscaleError(
                f"--licence {licence!r}: '{written}' is not an SPDX identifier (read as {key}); "
                f"give the identifier meant (e.g. {key}, or another version of it)"
            )
    return info.normalized_expression or str(expression)


def _a_zoo_folder(zoo: Path) -> None:
    """Refuse a run folder, a prepared store, or the zoo shipped inside segscale as --zoo."""
    import segscale

    inside = next((f for f in zoo.parents if (f / INDEX).is_file()), None)
    if inside is not None:
        raise SegscaleError(f"--zoo {zoo}: inside the zoo {inside}; publish into {inside} itself")
    if (zoo / "config.yaml").is_file() or (zoo / "meta.json").is_file():
        raise SegscaleError(f"--zoo {zoo}: a run folder or a prepared store, not a zoo")
    if zoo.is_relative_to(Path(segscale.__file__).resolve().parent):
        raise SegscaleError(
            f"--zoo {zoo}: the zoo shipped inside segscale (replaced by any upgrade); publish "
            "into a folder of your own, and point SEGSCALE_ZOO at it"
        )


def log_to_mlflow(run_dir: Path, entry: Path) -> str | None:
    """Log a published entry to the MLflow run of `run_dir` (artifacts zoo/NAME-VERSION/) and
    register it in the store's model registry as model NAME (the zoo version as a tag), so the
    zoo and the tracking UI show the same model. Returns a line saying what was logged, or None
    when the run was not tracked by MLflow. Like a tracker it never fails: an error is a warning."""
    import warnings

    from segscale.tracking import MLFLOW_RUN_ID, default_uri, mlflow_client

    run_dir = run_dir.resolve()
    tracker = load_config(run_dir / "config.yaml").tracker_config("mlflow")
    if tracker is None or not (run_dir / MLFLOW_RUN_ID).is_file():
        return None
    info = json.loads((entry / ENTRY_META).read_text())
    name, version = info["name"], info["version"]
    run_id = (run_dir / MLFLOW_RUN_ID).read_text().strip()
    uri = tracker.kwargs.get("uri") or default_uri(run_dir.parent)
    if not tracker.kwargs.get("uri") and not (run_dir.parent / "mlflow.db").is_file():
        warnings.warn(
            f"mlflow: {name}@{version} not logged: no MLflow store beside {run_dir} (moved?)",
            stacklevel=2,
        )
        return None
    try:
        client = mlflow_client(uri)
        # the same name and version published into another zoo: beside it, not over it (the
        # registry's earlier version points at those files)
        taken = {a.path for a in client.list_artifacts(run_id, "zoo")}
        path, n = f"zoo/{name}-{version}", 2
        while path in taken:
            path, n = f"zoo/{name}-{version}-{n}", n + 1
        client.log_artifacts(run_id, str(entry), path)
        client.set_tag(run_id, "segscale.zoo", f"{name}@{version}")
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name, description=info.get("description") or None)
        model = client.create_model_version(
            name,
            source=f"{client.get_run(run_id).info.artifact_uri}/{path}",
            run_id=run_id,
            tags={"segscale.zoo_version": version},
            description=(entry / "card.md").read_text(),
        )
    except Exception as e:  # the entry is published; only its mirror in MLflow is missing
        warnings.warn(f"mlflow: {name}@{version} not logged to {uri}: {e}", stacklevel=2)
        return None
    return f"logged to MLflow run {run_id} and registered as model {name}, version {model.version}"


def _evaluation(run_dir: Path, split: str) -> dict[str, Any] | None:
    """The run's test-split evaluation (dataset level and per-case summary), if it has one."""
    for path in (run_dir / f"evaluation-{split}.json", run_dir.parent / "evaluation.json"):
        if path.is_file():
            e = read_record(path, ("split", "dataset"), "evaluation", metrics=True)
            if Path(e.get("run", "")).resolve() == run_dir and e.get("split") == split:
                summary = {k: v["mean"] for k, v in e.get("case_summary", {}).items()}
                # a segmentation run scores cases; a classifier, slices
                count = {"cases": len(e["cases"])} if "cases" in e else {"slices": e.get("slices")}
                return {"split": split, **count, "dataset": e["dataset"],
                        "case_mean": summary}  # fmt: skip
    return None


def model_card(info: dict[str, Any]) -> str:
    """The entry's model card (Markdown) from its metadata."""
    pre = info["input"]["preprocessing"]
    arch = ", ".join(f"{k}={v}" for k, v in info["architecture"].items() if k != "name")
    lines = [
        f"# {info['name']} {info['version']}",
        "",
        info["description"] or "A segscale segmentation model.",
        "",
        f"- **Task**: 2D slice segmentation; classes {', '.join(info['classes'].values())}.",
        f"- **Network**: {info['architecture']['name']} ({arch}).",
        f"- **Input**: {info['input']['channels']} channel(s) "
        f"({', '.join(info['input']['channel_names']) or 'unnamed'}), slices along axis "
        f"{pre.get('axis')}, resized to {info['input']['size']}², normalisation "
        f"{pre.get('normalize')}. `segscale predict zoo:{info['name']}@{info['version']}` "
        "applies this itself and writes masks in each input's geometry.",
        f"- **Training data**: {info['training_data']['name']} "
        f"({info['training_data']['kind']}), cases per split "
        f"{info['training_data']['cases_per_split']}, {info['training_data']['epochs']} epochs, "
        f"seed {info['training_data']['seed']}"
        + (
            f", fine-tuned from {info['fine_tuned_from']} (see its licence too)."
            if info.get("fine_tuned_from")
            else ", trained from scratch."
        ),
        f"- **Licence**: {info['licence']}. **Versions**: segscale "
        f"{info['versions']['segscale']}, torch {info['versions']['torch']}.",
        "",
        "## Evaluation",
        "",
    ]
    e = info["evaluation"]
    if e is None:
        lines.append("No test-split evaluation was found beside the run when it was published.")
    else:
        scored = f"{e['cases']} cases" if "cases" in e else f"{e.get('slices')} slices"
        lines += [f"On the `{e['split']}` split ({scored}):", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} (dataset) | {v:.4f} |" for k, v in e["dataset"].items()]
        lines += [
            f"| {k} (case mean) | {v:.4f} |"
            for k, v in e["case_mean"].items()
            if k in ("hd95", "assd")
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- use


def entry_config(entry: Path) -> RunConfig:
    """An entry's config, its store pointing at the entry's own store description. Raises
    SegscaleError when it names code (a 'pkg.mod:attr' or .py model or task): building its
    model would run that code, and an entry runs built-in parts only."""
    where = entry / "config.yaml"
    try:
        raw = yaml.safe_load(where.read_text())
        raw["data"]["store"] = str(entry / "store")
    except (OSError, yaml.YAMLError, TypeError, KeyError) as e:
        raise SegscaleError(f"{where}: not a zoo entry's config ({type(e).__name__})") from None
    cfg = validate(raw, source=str(where))
    built_in_only(cfg, where, "names code; nothing a zoo entry ships is run")
    return cfg


def built_in_only(cfg: RunConfig, where: object, why: str) -> None:
    """Refuse a config whose model or task is code ('pkg.mod:attr', a .py file): building a zoo
    entry's model must not import anything the entry names. Raises SegscaleError."""
    code = {k: v for k, v in cfg.plugins().items() if k in ("task.name", "model.name")}
    if code:
        key, spec = next(iter(code.items()))
        raise SegscaleError(
            f"{where}: {key} '{spec}' {why}; a zoo entry holds built-in architectures only"
        )


def load_model(entry: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Plan]:
    """An entry's model in eval mode on `device` (weights from safetensors), with its Plan."""
    from safetensors.torch import load_file

    p = inference_plan(entry_config(entry))
    model = p.model()
    try:
        weights = load_file(str(entry / WEIGHTS), device="cpu")
    except Exception as e:  # SafetensorError, OSError: a damaged file, whatever its hash says
        raise SegscaleError(f"{entry / WEIGHTS}: not a readable safetensors file ({e})") from None
    fit_weights(model, weights, f"{entry / WEIGHTS}: does not fit its config's model")
    return model.to(device).eval(), p


def load_any_model(
    source: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Plan]:
    """The model of a finished run folder or of a pulled zoo entry's folder, in eval mode on
    `device`, with its Plan. Raises SegscaleError when it is neither or its weights do not load."""
    from segscale.engine import load_trained_model

    check_model_source(source)
    if (Path(source) / ENTRY_META).is_file():
        return load_model(Path(source), device)
    return load_trained_model(Path(source), device)

"""The model zoo: publish a finished run as a verifiable entry, list a zoo, pull an entry into a
local cache, and build its model to segment with.

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

Pulls go to a cache (SEGSCALE_CACHE, default ~/.cache/segscale) and every file is checked against
the sha256 in the index; a mismatch is refused with one line and nothing is kept. Names and
versions are validated: letters, digits, '.', '_', '-', no path tricks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from segscale._files import write_atomic
from segscale.config import RunConfig, load_config, validate
from segscale.engine import Plan, inference_plan, plan, trained_weights
from segscale.errors import SegscaleError

FORMAT = "segscale-zoo/1"
INDEX = "index.json"
ENTRY_META = "segscale-model.json"
WEIGHTS = "model.safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")


def check_name(name: str, version: str | None = None) -> None:
    """Raises SegscaleError for a name or version that is not a plain identifier."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise SegscaleError(
            f"zoo name {name!r}: expected letters, digits, '.', '_' or '-' (at most 64, no '..')"
        )
    if version is not None and (not _VERSION.fullmatch(version) or ".." in version):
        raise SegscaleError(
            f"zoo version {version!r}: expected letters, digits, '.', '_', '+' or '-' (no '..')"
        )


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'zoo:NAME[@VERSION]' or 'NAME[@VERSION]' → (name, version or None: the newest)."""
    ref = ref.removeprefix("zoo:")
    name, _, version = ref.partition("@")
    check_name(name, version or None)
    return name, version or None


def default_zoo() -> str:
    """SEGSCALE_ZOO, else the zoo shipped with segscale (no network needed)."""
    from importlib import resources

    return os.environ.get("SEGSCALE_ZOO") or str(resources.files("segscale") / "resources" / "zoo")


def cache_dir() -> Path:
    return Path(os.environ.get("SEGSCALE_CACHE") or Path.home() / ".cache" / "segscale") / "zoo"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- publish


def publish(
    run_dir: Path,
    name: str,
    zoo: Path,
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
    run_dir = run_dir.resolve()
    weights = trained_weights(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.task.name != "segmentation":
        raise SegscaleError(f"{run_dir}: a {cfg.task.name} run; the zoo holds segmentation models")
    p = plan(cfg)
    zoo.mkdir(parents=True, exist_ok=True)
    index = _read_index(zoo) if (zoo / INDEX).is_file() else {"format": FORMAT, "entries": {}}
    if version in index["entries"].get(name, {}):
        raise SegscaleError(f"{zoo}: {name}@{version} is already published; give a new --version")
    entry = zoo / name / version
    if entry.exists():
        raise SegscaleError(f"{entry}: exists but is not in {zoo / INDEX}; remove it first")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=zoo.resolve()))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / WEIGHTS))
        meta = dict(p.store.meta)
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
            "versions": {"segscale": segscale.__version__, "torch": torch.__version__},
        }
        write_atomic(staging / "card.md", model_card(info))
        files = {
            str(f.relative_to(staging)): {"sha256": _sha256(f), "size": f.stat().st_size}
            for f in sorted(staging.rglob("*"))
            if f.is_file()
        }
        info["files"] = files
        write_atomic(staging / ENTRY_META, json.dumps(info, indent=1))
        files[ENTRY_META] = {
            "sha256": _sha256(staging / ENTRY_META),
            "size": (staging / ENTRY_META).stat().st_size,
        }
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(entry)  # the entry appears whole, or not at all
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
    write_atomic(zoo / INDEX, json.dumps(index, indent=1))
    return entry


def _evaluation(run_dir: Path, split: str) -> dict[str, Any] | None:
    """The run's test-split evaluation (dataset level and per-case summary), if it has one."""
    for path in (run_dir / f"evaluation-{split}.json", run_dir.parent / "evaluation.json"):
        if path.is_file():
            e = json.loads(path.read_text())
            if Path(e.get("run", "")).resolve() == run_dir and e.get("split") == split:
                summary = {k: v["mean"] for k, v in e.get("case_summary", {}).items()}
                return {"split": split, "cases": len(e["cases"]), "dataset": e["dataset"],
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
        f"seed {info['training_data']['seed']}.",
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
        lines += [f"On the `{e['split']}` split ({e['cases']} cases):", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} (dataset) | {v:.4f} |" for k, v in e["dataset"].items()]
        lines += [
            f"| {k} (case mean) | {v:.4f} |"
            for k, v in e["case_mean"].items()
            if k in ("hd95", "assd")
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- list, pull


def _is_url(zoo: str | Path) -> bool:
    return urllib.parse.urlparse(str(zoo)).scheme in ("http", "https")


def _fetch(zoo: str | Path, rel: str) -> bytes:
    """A file of a zoo (folder or URL), as bytes. Raises SegscaleError when it cannot be read."""
    if _is_url(zoo):
        url = str(zoo).rstrip("/") + "/" + urllib.parse.quote(rel)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read()
        except (urllib.error.URLError, OSError) as e:
            raise SegscaleError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None
    path = Path(zoo) / rel
    try:
        return path.read_bytes()
    except OSError as e:
        raise SegscaleError(f"{path}: cannot read ({e.strerror})") from None


def _read_index(zoo: str | Path) -> dict[str, Any]:
    where = f"{str(zoo).rstrip('/')}/{INDEX}"
    try:
        index = json.loads(_fetch(zoo, INDEX))
    except ValueError as e:
        raise SegscaleError(f"{where}: not a zoo index (invalid JSON: {e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise SegscaleError(f"{where}: not a segscale zoo index (format {FORMAT!r} expected)")
    return index


def entries(zoo: str | Path | None = None) -> list[dict[str, Any]]:
    """Every entry of a zoo, newest version last per name: name, version, summary."""
    index = _read_index(zoo or default_zoo())
    return [
        {"name": name, "version": v, **versions[v]["summary"]}
        for name, versions in sorted(index["entries"].items())
        for v in sorted(versions, key=_version_key)
    ]


def _version_key(version: str) -> tuple:
    """Numeric parts compare as numbers: 2 < 10, 1.2 < 1.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version))


def pull(ref: str, zoo: str | Path | None = None) -> Path:
    """The local folder of zoo entry NAME[@VERSION] (the newest when no version is given):
    downloaded into the cache, or found there, every file verified by sha256 against the zoo's
    index. Raises SegscaleError for an unknown entry or a file that does not match its hash."""
    zoo = zoo or default_zoo()
    name, version = parse_ref(ref)
    index = _read_index(zoo)
    versions = index["entries"].get(name)
    if not versions:
        known = ", ".join(sorted(index["entries"])) or "none"
        raise SegscaleError(f"zoo {zoo}: no model {name!r} (models: {known})")
    version = version or max(versions, key=_version_key)
    if version not in versions:
        raise SegscaleError(
            f"zoo {zoo}: {name} has no version {version!r} "
            f"(versions: {', '.join(sorted(versions, key=_version_key))})"
        )
    files = versions[version]["files"]
    for rel in files:  # an index is input too: no absolute paths, no '..'
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or not parts:
            raise SegscaleError(f"zoo {zoo}: {name}@{version} lists an unsafe path {rel!r}")
    target = cache_dir() / name / version
    if target.is_dir() and all(
        (target / rel).is_file() and _sha256(target / rel) == f["sha256"]
        for rel, f in files.items()
    ):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        for rel, f in files.items():
            data = _fetch(zoo, f"{name}/{version}/{rel}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != f["sha256"]:
                raise SegscaleError(
                    f"{name}@{version}: {rel} does not match the zoo's sha256 "
                    f"({digest[:12]}… instead of {f['sha256'][:12]}…); nothing was kept"
                )
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------- use


def entry_config(entry: Path) -> RunConfig:
    """An entry's config, its store pointing at the entry's own store description."""
    raw = yaml.safe_load((entry / "config.yaml").read_text())
    raw["data"]["store"] = str(entry / "store")
    return validate(raw, source=str(entry / "config.yaml"))


def load_model(entry: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Plan]:
    """An entry's model in eval mode on `device` (weights from safetensors), with its Plan."""
    from safetensors.torch import load_file

    p = inference_plan(entry_config(entry))
    model = p.model()
    try:
        model.load_state_dict(load_file(str(entry / WEIGHTS), device="cpu"))
    except (RuntimeError, OSError) as e:
        raise SegscaleError(f"{entry / WEIGHTS}: does not fit its config's model: {e}") from None
    return model.to(device).eval(), p

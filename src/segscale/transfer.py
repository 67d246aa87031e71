"""Transfer learning: initialise a model from pretrained weights that may not fit it whole (another
number of classes or of input channels), and say exactly what was loaded.

Per tensor of the model:
    loaded    the source has it with the same shape
    adapted   a convolution's weight that differs only in its input channels: the source's
              kernels averaged over its channels, copied to each of the model's and scaled by
              C_source / C_model, so a constant input over the channels gives the same response
              (the rule timm uses to adapt an RGB stem to other channel counts)
    skipped   the source has it with another shape (e.g. a classifier for other classes): kept
              as initialised
    kept      the source does not have it: kept as initialised
Sources: `zoo:NAME[@VERSION]` (pulled and verified, segscale.hub), a zoo entry's folder, a run
folder (its model.pt), a .safetensors file, or a torch state dict / checkpoint file (loaded with
weights_only: no code runs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from segscale.errors import SegscaleError

RECORD = "pretrained.json"  # in a run folder: what load_pretrained did (TransferReport.as_dict)


@dataclass
class TransferReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[dict[str, Any]] = field(default_factory=list)  # name, from, to
    skipped: list[dict[str, Any]] = field(default_factory=list)  # name, from, to
    kept: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # source tensors the model has no place for
    fraction: float = 0.0  # of the model's weights (elements) that came from the source
    note: str | None = None  # preprocessing_note's warning: for the user, not the record

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        del record["note"]
        return record

    def summary(self) -> str:
        line = (
            f"pretrained {self.source}: {len(self.loaded)} tensors loaded, {len(self.adapted)} "
            f"adapted, {len(self.skipped)} skipped, {len(self.kept)} kept as initialised "
            f"({100 * self.fraction:.1f}% of the weights from the source)"
        )
        if self.skipped:
            line += "; skipped: " + ", ".join(
                f"{s['name']} {s['from']}→{s['to']}" for s in self.skipped[:4]
            )
        return line


def _located(spec: str) -> tuple[str, Path | None]:
    """A source pulled once: (the spec with the zoo version it resolved to, the zoo entry's
    cached folder); (spec, None) for a local source. Each pull verifies every cached file."""
    if not spec.startswith("zoo:"):
        return spec, None
    from segscale.hub import pull

    folder = pull(spec)
    return (spec if "@" in spec else f"{spec}@{folder.name}"), folder  # the folder is the version


def source_name(spec: str) -> str:
    """A pretrained source as published records name it: a zoo ref as it is, a local file or
    run folder by its name only (its path is the user's)."""
    return spec if spec.startswith("zoo:") else f"local weights ({Path(spec).name})"


def recorded_source(run_dir: Path, configured: str | None) -> tuple[str | None, dict | None]:
    """What a run's weights were fine-tuned from, as its records name it (source_name of the
    source its pretrained.json resolved, a zoo entry with its version, else `configured`, its
    config's model.pretrained), and that record (None when there is none); (None, None) for a
    run trained from scratch. Raises SegscaleError for a record that is there but unreadable."""
    from segscale._files import read_record

    if configured is None:
        return None, None
    path = run_dir / RECORD
    record = read_record(path, ("fraction", "loaded"), "transfer record") if path.exists() else None
    source = record.get("source") if record is not None else None
    return source_name(source if isinstance(source, str) else configured), record


# how the inputs were prepared, where weights learnt on one setting see other values on another
INPUT_SETTINGS = ("normalize", "clip", "nonzero", "spacing", "size")


def preprocessing_note(
    spec: str, preprocessing: dict[str, Any], folder: Path | None = None
) -> str | None:
    """A warning when a pretrained source (a zoo entry or a run folder, whose store description
    says how its inputs were prepared) saw inputs prepared otherwise than `preprocessing` (the
    run's store's) in INPUT_SETTINGS; None when they agree or the source records none (a
    weights file). `folder`: a zoo source's entry, already pulled."""
    import json

    if spec.startswith("zoo:"):
        folder = folder or _located(spec)[1]
    else:  # a run folder, or a weights file in one (model.pt, checkpoints/best.pt)
        path = Path(spec).expanduser().resolve()
        runs = [f for f in (path, path.parent, path.parent.parent) if (f / "config.yaml").is_file()]
        folder = path if path.is_dir() else (runs[0] if runs else None)
    if folder is None:
        return None
    meta = folder / "store" / "meta.json"  # a zoo entry's; a run folder's store is its config's
    if not meta.is_file() and (folder / "config.yaml").is_file():
        from segscale.config import load_config

        try:
            meta = load_config(folder / "config.yaml").data.store / "meta.json"
        except SegscaleError:
            return None
    try:
        source = json.loads(meta.read_text())["preprocessing"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    differ = [
        f"{k} {source.get(k)} there, {preprocessing.get(k)} here"
        for k in INPUT_SETTINGS
        if source.get(k) != preprocessing.get(k)
    ]
    if not differ:
        return None
    return (
        f"model.pretrained {spec} learnt from inputs prepared otherwise ({'; '.join(differ)}): "
        "its weights expect other intensities or scales; prepare the store as its source was "
        "for the most of them"
    )


def read_weights(spec: str, folder: Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a pretrained source (see the module's docstring); `folder`: a zoo source's
    entry, already pulled. Raises SegscaleError when it cannot be found or read."""
    where = f"model.pretrained {spec}"
    if spec.startswith("zoo:"):
        from segscale.hub import WEIGHTS

        return _safetensors((folder or _located(spec)[1]) / WEIGHTS, where)
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "model.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise SegscaleError(f"{where}: a folder without model.safetensors or model.pt")
    if not path.is_file():
        raise SegscaleError(f"{where}: no such file or folder")
    if path.suffix == ".safetensors":
        return _safetensors(path, where)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one that would need pickled code to load
        raise SegscaleError(
            f"{where}: not a PyTorch state dict or safetensors file (read with weights_only: "
            "no pickled code is run)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a segscale checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegscaleError(f"{where}: expected a state dict of tensors")
    return state


def _safetensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise SegscaleError(f"{where}: {path}: not a readable safetensors file ({e})") from None


def load_pretrained(
    model: torch.nn.Module,
    spec: str,
    min_fraction: float = 0.5,
    preprocessing: dict[str, Any] | None = None,
) -> TransferReport:
    """Initialise `model` in place from `spec` as far as it fits; returns what happened, with
    preprocessing_note's warning against `preprocessing` (a store's) when given. A zoo source is
    pulled once. Raises SegscaleError when less than `min_fraction` of the model's weights fit
    (another architecture, most likely), naming a few tensors that did not."""
    recorded, folder = _located(spec)
    source = read_weights(spec, folder)
    own = model.state_dict()
    report = TransferReport(recorded)
    if preprocessing is not None:
        report.note = preprocessing_note(spec, preprocessing, folder)
    new: dict[str, torch.Tensor] = {}
    total = taken = 0
    for name, mine in own.items():
        weight = mine.is_floating_point()
        total += mine.numel() if weight else 0
        theirs = source.get(name)
        if theirs is None:
            report.kept.append(name)
            continue
        if theirs.shape == mine.shape:
            new[name] = theirs.to(mine.dtype)
            report.loaded.append(name)
        elif (
            mine.dim() == 4 and theirs.dim() == 4
            and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:]
        ):  # fmt: skip
            c_src, c_dst = theirs.shape[1], mine.shape[1]
            kernel = theirs.to(mine.dtype).mean(1, keepdim=True) * (c_src / c_dst)
            new[name] = kernel.expand_as(mine).clone()
            report.adapted.append(
                {"name": name, "from": list(theirs.shape), "to": list(mine.shape)}
            )
        else:
            report.skipped.append(
                {"name": name, "from": list(theirs.shape), "to": list(mine.shape)}
            )
            continue
        taken += mine.numel() if weight else 0
    report.unused = sorted(set(source) - set(own))
    report.fraction = taken / total if total else 0.0
    if report.fraction < min_fraction:
        missing = [s["name"] for s in report.skipped[:3]] + report.kept[:3]
        raise SegscaleError(
            f"model.pretrained {spec}: only {100 * report.fraction:.1f}% of the model's weights "
            f"fit (e.g. {', '.join(missing) or 'none'}); is it the same architecture?"
        )
    model.load_state_dict({**own, **new})
    return report

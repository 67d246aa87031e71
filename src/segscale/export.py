"""`segscale export`: a run's or a zoo entry's model as a file that runs without segscale.

- ONNX (torch.onnx's torch.export-based exporter; needs `onnx` and `onnxscript`:
  pip install 'segscale[export]'): input `image` (N, C, S, S) float32, output `logits`
  (N, classes, S, S) or the task's shape, N dynamic. Run it with onnxruntime or any ONNX runtime.
- TorchScript (torch.jit.trace): the same signature; `torch.jit.load(path)` in any PyTorch.

Each file carries the model's description (segscale-model.json: channels, slice size, the
preprocessing to apply first, the classes) as ONNX metadata or a TorchScript extra file, and the
export is checked before it is kept: the exported model is run on a batch of a different size than
the one traced and must agree with PyTorch's outputs within `TOLERANCE` (largest absolute
difference of the logits), else nothing is written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segscale import __version__
from segscale._files import other_run, output_file, publish, run_or_entry
from segscale.errors import SegscaleError
from segscale.hub import check_model_source

if TYPE_CHECKING:  # torch is imported where a model is exported: its refusals need none
    import torch

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4  # max |exported − PyTorch| over the check batch's logits (float32 arithmetic)
DESCRIPTION = "segscale-model.json"


def describe(plan: Any, source: Path) -> dict[str, Any]:
    """What a user of the exported file must know: input layout, preprocessing, classes."""
    from segscale.predict import mask_values

    meta, size = plan.store.meta, plan.store.preprocessing.size
    return {
        "source": _name(Path(source)),  # the file may be shared, a local path not
        "segscale_version": __version__,
        "task": plan.cfg.task.name,
        "model": plan.cfg.model.name,
        "input": {
            "name": "image",
            "shape": ["N", plan.in_channels, size, size],
            "dtype": "float32",
            "channels": meta.get("channel_names"),
            # the axis codes (e.g. RAS) of the volumes whose slices it was trained on: reorient
            # a volume to them before slicing along preprocessing.axis
            "orientation": plan.store.orientation,
        },
        "output": {
            "name": "logits",
            "classes": plan.task.labels(plan.store),
            # a segmentation's class → the mask value it stands for (what predict writes)
            **(
                {"mask_values": {str(c): int(v) for c, v in enumerate(mask_values(meta))}}
                if plan.cfg.task.name == "segmentation"
                else {}
            ),
        },
        "preprocessing": meta.get("preprocessing"),
    }


def _name(source: Path) -> str:
    """A run's folder name, or zoo:NAME@VERSION for a zoo entry (as its description names it)."""
    from segscale.hub import ENTRY_META

    try:
        entry = json.loads((source / ENTRY_META).read_text())
        return f"zoo:{entry['name']}@{entry['version']}"
    except (OSError, ValueError, TypeError, KeyError):  # a run folder
        return source.name


def file_name(fmt: str, stem: str = "model") -> str:
    """The default name of an export: model.onnx or model.torchscript.pt (another `stem` for a zoo
    entry's). Raises SegscaleError for an unknown format."""
    if fmt not in FORMATS:
        raise SegscaleError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    return stem + SUFFIX[fmt]


def export(
    source: Path, fmt: str, out: Path | None = None, check_batch: int = 3, force: bool = False
) -> Path:
    """Export the model of a finished run folder or a pulled zoo entry to `out` (default:
    SOURCE/model.onnx or SOURCE/model.torchscript.pt; its folder created). An existing file is
    replaced only with `force`, never a device or other special file. Returns the written path.
    Raises SegscaleError for an unknown format, a missing exporter, a model the exporter cannot
    trace, an unwritable place, or an export whose outputs differ from PyTorch's by more than
    TOLERANCE (nothing is written then)."""
    name = file_name(fmt)  # checks the format first
    check_model_source(source)  # before --out, which defaults to a file in it
    out = out or source / name
    # a name that says what the file is: tools (Netron, onnxruntime, torch.jit.load users) go by it
    endings = {"onnx": (".onnx",), "torchscript": (".pt", ".pth")}[fmt]
    kind = {"onnx": "an ONNX", "torchscript": "a TorchScript"}[fmt]
    if not Path(out).is_dir() and not Path(out).name.endswith(endings):
        raise SegscaleError(
            f"--out {out}: {kind} export needs a name ending in {' or '.join(endings)}"
        )
    # not into another run's folder, where it would pass for that run's model (checked before
    # output_file makes the folders of --out)
    other = other_run(out, source)
    if other is not None:
        raise SegscaleError(
            f"--out {Path(out).resolve()}: inside {run_or_entry(other)} {other}, where it would "
            f"pass for its model; export beside {Path(source).resolve()} or elsewhere"
        )
    missing = [f for f in Path(out).resolve().parents if not f.exists()]  # created below
    out = output_file(out, "--out", overwrite=force)
    # in the folder it exports, only an earlier export is replaced (they end in .onnx or
    # .torchscript.pt): never the run's own weights, config, checkpoints or records
    earlier = out.name.endswith(tuple(SUFFIX.values()))
    if out.exists() and out.is_relative_to(Path(source).resolve()) and not earlier:
        raise SegscaleError(
            f"--out {out}: a file of {Path(source).resolve()} itself, not an earlier export "
            f"(those end in {' or '.join(SUFFIX.values())}); give another name"
        )
    try:
        return _export(source, fmt, out, check_batch)
    except BaseException:
        for folder in missing:  # innermost first: the folders made for it, when still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _export(source: Path, fmt: str, out: Path, check_batch: int) -> Path:
    import torch

    from segscale.zoo import load_any_model

    model, plan = load_any_model(source, "cpu")
    size = plan.store.preprocessing.size
    description = describe(plan, source)
    generator = torch.Generator().manual_seed(0)
    traced = torch.randn(2, plan.in_channels, size, size, generator=generator)
    checked = torch.randn(check_batch, plan.in_channels, size, size, generator=generator)
    with torch.no_grad():
        expected = model(checked)
    # written beside `out` and renamed once checked: never a half-written or unverified file
    # (in a folder of its own under its final name: a TorchScript archive's inner folder is
    # named after the file it was saved as, which its users see when they unzip it)
    try:
        tmp_dir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except OSError as e:
        raise SegscaleError(f"--out {out}: cannot write there ({e.strerror})") from None
    tmp_path = tmp_dir / out.name
    try:
        try:
            if fmt == "onnx":
                got = _onnx(model, traced, checked, tmp_path, description)
            else:
                got = _torchscript(model, traced, checked, tmp_path, description)
        except SegscaleError:
            raise
        except Exception as e:  # the exporter's own failure: a model it cannot trace
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            other = "torchscript" if fmt == "onnx" else "onnx"
            raise SegscaleError(
                f"{source}: torch cannot export this model to {fmt} ({first[:300]}); "
                f"try --format {other}"
            ) from None
        difference = float((got - expected).abs().max())
        if not difference <= TOLERANCE:
            raise SegscaleError(
                f"{source}: the {fmt} export differs from PyTorch by {difference:.3g} "
                f"(tolerance {TOLERANCE:g}) on a batch of {check_batch}; nothing written"
            )
        publish(tmp_path, out)  # the permissions a plain open() gives, not mkstemp's 0600
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out


def _onnx(
    model: torch.nn.Module,
    traced: torch.Tensor,
    checked: torch.Tensor,
    path: Path,
    description: dict[str, Any],
) -> torch.Tensor:
    import torch

    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise SegscaleError(
                f"--format onnx needs {package}: pip install 'segscale[export]'"
            ) from None
    import onnx
    import onnxruntime

    batch = torch.export.Dim("batch", min=1)
    # the exporter logs that torchvision's detection ops are skipped: nothing a U-Net uses
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the exporter's own deprecation notices
            program = torch.onnx.export(
                model,
                (traced,),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    program.save(str(path))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = DESCRIPTION, json.dumps(description)
    onnx.save(proto, str(path))
    runtime = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(runtime.run(None, {"image": checked.numpy()})[0])


def _torchscript(
    model: torch.nn.Module,
    traced: torch.Tensor,
    checked: torch.Tensor,
    path: Path,
    description: dict[str, Any],
) -> torch.Tensor:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        script = torch.jit.trace(model, traced)
        torch.jit.save(script, str(path), _extra_files={DESCRIPTION: json.dumps(description)})
        loaded = torch.jit.load(str(path))
        return loaded(checked)

"""The run configuration: pydantic models, YAML loading, `a.b=value` overrides.

Every field is documented here once; `segscale train --help` and the README point to this file.
Unknown keys are errors that name the file, the line, the key and the closest valid key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from segscale._files import signed, write_atomic
from segscale.errors import SEED_MAX, ConfigError, did_you_mean, expected_by, shown

_UNIONS = (typing.Union, types.UnionType)


class _Strict(BaseModel):
    # no infinite or NaN settings: an lr, a weight decay or a warmup of .inf is a slip, not a plan
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for a number; in a config it is a slip (epochs: true). Per
        # field, so that the error names the key as every other type error does
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _is_number(annotation):
            raise ValueError(f"expected {_number_word(annotation)}")
        listed = isinstance(value, list | tuple) and _holds_numbers(annotation)
        if listed and any(isinstance(v, bool) for v in value):  # decay_epochs: [true, 2]
            raise ValueError("expected numbers")
        return value


def _base_types(annotation: Any) -> list[Any]:
    """The types a field takes, without None and Annotated's constraints: [int] for
    PositiveInt | None."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in _UNIONS else ()
    kinds = [m for m in members or (annotation,) if m is not type(None)]
    return [typing.get_args(k)[0] if typing.get_origin(k) is typing.Annotated else k for k in kinds]


def _is_number(annotation: Any) -> bool:
    """Whether a field takes a number and no boolean (int, float, int | None, PositiveInt ...)."""
    base = _base_types(annotation)
    return bool(base) and all(b in (int, float) for b in base)


def _number_word(annotation: Any) -> str:
    """'a whole number' for a field of ints only, else 'a number'."""
    return "a whole number" if all(b is int for b in _base_types(annotation)) else "a number"


def _holds_numbers(annotation: Any) -> bool:
    """Whether a field is a list or tuple of numbers (decay_epochs, zoom)."""
    return typing.get_origin(annotation) in (list, tuple) and all(
        _is_number(a) for a in typing.get_args(annotation) if a is not Ellipsis
    )


class _Loader(yaml.SafeLoader):
    """Numbers as YAML 1.2 reads them: 010 is ten and 1:30 is text (YAML 1.1, PyYAML's default,
    reads them as 8 and 90), 1e-3 is a number; no dates (2024-06-01 is text); booleans as PyYAML
    reads them (true/false, yes/no, on/off), so plug-ins' kwargs keep their meaning; merge keys
    (<<) as usual; and a key given twice in one mapping is an error (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # what it merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' given twice (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_CORE = ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _CORE]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _CORE[1], re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    _CORE[2],
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)
_Loader.add_constructor(
    _CORE[1],
    lambda loader, node: (
        int(v, 0) if (v := loader.construct_scalar(node))[:2] in ("0o", "0x") else int(v, 10)
    ),
)


def read_yaml(text: str) -> Any:
    """YAML text as Python data, read as segscale reads configs and overrides (see _Loader)."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except RecursionError:  # brackets thousands deep: as a YAML error, named by the caller
        raise yaml.YAMLError("nested too deep to be a config") from None


class AugmentConfig(_Strict):
    """On-the-fly augmentation of training batches; image and mask get the same geometry."""

    enabled: bool = Field(False, description="Augment training batches.")
    rotation: float = Field(0.0, ge=0, le=180, description="Max rotation in degrees (±).")
    zoom: tuple[float, float] = Field((1.0, 1.0), description="Zoom range (min, max).")
    translation: float = Field(
        0.0, ge=0, le=0.5, description="Max shift as a fraction of the image size."
    )
    flip: bool = Field(False, description="Random horizontal and vertical flips.")
    intensity: float = Field(0.0, ge=0, description="Std of a random intensity scale and shift.")

    @model_validator(mode="after")
    def _zoom_range(self) -> AugmentConfig:
        low, high = self.zoom
        if not 0 < low <= high:
            raise ValueError(f"zoom {list(self.zoom)}: expected (min, max) with 0 < min ≤ max")
        return self


# How fast, or when to save, not what: a run computes the same with any of their values (the
# same batches; at most float rounding for channels_last, compile and threads): a resume may
# change them.
SPEED_SETTINGS = (
    "data.num_workers",
    "data.on_device",
    "train.channels_last",
    "train.compile",
    "train.threads",
    "train.checkpoint_every",  # when to save, not what is computed
    "train.keep_checkpoints",
)

# Table 2.1 of the thesis (left atrium): rotation ±45°, zoom 0.8–1.2, translation up to 25.6 px of
# 512 (5%). `augment: left-atrium` in a config, `--preset left-atrium` offline.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "left-atrium": {"enabled": True, "rotation": 45.0, "zoom": (0.8, 1.2), "translation": 0.05}
}


class Component(_Strict):
    """A replaceable part of a run: a built-in name or a user's 'pkg.mod:attr' / 'file.py:attr',
    with the keyword arguments its factory takes. Every kind (task, model, loss, optimizer,
    strategy, tracker, callback, transform) has this shape; in YAML a plain string means
    {name: that}. What the engine passes besides `kwargs` is listed per kind in its `name` help."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _absolute_file(cls, v: str) -> str:
        # a plug-in file is found from the working directory, as data.store is; the run folder's
        # config.yaml then names it absolutely, so that config reads the same from anywhere
        where, sep, attr = v.rpartition(":")
        if not sep and v.endswith(".py"):
            where, attr = v, ""
        if where.endswith(".py") and not Path(where).is_absolute():  # relative, or ~/...
            return str(_absolute(where)) + (f":{attr}" if attr else "")
        return v


def _absolute(path: str) -> Path:
    """A path as given, resolved against the working directory (~ expanded)."""
    return (Path.cwd() / Path(path).expanduser()).resolve()


class TransformConfig(Component):
    name: str = Field(
        description="A 'pkg.mod:factory' / 'file.py:factory' returning a per-sample transform "
        "(image (C, H, W), mask (H, W)) → (image, mask); MONAI dict transforms through "
        "segscale.imgmed.plugins.DictTransform."
    )


class DataConfig(_Strict):
    store: Path = Field(description="A prepared store: the output folder of `segscale prepare`.")
    train_split: str = "train"
    val_split: str | None = Field(
        "val",
        description="Split validated during training. null: none, e.g. a final model on every "
        "training and validation case (model.pt is the last epoch's; no best.pt, no validation "
        "pictures, no callback that reads a validation metric).",
    )
    test_split: str = Field("test", description="Split that `segscale evaluate` scores by default.")
    num_workers: int = Field(0, ge=0, description="DataLoader processes per training worker.")
    on_device: Literal["auto"] | bool = Field(
        "auto",
        description="Hold the training split in the training device's memory and gather batches "
        "there (no DataLoader; the same batches): auto on a GPU when it takes under a quarter of "
        "the free memory and there is no per-sample transform; true on CPU keeps it in RAM.",
    )
    augment: AugmentConfig = AugmentConfig()
    split_seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Draw which of the store's training and validation cases validate (as many "
        "as the store has), with this seed; the test split never changes (`segscale repeat "
        "--vary split`). Default: the store's own split.",
    )
    folds: int | None = Field(
        None,
        ge=2,
        description="k-fold cross-validation: the store's training and validation cases pooled, "
        "shuffled (with data.split_seed, default 0) and dealt into this many folds of near-equal "
        "size; fold `data.fold` validates, the others train; the test split never changes "
        "(`segscale repeat --vary fold` trains every fold). Default: the store's own split.",
    )
    fold: int = Field(0, ge=0, description="The fold that validates, 0..data.folds-1.")

    @field_validator("fold")
    @classmethod
    def _fold_of_folds(cls, v: int, info: ValidationInfo) -> int:
        folds = info.data.get("folds")  # (declared before fold: validated first)
        if v and folds is None:
            raise ValueError(f"fold {v}: it needs folds (k of k-fold cross-validation)")
        if folds is not None and v >= folds:
            raise ValueError(f"fold {v}: expected 0..folds-1 (folds: {folds})")
        return v

    @field_validator("store")
    @classmethod
    def _absolute_store(cls, v: Path) -> Path:
        # the one place a relative store path is resolved: against the working directory
        v = v.expanduser()
        return v if v.is_absolute() else (Path.cwd() / v).resolve()

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_preset(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in AUGMENT_PRESETS:
                raise ValueError(f"unknown preset '{v}' (expected {', '.join(AUGMENT_PRESETS)})")
            return AUGMENT_PRESETS[v]
        return v

    transform: TransformConfig | None = Field(
        None,
        description="Your own per-sample training transform (MONAI, TorchIO, ...), applied before "
        "batching and before `augment`.",
    )

    @model_validator(mode="after")
    def _on_device_gathers_whole_batches(self) -> DataConfig:
        # in training its settings act only when it is on (offline, always): settings given with
        # no word of `enabled` are a forgotten switch; `enabled: false` turns them off on purpose
        a = self.augment
        unread = [
            k
            for k in ("rotation", "zoom", "translation", "flip", "intensity")
            if getattr(a, k) != AugmentConfig.model_fields[k].default
        ]
        if unread and not a.enabled and "enabled" not in a.model_fields_set:
            takes = "takes" if len(unread) == 1 else "take"
            raise ValueError(f"augment: {', '.join(unread)} {takes} effect only with enabled: true")
        for key in ("split_seed", "folds"):
            # a rule over several keys: checked on the section, so the error names every
            # override inside it (data.folds=3 and data.val_split=test), not only the last
            clash = [k for k in ("train_split", "val_split") if getattr(self, k) == self.test_split]
            if getattr(self, key) is not None and clash:
                raise ValueError(
                    f"{key} deals the training and validation cases anew and never the test "
                    f"split's; {' and '.join(clash)} must not be test_split '{self.test_split}'"
                )
        if self.split_seed is not None and self.val_split is None:
            raise ValueError(
                "split_seed draws which training cases validate: it needs a val_split "
                "(val_split is null)"
            )
        if self.folds is not None and self.val_split is None:
            raise ValueError("folds: a fold validates; it needs a val_split (val_split is null)")
        if self.on_device is True and (self.transform is not None or self.num_workers):
            raise ValueError(
                "on_device gathers batches on the device, without per-sample work: it cannot "
                "run data.transform or DataLoader processes (num_workers); set one of them off"
            )
        return self


class ModelConfig(Component):
    name: str = Field(
        "unet",
        description="unet | resunet | fcn | cnn (classifier), or a factory as 'pkg.mod:attr' / "
        "'file.py:attr'; called as factory(in_channels=, num_classes=, **kwargs), both from the store.",
    )
    pretrained: str | None = Field(
        None,
        description="Initialise from zoo:NAME[@VERSION], a zoo entry or run folder, or a "
        ".safetensors / torch state dict file, as far as the shapes fit (another number of "
        "classes or input channels): RUN_DIR/pretrained.json says what was loaded.",
    )

    @field_validator("pretrained")
    @classmethod
    def _absolute_pretrained(cls, v: str | None) -> str | None:
        # a file or folder is found from the working directory, and saved absolutely (as above)
        if v is None or v.startswith("zoo:") or Path(v).is_absolute():
            return v
        return str(_absolute(v))


class LossConfig(Component):
    name: str = Field(
        "dice_ce",
        description="ce | dice | dice_ce | a 'pkg.mod:Class' loss module, called as Class(**kwargs) "
        "and then loss(logits, target).",
    )


NO_MOMENTUM = ("adam", "adamw")  # built-in optimisers that read neither momentum nor nesterov


class OptimizerConfig(Component):
    name: str = Field(
        "sgd",
        description="sgd | adam | adamw | a 'pkg.mod:factory' called as factory(parameters, this "
        "config), which returns a torch optimizer. `kwargs` go to the torch optimizer (e.g. "
        "betas, eps for adam).",
    )
    lr: float = Field(gt=0, description="Base learning rate, for the reference batch.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (sgd only).")
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only).")
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _momentum_is_read(self) -> OptimizerConfig:
        own = sorted({"lr", "momentum", "nesterov", "weight_decay"} & set(self.kwargs))
        if own:  # torch would get them twice ("got multiple values")
            raise ValueError(f"kwargs.{own[0]}: give it as train.optimizer.{own[0]}, not in kwargs")
        given = [k for k in ("momentum", "nesterov") if k in self.model_fields_set]
        if given and self.name in NO_MOMENTUM:
            raise ValueError(
                f"{self.name} has no {' or '.join(given)}; its moments are "
                "kwargs.betas (default [0.9, 0.999]); remove it from the file, or override "
                + " ".join(f"~train.optimizer.{k}" for k in given)
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unread(self, handler: Any) -> Any:
        # adam and adamw read no momentum: not written either, so a saved config loads again
        data = handler(self)
        if self.name in NO_MOMENTUM and isinstance(data, dict):
            data.pop("momentum", None)
            data.pop("nesterov", None)
        return data


GRESCALE_WARMUP_EPOCHS = 5.0  # the thesis' defaults (ch. 6.3.2)
GRESCALE_DECAY_PHASE = 3 / 7
GRESCALE_DECAY_COEFFICIENT = math.log(100.0)  # the lr falls 100× over the decay phase


class ScheduleConfig(_Strict):
    """lr(step) = scaled base lr × warmup × decay; see segscale.schedules."""

    rule: Literal["standard", "grescale"] = Field(
        "standard",
        description="standard: the scaling, warmup and decay keys below; grescale: the thesis' "
        "three phases (gradual warmup to the scaled lr, default 5 epochs; stabilisation at it; "
        "exponential decay over decay_phase), docs/scaling-guideline.md.",
    )
    decay_coefficient: float | None = Field(
        None,
        gt=0,
        description="grescale: c in lr = peak · exp(−c · t / T) over the decay phase (t steps into "
        "it, T its length): the lr falls e^c-fold; default ln 100.",
    )
    decay_phase: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="grescale: the decay phase's length, as a fraction of the epochs after the "
        "default 5-epoch warmup (fixed when warmup grows: stabilisation shrinks); default 3/7.",
    )
    scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="Scale the lr by global batch / reference batch (or its sqrt)."
    )
    reference_batch: int | None = Field(
        None, gt=0, description="Batch the base lr is tuned for; default: the per-worker batch."
    )
    warmup_epochs: float | None = Field(
        None, ge=0, description="Warmup length in epochs (Goyal et al.); default none."
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup length in steps (instead of warmup_epochs)."
    )
    warmup: Literal["gradual", "constant"] = "gradual"
    decay: Literal["none", "step", "cosine", "poly", "exponential"] = "none"
    decay_epochs: list[int] = Field(
        default_factory=list, description="Step decay: the epochs at which lr × decay_factor."
    )
    decay_factor: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Step decay: lr × this at each milestone; exponential: lr × this per epoch.",
    )
    poly_power: float = Field(0.9, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine/poly floor, × peak lr.")

    @model_validator(mode="after")
    def _every_option_takes_effect(self) -> ScheduleConfig:
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give warmup_epochs or warmup_steps, not both")
        unread = [  # values other than the defaults that the chosen rule would ignore
            ("decay_epochs", bool(self.decay_epochs), self.decay != "step", "decay: step"),
            (
                "decay_factor",
                self.decay_factor != 0.1,
                self.decay not in ("step", "exponential"),
                "decay: step or exponential",
            ),
            ("poly_power", self.poly_power != 0.9, self.decay != "poly", "decay: poly"),
            (
                "min_lr_ratio",
                self.min_lr_ratio != 0.0,
                self.decay not in ("cosine", "poly"),
                "decay: cosine or poly",
            ),
            (
                "reference_batch",
                self.reference_batch is not None,
                self.scaling == "none",
                "scaling: linear or sqrt",
            ),
            (
                "warmup: constant",
                self.warmup == "constant",
                not (self.warmup_epochs or self.warmup_steps),
                "warmup_epochs or warmup_steps > 0",
            ),
            (  # warmup climbs from the base lr to the scaled one: unscaled, nothing to climb
                "warmup_epochs" if self.warmup_epochs else "warmup_steps",
                bool(self.warmup_epochs or self.warmup_steps) and self.rule == "standard",
                self.scaling == "none",
                "scaling: linear or sqrt (it climbs from the base lr to the scaled lr)",
            ),
        ]
        grescale = self.rule == "grescale"
        unread += [
            (
                "decay_coefficient",
                self.decay_coefficient is not None,
                not grescale,
                "rule: grescale",
            ),
            ("decay_phase", self.decay_phase is not None, not grescale, "rule: grescale"),
        ]
        for key, given, ignored, needs in unread:
            if given and ignored:
                raise ValueError(f"{key} takes effect only with {needs}")
        if grescale and (self.decay != "none" or self.warmup != "gradual"):
            raise ValueError(
                "rule: grescale has its own gradual warmup and decay phase; drop decay and warmup "
                "(tune them with warmup_epochs, decay_phase and decay_coefficient)"
            )
        if (
            self.decay_epochs != sorted(set(self.decay_epochs))
            or min(self.decay_epochs, default=1) < 1
        ):
            raise ValueError(
                f"decay_epochs {self.decay_epochs}: expected epochs ≥ 1 in increasing order, each once"
            )
        if self.decay == "step" and not self.decay_epochs:
            raise ValueError(
                "decay: step needs decay_epochs (the epochs at which lr × decay_factor)"
            )
        return self


class TaskConfig(Component):
    """What the run learns; a plain string in YAML means {name: that}."""

    name: str = Field(
        "segmentation",
        description="segmentation | classification (one class per slice: does it show the "
        "foreground?) | a 'pkg.mod:Class' task.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="classification: foreground (a class index; default any)."
    )


class TrackerConfig(Component):
    """Where rank 0 mirrors the run besides its folder; a plain string in YAML means {name: that}."""

    name: str = Field(
        "mlflow",
        description="mlflow (a local SQLite store: <runs folder>/mlflow.db) | tensorboard "
        "(event files in RUN_DIR/tensorboard; pip install 'segscale[tensorboard]') | none | a "
        "'pkg.mod:Class' tracker.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="mlflow: uri (an MLflow tracking URI: sqlite://, http(s)://, a database), "
        "experiment (default 'segscale'), "
        "poll_seconds (how often the run's tags are read for segscale.stop; default 5). "
        "tensorboard: log_dir (a folder of runs: this run's events go to LOG_DIR/<run folder name>).",
    )

    @model_validator(mode="after")
    def _absolute_places(self) -> TrackerConfig:
        # where a tracker writes is found from the working directory, as data.store is, and
        # saved absolutely: a resume from another folder writes to the same place
        kwargs = self.kwargs
        if self.name == "tensorboard" and isinstance(kwargs.get("log_dir"), str):
            if kwargs["log_dir"].strip():
                kwargs["log_dir"] = str(_absolute(kwargs["log_dir"]))
            else:  # '' is the default, RUN_DIR/tensorboard, not the working directory
                del kwargs["log_dir"]
        uri = kwargs.get("uri") if self.name == "mlflow" else None
        if (
            isinstance(uri, str)
            and uri.startswith("sqlite:///")
            and uri[10:] not in ("", ":memory:")
        ):
            path = uri[len("sqlite:///") :]
            if not path.startswith("/"):
                kwargs["uri"] = f"sqlite:///{_absolute(path)}"
        return self


MIN_INTERVAL = 0.05  # seconds: the shortest sampling or polling interval of a monitor


def by_epoch(curve: dict[Any, Any], what: str) -> dict[int, Any]:
    """{epoch: value} with its keys read as whole epochs (1, "1", "01", 1.0 and "1.0" alike; a
    YAML or JSON file gives them as text). Raises ValueError naming `what` for any other key."""
    out: dict[int, Any] = {}
    for key, value in curve.items():
        try:
            number = float(str(key).strip())
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number == int(number)):
            raise ValueError(f"{what}: epoch {key!r}, expected a whole number")
        out[int(number)] = value
    return out


class MonitorConfig(_Strict):
    """What a running job reports besides its per-epoch rows; it never changes what is trained."""

    log_every: int = Field(
        50,
        gt=0,
        description="Step metrics (loss, lr, img/s, step time, data wait, gradient norm) every N "
        "steps, to trackers' on_log (MLflow: step/...).",
    )
    system_every: float = Field(
        10.0,
        ge=0,
        description="Seconds between samples of every rank's CPU, memory, disk and network use "
        "(and its GPU's, with nvidia-ml-py) into RUN_DIR/system/; 0: none; at least 0.05.",
    )

    @field_validator("system_every")
    @classmethod
    def _a_sampling_interval(cls, v: float) -> float:
        # below it the sampler is a busy loop that takes a core from training
        if 0 < v < MIN_INTERVAL or v == math.inf:
            raise ValueError(
                f"expected 0 (off) or {MIN_INTERVAL:g} s to a finite number of seconds"
            )
        return v

    pictures: int = Field(
        4,
        ge=0,
        description="At each validation, image / ground truth / prediction for N fixed "
        "validation slices (N cases spread over the split, each on its slice with the most "
        "foreground; several slices per case when the split has fewer cases, at most its slices "
        "with foreground: plan and train warn when that is fewer than N) into "
        "RUN_DIR/pictures/ and to the trackers (MLflow: artifacts validation/); segmentation "
        "only; 0: none.",
    )


class StrategyConfig(Component):
    """How workers combine their gradients; a plain string in YAML means {name: that}."""

    name: str = Field(
        "allreduce",
        description="allreduce (DDP ring all-reduce) | local_sgd | a 'pkg.mod:Class' strategy.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="allreduce: bucket_cap_mb, gradient_as_bucket_view, static_graph, compression "
        "(none | fp16 | bf16 | powersgd), powersgd_rank, powersgd_start_iter; local_sgd: period.",
    )


class CallbackConfig(Component):
    name: str = Field(
        description="early_stop (finish when the validation metric has not improved by more "
        "than min_delta for patience validations, or with a reference curve stays under it: "
        "kwargs patience, min_delta, reference, margin, after, metric) | a 'pkg.mod:Class' / "
        "'file.py:Class' with hooks (on_step_end, on_epoch_end, ...), called as Class(**kwargs)."
    )


class DivergenceConfig(_Strict):
    """Stop a run whose loss diverges, at the step it does, keeping the checkpoints before it."""

    enabled: bool = True
    factor: float = Field(
        10.0, gt=1, description="Diverged when the smoothed loss exceeds this × its minimum..."
    )
    patience: int = Field(3, ge=1, description="...for this many consecutive steps (or NaN/inf).")
    smoothing: float = Field(
        0.9, ge=0, lt=1, description="Exponential moving average of the loss (0: none)."
    )

    @model_validator(mode="after")
    def _takes_effect(self) -> DivergenceConfig:
        defaults = type(self).model_fields  # a saved config.yaml writes the defaults out
        set_ = [
            k
            for k in ("factor", "patience", "smoothing")
            if getattr(self, k) != defaults[k].default
        ]
        if set_ and not self.enabled:
            takes = "takes" if len(set_) == 1 else "take"
            raise ValueError(f"{', '.join(set_)} {takes} effect only with enabled: true")
        return self


class FinetuneConfig(_Strict):
    """Fine-tuning from model.pretrained: the encoder (the model's `encoder_modules`, or its
    submodule named `encoder`) learns later or slower than the rest."""

    freeze_encoder_epochs: int = Field(
        0,
        ge=0,
        description="The encoder's weights are not updated for the first N epochs (its lr is 0; "
        "gradients still flow through it, normalisation statistics still adapt).",
    )
    encoder_lr_scale: float = Field(
        1.0,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="The encoder's lr is the schedule's lr × this (after any freeze); 0 to 100.",
    )


class TrainConfig(_Strict):
    epochs: int = Field(gt=0, le=1_000_000)
    batch_size: int = Field(
        gt=0, le=1_000_000, description="Per worker; the global batch is × workers."
    )
    optimizer: OptimizerConfig
    loss: LossConfig = LossConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    steps_per_epoch: int | None = Field(
        None, gt=0, description="Cap on steps per epoch (quick runs); default: a full pass."
    )
    val_every: int = Field(1, gt=0, description="Validate every N epochs (and after the last).")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Also checkpoint every N steps (default: at epoch ends only)."
    )
    keep_checkpoints: int = Field(
        3, gt=0, description="Keep the newest N checkpoints (plus best.pt)."
    )
    callbacks: list[CallbackConfig] = Field(
        default_factory=list,
        description="Objects with hooks (on_step_end, on_epoch_end, ...), by 'pkg.mod:Class'.",
    )

    @field_validator("callbacks", mode="before")
    @classmethod
    def _one_callback(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | dict) else v  # one callback needs no list

    strategy: StrategyConfig = StrategyConfig()

    simulate_workers: int | None = Field(
        None,
        gt=0,
        # more than the largest data-parallel runs published (Goyal et al.: 256 GPUs): 100000
        # was a step of hours that no signal could stop
        le=4096,
        description="Run the math of K synchronous workers in one process (accumulation).",
    )
    simulate_fused: bool = Field(
        False,
        description="Run the K simulated micro-batches as one forward pass, BatchNorm still per "
        "micro-batch. Faster; equal up to float rounding, which training amplifies "
        "(docs/distributed.md).",
    )
    sync_batchnorm: bool = Field(
        False, description="Synchronise BatchNorm statistics across workers."
    )
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision (autocast): auto is bf16 on a GPU that supports it, none "
        "(fp32) on CPU; fp16 adds loss scaling.",
    )
    channels_last: Literal["auto"] | bool = Field(
        "auto",
        description="Model and batches in channels-last memory format (faster convolutions on "
        "tensor cores); auto: on GPUs.",
    )
    compile: (
        bool | Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    ) = Field(
        False,
        description="torch.compile the model (in place: its weights, checkpoints and resume are "
        "unchanged); true or a torch.compile mode. Worth it where benchmarks/gpu.py measures it "
        "faster; the first steps pay the compilation.",
    )
    check_every: Literal["auto"] | PositiveInt = Field(
        "auto",
        description="Every N steps (and before every checkpoint) the host reads the losses for "
        "the divergence guard and the workers agree on a stop. Each read waits for the device; "
        "between them a GPU runs ahead. A stop or divergence is acted on up to N-1 steps later "
        "(the diverged step is still named, its weights never saved). auto: 1 on CPU, 10 on GPUs.",
    )
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this.")

    @field_validator("check_every", mode="before")
    @classmethod
    def _steps_or_auto(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError("expected auto or a whole number of steps > 0")

    finetune: FinetuneConfig = FinetuneConfig()
    divergence: DivergenceConfig = DivergenceConfig()
    deterministic: bool = Field(True, description="Seed everything, deterministic kernels.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads per worker (default: the cores / workers on this node).",
    )

    @model_validator(mode="after")
    def _simulation_is_exact(self) -> TrainConfig:
        if self.simulate_fused and not self.simulate_workers:
            raise ValueError(
                "train.simulate_fused applies to train.simulate_workers only; set both or neither"
            )
        compression = self.strategy.kwargs.get("compression", "none")
        if self.simulate_workers and (self.strategy.name != "allreduce" or compression != "none"):
            # the simulation accumulates exact gradients: another strategy's math would go unsimulated
            what = (
                f"'{self.strategy.name}'"
                if self.strategy.name != "allreduce"
                else f"compression '{compression}'"
            )
            raise ValueError(
                f"train.simulate_workers reproduces plain gradient all-reduce, not train.strategy "
                f"{what}: use strategy allreduce without compression, or real workers"
            )
        if self.simulate_workers and self.sync_batchnorm:
            raise ValueError(
                "train.sync_batchnorm synchronises real workers' statistics; simulated workers "
                "(train.simulate_workers) have none to share: drop one"
            )
        return self


class RunConfig(_Strict):
    name: str = Field(description="Run name; the default run folder is runs/<name>.")
    seed: int = Field(
        0,
        ge=0,
        le=SEED_MAX,
        description="Seeds everything random (init_seed, data_seed: one part).",
    )
    init_seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Seed of the weight initialisation only (default: seed).",
    )
    data_seed: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="Seed of the data order, augmentation and dropout only (default: seed).",
    )
    workers: int | None = Field(
        None,
        gt=0,
        description="Default for `segscale train --workers` (the XML parallelism degree).",
    )
    task: TaskConfig = TaskConfig()
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig
    tracker: list[TrackerConfig] = Field(
        default_factory=lambda: [TrackerConfig()],
        description="One tracker or a list: every one records the run (e.g. [mlflow, tensorboard]).",
    )
    monitor: MonitorConfig = MonitorConfig()

    @field_validator("tracker", mode="before")
    @classmethod
    def _one_tracker(cls, v: Any) -> Any:
        return [v] if isinstance(v, str | dict) else v  # one tracker needs no list

    @field_validator("tracker")
    @classmethod
    def _trackers_once_each(cls, v: list[TrackerConfig]) -> list[TrackerConfig]:
        names = [t.name for t in v]
        if not names:
            raise ValueError("an empty list; to record nothing, write tracker: none")
        if len(set(names)) < len(names):
            raise ValueError("each tracker once (two would record the run twice)")
        if "none" in names and len(names) > 1:
            raise ValueError("'none' means no tracker; drop it or the others")
        return v

    def tracker_config(self, name: str) -> TrackerConfig | None:
        """The tracker of that name (e.g. 'mlflow') among the run's trackers, or None."""
        return next((t for t in self.tracker if t.name == name), None)

    # where each key was set: validate's _where bound to the file and overrides it read
    _where: Any = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:  # the same settings, wherever they were read from
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def where(self, key: str) -> str | None:
        """Where `key` (dotted: 'model.name') was set, to name in an error found after
        validation (an unknown component): 'c.yaml:9', 'c.xml <CNN_archi>', "override
        'model.name=x'"; None for a config validated from a dict alone."""
        if self._where is None or self._where.keywords["source"] == "<config>":
            return None
        return self._where(tuple(key.split(".")))

    @model_validator(mode="after")
    def _parts_agree(self) -> RunConfig:
        if self.train.finetune.freeze_encoder_epochs and self.model.pretrained is None:
            raise ValueError(
                "train.finetune.freeze_encoder_epochs takes effect only with model.pretrained "
                "(it would hold a random encoder fixed)"
            )
        if self.data.train_split == self.data.test_split:
            raise ValueError(
                f"data.train_split and data.test_split are both '{self.data.test_split}': the "
                "test would score what the model trained on"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        # it names a folder, an MLflow run and a Slurm job: a line break or a quote in it would
        # end up in a shell script (the sbatch of `segscale launch`)
        if not re.fullmatch(r"\w[\w.-]*", v):
            raise ValueError(
                "must be a plain folder name: letters, digits, '.', '_' and '-', starting with a "
                "letter, digit or '_'"
            )
        return v

    def plugins(self) -> dict[str, str]:
        """The parts named by a user's code ('pkg.mod:attr' or a .py file), as {key: spec},
        e.g. {'model.name': '/home/me/net.py:make'}: what building the run would import."""
        parts: dict[str, Component | None] = {
            "task": self.task,
            "model": self.model,
            "train.loss": self.train.loss,
            "train.optimizer": self.train.optimizer,
            "train.strategy": self.train.strategy,
            "data.transform": self.data.transform,
            **{f"train.callbacks[{i}]": c for i, c in enumerate(self.train.callbacks)},
            **{f"tracker[{i}]": t for i, t in enumerate(self.tracker)},
        }
        return {
            f"{key}.name": part.name
            for key, part in parts.items()
            if part is not None and (":" in part.name or part.name.endswith(".py"))
        }

    def seed_for(self, part: Literal["init", "data"]) -> int:
        """The seed of one part of the randomness: `init_seed`/`data_seed`, else `seed`."""
        own = self.init_seed if part == "init" else self.data_seed
        return self.seed if own is None else own

    def settings(self) -> dict[str, Any]:
        """Everything that shapes training, as JSON data: not the tracker and the monitor, which
        only record, nor train.check_every, which only sets when the host looks (a run may
        resume with another). The digest hashes it; trackers record it as the run's
        parameters."""
        data = self.model_dump(
            mode="json", exclude={"tracker": True, "monitor": True, "train": {"check_every"}}
        )
        # unset, options added since 0.1 leave the digest that runs started before them have
        for key in ("init_seed", "data_seed"):
            if data[key] is None:
                del data[key]
        if data["model"]["pretrained"] is None:
            del data["model"]["pretrained"]
        if data["data"]["split_seed"] is None:
            del data["data"]["split_seed"]
        if data["data"]["folds"] is None and data["data"]["fold"] == 0:
            del data["data"]["folds"], data["data"]["fold"]
        if data["train"]["finetune"] == FinetuneConfig().model_dump(mode="json"):
            del data["train"]["finetune"]
        # how fast, not what: the result is the same up to float rounding
        for key, default in (("channels_last", "auto"), ("compile", False)):
            if data["train"][key] == default:
                del data["train"][key]
        if data["data"]["on_device"] == "auto":
            del data["data"]["on_device"]
        return data

    def digest(self) -> str:
        """A short hash of the settings (for checkpoints and records)."""
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def resume_digest(self) -> str:
        """A short hash of what the run computes: the settings without SPEED_SETTINGS, which a
        resume may change (checkpoints carry it; a resume is refused when it differs)."""
        data = self.settings()
        for key in SPEED_SETTINGS:
            section, name = key.split(".")
            data[section].pop(name, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def differing_keys(self, other: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """The dotted keys (params()) whose values differ between the two configs, sorted."""
        mine, theirs = self.params(), other.params()
        keys = {*mine, *theirs} - set(ignore)
        return sorted(k for k in keys if mine.get(k) != theirs.get(k))

    def params(self) -> dict[str, Any]:
        """The settings flattened to dotted keys, as trackers record them:
        {'train': {'optimizer': {'lr': 1e-3}}} → {'train.optimizer.lr': 1e-3}."""
        return _flatten(self.settings())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML (or Auto-CNNp XML) run config, apply `a.b=value` overrides, validate, resolve
    relative paths against the working directory. Raises ConfigError naming file, line and key."""
    raw, text, origins = read_raw(path)
    for item in overrides or []:
        apply_override(raw, item)
    return validate(raw, source=str(path), text=text, overrides=overrides, origins=origins)


class RawConfig(typing.NamedTuple):
    """A config file as read, before validation: its keys as written, its YAML text (None for
    XML) and, for XML, where each key came from ({'train.batch_size': '<property
    name="minibatch_size">'}; its parallelism degree is `workers`)."""

    raw: dict[str, Any]
    text: str | None = None
    origins: dict[str, str] | None = None


MAX_CONFIG_BYTES = 1_000_000  # a config file larger than this is not one


def read_raw(path: str | Path) -> RawConfig:
    """A config file's keys as written, before validation (RawConfig). Raises ConfigError for a
    file that cannot be read."""
    path = Path(path)
    if path.exists() and not path.is_file():  # /dev/zero, a FIFO: read without end
        what = "a folder" if path.is_dir() else "not a regular file"
        raise ConfigError(f"cannot read config {path}: {what}; expected a YAML or XML file")
    try:
        size = path.stat().st_size if path.is_file() else 0
    except OSError:
        size = 0  # the read below says why
    if size > MAX_CONFIG_BYTES:  # a data file given by mistake: parsing it takes minutes
        raise ConfigError(
            f"{path}: {size / 1e6:.1f} MB; a config is a few KB of text (at most "
            f"{MAX_CONFIG_BYTES // 1_000_000} MB): is it the right file?"
        )
    if path.suffix.lower() == ".xml":
        from segscale.xmlconfig import read_xml

        if not path.is_file():
            raise ConfigError(f"cannot read config {path}: no such file")
        raw, origins = read_xml(path)
        return RawConfig(raw, None, origins)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        raw = read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return RawConfig(raw, text)


def as_written(cfg: RunConfig, raw: Any) -> dict[str, Any]:
    """What a config file sets (defaults it leaves unset left out), validated, with each path
    as the file wrote it: relative paths stay relative (to the working directory), where the
    validated config holds them resolved. For `segscale config convert`."""

    def keep(done: Any, given: Any) -> Any:
        if isinstance(done, dict):
            given = {"name": given} if isinstance(given, str) else given  # component shorthand
            given = given if isinstance(given, dict) else {}
            return {k: keep(v, given.get(k)) for k, v in done.items()}
        if isinstance(done, list) and isinstance(given, list) and len(done) == len(given):
            return [keep(d, g) for d, g in zip(done, given)]
        if isinstance(done, str) and isinstance(given, str) and Path(done).is_absolute():
            return given  # resolved here from what the file wrote
        return done

    return keep(cfg.model_dump(mode="json", exclude_unset=True), raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, 1e-3, [1,2] work).
    `~a.b.c` removes the key (Hydra's form): back to its default, where null would be a value
    (an sgd config's momentum, when an override makes it adam)."""
    if item.startswith("~"):
        _remove(raw, item)
        return
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}': expected key.sub=value, or ~key.sub to remove it")
    node = raw
    parts = key.split(".")
    if "" in parts:
        raise ConfigError(f"override '{item}': an empty key in '{key}'; expected key.sub=value")
    for i, part in enumerate(parts):
        # callbacks.0.name, callbacks[0].name: an index into a list field (a kwargs dict may
        # have number keys: a class's weight, an epoch of a curve)
        field = _field_at(tuple(parts[:i])) if part.isdigit() else None
        if "[" in part or (field is not None and typing.get_origin(field.annotation) is list):
            listed = ".".join([*parts[:i], part.partition("[")[0]] if "[" in part else parts[:i])
            raise ConfigError(
                f"override '{item}': an override cannot index a list; give {listed} whole, "
                f"e.g. {listed}=[...]"
            )
    for depth, part in enumerate(parts[:-1], 1):
        child = node.get(part)
        if child is None:  # absent, or given as null (transform: null): a new section
            child = node[part] = {}
        if isinstance(child, str):  # loss: dice, augment: left-atrium: a section in one word
            child = node[part] = _section_of(tuple(parts[:depth]), child)
        if isinstance(child, list):
            raise ConfigError(
                f"override '{item}': '{part}' is a list; give it whole, e.g. {part}=[...]"
            )
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = read_yaml(value)
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"override '{item}': value is not valid YAML: {problem}") from None


def _remove(raw: dict[str, Any], item: str) -> None:
    """Apply a `~a.b.c` override: the key is taken out of its section. Raises ConfigError when
    there is no such key to remove."""
    parts = item[1:].split(".")
    if "=" in item or "" in parts:
        raise ConfigError(f"override '{item}': expected ~key.sub (a key to remove, no value)")
    node: Any = raw
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            raise ConfigError(
                f"override '{item}': {where} is a list; give it whole without the item "
                f"({where}=[...]), or remove all of it (~{where})"
            )
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': {where} is not a section")
        if part not in node:
            parent = _field_at(tuple(parts[:depth])) if depth else None
            section = _section(parent.annotation) if parent is not None else None
            known = getattr(RunConfig if not depth else section, "model_fields", None)
            if known is not None and part not in known:  # a typo, not a default
                raise ConfigError(
                    f"override '{item}': {where} has no key '{part}'{did_you_mean(part, known)}"
                )
            given = did_you_mean(part, [str(k) for k in node])  # a typo of a key set here
            raise ConfigError(
                f"override '{item}': {where} has no key '{part}'{given}"
                if given  # kwargs too, whose keys no schema knows
                else f"override '{item}': {where} has no key '{part}' to remove (it takes its "
                "default already)"
            )
        if depth == len(parts) - 1:
            del node[part]
        node = node[part] if depth < len(parts) - 1 else None


def _section_of(loc: tuple[str, ...], word: str) -> Any:
    """The section a one-word value at loc stands for: a component's name ({name: word}), an
    augmentation preset (its settings); otherwise the word itself."""
    section = _section(getattr(_field_at(loc), "annotation", None))
    if isinstance(section, type) and issubclass(section, Component):
        return {"name": word}
    if section is AugmentConfig and word in AUGMENT_PRESETS:
        return dict(AUGMENT_PRESETS[word])
    return word


def validate(
    raw: dict[str, Any],
    source: str = "<config>",
    text: str | None = None,
    overrides: list[str] | None = None,
    origins: dict[str, str] | None = None,
) -> RunConfig:
    """A RunConfig from raw data; ConfigError names where the bad value came from: the
    command-line override that set it, else the file's line (`text`) or element (`origins`,
    RawConfig's), else `source`."""
    try:
        cfg = RunConfig.model_validate(raw)
    except RecursionError:  # lists in lists thousands deep: no config is
        raise ConfigError(f"{source}: nested too deep to be a config") from None
    except ValidationError as e:
        # A misspelt key shows up twice (unknown + missing); the unknown one carries the suggestion.
        err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
        # a value that fits no member of a union (bool | 'auto') names each member in its loc
        loc = tuple(str(p) for p in err["loc"] if not _is_union_member(p))
        rule = str(err["ctx"]["error"]) if err["type"] == "value_error" else ""
        where = _where(loc, source, text, overrides, origins, rule)
        raise ConfigError(f"{where}: {_describe(err, loc)}") from None
    cfg._where = functools.partial(
        _where, source=source, text=text, overrides=overrides, origins=origins
    )
    return cfg


def _where(
    loc: tuple[str, ...],
    source: str,
    text: str | None = None,
    overrides: list[str] | None = None,
    origins: dict[str, str] | None = None,
    rule: str = "",
) -> str:
    """Where the value at `loc` came from, for an error: the override that set it, else the
    YAML file's line (`text`) or the XML file's element (`origins`), else `source`. `rule`: a
    rule over a whole section that failed, whose message names the keys it reads."""
    key = ".".join(loc)
    keys = [(o, o.partition("=")[0].removeprefix("~")) for o in overrides or []]
    # an override that set this key (or the section holding it) is where the value came from
    given = [o for o, k in keys if key == k or key.startswith(k + ".")]
    # a rule over a whole section can fail on what the file and overrides set inside it
    inside = [o for o, k in keys if not key or k.startswith(key + ".")]
    # an XML file's elements of the key, or those a section rule names
    origin, every = _origin(origins or {}, key, rule)
    if rule:  # such a rule names the keys it reads: those overrides (or the file's)
        named = [o for o in inside if re.search(rf"\b{re.escape(_leaf(o))}\b", rule)]
        inside = named or ([] if origin else inside)
    line, whole = _line_of(text, loc) if text else (None, False)
    origin = origin or (None if inside else every)
    where = f"{source}:{line}" if line else f"{source} {origin}" if origin else source
    whole = whole or bool(origin)
    if given:
        where = f"override '{given[-1]}'"
    elif inside:  # the file too, if it holds this key at all
        named = " and ".join(f"override '{o}'" for o in inside)
        where = f"{where} and {named}" if whole or not key else named
    return where


def _origin(origins: dict[str, str], key: str, rule: str = "") -> tuple[str | None, str | None]:
    """Where in an XML file `key` came from, as (the elements it names, every element): the
    element of the key or of the entry holding it (train.loss for train.loss.name) for both;
    else the elements of the keys inside it that the `rule` (a section rule's message) names,
    and the elements of all the keys inside it (or those named, when the rule names some)."""
    holding = [k for k in origins if key == k or key.startswith(k + ".")]
    if holding:
        return (origins[max(holding, key=len)],) * 2
    inside = [k for k in origins if key and k.startswith(key + ".")]
    named = [k for k in inside if re.search(rf"\b{re.escape(_leaf(k))}\b", rule)]
    return " and ".join(origins[k] for k in named) or None, (
        " and ".join(origins[k] for k in named or inside) or None
    )


def _leaf(override: str) -> str:
    """The last key of an override: 'folds' of 'data.folds=3'."""
    return override.partition("=")[0].removeprefix("~").rpartition(".")[2]


def _is_union_member(part: Any) -> bool:
    """Whether a pydantic error-location part names a member of a union (e.g. "bool",
    "literal['auto']", "function-after[...]") rather than a key or a list index."""
    return isinstance(part, str) and (
        "[" in part or part in ("bool", "int", "float", "str", "none", "dict", "list")
    )


def _describe(err: Any, loc: tuple[str, ...]) -> str:
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        elsewhere = _paths_named(loc[-1])  # a key of another section, given in this one
        hint = f" (it is {' or '.join(elsewhere)})" if elsewhere else did_you_mean(loc[-1], fields)
        return f"unknown key '{key}'{hint}; valid keys here: {', '.join(fields)}"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    got = err.get("input")
    if isinstance(got, bool) or got is None:  # as YAML writes them: true, null
        got = _Shown("null" if got is None else str(got).lower())
    section = isinstance(got, dict)
    if len(repr(got)) > 200:  # a value shown, not a file's worth of it (YAML aliases expand)
        got = _Shown(shown(got))
    if err["type"] == "value_error":  # a rule of ours: its message says what was expected
        given = "" if section else f", got {got!r}"  # a whole section, however long, says nothing
        return f"key '{key}': {err['ctx']['error']}{given}" if key else str(err["ctx"]["error"])
    choices = _choices(loc)
    if choices:
        return f"key '{key}': expected one of {', '.join(choices)}, got {got!r}"
    return f"key '{key}': {expected_by(err)}, got {got!r}"


class _Shown(str):
    """A value cut for a message: its repr is the text itself."""

    def __repr__(self) -> str:
        return str(self)


def _choices(loc: tuple[str, ...]) -> list[str]:
    """The values a field of literals and booleans accepts (e.g. auto, true, false), as YAML
    spells them; [] for any other field."""
    field = _field_at(loc)
    if field is None:
        return []
    members = typing.get_args(field.annotation) or (field.annotation,)
    values: list[str] = []
    for member in members:
        if member is bool:
            values += ["true", "false"]
        elif typing.get_origin(member) is typing.Literal:
            values += [str(v) for v in typing.get_args(member)]
        else:
            return []
    return values


def _paths_named(name: str, model: Any = None, prefix: str = "") -> list[str]:
    """Every config key called `name`, as dotted paths (e.g. warmup_epochs →
    train.schedule.warmup_epochs)."""
    found: list[str] = []
    for field_name, field in (model or RunConfig).model_fields.items():
        path = f"{prefix}{field_name}"
        if field_name == name:
            found.append(path)
        section = _section(field.annotation)
        if hasattr(section, "model_fields") and section is not model:
            found += _paths_named(name, section, path + ".")
    return found


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """The valid field names of the config section at loc (for suggestions)."""
    if not loc:
        model: Any = RunConfig
    else:
        field = _field_at(loc)
        model = _section(field.annotation) if field is not None else None
    return list(model.model_fields) if hasattr(model, "model_fields") else []


def _field_at(loc: tuple[str, ...]) -> Any:
    """The pydantic field at a config location, or None; list indices and optional sections
    (train.callbacks.0, data.transform) are walked through."""
    model: Any = RunConfig
    field = None
    for part in loc:
        if part.isdigit():
            continue  # an item of a list: its model is the list's
        fields = getattr(model, "model_fields", None)
        field = fields.get(part) if fields else None
        if field is None:
            return None
        model = _section(field.annotation)
    return field


def _section(annotation: Any) -> Any:
    """The pydantic model inside list[...] or X | None, else the annotation itself."""
    for arg in typing.get_args(annotation):
        if hasattr(arg, "model_fields") or typing.get_args(arg):
            return _section(arg)
    return annotation


def _line_of(text: str, loc: tuple[str, ...]) -> tuple[int | None, bool]:
    """The 1-based line of the deepest key of loc present in the YAML text, and whether that
    key is loc itself (the file holds it) rather than a section above it."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None, False
    line, found = None, 0
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]  # a list's item (a callback, a tracker): its own line
            line, found = node.start_mark.line + 1, found + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == part:
                line, node, found = k.start_mark.line + 1, v, found + 1
                break
        else:
            break
    return line, found == len(loc)


def save_config(cfg: RunConfig, path: Path, mark: str | None = None) -> None:
    """`cfg` as YAML at `path`; `mark`: a first comment line naming who wrote it, signed
    (_files.signed), so a rerun tells the file edited by hand since."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    write_atomic(path, signed(f"# {mark}\n{text}", mark) if mark else text)

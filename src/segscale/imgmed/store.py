"""The prepared store: memory-mapped arrays plus meta.json, written atomically.

<store>/images.npy   float32 (N, C, S, S)   model inputs, already normalised and resized
<store>/masks.npy    uint8   (N, S, S)      labels 0..K-1
<store>/meta.json    sources, cases (split, slice indices, original shape and affine),
                     preprocessing parameters, labels, input and content hashes
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from segscale.errors import DataError
from segscale.imgmed.transforms import Preprocessing

FORMAT = "segscale-store/1"


@dataclass
class Store:
    """A prepared store opened for reading (arrays are memory-mapped, not loaded)."""

    path: Path
    meta: dict[str, Any]
    images: np.ndarray
    masks: np.ndarray

    @classmethod
    def open(cls, path: str | Path) -> Store:
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise DataError(
                f"{path}: not a prepared store (no meta.json); run `segscale prepare` first"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{meta_path}: unreadable ({e}); prepare the store again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DataError(f"{meta_path}: format {got!r}, expected {FORMAT!r}")
        arrays = []
        for name in ("images.npy", "masks.npy"):
            try:  # numpy raises FileNotFoundError, ValueError (a truncated file), ... unnamed
                arrays.append(np.load(path / name, mmap_mode="r"))
            except (OSError, ValueError, EOFError) as e:
                what = "missing" if not (path / name).exists() else f"damaged ({e})"
                raise DataError(f"{path / name}: {what}; prepare the store again") from None
        images, masks = arrays
        if len(images) != len(masks) or images.ndim != 4 or masks.ndim != 3:
            raise DataError(
                f"{path}: images.npy {images.shape} and masks.npy {masks.shape} do not match; "
                "prepare the store again"
            )
        return cls(path, meta, images, masks)

    @property
    def num_classes(self) -> int:
        return len(self.meta["labels"])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def orientation(self) -> str | None:
        """The axis codes (e.g. 'RAS') most training volumes were stored in, which their slices
        were cut along: what `predict` gives a network. None for 2D pictures or when unknown
        (an entry published without it)."""
        if "orientation" in self.meta or "cases" not in self.meta:
            return self.meta.get("orientation")
        return orientation_of(self.meta["cases"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    def repartition(
        self, train: str, val: str, seed: int, folds: int | None = None, fold: int = 0
    ) -> Store:
        """This store with its `train` and `val` cases drawn anew (seeded): as many validation
        cases as before, or with `folds` (k-fold cross-validation) the pooled cases shuffled and
        dealt into `folds` folds of near-equal size (numpy's array_split), fold `fold`
        validating, so that over the k folds every case validates once. Every other split (the
        test split) is untouched; the arrays are shared. Raises DataError when there are fewer
        cases than folds."""
        pooled = sorted(c["id"] for c in self.meta["cases"] if c["split"] in (train, val))
        order = np.random.default_rng(seed).permutation(len(pooled))
        if folds is None:
            picked = order[: sum(c["split"] == val for c in self.meta["cases"])]
        elif folds > len(pooled):
            raise DataError(
                f"{self.path}: {len(pooled)} {train} and {val} cases; data.folds {folds} needs "
                f"at least as many (at most {len(pooled)} folds)"
            )
        else:
            picked = np.array_split(order, folds)[fold]
        chosen = {pooled[i] for i in picked}
        cases = [
            {**c, "split": val if c["id"] in chosen else train} if c["split"] in (train, val) else c
            for c in self.meta["cases"]
        ]
        splits = {}
        for c in cases:
            splits.setdefault(c["split"], []).append(c["id"])
        # the split as prepared stays known: it is what a run's record of its store compares
        prepared = self.meta.get("prepared_splits", self.meta["splits"])
        meta = {**self.meta, "cases": cases, "splits": splits, "prepared_splits": prepared}
        return Store(self.path, meta, self.images, self.masks)

    def cases(self, split: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.meta["cases"] if split is None or c["split"] == split]

    def rows(self, split: str) -> np.ndarray:
        """Row indices of a split, in case order."""
        cases = self.cases(split)
        if not cases:
            known = sorted({c["split"] for c in self.meta["cases"]})
            raise DataError(
                f"{self.path}: split '{split}' has no cases (splits here: {', '.join(known)})"
            )
        return np.concatenate([np.arange(c["start"], c["start"] + c["count"]) for c in cases])


def orientation_of(cases: list[dict[str, Any]]) -> str | None:
    """The axis codes most of the cases' volumes share (their recorded affines), None for
    pictures."""
    from segscale.imgmed.geometry import axis_codes, common_axis_codes

    return common_axis_codes(
        {c["id"]: axis_codes(np.asarray(c["affine"])) for c in cases if c.get("affine") is not None}
    )


class Origin(NamedTuple):
    """What a store was made from: ('prepared', the dataset's folder) or ('augmented', the
    store it grew), as resolved paths."""

    how: str
    source: str


def store_origin(meta: dict[str, Any]) -> Origin:
    """A store's Origin, from its meta.json."""
    augmented = meta.get("augmented")
    if isinstance(augmented, dict):
        return Origin("augmented", str(augmented.get("source")))
    return Origin("prepared", str(meta.get("source")))


STORE_FILES = ("images.npy", "masks.npy", "meta.json")  # what a store folder holds


def is_current(output: Path, input_hash: str, origin: Origin, force: bool = False) -> bool:
    """Whether `output` already holds the store these inputs make (a rerun is then a no-op). A
    store of the same `origin` (prepared from the same dataset, or augmented from the same
    store) made with other settings is replaced; a store of another origin, or a damaged one
    (meta.json unreadable), only with `force`; a non-empty folder that is not a store, or a
    store with other files in it (they would go with it), never. Raises DataError otherwise."""
    if not output.exists() or not any(output.iterdir()):
        return False
    others = sorted(p.name for p in output.iterdir() if p.name not in STORE_FILES)
    if not ((output / "meta.json").is_file() and (output / "images.npy").exists()):
        raise DataError(
            f"{output}: exists, is not empty and is not a prepared store; choose another output"
        )
    if others:
        raise DataError(
            f"{output}: a store with other files in it ({', '.join(others[:3])}), which "
            "replacing it would delete; move them out, or choose another output"
        )
    try:
        found = json.loads((output / "meta.json").read_bytes())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        found = None
    if not isinstance(found, dict):
        if not force:
            raise DataError(
                f"{output}: a damaged store (its meta.json cannot be read); give another "
                "output, or --force to replace it"
            )
        return False
    if found.get("input_hash") == input_hash:
        return True
    theirs = store_origin(found)
    if theirs != origin and not force:
        raise DataError(
            f"{output}: a store {theirs.how} from {theirs.source}, not {origin.how} from "
            f"{origin.source}; give another output, or --force to replace it"
        )
    return False


class StoreWriter:
    """Writes a store into a temp folder beside the target and renames it into place on success,
    so an interrupted prepare never leaves a half-written store behind. Raises DataError before
    anything is written when the disk has not room for it (its arrays are sparse files: a full
    disk would show only when they are written, hours into a large augmentation)."""

    def __init__(self, output: Path, num_rows: int, channels: int, size: int) -> None:
        self.output = output
        need = num_rows * size * size * (4 * channels + 1)  # float32 images, uint8 masks
        there = next(p for p in (output.parent, *output.parent.parents) if p.exists())
        try:
            free = shutil.disk_usage(there).free
        except OSError:  # not a folder one can ask: mkdir below says why
            free = need
        if need > free:
            raise DataError(
                f"cannot write {output}: the store needs {need / 1e9:,.1f} GB ({num_rows:,} "
                f"slices of {channels}×{size}×{size}), and {free / 1e9:,.1f} GB are free there"
            )
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
        except OSError as e:
            raise DataError(f"cannot write {output}: {e.strerror or e}") from None
        try:  # the arrays are sized up front: a full disk or a size limit shows here
            self.images = np.lib.format.open_memmap(
                self.tmp / "images.npy",
                mode="w+",
                dtype=np.float32,
                shape=(num_rows, channels, size, size),
            )
            self.masks = np.lib.format.open_memmap(
                self.tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(num_rows, size, size)
            )
        except OSError as e:
            self.abort()
            raise DataError(f"cannot write {output}: {e.strerror or e}") from None

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).data)
        h.update(np.ascontiguousarray(self.masks).data)
        return h.hexdigest()

    def commit_cases(self, meta: dict[str, Any], cases: list[dict[str, Any]]) -> None:
        """Commit with the fields derived from what was written: the cases, the splits they
        make, the content hash and the time."""
        splits = {s: [c["id"] for c in cases if c["split"] == s] for s in ("train", "val", "test")}
        self.commit(
            {
                **meta,
                "splits": splits,
                "cases": cases,
                "content_hash": self.content_hash(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )

    def commit(self, meta: dict[str, Any]) -> None:
        self.images.flush()
        self.masks.flush()
        del self.images, self.masks
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.output.exists():
            old = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
            os.replace(self.output, old)
            os.replace(self.tmp, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.output)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

"""`segscale prepare`: raw dataset → prepared store (split by case, sliced, resized, normalised)."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from segscale._files import file_sha256, write_atomic
from segscale._progress import progress_bar
from segscale.errors import DataError, Preempted
from segscale.imgmed.files import list_files
from segscale.imgmed.geometry import (
    axis_codes,
    common_axis_codes,
    dataset_notes,
    one_slice_on_axis,
    onto_grid,
    plane_across,
    split_majority,
    to_axis_codes,
)
from segscale.imgmed.io import (
    load_image2d,
    load_mask2d,
    load_nifti,
    nifti_header,
    stored_axis_codes,
)
from segscale.imgmed.sources import Case, Source, discover
from segscale.imgmed.store import FORMAT, Origin, StoreWriter, is_current, orientation_of
from segscale.imgmed.transforms import (
    Plane,
    Preprocessing,
    channels_first,
    inplane_spacing,
    preprocess,
    require_finite,
    to_grid,
    to_slices,
)


def split_cases(
    case_ids: list[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Case id → train/val/test; by case, so no case lands in two splits. Seeded."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"split fractions val={val_fraction}, test={test_fraction}: expected each in [0, 1) and a sum < 1"
        )
    n = len(case_ids)
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction) if test_fraction > 0 else 0
    n_val = round(n * val_fraction) if val_fraction > 0 else 0
    n_test = max(n_test, 1 if test_fraction > 0 and n >= 3 else 0)
    n_val = max(n_val, 1 if val_fraction > 0 and n >= 3 else 0)
    if n - n_test - n_val < 1:
        raise DataError(
            f"{n} case(s) are too few for a train split with val={val_fraction}, test={test_fraction}"
        )
    splits = {}
    for rank, i in enumerate(order):
        splits[case_ids[i]] = (
            "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        )
    return splits


def parse_labels(text: str) -> dict[int, str]:
    """`--labels`: '1,2' or '1:liver,2:tumour' (raw mask values, with names or not); the
    background, 0, is implied."""
    out: dict[int, str] = {}
    for item in text.split(","):
        value, _, name = item.strip().partition(":")
        try:
            v = int(value)
        except ValueError:
            raise DataError(
                f"--labels '{text}': expected values like 1,2 or 1:liver,2:tumour"
            ) from None
        if v < 0 or v in out:
            why = "negative" if v < 0 else "given twice"
            raise DataError(f"--labels '{text}': value {v} {why}")
        out[v] = name.strip() or ("background" if v == 0 else f"label {v}")
    return out


def parse_label_map(text: str | None) -> dict[int, int] | None:
    """'0:1,255:0' → {0: 1, 255: 0} (raw mask value → class)."""
    if not text:
        return None
    try:
        pairs = [(int(a), int(b)) for a, b in (kv.split(":") for kv in text.split(","))]
    except ValueError as e:
        raise DataError(f"label map '{text}': expected raw:class pairs like 0:1,255:0") from e
    raw = [a for a, _ in pairs]
    twice = sorted({a for a in raw if raw.count(a) > 1})
    if twice:
        raise DataError(f"label map '{text}': raw value(s) {twice} given twice")
    return dict(pairs)


def prepare(
    source: str | Path,
    output: str | Path,
    prep: Preprocessing = Preprocessing(),
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    label_map: dict[int, int] | None = None,
    progress: bool = True,
    jobs: int = 1,
    force: bool = False,
) -> tuple[Path, bool]:
    """Prepare a store; returns (path, written). Re-running with the same inputs is a no-op;
    with other settings, it replaces the store it made from this dataset; a store of another
    origin only with `force` (store.is_current).

    Cases are processed by `jobs` processes, each into its own chunk file in a `.NAME.partial`
    folder beside the output; the store is then assembled in case order (identical for any
    `jobs`). An interrupted or failed run keeps its finished chunks: the next run with the same
    settings reuses each chunk whose case files and settings are unchanged."""
    if jobs < 1:
        raise DataError(f"jobs {jobs}: expected at least 1")
    src = discover(source)
    output = Path(output).resolve()
    # a store inside a folder the source lists files from would be read as data next time
    listed = {p.resolve().parent for c in src.cases for p in (*c.images, c.label) if p is not None}
    inside = next((f for f in listed if f == output or f in output.parents), None)
    inside = src.root.resolve() if output == src.root.resolve() else inside
    if inside is not None:
        raise DataError(
            f"{output}: inside {inside}, which the dataset's files are listed from; the next "
            "prepare would read the store as data. Write it elsewhere"
        )
    params = {
        "preprocessing": prep.to_dict(),
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "label_map": {str(k): v for k, v in label_map.items()} if label_map else None,
        # what dataset.json / labels.json declare: a new name or label makes a new store
        "declared": [src.name, sorted(src.labels.items()), src.channel_names],
    }
    digests = _case_digests(src)
    input_hash = _input_hash(digests, params)
    partial = output.parent / f".{output.name}.partial"
    if is_current(output, input_hash, Origin("prepared", str(src.root.resolve())), force):
        shutil.rmtree(partial, ignore_errors=True)  # chunks of a run stopped after its commit
        return output, False

    labels, value_to_class = label_table(src, label_map)
    splits = split_cases([c.id for c in src.cases], val_fraction, test_fraction, seed)
    is_volume = src.volumes
    # every volume in the axes most of them are stored in: slices then cut one anatomical plane
    # (one slice is cut along its axis of size 1 as it is: it has no vote)
    stored = case_orientations(src) if is_volume else {}
    flat = one_slice_cases(src) if is_volume else set()
    orientation = common_axis_codes({c: v for c, v in stored.items() if c not in flat})
    partial.mkdir(parents=True, exist_ok=True)
    # a chunk depends on its case's files and the per-case settings, not on the split
    setting = json.dumps(
        [prep.to_dict(), sorted(value_to_class.items()), FORMAT, orientation]
    ).encode()
    chunks = {
        c.id: partial
        / f"{c.id}-{hashlib.sha256(setting + digests[c.id].encode()).hexdigest()[:16]}.npz"
        for c in src.cases
    }
    todo = [c for c in src.cases if not chunks[c.id].is_file()]
    try:
        _run_cases(
            todo,
            chunks,
            is_volume,
            value_to_class,
            prep,
            jobs,
            progress,
            src.name,
            resumed=len(src.cases) - len(todo),
            orientations={cid: (codes, orientation) for cid, codes in stored.items()},
        )
    except DataError as e:  # --channels picked by names that do not fit the images
        if src.channels_declared and prep.channels is not None and "out of range" in str(e):
            raise DataError(
                f"{e}\n{src.root / 'dataset.json'} declares {len(src.channel_names)} channel(s) "
                f"({', '.join(src.channel_names)}), which --channels picks by: do they match "
                "the images?"
            ) from None
        raise
    except KeyboardInterrupt:
        kept = sum(chunks[c.id].is_file() for c in src.cases)
        raise Preempted(
            f"{output}: interrupted with {kept} of {len(src.cases)} cases prepared, kept in "
            f"{partial}; the same command goes on from them"
        ) from None

    # the store's size from the small mask arrays; the images are then read one case at a time,
    # so a dataset larger than memory can be assembled
    total, channels = _store_size({c.id: chunks[c.id] for c in src.cases})
    writer = StoreWriter(output, total, channels, prep.size)
    cases_meta: list[dict[str, Any]] = []
    try:
        start = 0
        for case in src.cases:
            images, masks, info = _read_chunk(chunks[case.id], "images", "masks", "info")
            info = json.loads(str(info))
            count = len(masks)
            writer.images[start : start + count] = images
            writer.masks[start : start + count] = masks
            cases_meta.append(
                {"id": case.id, "split": splits[case.id], **info, "start": start, "count": count}
            )
            start += count
        meta = {
            "format": FORMAT,
            "name": src.name,
            "source": str(src.root.resolve()),
            "source_kind": src.kind,
            "labels": {str(k): v for k, v in labels.items()},
            "label_values": {
                str(v): c for v, c in value_to_class.items()
            },  # raw mask value → class
            "channel_names": _channel_names(src, prep, channels, cases_meta),
            # what predict reorients a volume to (the zoo ships it without the cases)
            # (a dataset of one-slice volumes: the axes they were cut in, as prepared)
            "orientation": orientation
            if orientation is not None
            else orientation_of([c for c in cases_meta if c["stored_axes"] is not None]),
            **params,
            "input_hash": input_hash,
        }
        writer.commit_cases(meta, cases_meta)
    except BaseException:
        writer.abort()
        raise
    now = {  # (one slice is cut along its axis of size 1 as it is, not reoriented)
        c["id"]: orientation if c["reoriented"] else c["stored_axes"]
        for c in cases_meta
        if 1 not in c["shape"][:3]
    }
    for note in dataset_notes([(c["id"], c["affine"]) for c in cases_meta], prep.axis, now):
        warnings.warn(note, stacklevel=2)
    moved = [c for c in cases_meta if c.get("reoriented")]
    if moved:
        warnings.warn(
            f"{len(moved)} of {len(cases_meta)} case(s) stored in other axes than the others' "
            f"{orientation} (e.g. {moved[0]['id']}: {moved[0]['stored_axes']}) were reoriented "
            f"to {orientation} (a permutation and flips, exact), so that every case's slices "
            "cut one anatomical plane",
            stacklevel=2,
        )
    if orientation is not None:  # one slice is cut as it is: maybe in another plane
        plane = plane_across(orientation, prep.axis)
        other = [
            c
            for c in cases_meta
            if 1 in c["shape"][:3]
            and c["stored_axes"] is not None
            and plane_across(axis_codes(c["affine"]), prep.axis) != plane
        ]
        if other:
            c = other[0]
            warnings.warn(
                f"{len(other)} one-slice case(s) (e.g. {c['id']}: "
                f"{plane_across(axis_codes(c['affine']), prep.axis)}) are cut in another plane "
                f"than the other volumes ({plane}): the network learns both",
                stacklevel=2,
            )
    small = [c for c in cases_meta if min(c.get("resampled") or [prep.size]) < MIN_PLANE]
    if prep.spacing is not None and small:
        c = small[0]
        warnings.warn(
            f"--spacing {prep.spacing:g} mm: {len(small)} case(s) resample to under {MIN_PLANE} "
            f"pixels across (e.g. {c['id']}: {c['resampled'][0]}×{c['resampled'][1]}); the "
            "spacing is far coarser than the voxels",
            stacklevel=2,
        )
    shutil.rmtree(partial, ignore_errors=True)
    return output, True


MIN_PLANE = 8  # pixels across a resampled slice below which little anatomy is left


def _run_cases(
    todo: list[Case],
    chunks: dict[str, Path],
    is_volume: bool,
    value_to_class: dict[int, int],
    prep: Preprocessing,
    jobs: int,
    progress: bool,
    name: str,
    resumed: int,
    orientations: dict[str, tuple[str | None, str | None]] | None = None,
) -> None:
    """Preprocess each case into its chunk, in this process or in `jobs` processes;
    `orientations`: case id → (its axis codes, the dataset's) for _prepare_case."""
    orientations = orientations or {}
    args = [
        (c, chunks[c.id], is_volume, value_to_class, prep, jobs > 1, orientations.get(c.id))
        for c in todo
    ]
    note = f" ({resumed} resumed)" if resumed else ""
    refused: dict[str, str] = {}  # every case's problem, not only the first one's
    with progress_bar(progress, f"preparing {name}{note}", len(todo)) as advance:
        if jobs == 1 or len(todo) <= 1:
            for case, a in zip(todo, args):
                try:
                    _prepare_case(*a)
                except DataError as e:
                    refused[case.id] = str(e)
                advance()
        else:
            import multiprocessing as mp
            import sys
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # fork starts at once (spawn re-imports torch in each process); torch's CPU thread
            # pools survive a fork, as its DataLoader workers show, but CUDA does not
            torch = sys.modules.get("torch")
            cuda = torch is not None and torch.cuda.is_initialized()
            method = "fork" if sys.platform == "linux" and not cuda else "spawn"
            workers = min(jobs, len(todo))
            context = mp.get_context(method)
            with ProcessPoolExecutor(workers, context, initializer=_ignore_interrupt) as pool:
                futures = {pool.submit(_prepare_case, *a): case for case, a in zip(todo, args)}
                try:
                    for future in as_completed(futures):
                        try:
                            future.result()
                        except DataError as e:
                            refused[futures[future].id] = str(e)
                        advance()
                except BaseException:  # Ctrl-C or a failure: the cases in hand finish, no others
                    # cancelled here and now: shutdown(cancel_futures=True) leaves it to the pool's
                    # thread, and the with-exit's own shutdown() can undo it first
                    for f in futures:
                        f.cancel()
                    raise
    if refused:
        raise DataError(refusals(refused, [c.id for c in todo], resumed))


def _ignore_interrupt() -> None:
    """In each pool process: leave Ctrl-C to the parent.

    A terminal's Ctrl-C reaches every process of its group. A pool process interrupted while it
    holds the task queue's lock dies with it held, and the pool's shutdown then waits forever; the
    parent alone stops the pool instead.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def refusals(refused: dict[str, str], order: list[str], resumed: int = 0) -> str:
    """One case's problem as it is; several as one line each, in case order."""
    if len(refused) == 1:
        return next(iter(refused.values()))
    lines = [f"  {cid}: {refused[cid]}" for cid in order if cid in refused]
    kept = len(order) - len(refused) + resumed
    return (
        f"{len(refused)} of {len(order) + resumed} cases refused ({kept} prepared cases are kept "
        "for the rerun):\n" + "\n".join(lines)
    )


def case_orientations(src: Source) -> dict[str, str | None]:
    """Each volume case's axis codes, from its first image's header alone: None where the
    header gives no orientation (a NIfTI with qform and sform codes 0) or cannot be read (the
    case's own refusal says why)."""
    from segscale.imgmed.dicom import series_axis_codes

    out: dict[str, str | None] = {}
    for case in src.cases:
        try:
            if src.kind == "dicom":
                out[case.id] = series_axis_codes(case.images[0])
            else:
                out[case.id] = stored_axis_codes(nifti_header(case.images[0]))
        except DataError:
            out[case.id] = None
    return out


def one_slice_cases(src: Source) -> set[str]:
    """The volume cases of one slice, from their first image's header alone: a NIfTI of shape
    (X, Y), or with an axis of size 1 among its first three; a DICOM series of one file."""
    out = set()
    for case in src.cases:
        try:
            if src.kind == "dicom":
                one = len(list_files(case.images[0])) == 1
            else:
                shape = nifti_header(case.images[0]).get_data_shape()
                one = len(shape) == 2 or 1 in shape[:3]
        except (DataError, OSError):  # the case's own refusal says why
            continue
        if one:
            out.add(case.id)
    return out


def _prepare_case(
    case: Case,
    chunk: Path,
    is_volume: bool,
    value_to_class: dict[int, int],
    prep: Preprocessing,
    one_thread: bool,
    orientation: tuple[str | None, str | None] | None = None,
) -> None:
    """Load, check and preprocess one case; write its slices to `chunk` atomically.
    `orientation`: (the axis codes the case is stored in, the dataset's): a volume stored in
    other axes is moved to the dataset's first (exact: a permutation and flips), so that every
    case's slices are cut in one anatomical plane."""
    if one_thread:  # the processes share the cores
        import torch

        torch.set_num_threads(1)
    image, mask, affine = load_case(case, is_volume, value_to_class)
    stored, orientation = orientation if orientation is not None else (None, None)
    # a header without an orientation is sliced as stored; so is one slice (its plane is given)
    reoriented = None not in (stored, orientation) and stored != orientation
    reoriented = reoriented and 1 not in mask.shape
    if reoriented:
        image, moved, _ = to_axis_codes(image, affine, orientation)
        mask, affine = to_axis_codes(mask, affine, orientation)[0], moved
    elif is_volume and (one_slice := one_slice_on_axis(mask, affine, prep.axis)) is not None:
        image = one_slice_on_axis(image, affine, prep.axis)[0]  # (X, 1, Z) cut along axis 1
        mask, affine = one_slice[:2]
    try:
        x, indices = preprocess(image, is_volume, prep, mask=mask, affine=affine)
    except DataError as e:  # say which case
        raise DataError(f"{case.images[0]}: {e}") from None
    m = to_slices(mask[None], prep.axis, indices)[:, 0] if is_volume else mask[None]
    plane = Plane.of(prep, m.shape[-2:], inplane_spacing(affine, prep.axis) if is_volume else None)
    info = {
        "images": [str(p) for p in case.images],
        "label": str(case.label),
        "shape": list(mask.shape),
        "affine": affine.tolist() if affine is not None else None,  # (as prepared)
        "stored_axes": stored,  # the axis codes of its files (None: no orientation in them)
        "reoriented": bool(reoriented),
        "slice_indices": indices.tolist(),
        "channels": int(x.shape[1]),
        "source_channels": int(
            channels_first(image, is_volume, None).shape[0]
        ),  # before --channels
        "resampled": list(plane.resampled),
    }
    masks = to_grid(m, plane, prep.size, masks=True).numpy()
    try:
        write_atomic(
            chunk,
            lambda f: np.savez(f, images=x.numpy(), masks=masks, info=np.array(json.dumps(info))),
        )
    except OSError as e:
        raise DataError(f"cannot write {chunk}: {e.strerror or e}") from None


def _read_chunk(chunk: Path, *names: str) -> Any:
    """One array of a case's chunk, or a tuple of several."""
    with np.load(chunk, allow_pickle=False) as z:
        arrays = tuple(z[n] for n in names)
    return arrays[0] if len(arrays) == 1 else arrays


def _store_size(chunks: dict[str, Path]) -> tuple[int, int]:
    """(slices, channels) of the store the cases' chunks make, from one read of each chunk's
    small arrays. Every case must have the same channel count; cases that differ are refused
    together (a grey picture beside an RGB one, a 2-channel volume beside 1)."""
    total = 0
    counts: dict[int, list[str]] = {}
    for cid, chunk in chunks.items():
        masks, info = _read_chunk(chunk, "masks", "info")
        total += len(masks)
        # chunks written before the count was recorded: read it off the images
        n = json.loads(str(info)).get("channels") or len(_read_chunk(chunk, "images")[0])
        counts.setdefault(int(n), []).append(cid)
    if len(counts) > 1:
        common, odd = split_majority(counts, "{key} in {ids}")
        raise DataError(
            f"cases differ in their number of channels: {common} in {len(counts[common])} "
            f"cases, {odd}; give every case the same channels (or pick them with --channels)"
        )
    return total, next(iter(counts))


def _channel_names(
    src: Source, prep: Preprocessing, channels: int, cases: list[dict[str, Any]]
) -> list[str]:
    """The store's channel names: the source's, of the channels kept (`channels` of them; the
    `cases`' records say how many their images hold before --channels picks). Raises DataError
    when a dataset.json declares another number of channels than the images hold: with
    --channels too, since the names then pick the wrong channels ('T1gd' is index 1 of four)."""
    names = src.channel_names
    unpicked = channels if prep.channels is None else None  # (chunks of an older segscale)
    odd = [c for c in cases if c.get("source_channels", unpicked) not in (None, len(names))]
    if src.channels_declared and odd:
        raise DataError(
            f"{src.root / 'dataset.json'}: declares {len(names)} channel(s) "
            f"({', '.join(names)}), but the images hold {odd[0].get('source_channels', unpicked)} "
            f"(e.g. {odd[0]['id']}" + ("" if src.volumes else "; a colour picture is 3") + ")"
        )
    if prep.channels is not None:
        return [names[c] if c < len(names) else f"channel_{c}" for c in prep.channels]
    return names if len(names) == channels else [f"channel_{c}" for c in range(channels)]


def label_table(
    src: Source, label_map: dict[int, int] | None
) -> tuple[dict[int, str], dict[int, int]]:
    """Class names, and the raw mask value → class index table. Declared labels that are not
    0..K-1 (BraTS' original 0, 1, 2, 4) are classes in sorted order; `predict` writes the raw
    values back."""
    if src.kind == "msd" or (src.kind == "dicom" and src.labels):
        where = "dataset.json" if src.kind == "msd" else "labels.json"
        if label_map:
            raise DataError(
                f"--label-map applies to masks without declared labels; these come from {where}"
            )
        values = sorted(src.labels)
        if values[0] < 0:
            raise DataError(f"{src.root / where}: label {values[0]}; label values are ≥ 0")
        if values[0] != 0:
            raise DataError(f"{src.root / where}: labels {values}; 0 (the background) is missing")
        return {i: src.labels[v] for i, v in enumerate(values)}, {
            v: i for i, v in enumerate(values)
        }
    if label_map is None:
        values: set[int] = set()
        refused: dict[str, str] = {}  # every unreadable mask, not only the first
        by_case: dict[Path, set[int]] = {}
        for case in src.cases:
            try:
                found = _mask_values(case, src.kind)
            except DataError as e:
                refused[case.id] = str(e)
                continue
            values.update(found)
            by_case[case.label] = found
            if len(values) > 16:
                raise DataError(
                    f"{case.label}: more than 16 distinct mask values; anti-aliased edges? "
                    "expected a few label values (or pass --label-map)"
                )
        if refused:
            raise DataError(refusals(refused, [c.id for c in src.cases]))
        _one_encoding(by_case)
        label_map = {v: i for i, v in enumerate(sorted(values))}
    return class_names(label_map), label_map


def class_names(label_map: dict[int, int]) -> dict[int, str]:
    """Class index → name for a raw mask value → class table: 'background' for 0, else
    'class_K (mask value [v, ...])'. Raises DataError unless the classes are 0..K-1."""
    classes = sorted(set(label_map.values()))
    if classes != list(range(len(classes))):
        raise DataError(f"label map classes must be 0..K-1, got {classes}")
    raw = {c: [v for v, k in label_map.items() if k == c] for c in classes}
    return {c: "background" if c == 0 else f"class_{c} (mask value {raw[c]})" for c in classes}


def _one_encoding(values: dict[Path, set[int]]) -> None:
    """Masks without declared labels must say foreground one way. Refused: no foreground value
    anywhere (every mask one value), and a binary foreground written as 1 in some masks and 255
    in others, never both in one mask (1-bit pictures read 0/1, 8-bit ones 0/255): as classes
    they would be two. Raises DataError naming a mask of each kind and the --label-map fix."""
    every = set().union(*values.values()) if values else set()
    if len(every) == 1:
        (value,) = every
        raise DataError(
            f"{next(iter(values))}: every mask holds only the value {value}; nothing to segment "
            "(masks drawn in an alpha channel: save them as grey values)"
        )
    ones = [m for m, v in values.items() if 1 in v]
    full = [m for m, v in values.items() if 255 in v]
    if ones and full and not set(ones) & set(full) and every <= {0, 1, 255}:
        raise DataError(
            f"masks give the foreground as 1 in {len(ones)} (e.g. {ones[0].name}) and as 255 in "
            f"{len(full)} (e.g. {full[0].name}), never both in one: 1-bit pictures read 0/1, 8-bit "
            "ones 0/255. Save them alike, or pass --label-map 0:0,1:1,255:1"
        )


def _mask_values(case: Case, kind: str) -> set[int]:
    if kind == "png2d":
        return set(np.unique(load_mask2d(case.label)).tolist())
    mask, _ = load_nifti(case.label, dtype=None)
    if not np.issubdtype(mask.dtype, np.integer) and not np.array_equal(mask, np.round(mask)):
        raise DataError(f"{case.label}: non-integer label values; expected integer class labels")
    return set(np.unique(mask).astype(np.int64).tolist())


def load_case(case: Case, is_volume: bool, value_to_class: dict[int, int]):
    """A case's image ((X, Y, Z[, C]) or (H, W[, C])), class mask on the image's grid, and
    affine (None for 2D). Channels and the label are matched to the first image in world space
    (segscale.imgmed.geometry): reoriented when stored in another axis order, refused otherwise."""
    if is_volume and case.images[0].is_dir():  # a DICOM series
        from segscale.imgmed.dicom import load_dicom_series

        image, affine = load_dicom_series(case.images[0])
        raw_mask, mask_affine = _load_label_volume(case.label)
        raw_mask = onto_grid(
            raw_mask,
            mask_affine,
            affine,
            image.shape,
            name=case.label,
            target=case.images[0],
            what="mask",
            target_what="DICOM series",
        )
    elif is_volume:
        image, affine = load_channel_files(case.images, is_volume)
        raw_mask, mask_affine = _load_label_volume(case.label)
        raw_mask = onto_grid(
            raw_mask, mask_affine, affine, image.shape[:3], name=case.label, target=case.images[0]
        )
    else:
        image, affine = load_channel_files(case.images, is_volume)
        raw_mask = load_mask2d(case.label)
        if raw_mask.shape != image.shape[:2]:
            raise DataError(
                f"{case.label}: mask shape {raw_mask.shape} does not match image shape {image.shape[:2]} ({case.images[0]})"
            )
    if image.size == 0:
        raise DataError(f"{case.images[0]}: empty image (shape {image.shape})")
    require_finite(image, f"{case.images[0]}: image")
    return image, _map_labels(raw_mask, value_to_class, case.label), affine


def load_channel_files(paths: list[Path], volume: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One image from its files: one file, or nnU-Net v2's one file per channel (or per group of
    channels: an RGB picture is three). `volume`: NIfTI → ((X, Y, Z[, C]), affine), each further
    file matched to the first in world space (segscale.imgmed.geometry); else 2D pictures →
    ((H, W[, C]), None), each of the first's size. Raises DataError naming the file that does
    not fit."""
    if volume:
        first, affine = _one_slice_3d(*load_nifti(paths[0]))
        if first.size == 0:
            raise DataError(f"{paths[0]}: empty image (shape {first.shape})")
        channels = [first]
        for path in paths[1:]:
            data, channel_affine = _one_slice_3d(*load_nifti(path))
            channels.append(
                onto_grid(
                    data,
                    channel_affine,
                    affine,
                    first.shape,
                    name=path,
                    target=paths[0],
                    what="channel",
                    target_what="first channel",
                )
            )
        if len(channels) == 1:
            return first, affine
        channels = [c if c.ndim == 4 else c[..., None] for c in channels]
        return np.concatenate(channels, axis=-1), affine
    pictures = [load_image2d(p) for p in paths]
    for path, picture in zip(paths[1:], pictures[1:]):
        if picture.shape[:2] != pictures[0].shape[:2]:
            h, w = picture.shape[:2]
            raise DataError(
                f"{path}: {h}×{w} pixels, but {paths[0].name} (the first channel) is "
                f"{pictures[0].shape[0]}×{pictures[0].shape[1]}; every channel file of a case "
                "needs the same size"
            )
    return (pictures[0] if len(pictures) == 1 else np.dstack(pictures)), None


def _one_slice_3d(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 2D NIfTI (X, Y) as the one-slice volume (X, Y, 1) it describes (its affine is 4×4)."""
    return (data[:, :, None] if data.ndim == 2 else data), affine


def _load_label_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D label volume in the file's own type (uint8 mostly) and its affine."""
    mask, affine = _one_slice_3d(*load_nifti(path, dtype=None))
    if mask.ndim != 3:
        raise DataError(f"{path}: expected a 3D label volume, got shape {mask.shape}")
    return mask, affine


def _map_labels(raw: np.ndarray, table: dict[int, int], path: Path | None) -> np.ndarray:
    if not np.issubdtype(raw.dtype, np.integer):
        if not np.array_equal(raw, np.round(raw)):
            raise DataError(f"{path}: non-integer label values; expected integer class labels")
        raw = raw.astype(np.int64)
    if raw.min() < 0:
        raise DataError(f"{path}: negative label value {int(raw.min())}; expected class labels ≥ 0")
    # a bincount over small label values is several times faster than np.unique on a volume
    values = np.flatnonzero(np.bincount(raw.ravel())) if raw.max() < 65536 else np.unique(raw)
    undeclared = [int(v) for v in values if int(v) not in table]
    if undeclared:
        raise DataError(
            f"{path}: label values {undeclared} not declared (declared: {sorted(table)}); add "
            "them to the labels the dataset declares (dataset.json, labels.json), or give "
            "--label-map where it declares none"
        )
    lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for v, c in table.items():
        if 0 <= v < len(lut):
            lut[v] = c
    return lut[raw]


def _case_digests(src: Source) -> dict[str, str]:
    """Per case: a hash of its files' names and contents."""
    out = {}
    for case in src.cases:
        h = hashlib.sha256()
        for p in [*case.images, case.label]:
            # a DICOM series is a folder: every file in it counts
            for f in list_files(p) if p.is_dir() else [p]:
                if f.is_file():
                    h.update(f.name.encode())
                    h.update(file_sha256(f).encode())
        out[case.id] = h.hexdigest()
    return out


def _input_hash(digests: dict[str, str], params: dict) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(FORMAT.encode())
    for case_id, digest in digests.items():
        h.update(case_id.encode())
        h.update(digest.encode())
    return h.hexdigest()

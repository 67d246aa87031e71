"""File helpers shared across the package: one atomic write, one checksum, one JSON dialect."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text (RFC 8259) of `obj`: NaN and ±inf, which JSON has no token for, are
    written as null. Python's json would write bare NaN/Infinity, which jq, JavaScript's
    JSON.parse and most other parsers refuse. Every record segscale writes for its users
    (evaluations, metrics.jsonl, reports) goes through here; `from_json` reads them back."""
    return json.dumps(_nulled(obj), indent=indent, allow_nan=False)


def _nulled(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nulled(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nulled(v) for v in obj]
    return obj


def from_json(text: str | bytes) -> Any:
    """A metric record written by `to_json`, with null read back as NaN (a metric that is not
    defined, e.g. HD95 of an empty mask; in these records null never means anything else).
    Older records with bare NaN tokens read the same. Raises ValueError for text that is not
    JSON."""
    return _nan(json.loads(text))


def _nan(obj: Any) -> Any:
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return obj


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines metric file (metrics.jsonl), null read as NaN; blank lines
    skipped. Raises SegscaleError naming the file (and line) when it cannot be read or a line
    is not a JSON object."""
    from segscale.errors import SegscaleError

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SegscaleError(f"{path}: cannot read it ({e.strerror})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = from_json(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                raise SegscaleError(f"{path}:{number}: not a JSON record (a damaged file?)")
            rows.append(row)
    return rows


def _umask() -> int:
    """The process's umask: from /proc on Linux (read-only), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str | Path, path: Path) -> None:
    """Rename a finished temp file into place with the permissions a plain open() would give
    (mkstemp creates it 0600, readable by its owner alone)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_atomic(path: Path, content: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temp file beside it, fsync and rename: readers never see half of
    it, a crash leaves the old file or the new one, and concurrent writers of the same content
    (every node writing config.yaml) cannot collide. `content`: text (UTF-8), bytes, or a
    function that writes into the open binary file (torch.save, np.savez, ...).

    Raises OSError (disk full, read-only folder) after removing the temp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode())
            elif isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def differ(keys: list[str], most: int = 5) -> str:
    """'lr differs', 'lr, seed differ', 'a, b, c, d, e and 2 more differ': the keys that
    differ between two settings, for a message."""
    shown = ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")
    return f"{shown} {'differs' if len(keys) == 1 else 'differ'}"


# the top-level keys of a segmentation run's evaluation record (segscale evaluate)
EVALUATION = ("split", "dataset", "case_summary", "cases")

# the state files of the jobs whose folders hold runs (segscale.tune, segscale.repeat): named
# here, below both, so that every command can tell such a folder from a run
TUNE_STATE = "tune.json"
REPEAT_STATE = "repeat.json"
# a zoo entry's metadata (segscale.hub): an entry holds a config.yaml as a run does
ENTRY_META = "segscale-model.json"


def is_zoo_entry(folder: Path) -> bool:
    """Whether `folder` is a zoo entry (its metadata beside a config.yaml, as a run has)."""
    return (Path(folder) / ENTRY_META).is_file()


def run_or_entry(folder: Path) -> str:
    """'the zoo entry' or 'the run folder': what a folder with a config.yaml is, for messages."""
    return "the zoo entry" if is_zoo_entry(folder) else "the run folder"


def read_record(path: Path, keys: tuple[str, ...], what: str, metrics: bool = False) -> dict:
    """A JSON object segscale wrote (a job's state, a record), with `keys` at its top level;
    `metrics`: a metric record (to_json's null read back as NaN). Raises SegscaleError naming
    the file when it cannot be read, is not JSON, or is not of that shape."""
    from segscale.errors import SegscaleError

    try:
        text = path.read_text()
        data = from_json(text) if metrics else json.loads(text)
    except OSError as e:
        raise SegscaleError(f"{path}: cannot read {what} ({e.strerror})") from None
    except ValueError as e:
        raise SegscaleError(f"{path}: unreadable {what} (not JSON: {e})") from None
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else list(keys)
    if missing:
        raise SegscaleError(f"{path}: unreadable {what} (no {', '.join(missing)})")
    return data


# what a run folder holds of its own (file names, fnmatch patterns): never replaced by another
# command's output, --force or not; and the folders of its records, never written into
RUN_RECORDS = (
    "config.yaml",
    "model.pt",
    "*.sha256",
    "environment.json",
    "metrics.jsonl",
    "pretrained.json",
    "packages.txt",
    "mlflow_run_id",
    "evaluation-*",
)
RUN_FOLDERS = ("checkpoints", "pictures", "system", "tensorboard")


def is_store(folder: Path) -> bool:
    """Whether `folder` is a prepared store (meta.json beside images.npy)."""
    return (folder / "meta.json").is_file() and (folder / "images.npy").exists()


def not_a_run(path: Path, alternative: str | None = None) -> Exception:
    """The SegscaleError for `path` given where a run folder (or `alternative`, what else the
    command takes: 'a `segscale repeat` folder', 'a zoo entry') was expected, saying what it
    is: missing, a file, a prepared store, or another folder."""
    from segscale.errors import SegscaleError

    path = Path(path)
    wanted = f"a run folder or {alternative}" if alternative else "a run folder"
    if not path.exists():
        what = "no such file or folder"
    elif not path.is_dir():
        what = f"a file, not {wanted}"
    elif is_store(path):
        what = f"a prepared store, not {wanted}; train a run on it first"
    elif (path / TUNE_STATE).is_file() or (path / REPEAT_STATE).is_file():
        job = "tune" if (path / TUNE_STATE).is_file() else "repeat"
        runs = sorted(p.name for p in path.iterdir() if (p / "config.yaml").is_file())
        if job == "tune":  # its chosen trial, else a trial, before the one-worker baselines
            runs.sort(key=lambda name: (name != _chosen_trial(path), not name.startswith("trial")))
        example = f"{path / runs[0]}" if runs else "one of its runs once it has one"
        what = f"a `segscale {job}` folder, not {wanted}; give one of its runs ({example})"
        if job == "tune" and (path / "tuned.yaml").is_file():
            what += f", or train {path / 'tuned.yaml'}"
    elif alternative:
        what = f"neither a run folder nor {alternative}"
    else:
        what = "not a run folder (no config.yaml)"
    return SegscaleError(f"{path}: {what}")


def _chosen_trial(folder: Path) -> str | None:
    """The folder name of the trial a finished `segscale tune` in `folder` chose, if it can be
    read from its state."""
    try:
        state = json.loads((folder / TUNE_STATE).read_text())
        chosen = state["decision"]["trial"]
        return next(Path(t["run_dir"]).name for t in state["trials"] if t["index"] == chosen)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def other_run(path: Path, mine: Path | None = None) -> Path | None:
    """The run folder (config.yaml: started, or set up by `launch`) that `path` lies inside,
    when it is not `mine`: a file written there would pass for that run's own. None otherwise."""
    path = Path(path).resolve()
    mine = Path(mine).resolve() if mine is not None else None
    return next((f for f in path.parents if (f / "config.yaml").is_file() and f != mine), None)


def is_run(folder: Path) -> bool:
    """Whether `folder` is a run folder that has started (config.yaml and what training wrote)."""
    started = ("environment.json", "model.pt", "checkpoints")
    return (folder / "config.yaml").is_file() and any((folder / f).exists() for f in started)


def not_a_record(
    path: Path, option: str, store_ok: bool = False, of_run: Path | None = None
) -> None:
    """Refuse (SegscaleError naming the option) to write `path`, a file or a folder, inside a
    prepared store (or as one, unless `store_ok`: prepare and augment write stores), inside a
    run folder's record folders (RUN_FOLDERS), or over one of its records (RUN_RECORDS):
    whatever the command and --force. `of_run`: the run whose own records the command writes
    (`evaluate RUN` its evaluation-*.json), left to the command's own checks."""
    from fnmatch import fnmatch

    from segscale.errors import SegscaleError

    path = Path(path).resolve()
    mine = Path(of_run).resolve() if of_run is not None else None
    for folder in (path, *path.parents):
        if is_store(folder) and not (store_ok and folder == path):
            where = (
                "is a prepared store" if folder == path else f"inside the prepared store {folder}"
            )
            raise SegscaleError(f"{option} {path}: {where}; write to another path")
        if folder != path and folder != mine and is_run(folder):
            inside = path.relative_to(folder).parts
            if inside[0] in RUN_FOLDERS or (
                len(inside) == 1 and any(fnmatch(inside[0], p) for p in RUN_RECORDS)
            ):
                raise SegscaleError(
                    f"{option} {path}: a record of the run {folder}; write to another path"
                )


def signed(text: str, mark: str) -> str:
    """`text`, which holds `mark`, with the sha256 of the whole text written after the mark
    (` sha256:<16 hex>`): output_file then tells the command's own earlier output from one
    edited since (_whose), which it replaces only with --force."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text.replace(mark, f"{mark} sha256:{digest}", 1)


UNSIGNED = " sha256:" + "0" * 16  # after a mark in a file to sign: the digest's room


def signed_bytes(data: bytes, mark: str) -> bytes:
    """A file's bytes (a picture's, a PDF's), which hold `mark` + UNSIGNED in their metadata,
    with the sha256 that `signed` writes for a text over the zeros: the same length, so a
    PDF's offsets stay valid (a PNG's chunk checksum is written again). output_file(signed=True)
    then tells the command's own unedited file from one edited since."""
    import struct
    import zlib

    at = data.index(f"{mark}{UNSIGNED}".encode()) + len(mark.encode())
    start = at + len(" sha256:")
    digest = hashlib.sha256(_unsigned(data, start, start + 16)).hexdigest()[:16]
    data = data[:start] + digest.encode() + data[start + 16 :]
    crc = _png_crc_at(data, at)
    if crc is not None:  # the chunk's checksum, for what it holds now
        chunk, end = crc
        data = data[:end] + struct.pack(">I", zlib.crc32(data[chunk + 4 : end])) + data[end + 4 :]
    return data


def save_signed_figure(fig: Any, out: Path, mark: str) -> None:
    """Save a matplotlib figure to `out` (PNG, PDF or SVG, by its suffix; 110 dpi) atomically,
    `mark` signed into its metadata (signed_bytes): the command that drew it replaces its own
    unedited picture on a rerun, and refuses one edited since (keep_edited, output_file) that
    is not given --force."""
    import io

    kind = Path(out).suffix[1:].lower()
    key = "Software" if kind == "png" else "Creator"  # PDF and SVG's
    buffer = io.BytesIO()
    fig.savefig(buffer, format=kind, dpi=110, metadata={key: mark + UNSIGNED})
    write_atomic(out, signed_bytes(buffer.getvalue(), mark))


def _png_crc_at(data: bytes, at: int) -> tuple[int, int] | None:
    """(start, end of its data) of the PNG chunk that holds byte `at`, whose CRC follows at
    `end`; None when `data` is no PNG."""
    import struct

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    chunk = 8
    while chunk + 8 <= len(data):
        (length,) = struct.unpack(">I", data[chunk : chunk + 4])
        end = chunk + 8 + length
        if chunk < at < end:
            return chunk, end
        chunk = end + 4
    return None


def _unsigned(data: bytes, start: int, end: int) -> bytes:
    """What a signature's digest covers: `data` without ' sha256:' and the digest at
    [start, end), nor, in a PNG, the checksum of the chunk that holds it (it depends on the
    digest)."""
    crc = _png_crc_at(data, start)
    if crc is not None:
        data = data[: crc[1]] + data[crc[1] + 4 :]  # after the digest: its offsets stay
    return data[: start - len(" sha256:")] + data[end:]


def keep_edited(
    folder: Path,
    state: str,
    outputs: tuple[str, ...],
    texts: tuple[str, ...],
    mark: str,
    force: bool,
) -> None:
    """Refuse, before a resumable job reruns in `folder` (it holds the job's `state` file),
    what its rerun would write over: one of its `outputs` that is a folder or a special file
    (the rerun would fail at its end, its work done), or one of the `texts` it signs with
    `mark` (`signed`) that was edited since, or that it did not sign (a user's file; its own
    with the signature line gone, as a YAML tool that drops comments leaves it). `force`
    replaces the texts. Raises SegscaleError naming the first such file."""
    from segscale.errors import SegscaleError

    if not (folder / state).is_file():  # a first run: job_state says what the folder is
        return
    who = mark.split(" by ")[-1]
    for name in outputs:
        path = folder / name
        if path.exists() and not path.is_file():
            raise SegscaleError(
                f"{path}: {'a folder' if path.is_dir() else 'not a regular file'} where {who} "
                f"writes its {name}; move it away"
            )
    for name in () if force else texts:
        path = folder / name
        whose = _whose(path, mark, signed=True) if path.exists() else "own"
        if whose != "own":
            why = {
                "edited": f"edited since {who} wrote it",
                "other": f"not written by {who} (or its signature was removed: "
                + (
                    "the one in its metadata)"
                    if name.lower().endswith((".png", ".svg", ".pdf"))
                    else "its first line)"
                ),
            }[whose]
            raise SegscaleError(
                f"{path}: {why}, and {who} writes it again; move it away, or give --force to "
                "replace it"
            )


def _whose(path: Path, mark: str, signed: bool = False) -> str:
    """Whose the file at `path` is: "own" when it is a command's unedited output (its first MiB
    holds `mark`, and a text `signed` with it still has that digest), "edited" when such a text
    was changed since (or, `signed`: a text the command signs has lost its digest), else
    "other" (also for a file that cannot be read)."""
    import re

    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
            signature = re.search(re.escape(mark.encode()) + rb" sha256:([0-9a-f]{16})", data)
            if signature is not None:
                data += f.read()  # a text output: the whole of it is hashed
    except OSError:
        return "other"
    if mark.encode() not in data:
        return "other"
    if signature is None:  # a picture's metadata; a signed text whose digest was taken out
        return "edited" if signed else "own"
    start, end = signature.span(1)
    same = hashlib.sha256(_unsigned(data, start, end)).hexdigest()[:16] == signature[1].decode()
    return "own" if same else "edited"


def output_file(
    path: Path,
    option: str = "--out",
    overwrite: bool = True,
    own: str | None = None,
    of_run: Path | None = None,
    signed: bool = False,
) -> Path:
    """`path` resolved, where a file can be written: not a folder, not a device or other special
    file, in a folder (created when missing, unless a file is in its way: every command makes
    the folder of a file it is told to write); an existing file only when `overwrite`, or when
    it holds the mark `own` (in its first MiB: the command's own earlier output, written with
    that mark; `signed`: a text written with `signed`, unedited since); never a record of a
    run or a file in a store (not_a_record; `of_run`: the run whose own records the command
    writes). Raises SegscaleError naming the option otherwise (before anything is computed)."""
    from segscale.errors import SegscaleError

    path = Path(path).resolve()
    if path.is_dir():
        raise SegscaleError(f"{option} {path}: a folder; give a file name")
    if path.exists() and not path.is_file():
        raise SegscaleError(f"{option} {path}: exists and is not a regular file; give a file name")
    not_a_record(path, option, of_run=of_run)
    whose = (
        "own" if not path.exists() or overwrite else _whose(path, own, signed) if own else "other"
    )
    if whose != "own":
        who = own.split(" by ")[-1] if own else ""
        why = {
            "other": f" and is not an earlier output of {who}" if own else "",
            "edited": f" and was edited since {who} wrote it",
        }[whose]
        raise SegscaleError(
            f"{option} {path}: exists{why}; give another name or --force to replace it"
        )
    try:
        output_dir(path.parent, option, of_run=of_run)
    except SegscaleError:  # named for what was given: a file's path, not a folder
        raise SegscaleError(
            f"{option} {path}: its folder {path.parent} is a file or inside one"
        ) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SegscaleError(f"{option} {path}: cannot create its folder ({e.strerror})") from None
    return path


def apart_from_input(output: Path, source: Path, option: str = "--out") -> Path:
    """`output` resolved, refused (SegscaleError naming the option) when writing it would touch
    `source`: the same path, a path inside the source folder (a file beside a DICOM series
    makes it unreadable; a store inside its source is read back as data), or a folder that
    holds the source."""
    from segscale.errors import SegscaleError

    output, source = Path(output).resolve(), Path(source).resolve()
    if output == source:
        where = "is the input itself"
    elif source.is_dir() and output.is_relative_to(source):
        where = f"is inside the input folder {source}"
    elif source.is_relative_to(output):
        where = f"holds the input {source}"
    else:
        return output
    raise SegscaleError(f"{option} {output}: {where}; write to another path")


def output_dir(
    path: Path, option: str = "--out", store_ok: bool = False, of_run: Path | None = None
) -> Path:
    """`path` resolved, where a folder can be (or is): not a file, and no file on its way; not
    in a store or a run's record folders (not_a_record, with `store_ok` and `of_run`). Raises
    SegscaleError naming the option otherwise."""
    from segscale.errors import SegscaleError

    path = Path(path).resolve()
    not_a_record(path, option, store_ok, of_run)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"is inside {folder}, a file"
                raise SegscaleError(f"{option} {path}: {where}; give a folder")
            break
    return path


def job_state(path: Path, signature: dict, fresh: dict, what: str) -> dict:
    """The state of a resumable job (`segscale tune`, `segscale repeat`) in the JSON file `path`:
    `fresh` (with `signature`) when there is none yet, else the saved one, refused when it was
    started with another signature (one line naming the keys that differ), and a folder that
    holds other files but no state (a run, a store). `what` names the job in messages, e.g.
    "tuning". The fresh state is written at once: the folder is the job's from then on."""
    from segscale.errors import SegscaleError

    folder = output_dir(path.parent)
    if not path.is_file():
        # a run, a store, anyone's folder: the job's runs and reports would land among its files
        if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
            found = (
                f"{path.name} is a folder"
                if path.is_dir()
                else f"{path.name} is not a file"
                if path.exists()
                else f"no {path.name}"
            )
            raise SegscaleError(
                f"{folder}: not empty, and no {what} started there ({found}); use a new or "
                "empty --out"
            )
        folder.mkdir(parents=True, exist_ok=True)
        state = {"signature": signature, **fresh}
        write_atomic(path, to_json(state, indent=1))  # the folder is this job's from now on
        return state
    state = read_record(path, ("signature", *fresh), f"{what} state; use another --out")
    before = state["signature"] if isinstance(state["signature"], dict) else {}
    if before != signature:
        changed = sorted(k for k in {*before, *signature} if before.get(k) != signature.get(k))
        raise SegscaleError(
            f"{folder}: holds a {what} started with other settings "
            f"({differ(changed, most=10)}); rerun it as it started, or use another --out"
        )
    return state


RUN_LOCK = ".running"  # in a run folder: held (flock) by the process that records a training
_HELD: set[int] = set()  # descriptors of the locks this process holds
_FORK_HOOK: list[bool] = []  # whether _drop_held_in_child is registered (once per process)


def _drop_held_in_child() -> None:
    # a forked child (a data-loading worker) shares the lock while it holds a copy of the
    # descriptor, and may outlive its parent by seconds; its copies are closed at once
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


def _holder(path: Path) -> str:
    """What a held lock file says of its holder."""
    return Path(path).read_text(errors="replace").strip() or "another process"


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file `path` ('pid P on HOST since T', as its holder wrote), or None
    when nobody does. Raises OSError where that cannot be told (a file system without flock,
    a file that cannot be opened for writing)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class held_lock:
    """Hold an exclusive flock on `path` for a `with` block, waiting up to `wait` seconds for
    it (a restarted worker may wait for its predecessor's last child to exit); the file then
    says who holds it. The kernel releases it when the holder dies, however it dies. Raises
    SegscaleError naming the holder when the wait runs out. A file system without flock
    (some parallel file systems) is not locked."""

    def __init__(self, path: Path, wait: float = 0.0, what: str = "") -> None:
        self.path, self.wait, self.what, self.fd = Path(path), wait, what, -1

    def __enter__(self) -> held_lock:
        import fcntl
        import socket
        import time

        from segscale.errors import SegscaleError

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(self.path)
                    os.close(self.fd)
                    raise SegscaleError(f"{self.path.parent}: {self.what} ({holder})") from None
                time.sleep(0.2)
            except OSError:  # no flock here: run unlocked rather than not at all
                return self
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(self.fd, 0)
        who = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n"
        os.pwrite(self.fd, who.encode(), 0)
        if not _HELD and not _FORK_HOOK:
            os.register_at_fork(after_in_child=_drop_held_in_child)
            _FORK_HOOK.append(True)
        _HELD.add(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing its last descriptor releases the lock
            self.fd = -1

"""Zoo indexes and verified downloads, with nothing of the engine: read a zoo's index (a folder
or a static HTTP(S) location), list its entries, pull an entry into the local cache with every
file checked against the index's sha256. segscale.zoo publishes entries and builds their models;
the engine resolves `model.pretrained: zoo:NAME` through here.

Pulls go to a cache (SEGSCALE_CACHE, default ~/.cache/segscale) and every file is checked against
the sha256 in the index; a mismatch is refused with one line and nothing is kept. Names and
versions are validated: letters, digits, '.', '_', '-', no path tricks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from segscale._files import ENTRY_META, file_sha256, not_a_run
from segscale.errors import SegscaleError, shown

FORMAT = "segscale-zoo/1"
INDEX = "index.json"
WEIGHTS = "model.safetensors"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")


def check_name(name: str, version: str | None = None) -> None:
    """Raises SegscaleError for a name or version that is not a plain identifier."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise SegscaleError(
            f"zoo name {shown(name, 80)}: expected letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (at most 64, no '..')"
        )
    if version is not None and (not _VERSION.fullmatch(version) or ".." in version):
        raise SegscaleError(
            f"zoo version {shown(version, 48)}: expected letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit (at most 32, no '..')"
        )


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'zoo:NAME[@VERSION]' or 'NAME[@VERSION]' → (name, version or None: the newest)."""
    ref = ref.removeprefix("zoo:")
    name, at, version = ref.partition("@")
    if at and not version:  # 'tiny@' took the newest: a version left out by a typo, likely
        raise SegscaleError(f"zoo entry '{ref}': an empty version; give NAME@VERSION, or NAME")
    check_name(name, version or None)
    return name, version or None


def default_zoo() -> str:
    """SEGSCALE_ZOO, else the zoo shipped with segscale (no network needed)."""
    from importlib import resources

    return os.environ.get("SEGSCALE_ZOO") or str(resources.files("segscale") / "resources" / "zoo")


def cache_dir() -> Path:
    return Path(os.environ.get("SEGSCALE_CACHE") or Path.home() / ".cache" / "segscale") / "zoo"


def _is_url(zoo: str | Path) -> bool:
    return urllib.parse.urlparse(str(zoo)).scheme in ("http", "https")


# A download gives up when, after its first minute, it has averaged under this rate: a server
# dripping bytes would otherwise hold it for days (the 60 s timeout is per read, not per file).
SLOWEST = 10_000  # bytes per second
INDEX_LIMIT = 64 * 2**20  # an index is JSON text; anything larger is not one


def check_zoo(zoo: str | Path) -> None:
    """Refuse a --zoo that is neither a folder path nor an http(s) URL (ftp://, a malformed
    URL, an empty string), before anything is read. Raises SegscaleError."""
    text = str(zoo)
    try:
        scheme = urllib.parse.urlparse(text).scheme
        if scheme in ("http", "https"):
            urllib.parse.urlparse(text).port  # noqa: B018 (raises for a bad host or port)
    except ValueError as e:
        raise SegscaleError(f"--zoo {text}: not a valid URL ({e})") from None
    if not text.strip():
        raise SegscaleError("--zoo '': give a zoo folder or an http(s) URL")
    if scheme and scheme not in ("http", "https") and len(scheme) > 1:  # C:\ is a path
        raise SegscaleError(f"--zoo {text}: {scheme}:// is not supported; a folder or http(s)")


def _fetch(zoo: str | Path, rel: str, size: int | None = None) -> bytes:
    """A file of a zoo (folder or URL), as bytes; `size`: the length the index gives it (a
    download is refused past it). Raises SegscaleError when it cannot be read, or a download
    is larger than expected or slower than SLOWEST."""
    if _is_url(zoo):
        url = str(zoo).rstrip("/") + "/" + urllib.parse.quote(rel)
        limit = size if size is not None else INDEX_LIMIT
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return _read_all(r, url, limit)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise SegscaleError(f"{url}: cannot download ({getattr(e, 'reason', e)})") from None
    path = Path(zoo) / rel
    try:
        return path.read_bytes()
    except OSError as e:
        raise SegscaleError(f"{path}: cannot read ({e.strerror})") from None


def _read_all(response: Any, url: str, limit: int) -> bytes:
    """A response's body, at most `limit` bytes, refused when it averages under SLOWEST after
    its first minute. read1 returns after one socket read, so the clock is checked throughout."""
    start, chunks, received = time.monotonic(), [], 0
    while chunk := response.read1(2**20):
        received += len(chunk)
        if received > limit:
            raise SegscaleError(f"{url}: larger than the {limit} bytes the zoo's index gives it")
        chunks.append(chunk)
        elapsed = time.monotonic() - start
        if elapsed > 60 and received / elapsed < SLOWEST:
            raise SegscaleError(
                f"{url}: {received} bytes in {elapsed:.0f} s, too slow (under {SLOWEST} B/s); "
                "try again later or use another copy of the zoo"
            )
    return b"".join(chunks)


def read_index(zoo: str | Path) -> dict[str, Any]:
    """A zoo's index, checked: its format, and every entry's shape (versions that are plain
    identifiers, each with a summary and a non-empty list of files with their sha256 and
    size). Raises SegscaleError naming the index for anything else."""
    check_zoo(zoo)
    where = f"{str(zoo).rstrip('/')}/{INDEX}"
    if not _is_url(zoo) and not Path(zoo).exists():
        raise SegscaleError(f"zoo {zoo}: no such folder (a zoo folder, or an http(s) URL)")
    if not _is_url(zoo) and not Path(zoo).is_dir():
        raise SegscaleError(f"zoo {zoo}: a file, not a zoo folder")
    if not _is_url(zoo) and (Path(zoo) / "meta.json").is_file():
        raise SegscaleError(f"zoo {zoo}: a prepared store, not a zoo")
    if not _is_url(zoo) and not (Path(zoo) / INDEX).exists():
        raise SegscaleError(f"zoo {zoo}: not a zoo (no {INDEX}); publish into it first")
    data = _fetch(zoo, INDEX)  # its own one-line error when missing or unreachable
    try:
        index = json.loads(data)
    except ValueError as e:
        raise SegscaleError(f"{where}: not a zoo index (invalid JSON: {e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise SegscaleError(f"{where}: not a segscale zoo index (format {FORMAT!r} expected)")
    _check_entries(index.get("entries"), where)
    return index


def _check_entries(entries: Any, where: str) -> None:
    """The `entries` of an index: {name: {version: {"files": {path: {"sha256", "size"}},
    "summary": {...}}}}, names and versions as check_name allows, file paths relative and
    inside the entry. An index is input like any other: a version such as '../../x' must never
    become a folder of the cache."""

    def bad(what: str) -> SegscaleError:
        return SegscaleError(f"{where}: not a valid zoo index ({what})")

    if not isinstance(entries, dict):
        raise bad("'entries' is not an object")
    for name, versions in entries.items():
        if not isinstance(versions, dict) or not versions:
            raise bad(f"{name!r} has no versions object")
        for version, record in versions.items():
            try:
                check_name(name, version)
            except SegscaleError as e:
                raise bad(str(e)) from None
            if not isinstance(record, dict) or not isinstance(record.get("summary"), dict):
                raise bad(f"{name}@{version} has no summary")
            for key, value in record["summary"].items():  # as zoo.publish writes them
                wanted = _SUMMARY.get(key)
                if wanted is not None and not _is(value, wanted[0]):
                    raise bad(
                        f"{name}@{version}: summary {key!r} is {value!r}; expected {wanted[1]}"
                    )
            files = record.get("files")
            if not isinstance(files, dict) or WEIGHTS not in files:
                raise bad(f"{name}@{version} lists no {WEIGHTS}")
            folders = {str(p) for rel in files for p in Path(rel).parents if str(p) != "."}
            seen: dict[str, str] = {}
            for rel, f in files.items():
                parts = Path(rel).parts
                if Path(rel).is_absolute() or ".." in parts or not parts:
                    raise bad(f"{name}@{version} lists an unsafe path {rel!r}")
                if not _plain(rel):  # ./x, x//y, a\\b, 'card.md ', NUL: not one file everywhere
                    raise bad(
                        f"{name}@{version} lists {rel!r}; expected a plain relative path (/ "
                        "between folders; no ./, //, \\ or :, no control or invisible "
                        "character, no space or dot at a name's end)"
                    )
                # Card.md beside card.md (é written two ways, a full-width ｃ): one file on
                # macOS and Windows, or the same name to a reader
                key = unicodedata.normalize("NFKC", rel).casefold()
                if key in seen:
                    raise bad(
                        f"{name}@{version} lists {seen[key]!r} and {rel!r}: one file on a disk "
                        "that ignores case, or one name to a reader"
                    )
                seen[key] = rel
                if str(Path(rel)) in folders:  # a file and a folder of one name: not a tree
                    raise bad(f"{name}@{version} lists {rel} as a file and as a folder of files")
                if not isinstance(f, dict) or not isinstance(f.get("sha256"), str):
                    raise bad(f"{name}@{version}: {rel} has no sha256")
                if not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
                    raise bad(f"{name}@{version}: {rel}'s sha256 is not 64 lower-case hex digits")
                if not _is(f.get("size"), "count"):
                    raise bad(
                        f"{name}@{version}: {rel}'s size is {f.get('size')!r}; expected bytes ≥ 0"
                    )


def _plain(rel: str) -> bool:
    """Whether a zoo index's file path is written plainly, so that it names one file on every
    system: as Path writes it (no ./, no //), / between folders, no control or invisible
    (format) character (a NUL ends the name for the OS), no \\ or : (Windows' separators and
    drives), and no name that starts with a space or ends in a space or a dot (Windows drops
    them: 'card.md.' is card.md there)."""
    if rel != Path(rel).as_posix() or "\\" in rel or ":" in rel:
        return False
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in rel):
        return False
    return all(part == part.strip() and not part.endswith(".") for part in rel.split("/"))


# the summary of an entry, key → (kind, what it is), as zoo.publish writes it: checked where
# present, so that `zoo list` shows any index it accepts
_SUMMARY = {
    "classes": ("texts", "a list of class names"),
    "channels": ("texts", "a list of channel names"),
    "size": ("count", "the input's side in pixels"),
    "architecture": ("text", "a network's name"),
    "dice": ("fraction", "a test Dice in [0, 1], or null"),
    "licence": ("text", "an SPDX identifier"),
    "created": ("text", "a date"),
}


def _is(value: Any, kind: str) -> bool:
    """Whether a JSON value is of `kind`: text, texts (a list of them), count (an integer ≥ 0;
    not a bool), fraction (a number in [0, 1], or null)."""
    if kind == "text":
        return isinstance(value, str)
    if kind == "texts":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "fraction":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return value is None or (number and 0 <= value <= 1)  # NaN is no fraction either
    raise ValueError(f"kind {kind!r}")


def entries(zoo: str | Path | None = None) -> list[dict[str, Any]]:
    """Every entry of a zoo, newest version last per name: name, version, summary."""
    index = read_index(default_zoo() if zoo is None else zoo)
    return [
        {"name": name, "version": v, **versions[v]["summary"]}
        for name, versions in sorted(index["entries"].items())
        for v in sorted(versions, key=_version_key)
    ]


def _version_key(version: str) -> tuple:
    """PEP 440 order where a version is one (1 < 1.1 < 2 < 10, 3.0rc1 < 3.0, 1 = 1.0 = 01),
    before any other, which compare by their numeric parts (2 < 10) then as text."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(version), ())
    except InvalidVersion:
        parts = re.split(r"[.+-]", version)
        return (0, None, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def same_version(a: str, b: str) -> bool:
    """Whether two version strings name one version (1, 1.0 and 01 do)."""
    ka, kb = _version_key(a), _version_key(b)
    return a == b or (ka[0] == kb[0] == 1 and ka == kb)


def pull(ref: str, zoo: str | Path | None = None) -> Path:
    """The local folder of zoo entry NAME[@VERSION] (the newest when no version is given):
    downloaded into the cache, or found there, every file verified by sha256 against the zoo's
    index. Raises SegscaleError for an unknown entry or a file that does not match its hash."""
    zoo = default_zoo() if zoo is None else zoo
    name, version = parse_ref(ref)
    index = read_index(zoo)
    versions = index["entries"].get(name)
    if not versions:
        known = ", ".join(sorted(index["entries"])) or "none"
        raise SegscaleError(f"zoo {zoo}: no model {name!r} (models: {known})")
    version = version or max(versions, key=_version_key)
    # 1.0 and 01 name version 1, as publish counts them
    version = next((v for v in versions if same_version(v, version)), version)
    if version not in versions:
        raise SegscaleError(
            f"zoo {zoo}: {name} has no version {version!r} "
            f"(versions: {', '.join(sorted(versions, key=_version_key))})"
        )
    files = versions[version]["files"]  # checked by read_index: safe paths, hashes, sizes
    cache = cache_dir()
    target = cache / name / version
    if not target.resolve().is_relative_to(cache.resolve()):  # never, after read_index's check
        raise SegscaleError(f"zoo {zoo}: {name}@{version} would be cached outside {cache}")
    if target.is_dir() and all(
        (target / rel).is_file() and file_sha256(target / rel) == f["sha256"]
        for rel, f in files.items()
    ):
        return target
    try:
        if target.parent.exists() != target.parent.is_dir() or target.parent.is_symlink():
            target.parent.unlink()  # the cache is segscale's: a stray file in its place
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    except OSError as e:
        raise SegscaleError(
            f"zoo cache {cache}: cannot write there ({e.strerror}); set SEGSCALE_CACHE to a "
            "writable folder"
        ) from None
    try:
        for rel, f in files.items():
            data = _fetch(zoo, f"{name}/{version}/{rel}", f["size"])
            digest = hashlib.sha256(data).hexdigest()
            if digest != f["sha256"]:
                raise SegscaleError(
                    f"{name}@{version}: {rel} does not match the zoo's sha256 "
                    f"({digest[:12]}… instead of {f['sha256'][:12]}…); nothing was kept"
                )
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        shutil.rmtree(target, ignore_errors=True)
        if target.exists() or target.is_symlink():  # the cache is segscale's: a stray file
            target.unlink()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):  # a refused first pull leaves no empty folder
            target.parent.rmdir()
    return target


def check_model_source(source: Path) -> None:
    """Raise SegscaleError unless `source` is a folder with a model: a run folder (config.yaml)
    or a pulled zoo entry (segscale-model.json)."""
    source = Path(source)
    if not (source / ENTRY_META).is_file() and not (source / "config.yaml").is_file():
        raise not_a_run(source, "a zoo entry (zoo:NAME[@VERSION])")

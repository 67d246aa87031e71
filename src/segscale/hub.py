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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from segscale._files import file_sha256
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


def read_index(zoo: str | Path) -> dict[str, Any]:
    where = f"{str(zoo).rstrip('/')}/{INDEX}"
    data = _fetch(zoo, INDEX)  # its own one-line error when missing or unreachable
    try:
        index = json.loads(data)
    except ValueError as e:
        raise SegscaleError(f"{where}: not a zoo index (invalid JSON: {e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise SegscaleError(f"{where}: not a segscale zoo index (format {FORMAT!r} expected)")
    return index


def entries(zoo: str | Path | None = None) -> list[dict[str, Any]]:
    """Every entry of a zoo, newest version last per name: name, version, summary."""
    index = read_index(zoo or default_zoo())
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
    index = read_index(zoo)
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
        (target / rel).is_file() and file_sha256(target / rel) == f["sha256"]
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
        with contextlib.suppress(OSError):  # a refused first pull leaves no empty folder
            target.parent.rmdir()
    return target

"""Write containers/constraints.txt: segscale's runtime dependencies (pyproject.toml) and
everything they require, at the versions installed in this environment, torch left out (the
image installs it first, from the index for its CPU or CUDA variant).

    .venv/bin/python scripts/pin-constraints.py
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stack, pinned = list(project["dependencies"]), {}
    while stack:
        requirement, _, marker = stack.pop().partition(";")
        if "extra" in marker:  # another package's optional part
            continue
        name = re.split(r"[<>=!~\[ (]", requirement.strip(), maxsplit=1)[0]
        if key(name) in pinned or key(name) == "torch":
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a marker excludes it on this platform
            continue
        pinned[key(name)] = f"{dist.metadata['Name']}=={dist.version}"
        stack += dist.requires or []
    header = [
        "# segscale's runtime packages at the versions its test suite passed with; torch is",
        "# installed first, from the index the image is built for. Regenerate with",
        "# scripts/pin-constraints.py.",
    ]
    text = "\n".join([*header, *sorted(pinned.values(), key=str.lower)]) + "\n"
    (ROOT / "containers" / "constraints.txt").write_text(text)
    print(f"pinned {len(pinned)} packages")


if __name__ == "__main__":
    main()

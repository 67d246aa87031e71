"""Finding input files: one way for every command (prepare's sources, predict, evaluate, imgmed).

- Suffixes match in any case (`CASE.NII.GZ`, `s0.PNG`).
- Hidden and system files are never inputs: names starting with '.' (macOS' `._name` companions
  that copying to a FAT/exFAT or network drive leaves beside every file, `.DS_Store`), Windows'
  `Thumbs.db` and `desktop.ini`, and DICOMDIR indexes.
- What a file holds is then decided by its content where it matters (segscale.imgmed.io.sniff,
  load_nifti): a gzipped NIfTI named `.nii` is read as what it is.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from segscale.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
SYSTEM_FILES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "dicomdir"})


def is_hidden(path: Path) -> bool:
    """Whether a file or folder is hidden or a system file, never a dataset's input."""
    return path.name.startswith(".") or path.name.lower() in SYSTEM_FILES


def has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    """Whether the name ends in one of `suffixes`, in any case."""
    return path.name.lower().endswith(tuple(s.lower() for s in suffixes))


def is_nifti_name(path: Path) -> bool:
    return has_suffix(path, NIFTI_SUFFIXES)


def strip_suffix(name: str) -> str:
    """The name without its image suffix, in any case: 'case_001.nii.gz' → 'case_001'."""
    for s in (*NIFTI_SUFFIXES, *PNG_SUFFIXES, ".bmp", ".npy", ".npz", *DICOM_SUFFIXES):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


def by_case(
    files: list[Path], what: str = "files", problems: list[str] | None = None
) -> dict[str, Path]:
    """`files` by case id for pairing with other files by name: the name without its image suffix,
    case-folded, so that 'Case_01.PNG' pairs with 'case_01.nii.gz' (tools and file systems
    differ in the case they write; macOS and Windows do not tell them apart). Look a case up
    with `case_key`. Raises DataError when two files make one case id (a.png beside a.tif,
    A.nii.gz beside a.nii.gz): one would silently stand for the other; `problems`: noted there
    instead, the first file kept."""
    out: dict[str, Path] = {}
    for p in files:
        key = case_key(p.name)
        if key in out:
            problem = f"{p} and {out[key]}: two {what} for '{strip_suffix(p.name)}'; remove one"
            if problems is None:
                raise DataError(problem)
            problems.append(problem)
            continue
        out[key] = p
    return out


def without_postfix(
    found: dict[str, Path], others: Iterable[str], where: Path, what: str
) -> dict[str, Path]:
    """Files by case key (`by_case`) keyed by their names without the one '_postfix' all of them
    end in (MONAI's SaveImage writes case_seg, many 2D datasets case_mask), when a case of the
    `others` (their case keys) has no file of its own name, and the names without it pair every
    file with one of the others, or every one of the others with a file; else `found` as it
    is. A postfix taken off is said in a warning: "`where`: `what` by their names without
    '_seg'" (`what`: e.g. "predictions paired with their references")."""
    import warnings

    wanted = set(others)
    if not found or all(key in found for key in wanted):
        return found
    if not all("_" in key.strip("_") for key in found):
        return found
    postfixes = {key.rpartition("_")[2] for key in found}
    if len(postfixes) != 1:
        return found
    postfix = postfixes.pop()
    bare = {key[: -len(postfix) - 1]: path for key, path in found.items()}
    if len(bare) < len(found) or not (set(bare) <= wanted or wanted <= set(bare)):
        return found
    example = found[next(iter(found))].name
    warnings.warn(
        f"{where}: {what} by their names without '_{postfix}' (e.g. {example})", stacklevel=3
    )
    return bare


def case_key(name: str) -> str:
    """The key `by_case` files a name under: without its image suffix, case-folded, in Unicode's
    composed form (macOS writes 'ë' as 'e' and a combining diaeresis, Linux and Windows as one
    character: the same name on screen)."""
    return unicodedata.normalize("NFC", strip_suffix(name)).casefold()


def list_files(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The visible files of `folder` (not hidden, not system files), in name order; only those
    ending in one of `suffixes` (any case) when given. Raises DataError when it cannot be read or one of those files is a
    link to nothing."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror})") from None
    wanted = [
        p for p in entries if not is_hidden(p) and (suffixes is None or has_suffix(p, suffixes))
    ]
    for p in wanted:
        if p.is_symlink() and not p.exists():  # silently skipped, its case would be lost
            raise DataError(
                f"{p}: a link to {os.readlink(p)}, which does not exist (a git-annex or DataLad "
                "file not fetched?)"
            )
    return sorted(p for p in wanted if p.is_file())


def list_folders(folder: Path) -> list[Path]:
    """The visible subfolders of `folder`, in name order."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not is_hidden(p))


def dicom_head(head: bytes) -> bool:
    """Whether a file's first bytes are DICOM Part 10's: a 128-byte preamble, then 'DICM'."""
    return head[128:132] == b"DICM"


def _looks_dicom(path: Path) -> bool:
    """A .dcm name, or DICOM Part 10's head."""
    if has_suffix(path, DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return dicom_head(f.read(132))
    except OSError:
        return False


def list_images(inputs: list[Path]) -> list[Path]:
    """The image files that `inputs` name: files as given, folders expanded to their visible
    NIfTI and PNG/JPG/TIFF files in name order. Raises DataError for a missing path or a folder
    without images."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = list_files(path, (*NIFTI_SUFFIXES, *PNG_SUFFIXES))
            if not found:
                dicom = any(_looks_dicom(p) for p in list_files(path)[:5])
                hint = " (a DICOM series? convert it: segscale imgmed convert FOLDER scan.nii.gz)"
                raise DataError(f"{path}: no NIfTI or PNG/JPG/TIFF files" + (hint if dicom else ""))
            files += found
        elif path.is_file():
            files.append(path)
        elif path.is_symlink():
            raise DataError(f"{path}: a link to {os.readlink(path)}, which does not exist")
        else:
            raise DataError(f"{path}: no such file or folder")
    return files

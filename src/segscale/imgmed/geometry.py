"""Two images that must align are compared in world space, not by array shape.

Wherever segscale pairs two volumes (an image and its label in `prepare`, for every source
format; a prediction and its reference in `evaluate`), the second is brought onto the first's
voxel grid by `onto_grid`:

- the same grid (every voxel centre within TOLERANCE of a voxel of the smallest spacing of its
  counterpart): used as it is;
- the same voxels stored in another axis order or direction (a RAS-reorienting writer, a mask
  exported with its rows reversed and an affine that says so): reoriented onto the first's grid,
  exactly (a permutation and flips of the array; no resampling);
- anything else (another spacing, a shifted origin, another shape): refused in one line naming
  both files and both geometries. segscale never resamples a label silently.

nnU-Net's dataset integrity check compares spacing, origin and direction the same way, but only
warns on a shifted origin or flipped axes; segscale fixes the flips and refuses the shift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segscale.errors import DataError

TOLERANCE = 0.1  # how far, in voxels (of the smaller spacing), two grids' voxel centres may differ


def _corners(shape: tuple[int, ...]) -> np.ndarray:
    """(4, 8) homogeneous voxel coordinates of the centres of a grid's corner voxels."""
    axes = [(0, max(n - 1, 0)) for n in shape[:3]]
    return np.array([[i, j, k, 1.0] for i in axes[0] for j in axes[1] for k in axes[2]]).T


def spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) along each array axis: the lengths of the affine's first three columns."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


def same_grid(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether affines `a` and `b` place every voxel centre of a grid of `shape` within TOLERANCE
    voxels of each other. The maps are affine, so the largest distance is at a corner."""
    moved = (np.asarray(a, float) - np.asarray(b, float)) @ _corners(shape)
    distance = float(np.linalg.norm(moved[:3], axis=0).max())
    return distance <= TOLERANCE * min(*spacing_from_affine(a), *spacing_from_affine(b))


def describe(affine: np.ndarray, shape: tuple[int, ...]) -> str:
    """'24×20×6 voxels of 0.7×0.8×2 mm, origin (-50, 30, 10) mm, axes LPS', with ', oblique:
    axes 30°, 30°, 0° off LPS' when the grid is turned from the world axes (the axis codes name
    only the nearest world axis, so two grids at different angles read alike without it)."""
    from nibabel.affines import obliquity

    sizes = "×".join(str(int(n)) for n in shape[:3])
    spacing = "×".join(f"{v:.4g}" for v in spacing_from_affine(affine))
    origin = ", ".join(f"{v:.4g}" for v in np.asarray(affine)[:3, 3])
    axes = axis_codes(affine)
    text = f"{sizes} voxels of {spacing} mm, origin ({origin}) mm, axes {axes}"
    angles = np.degrees(obliquity(np.asarray(affine, float)))
    if np.abs(angles).max() > 0.01:
        text += f", oblique: axes {', '.join(f'{abs(a):.3g}°' for a in angles)} off {axes}"
    return text


def _axis_map(affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """The axis order and flips (a nibabel orientation, (3, 2): target axis, ±1) that bring the
    grid `affine` nearest to `target_affine`, read from the voxel-to-voxel map between them.
    Comparing the two grids directly, not each with the world axes (nibabel's io_orientation),
    keeps oblique grids exact: at 45° the nearest world axis is a tie. Identity when the map
    is singular; the caller's grid check then refuses the pair."""
    try:
        steps = np.linalg.solve(np.asarray(target_affine, float), np.asarray(affine, float))[:3, :3]
    except np.linalg.LinAlgError:
        steps = np.eye(3)
    magnitude = np.abs(steps)
    axes = magnitude.argmax(axis=0)  # array axis i steps along target axis axes[i]
    if sorted(axes.tolist()) != [0, 1, 2]:
        axes = np.arange(3)
    return np.array([[a, 1.0 if steps[a, i] >= 0 else -1.0] for i, a in enumerate(axes)])


def onto_grid(
    array: np.ndarray,
    affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, ...],
    *,
    name: Path,
    target: Path,
    what: str = "label",
    target_what: str = "image",
) -> np.ndarray:
    """`array` (its first three axes on the grid `affine`) on the grid of (`target_affine`,
    `target_shape`): unchanged, or reoriented (axis order and flips, exact), as the module says.

    Raises DataError naming `name`, `target` and both geometries when the grids differ otherwise.
    """
    if array.ndim < 3 or len(target_shape) < 3:
        raise DataError(
            f"{name}: expected a 3D volume beside {target}, got shapes {array.shape} and "
            f"{tuple(target_shape)}"
        )
    shape = tuple(array.shape[:3])
    target_shape = tuple(int(n) for n in target_shape[:3])
    if shape == target_shape and same_grid(affine, target_affine, shape):
        return array
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    transform = _axis_map(affine, target_affine)
    moved = apply_orientation(array, transform)
    moved_affine = np.asarray(affine) @ inv_ornt_aff(transform, shape)
    # compared on the target's grid: the moved array has the target's shape when it matches
    if tuple(moved.shape[:3]) == target_shape and same_grid(
        moved_affine, target_affine, target_shape
    ):
        return np.ascontiguousarray(moved)
    if tuple(moved.shape[:3]) != target_shape:
        problem = f"{what} shape {shape} does not match {target_what} shape {target_shape}"
    else:
        problem = f"{what} is not on the voxel grid of its {target_what}"
    raise DataError(
        f"{name}: {problem} ({target}): {what} {describe(affine, shape)}; {target_what} "
        f"{describe(target_affine, target_shape)}; resample the {what} onto the {target_what}'s grid"
    )


def axis_codes(affine: np.ndarray) -> str:
    """The world direction each array axis points to, e.g. 'RAS' (nibabel's axis codes)."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, float)))


def to_axis_codes(
    array: np.ndarray, affine: np.ndarray, codes: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`array` (its first three axes on the grid `affine`; further axes, e.g. channels, kept)
    stored in the axis order and directions `codes` (e.g. 'RAS'): exact, a permutation and
    flips. Returns (moved array, its affine, the nibabel orientation that takes a moved array
    back: `apply_orientation(moved_mask, back)`). The same world content, so that a network
    trained on slices cut in one anatomical plane is given that plane."""
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    start, end = io_orientation(np.asarray(affine, float)), axcodes2ornt(tuple(codes))
    there = ornt_transform(start, end)
    moved = np.ascontiguousarray(apply_orientation(array, there))
    moved_affine = np.asarray(affine, float) @ inv_ornt_aff(there, array.shape[:3])
    return moved, moved_affine, ornt_transform(end, start)


def one_slice_on_axis(
    array: np.ndarray, affine: np.ndarray, axis: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A one-slice volume whose axis of size 1 is not the slicing `axis` ((X, 1, Z) cut along
    2 would give Z slices one pixel wide) with that axis moved to `axis`, the other two kept in
    order: (X, Z, 1). `array`'s axes after the third (channels) are kept. Returns (moved array,
    its affine, the nibabel orientation that takes a moved mask back), or None when the volume
    is not one slice or already has its size-1 axis at `axis`."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff

    ones = [i for i in range(3) if array.shape[i] == 1]
    if not ones or axis in ones:
        return None
    order = [i for i in range(3) if i != ones[0]]
    order.insert(axis, ones[0])  # new axis k is old axis order[k]
    there = np.zeros((3, 2))
    for k, old in enumerate(order):
        there[old] = (k, 1)
    back = np.array([(old, 1) for old in order], float)
    moved = np.ascontiguousarray(apply_orientation(array, there))
    return moved, np.asarray(affine, float) @ inv_ornt_aff(there, array.shape[:3]), back


PLANES = {
    "L": "sagittal",
    "R": "sagittal",
    "A": "coronal",
    "P": "coronal",
    "I": "axial",
    "S": "axial",
}


def plane_across(codes: str, axis: int) -> str:
    """The anatomical plane of slices cut across array `axis` of a volume in axes `codes`
    ('RAS', 2 → 'axial')."""
    return PLANES[codes[axis]]


def common_axis_codes(codes: dict[str, str | None]) -> str | None:
    """The axis codes most cases share ({case id: codes, None where unknown}), None when none is
    known."""
    groups: dict[str, list[str]] = {}
    for cid, case_codes in codes.items():
        if case_codes is not None:
            groups.setdefault(case_codes, []).append(cid)
    return str(majority(groups)) if groups else None


def majority(groups: dict) -> object:
    """The key of the largest group (case ids by a value they share)."""
    return max(groups, key=lambda k: len(groups[k]))


def split_majority(groups: dict, item: str) -> tuple[object, str]:
    """The key most cases share, and the other groups as text: `item` formatted with {key} and
    {ids} (the first five case ids) per group, joined by '; '."""
    common = majority(groups)
    others = "; ".join(
        item.format(key=key, ids=", ".join(ids[:5]) + (" ..." if len(ids) > 5 else ""))
        for key, ids in groups.items()
        if key != common
    )
    return common, others


def dataset_notes(
    cases: list[tuple[str, list | np.ndarray | None]],
    axis: int,
    codes: dict[str, str | None] | None = None,
) -> list[str]:
    """What is worth a warning across a dataset's volumes, from each case's (id, affine): mixed
    orientations (slicing along array `axis` then cuts different anatomical planes) and voxel
    spacings more than twice or less than half the median on an axis. 2D cases (affine None)
    are left out. `codes`: each case's axis codes as its header gives them (None: it gives
    none, and nibabel's guessed affine says nothing), else read from the affines."""
    volumes = [(cid, np.asarray(a, float)) for cid, a in cases if a is not None]
    if len(volumes) < 2:
        return []
    notes = []
    axes: dict[str, list[str]] = {}
    for cid, affine in volumes:
        known = axis_codes(affine) if codes is None else codes.get(cid)
        if known is not None:
            axes.setdefault(known, []).append(cid)
    if len(axes) > 1:
        common, others = split_majority(axes, "{key}: {ids}")
        notes.append(
            f"mixed orientations: {len(axes[common])} cases {common}, others {others}; "
            f"prepare reorients those to {common} (a permutation and flips, exact), so that "
            f"slices along array axis {axis} cut one anatomical plane"
        )
    spacings = np.array([spacing_from_affine(a) for _, a in volumes])
    median = np.median(spacings, axis=0)
    ratio = spacings / median
    odd = [i for i in range(len(volumes)) if ((ratio[i] > 2) | (ratio[i] < 0.5)).any()]
    if odd:
        shown = ", ".join(
            f"{volumes[i][0]} ({'×'.join(f'{v:.3g}' for v in spacings[i])} mm)" for i in odd[:5]
        )
        notes.append(
            f"spacing outliers against the median {'×'.join(f'{v:.3g}' for v in median)} mm: "
            f"{shown}{' ...' if len(odd) > 5 else ''}"
        )
    return notes

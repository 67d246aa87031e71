"""Build the demo sample bundled in src/segscale/resources/sample_la from the left-atrium set.

    python scripts/make_demo_sample.py ../shared/data/left_atrium_lge_mri_2018

Each case is downsampled 2× along every axis (2×2×2 block mean for the image, block majority for
the label: 0.625 mm → 1.25 mm isotropic) and the image is stored as int16 with a 1/100 scale
slope, which keeps the repository a few MB. SOURCE.md in the sample records all of this.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def block_mean(a: np.ndarray) -> np.ndarray:
    x, y, z = (s // 2 * 2 for s in a.shape)
    a = a[:x, :y, :z]
    return a.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean((1, 3, 5))


def main(src: Path, dst: Path) -> None:
    meta = json.loads((src / "dataset.json").read_text())
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for entry in meta["training"]:
        img = nib.load(src / entry["image"])
        lab = nib.load(src / entry["label"])
        affine = img.affine.copy()
        affine[:3, :3] *= 2
        image = block_mean(np.asarray(img.dataobj, dtype=np.float32))
        label = (block_mean(np.asarray(lab.dataobj, dtype=np.float32)) >= 0.5).astype(np.uint8)
        out = nib.Nifti1Image(np.round(image * 100).astype(np.int16), affine)
        out.header.set_slope_inter(1 / 100, 0)
        nib.save(out, dst / entry["image"])
        nib.save(nib.Nifti1Image(label, affine), dst / entry["label"])
    meta["description"] = "Demo sample (2x downsampled, 1.25 mm) of " + meta["description"]
    (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
    shutil.copy(src / "cases.tsv", dst / "cases.tsv")


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        Path(sys.argv[2]) if len(sys.argv) > 2 else Path("src/segscale/resources/sample_la"),
    )

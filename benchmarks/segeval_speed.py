"""SegEval speed: all metrics of one 240×240×155 brain-tumour case vs one training step of the
demo model, measured side by side in this process (a ratio; absolute times mean little here).

    python benchmarks/segeval_speed.py [--data ../shared/data/brats2013_flair_t1gd]

Goal (issue 4): the ratio metrics / training step is below 1.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import binary_dilation

from segscale.evaluation import evaluate_case
from segscale.imgmed.geometry import spacing_from_affine
from segscale.imgmed.io import load_nifti
from segscale.models import create_model


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/brats2013_flair_t1gd",
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    label, affine = load_nifti(args.data / "labelsTr" / "brats2013_0001.nii.gz")
    ref = label.astype(np.int64)
    pred = ref.copy()
    pred[binary_dilation(ref == 1, iterations=2) & (ref == 0)] = 1  # an over-segmented edema
    pred[np.roll(ref == 3, 3, axis=0)] = 3  # a shifted enhancing tumour
    sp = spacing_from_affine(affine)
    # slice-first and contiguous, as cases come out of the prepared store; labels as uint8 (the
    # store's dtype), predictions as int64 (argmax's)
    pred_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(pred, 2, 0)))
    ref_t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(ref, 2, 0)).astype(np.uint8))

    def metrics() -> None:
        evaluate_case(pred_t, ref_t, 4, (sp[2], sp[0], sp[1]), "brats2013_0001")

    model = create_model("resunet", 1, 2, base_channels=16, depth=3)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(8, 1, 128, 128), torch.randint(0, 2, (8, 128, 128))

    def train_step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_metrics = median_time(metrics, args.repeats)
    t_step = median_time(train_step, args.repeats)
    print(f"case {ref.shape}, 4 classes, torch threads {torch.get_num_threads()}")
    print(
        f"all SegEval metrics of one case : {t_metrics * 1000:8.1f} ms (median of {args.repeats})"
    )
    print(f"one demo training step (8×128²) : {t_step * 1000:8.1f} ms (median of {args.repeats})")
    print(f"ratio metrics / step            : {t_metrics / t_step:8.2f}  (goal < 1)")


if __name__ == "__main__":
    main()

"""ImgMed benchmarks, ratios measured side by side in one run (absolute times mean little here).

1. `prepare` throughput (slices/s) on the left-atrium and BraTS sets of ../shared/data, with 1 and
   with 2 processes, vs (a) a plain nibabel loop doing the same work (load, z-score, slice, resize
   images bilinear-antialiased and masks nearest, keep the arrays) and (b) MONAI's LoadImage +
   NormalizeIntensity + Resize doing the same, slice by slice.
2. Training-loader throughput (samples/s) from the prepared store vs decoding the case's .nii.gz
   for every sample (what a naive Dataset does): goal ≥ 20×.
3. A training step (ResUNet 16/3, batch 8, 128², one thread, Adam) fed by the real loader from the
   store vs the same batches already in memory: goal within 5%.

    python benchmarks/imgmed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from segscale.config import AugmentConfig
from segscale.data import SliceDataset, TrainLoader
from segscale.imgmed import Preprocessing, Store, prepare
from segscale.losses import DiceCELoss
from segscale.models import ResUNet

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "left atrium": DATA / "left_atrium_lge_mri_2018",
    "BraTS (2 channels)": DATA / "brats2013_flair_t1gd",
}
SIZE = 128


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def cases(root: Path) -> list[tuple[Path, Path]]:
    return sorted(
        zip(
            sorted((root / "imagesTr").glob("*.nii.gz")),
            sorted((root / "labelsTr").glob("*.nii.gz")),
        )
    )


def plain_nibabel(root: Path) -> int:
    """The same work as prepare, written as a plain loop: returns the number of slices."""
    n = 0
    kept = []
    for image_path, label_path in cases(root):
        image = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(str(label_path)).dataobj).astype(np.int64)
        image = image if image.ndim == 4 else image[..., None]
        image = np.moveaxis(image, -1, 0)  # (C, X, Y, Z)
        image = (image - image.mean((1, 2, 3), keepdims=True)) / image.std((1, 2, 3), keepdims=True)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, 3, 0)))  # (Z, C, X, Y)
        m = torch.from_numpy(np.ascontiguousarray(np.moveaxis(label, 2, 0)))[:, None].float()
        xs = F.interpolate(
            x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False
        )
        ms = F.interpolate(m, size=(SIZE, SIZE), mode="nearest-exact").to(torch.uint8)
        kept.append((xs.numpy(), ms.numpy()))
        n += len(xs)
    return n


def monai_pipeline(root: Path) -> int:
    from monai.transforms import LoadImage, NormalizeIntensity, Resize

    load = LoadImage(image_only=True)
    norm = NormalizeIntensity(channel_wise=True)
    resize_image = Resize((SIZE, SIZE), mode="bilinear", anti_aliasing=True)
    resize_mask = Resize((SIZE, SIZE), mode="nearest")
    n = 0
    for image_path, label_path in cases(root):
        image, label = load(image_path), load(label_path)
        image = image if image.ndim == 4 else image[..., None]
        image = norm(image.permute(3, 0, 1, 2))
        for z in range(image.shape[-1]):
            resize_image(image[..., z])
            resize_mask(label[None, ..., z])
            n += 1
    return n


def prepare_rate(root: Path, tmp: Path, jobs: int, repeats: int) -> tuple[float, int]:
    def run() -> int:
        out = tmp / f"store-{jobs}"
        shutil.rmtree(out, ignore_errors=True)
        path, _ = prepare(root, out, Preprocessing(size=SIZE), progress=False, jobs=jobs)
        return len(Store.open(path).masks)

    seconds, n = timed(run, repeats)
    return seconds, int(n)  # type: ignore[arg-type]


class NiftiPerSample(torch.utils.data.Dataset):
    """The naive dataset: every sample decodes its case's .nii.gz files, then slices and resizes."""

    def __init__(self, store: Store, split: str) -> None:
        self.items = [
            (c["images"][0], c["label"], z) for c in store.cases(split) for z in c["slice_indices"]
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        image_path, label_path, z = self.items[i]
        image = np.asarray(nib.load(image_path).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(label_path).dataobj)
        image = (image - image.mean()) / image.std()
        x = torch.from_numpy(np.ascontiguousarray(image[..., z]))[None, None]
        y = torch.from_numpy(np.ascontiguousarray(label[..., z]).astype(np.float32))[None, None]
        x = F.interpolate(
            x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False
        )
        y = F.interpolate(y, size=(SIZE, SIZE), mode="nearest-exact")
        return x[0], y[0, 0].long(), 0


def loader_rates(store: Store, samples: int) -> tuple[float, float]:
    def rate(dataset) -> float:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        t, n = time.perf_counter(), 0
        for x, _, _ in loader:
            n += len(x)
            if n >= samples:
                break
        return n / (time.perf_counter() - t)

    return rate(SliceDataset(store, "train")), rate(NiftiPerSample(store, "train"))


def step_times(store: Store, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = ResUNet(store.in_channels, store.num_classes)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = DiceCELoss()
    loader = TrainLoader(
        SliceDataset(store, "train"),
        8,
        [0],
        1,
        torch.device("cpu"),
        0,
        AugmentConfig(enabled=False),
    )

    def step(x, y) -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    loader.set_epoch(0)
    batches = [b[0] for _, b in zip(range(steps), loader)]  # the in-memory copy
    for x, y in batches[:3]:
        step(x, y)  # warm up

    def from_store() -> float:
        loader.set_epoch(0)
        t = time.perf_counter()
        for _, b in zip(range(steps), loader):
            step(*b[0])
        return time.perf_counter() - t

    def in_memory() -> float:
        t = time.perf_counter()
        for x, y in batches:
            step(x, y)
        return time.perf_counter() - t

    a, b = [], []
    for _ in range(3):  # interleaved
        a.append(from_store())
        b.append(in_memory())
    return min(a) / steps, min(b) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'1. prepare, slices/s (median of ' + str(args.repeats) + ')':44s} {'segscale':>9s} {'2 procs':>9s} {'nibabel':>9s} {'MONAI':>9s}   ratios vs nibabel"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, root in SETS.items():
            one, n = prepare_rate(root, tmp, 1, args.repeats)
            two, _ = prepare_rate(root, tmp, 2, args.repeats)
            plain, n_plain = timed(lambda r=root: plain_nibabel(r), args.repeats)
            monai, n_monai = timed(lambda r=root: monai_pipeline(r), args.repeats)
            assert n == n_plain == n_monai, (n, n_plain, n_monai)
            r = [n / one, n / two, n / plain, n / monai]
            print(
                f"{name + f' ({n} slices)':44s} "
                + " ".join(f"{v:9.1f}" for v in r)
                + f"   1 proc {r[0] / r[2]:.2f}, 2 procs {r[1] / r[2]:.2f}, MONAI {r[3] / r[2]:.2f}"
            )
        la, _ = prepare(
            SETS["left atrium"], tmp / "la", Preprocessing(size=SIZE), progress=False, jobs=2
        )
        store = Store.open(la)
        fast, slow = loader_rates(store, 200)
        print(
            f"\n2. loader, samples/s: prepared store {fast:.0f}, .nii.gz per sample {slow:.1f}: "
            f"{fast / slow:.0f}× (goal ≥ 20×)"
        )
        real, memory = step_times(store, args.steps)
        print(
            f"3. training step: real loader {real * 1000:.0f} ms, in-memory batches {memory * 1000:.0f} ms: "
            f"{real / memory:.3f}× (goal ≤ 1.05)"
        )


if __name__ == "__main__":
    main()

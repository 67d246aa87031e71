"""The MONAI side of benchmarks/time_to_dice.py: a straightforward MONAI 2D training script, as a
MONAI user writes it (monai.networks.nets.UNet with residual units, DiceCELoss, Adam 1e-3, DDP on
gloo, a DistributedSampler, one thread per worker), over the same prepared slices and split as
segscale's run. Run under torchrun. Rank 0 saves the weights and the wall time since the benchmark
launched the command (SEGSCALE_BENCH_T0) after every epoch; scoring happens afterwards."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch.utils.data import DistributedSampler, TensorDataset


def monai_unet() -> UNet:
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=2,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(args.seed)

    meta = json.loads(Path(args.store, "meta.json").read_text())
    rows = np.concatenate(
        [
            np.arange(c["start"], c["start"] + c["count"])
            for c in meta["cases"]
            if c["split"] == "train"
        ]
    )
    images = torch.from_numpy(np.load(Path(args.store, "images.npy"))[rows])
    masks = torch.from_numpy(np.load(Path(args.store, "masks.npy"))[rows].astype(np.int64))[:, None]
    data = TensorDataset(images, masks)
    sampler = DistributedSampler(data, shuffle=True, seed=args.seed)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, num_workers=0)

    model = torch.nn.parallel.DistributedDataParallel(monai_unet())
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            seen += len(x)
        rate = seen * dist.get_world_size() / (time.perf_counter() - t0)
        if rank == 0:
            elapsed = time.time() - float(os.environ["SEGSCALE_BENCH_T0"])
            torch.save(model.module.state_dict(), out / f"epoch_{epoch + 1:03d}.pt")
            with open(out / "times.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "seconds": elapsed, "img_s": rate}) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

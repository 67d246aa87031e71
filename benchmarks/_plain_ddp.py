"""The hand-written baseline of benchmarks/scaling.py: a plain torch DDP loop over the same prepared
store, model, batch, optimiser and loss as segscale's run, with nothing else. Run under torchrun;
rank 0 prints {"images_per_second": ..., "median_step_seconds": ...} for the epochs after the
first."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from segscale.losses import DiceCELoss
from segscale.models import ResUNet


class Slices(Dataset):
    def __init__(self, store: str) -> None:
        with open(os.path.join(store, "meta.json")) as f:
            meta = json.load(f)
        self.images = np.load(os.path.join(store, "images.npy"), mmap_mode="r")
        self.masks = np.load(os.path.join(store, "masks.npy"), mmap_mode="r")
        self.rows = [
            r
            for c in meta["cases"]
            if c["split"] == "train"
            for r in range(c["start"], c["start"] + c["count"])
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        return torch.from_numpy(np.array(self.images[r])), torch.from_numpy(
            self.masks[r].astype(np.int64)
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--first-step-file", help="write time.time() after the first step here (engine_overhead.py)"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(ResUNet(1, 2, base_channels=16, depth=3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss()
    data = Slices(args.store)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler, drop_last=True)
    rates, step_seconds = [], []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        t0, seen = time.perf_counter(), 0
        last = t0
        for i, (x, y) in enumerate(loader):
            if i == args.steps:
                break
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x) * world
            now = time.perf_counter()
            if epoch > 0:  # like benchmarks/_step_timer.py: step end to step end, loading included
                step_seconds.append(now - last)
            last = now
            if args.first_step_file and rank == 0 and epoch == 0 and i == 0:
                with open(args.first_step_file, "w") as f:
                    f.write(repr(time.time()))
        rates.append(seen / (time.perf_counter() - t0))
    if rank == 0:
        print(
            json.dumps(
                {
                    # none with --epochs 1 (engine_overhead.py times the first step only)
                    "images_per_second": float(np.mean(rates[1:])) if rates[1:] else None,
                    "median_step_seconds": float(np.median(step_seconds)) if step_seconds else None,
                    "global_batch": args.batch * world,
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

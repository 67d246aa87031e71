"""How fast segscale trains and segments on this machine's accelerator, checked before it is timed.

Each variant adds one speed setting to the one before: fp32; bf16 autocast; + channels_last;
+ torch.compile; + the training split held on the device (data.on_device); the last takes one
back, reading the loss and agreeing on stops after every step instead of every 10th
(train.check_every 1 against auto), to show what that saves. Every variant runs segscale's own
path: a Plan built from a config, its Trainer's train_step and end_step over its TrainLoader's
batches (the bundled left-atrium sample, prepared at --size), so what is timed is what
`segscale train` runs, augmentation included.

Checks first, and nothing is reported when one fails (exit 1):
- bf16 against fp32: the same initial weights and batches for --check-steps steps; the mean loss
  of the last 5 steps must agree within 5% (bf16 rounds; it must not change what is learned);
- compiled against eager: the compiled variant's network and an eager copy of its weights, on one
  batch in eval mode: largest logit difference ≤ 1e-3 × the largest logit (float reordering);
- device-resident batches against the DataLoader's: identical for the first steps.

Then per variant: training img/s (after --warmup steps, compilation included there), the
fraction of step time spent waiting for the next batch, inference img/s (eval, no grad, batch
--infer-batch), and MFU: training FLOP/s (FLOPs per image counted once by
torch.utils.flop_counter on an fp32 forward + backward, as 2 × multiply-adds) over the card's
dense bf16 peak (--peak-tflops, or known for H100/H200/A100; none on CPU).

    python benchmarks/gpu.py                      # on a GPU: 512², Ronneberger U-Net 64/4
    python benchmarks/gpu.py --quick              # anywhere: 64², U-Net 8/3, a few steps
    python benchmarks/gpu.py --json out.json      # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from segscale.config import validate
from segscale.demo import resource
from segscale.engine import plan
from segscale.imgmed import Preprocessing, prepare
from segscale.parallel import unwrap

# dense bf16 tensor-core peaks, TFLOP/s (NVIDIA datasheets; SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
BF16_LOSS_TOLERANCE = 0.05  # relative, on the mean loss of the last 5 check steps
COMPILE_TOLERANCE = 1e-3  # × the largest eager logit

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {"amp": "none", "channels_last": False, "compile": False, "on_device": False}),
    ("bf16", {"amp": "bf16", "channels_last": False, "compile": False, "on_device": False}),
    (
        "+ channels_last",
        {"amp": "bf16", "channels_last": True, "compile": False, "on_device": False},
    ),
    ("+ compile", {"amp": "bf16", "channels_last": True, "compile": True, "on_device": False}),
    (
        "+ data on device",
        {"amp": "bf16", "channels_last": True, "compile": True, "on_device": True},
    ),
    (  # what the host check every 10 steps (check_every auto) saves
        "check every step",
        {
            "amp": "bf16",
            "channels_last": True,
            "compile": True,
            "on_device": True,
            "check_every": 1,
        },
    ),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config(args: argparse.Namespace, store: Path, variant: dict[str, Any], steps: int) -> Any:
    return validate(
        {
            "name": "gpu-bench",
            "seed": 0,
            "data": {"store": str(store), "on_device": variant["on_device"]},
            "model": {
                "name": "unet",
                "kwargs": {"base_channels": args.base_channels, "depth": args.depth},
            },
            "train": {
                "epochs": 1,
                "batch_size": args.batch,
                "optimizer": {"name": "adam", "lr": 1e-4},
                "loss": "dice_ce",
                "steps_per_epoch": steps,
                "amp": variant["amp"],
                "channels_last": variant["channels_last"],
                "compile": variant["compile"],
                "check_every": variant.get("check_every", "auto"),
                # cuDNN's autotuner on; on CPU this changes nothing
                "deterministic": False,
            },
            "tracker": "none",
            "monitor": {"log_every": 10**9, "system_every": 0, "pictures": 0},
        }
    )


class Batches:
    """A Trainer's batches, epoch after epoch, timing how long each took to arrive."""

    def __init__(self, trainer: Any) -> None:
        self.trainer, self.epoch, self.waited = trainer, 0, 0.0
        self._start()

    def _start(self) -> None:
        self.trainer.train_loader.set_epoch(self.epoch)
        self.it = iter(self.trainer.train_loader)

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        started = time.perf_counter()
        batch = next(self.it, None)
        if batch is None:
            self.epoch += 1
            self._start()
            batch = next(self.it)
        self.waited += time.perf_counter() - started
        return batch


def trainer_for(args: argparse.Namespace, store: Path, variant: dict[str, Any], tmp: Path) -> Any:
    p = plan(config(args, store, variant, args.warmup + args.steps))
    strategy = p.strategy()
    return p, p.trainer(strategy, tmp / "run", progress=False)


def losses(
    args: argparse.Namespace, store: Path, variant: dict[str, Any], tmp: Path
) -> list[float]:
    _, trainer = trainer_for(args, store, variant, tmp)
    batches = Batches(trainer)
    trainer.model.train()
    return [float(trainer.train_step(batches.next())) for _ in range(args.check_steps)]


def check(args: argparse.Namespace, store: Path, tmp: Path) -> list[str]:
    """The correctness checks that run before any timing; returns the failures."""
    failures = []
    fp32 = losses(args, store, VARIANTS[0][1], tmp)
    bf16 = losses(args, store, VARIANTS[1][1], tmp)
    a, b = statistics.fmean(fp32[-5:]), statistics.fmean(bf16[-5:])
    gap = abs(b - a) / abs(a)
    print(
        f"check bf16 vs fp32: mean loss of the last 5 of {args.check_steps} steps {b:.4f} vs {a:.4f} ({gap:.1%}; tolerance {BF16_LOSS_TOLERANCE:.0%})"
    )
    if not gap <= BF16_LOSS_TOLERANCE:
        failures.append(f"bf16 loss {b:.4f} vs fp32 {a:.4f}: {gap:.1%} apart")
    _, on = trainer_for(args, store, VARIANTS[-1][1] | {"compile": False}, tmp)
    _, off = trainer_for(args, store, VARIANTS[-1][1] | {"compile": False, "on_device": False}, tmp)
    probes = []
    for trainer in (on, off):
        batches = Batches(trainer)
        probes.append([batches.next() for _ in range(3)])
    same = all(
        torch.equal(xa, xb) and torch.equal(ya, yb)
        for step_on, step_off in zip(*probes)
        for (xa, ya), (xb, yb) in zip(step_on, step_off)
    )
    print(f"check device-resident batches = DataLoader batches (3 steps): {same}")
    if not same:
        failures.append("device-resident batches differ from the DataLoader's")
    return failures


def check_compiled(p: Any, trainer: Any, x: torch.Tensor, variant: dict[str, Any]) -> str | None:
    """The compiled network against an eager copy of its weights, in eval mode, on batch x."""
    compiled = unwrap(trainer.model)
    eager = p.model().to(x.device)
    eager.load_state_dict(compiled.state_dict())
    eager.eval(), compiled.eval()
    if variant["channels_last"]:
        eager = eager.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = eager(x).float(), compiled(x).float()
    compiled.train()
    gap = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)
    print(
        f"check compiled vs eager logits (fp32, eval): largest difference {gap:.2e} of the largest logit (tolerance {COMPILE_TOLERANCE:g})"
    )
    return None if gap <= COMPILE_TOLERANCE else f"compiled logits {gap:.2e} apart from eager"


def flops_per_image(p: Any, size: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = p.model().to(device)
    x = torch.randn(1, p.in_channels, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().sum().backward()
    return float(counter.get_total_flops())


def measure(
    args: argparse.Namespace, store: Path, variant: dict[str, Any], tmp: Path
) -> dict[str, Any]:
    p, trainer = trainer_for(args, store, variant, tmp)
    device = trainer.strategy.device
    batches = Batches(trainer)
    trainer.model.train()
    for _ in range(args.warmup):  # compilation, cuDNN autotuning, allocator warm-up
        trainer.end_step(trainer.train_step(batches.next()))
    sync(device)
    batches.waited = 0.0
    started = time.perf_counter()
    for _ in range(args.steps):  # as `segscale train` steps: the host's check included
        trainer.end_step(trainer.train_step(batches.next()))
    sync(device)
    seconds = time.perf_counter() - started
    row = {
        "train_img_s": args.steps * args.batch / seconds,
        "data_wait": batches.waited / seconds,
        "device": str(device),
    }
    model = unwrap(trainer.model)
    x = torch.randn(args.infer_batch, p.in_channels, args.size, args.size, device=device)
    if variant["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    if variant["compile"]:
        row["compile_check"] = check_compiled(p, trainer, x, variant)
    model.eval()
    dtype = torch.bfloat16 if variant["amp"] == "bf16" else None
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(args.warmup):
            model(x)
        sync(device)
        started = time.perf_counter()
        for _ in range(args.infer_steps):
            model(x)
        sync(device)
    row["infer_img_s"] = args.infer_steps * args.infer_batch / (time.perf_counter() - started)
    return row


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given"
    if device.type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, name
    return None, name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and steps (CPU, CI)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--base-channels", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--check-steps", type=int)
    parser.add_argument("--infer-batch", type=int)
    parser.add_argument("--infer-steps", type=int)
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak")
    parser.add_argument("--variants", help="comma-separated variant numbers (1-6); default all")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    defaults = (
        dict(size=64, base_channels=8, depth=3, batch=4, steps=4, warmup=2, check_steps=8,
             infer_batch=8, infer_steps=3)
        if args.quick or not gpu
        else dict(size=512, base_channels=64, depth=4, batch=16, steps=30, warmup=10,
                  check_steps=30, infer_batch=64, infer_steps=20)
    )  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    chosen = [VARIANTS[int(i) - 1] for i in args.variants.split(",")] if args.variants else VARIANTS
    device = torch.device("cuda" if gpu else "cpu")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store, _ = prepare(
            resource("sample_la"), tmp / "store", Preprocessing(size=args.size),
            val_fraction=0.1, test_fraction=0.1, seed=0, progress=False,
        )  # fmt: skip
        failures = check(args, store, tmp)
        rows = {}
        for name, variant in chosen:
            print(f"measuring {name} ...", flush=True)
            rows[name] = measure(args, store, variant, tmp)
            if rows[name].get("compile_check"):
                failures.append(rows[name]["compile_check"])
        if failures:
            print("FAILED: " + "; ".join(failures))
            return 1
        flops = flops_per_image(plan(config(args, store, VARIANTS[0][1], 1)), args.size, device)
    peak, card = peak_tflops(args, device)
    base = rows[chosen[0][0]]["train_img_s"]
    print(
        f"\n{card if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}: U-Net "
        f"{args.base_channels}/{args.depth} at {args.size}², batch {args.batch}; "
        f"{flops / 1e9:.1f} GFLOP per training image (fwd + bwd); MFU against "
        + (f"{peak:g} TFLOP/s dense bf16" if peak else "no known peak")
    )
    print("\n| variant | training img/s | × first | data wait | inference img/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        r["mfu"] = r["train_img_s"] * flops / (peak * 1e12) if peak else math.nan
        mfu = f"{r['mfu']:.1%}" if peak else "n/a"
        print(
            f"| {name} | {r['train_img_s']:.1f} | {r['train_img_s'] / base:.2f} | "
            f"{r['data_wait']:.1%} | {r['infer_img_s']:.1f} | {mfu} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": card,
                    "torch": torch.__version__,
                    "settings": {k: v for k, v in vars(args).items() if k != "json"},
                    "flops_per_image": flops,
                    "peak_tflops": peak,
                    "variants": rows,
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Trainer: a plain synchronous data-parallel loop. It never reads config (see engine.py).

    fit():
        resume from the latest checkpoint when asked
        for each epoch:
            set_epoch (sampler, augmentation, dropout RNG)          → callbacks.on_epoch_start
            for each batch: train_step (lr(step), forward, backward = all-reduce, step)
            every val_every epochs: validate (exact, sharded)       → callbacks.on_validation_end
            log metrics, checkpoint (rank 0)                         → callbacks.on_epoch_end
        write model.pt                                               → callbacks.on_train_end

Callbacks are duck-typed: a hook is called only on objects that define it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segscale.checkpoint import (
    atomic_save,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
)
from segscale.data import TrainLoader
from segscale.evaluation import confusion_by_case
from segscale.parallel import Strategy, unwrap
from segscale.segeval import metrics_from_confusion


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Callable[[int], float],
        loss_fn: nn.Module,
        train_loader: TrainLoader,
        val_loader: Any,
        strategy: Strategy,
        *,
        epochs: int,
        num_classes: int,
        num_val_cases: int,
        run_dir: Path,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        val_every: int = 1,
        grad_clip: float | None = None,
        callbacks: Sequence[Any] = (),
        config_digest: str = "",
        keep_checkpoints: int = 3,
        amp: str = "none",
        fuse_microbatches: bool = False,
        progress: bool = True,
    ) -> None:
        self.model, self.optimizer, self.schedule, self.loss_fn = (
            model,
            optimizer,
            schedule,
            loss_fn,
        )
        self.train_loader, self.val_loader, self.strategy = train_loader, val_loader, strategy
        self.epochs, self.num_classes, self.num_val_cases = epochs, num_classes, num_val_cases
        self.run_dir, self.seed, self.grad_clip = Path(run_dir), seed, grad_clip
        self.steps_per_epoch = min(steps_per_epoch or len(train_loader), len(train_loader))
        self.val_every, self.callbacks, self.config_digest = (
            val_every,
            list(callbacks),
            config_digest,
        )
        self.keep_checkpoints, self.fuse_microbatches = keep_checkpoints, fuse_microbatches
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(strategy.device.type, enabled=amp == "fp16")
        self.progress = progress and strategy.rank == 0
        self.step, self.start_epoch, self.history = 0, 0, []

    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        if resume:
            self.resume()
        self._call("on_train_start")
        for epoch in range(self.start_epoch, self.epochs):
            self.set_epoch(epoch)
            t0 = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            elapsed = time.perf_counter() - t0
            record = {
                "epoch": epoch + 1,
                "step": self.step,
                "lr": self.schedule(self.step - 1),
                "train_loss": train_loss,
                "epoch_seconds": elapsed,
                "images_per_second": self.images_seen / elapsed,
            }
            if (epoch + 1) % self.val_every == 0 or epoch + 1 == self.epochs:
                record.update({f"val_{k}": v for k, v in self.validate().items()})
                self._call("on_validation_end", record)
            self.history.append(record)
            if self.strategy.rank == 0:
                self.save_checkpoint(epoch + 1)
                self.write_metrics()
                if self.progress:
                    print(_summary(record, self.epochs), flush=True)
            self._call("on_epoch_end", record)
        if self.strategy.rank == 0:
            atomic_save(unwrap(self.model).state_dict(), self.run_dir / "model.pt")
        self.strategy.barrier()
        self._call("on_train_end", self.history)
        return self.history

    def set_epoch(self, epoch: int) -> None:
        """Everything random in an epoch derives from (seed, rank, epoch): resuming is exact."""
        self.train_loader.set_epoch(epoch)
        torch.manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.strategy.rank)
        self._call("on_epoch_start", epoch)

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        total = torch.zeros(2, dtype=torch.float64, device=self.strategy.device)  # Σ loss·n, Σ n
        with _progress(
            self.progress, f"epoch {epoch + 1}/{self.epochs}", self.steps_per_epoch
        ) as advance:
            for i, micro in enumerate(self.train_loader):
                if i == self.steps_per_epoch:
                    break
                n = sum(len(x) for x, _ in micro)
                total += torch.stack([self.train_step(micro).double() * n, total.new_tensor(n)])
                advance()
        self.strategy.all_reduce_sum(total)
        self.images_seen = int(total[1])
        return float(total[0] / total[1])

    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimiser step over this process's micro-batches: one per worker it plays (one under
        torchrun; K when simulating K workers, whose gradients add up to the all-reduced mean)."""
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        # Without BatchNorm a sample's output does not depend on its batch-mates, so K micro-batches
        # can share one forward pass (faster); the loss stays per micro-batch, as on K workers.
        passes = [micro] if self.fuse_microbatches else [[m] for m in micro]
        loss = torch.zeros((), device=self.strategy.device)
        for group in passes:
            with torch.autocast(
                self.strategy.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                logits = self.model(
                    torch.cat([x for x, _ in group]) if len(group) > 1 else group[0][0]
                )
                chunks = logits.split([len(x) for x, _ in group])
                part = sum(self.loss_fn(z, y) for z, (_, y) in zip(chunks, group)) / len(micro)
            self.scaler.scale(
                part
            ).backward()  # under DDP, gradients are all-reduced here, bucket by bucket
            loss += part.detach().float()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return loss

    def validate(self) -> dict[str, float]:
        counts = confusion_by_case(
            unwrap(self.model), self.val_loader, self.num_classes, self.num_val_cases, self.strategy
        )
        return metrics_from_confusion(counts.sum(0))

    def write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history, so a resumed run never duplicates a line."""
        tmp = self.run_dir / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(self.run_dir / "metrics.jsonl")

    def save_checkpoint(self, epoch: int) -> None:
        state = {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "step": self.step,
            "config_digest": self.config_digest,
            "history": self.history,
        }
        atomic_save(state, checkpoint_path(self.run_dir, epoch))
        prune_checkpoints(self.run_dir, self.keep_checkpoints)

    def resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return
        state = load_checkpoint(path, self.config_digest)
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.step, self.history = (
            state["epoch"],
            state["step"],
            list(state["history"]),
        )

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)


def _summary(record: dict[str, Any], epochs: int) -> str:
    line = f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}"
    if "val_dice" in record:
        line += f"  val Dice {record['val_dice']:.4f}"
    return line + f"  lr {record['lr']:.3g}  {record['images_per_second']:.1f} img/s"


class _progress:
    """A rich progress bar on rank 0 (a no-op elsewhere); yields an `advance()` function."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self) -> Callable[[], None]:
        from rich.console import Console

        console = Console(stderr=True)
        self.enabled = self.enabled and console.is_terminal  # no bar in logs, only epoch lines
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            console=console,
        )
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


def main(argv: list[str] | None = None) -> int:
    """`torchrun [...] -m segscale.train CONFIG [--run-dir DIR] [--resume] [key=value ...]`: the
    torchrun-native entry point, equivalent to `segscale train CONFIG --workers N`. Every process
    loads and checks the config itself, so it also works when each node is started by a scheduler."""
    import argparse
    import sys

    from segscale.config import load_config
    from segscale.engine import plan, prepare_run_dir, train_worker
    from segscale.errors import SegscaleError

    parser = argparse.ArgumentParser(prog="segscale.train")
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plan(cfg)
        run_dir = (args.run_dir or Path("runs") / cfg.name).resolve()
        prepare_run_dir(cfg, run_dir, args.resume)
        train_worker(run_dir, resume=args.resume)
    except SegscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

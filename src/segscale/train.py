"""The Trainer: a plain synchronous data-parallel loop. It never reads config: the engine builds
it (segscale.engine.Plan.trainer).

    fit():
        resume from the newest valid checkpoint when asked               → on_train_start
        for each epoch:
            set_epoch (sampler, augmentation, dropout RNG; mid-epoch: the saved states)
                                                                         → on_epoch_start
            for each batch: train_step (lr(step), forward, backward = all-reduce, step)
                                                                         → on_step_end
                every checkpoint_every steps: checkpoint                 → on_checkpoint
                on SIGTERM/SIGINT: finish the step, checkpoint, exit (code 75)
            every val_every epochs: validate (exact, sharded)            → on_validation_end
            log metrics, checkpoint (+ best.pt)                          → on_epoch_end
            a callback called finish_early(reason): stop here, the record says why
        write model.pt                                                   → on_train_end

Callbacks are duck-typed: a hook is called only on objects that define it.
Everything random derives from (seed, rank, epoch), and a checkpoint holds every rank's RNG and
augmentation state plus its position in the epoch, so a resumed run continues exactly: the same
batches, the same augmentations, bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segscale._files import to_json, write_atomic
from segscale._progress import progress_bar
from segscale.checkpoint import atomic_save, check_world_size, load_latest, write_checkpoint
from segscale.data import TrainLoader
from segscale.errors import (
    STOP_FILE,
    Diverged,
    Preempted,
    SegscaleError,
    did_you_mean,
    is_builtin,
    raised_in,
)
from segscale.monitor import ConsoleView
from segscale.parallel import Strategy, unwrap
from segscale.repro import derive_seed


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
        task: Any = None,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        val_every: int = 1,
        grad_clip: float | None = None,
        callbacks: Sequence[Any] = (),
        config_digest: str = "",
        older_digests: tuple[str, ...] = (),
        checkpoint_every: int | None = None,
        keep_checkpoints: int = 3,
        amp: str = "none",
        channels_last: bool = False,
        fuse_microbatches: bool = False,
        divergence: DivergenceGuard | None = None,
        progress: bool = True,
        log_every: int | None = None,
        freeze_encoder_epochs: int = 0,
        check_every: int = 1,
    ) -> None:
        self.model, self.optimizer, self.schedule, self.loss_fn = (
            model,
            optimizer,
            schedule,
            loss_fn,
        )
        self.train_loader, self.val_loader, self.strategy = train_loader, val_loader, strategy
        self.epochs, self.num_classes, self.num_val_cases = epochs, num_classes, num_val_cases
        if task is None:
            from segscale.tasks import Segmentation

            task = Segmentation()
        self.task = task
        self.run_dir, self.seed, self.grad_clip = Path(run_dir), seed, grad_clip
        self.steps_per_epoch = steps_per_epoch or len(train_loader)  # the engine's formula
        self.val_every, self.callbacks, self.config_digest = (
            val_every,
            list(callbacks),
            config_digest,
        )
        # checkpoints carry config_digest; a resume also takes those written with older_digests
        self.older_digests = older_digests
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.fuse_microbatches = fuse_microbatches
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.divergence = divergence
        # The host reads the losses (divergence) and the workers agree on a stop every
        # `check_every` steps, and before every checkpoint: each read waits for the device.
        self.check_every = check_every
        self._unchecked: list[torch.Tensor] = []  # losses of the steps since the last check
        self.amp, self.channels_last = amp, channels_last
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(strategy.device.type, enabled=amp == "fp16")
        self.progress = progress and strategy.rank == 0
        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best_metric = -1.0  # the task's validation metric (higher is better)
        # this epoch on this rank: Σ loss·n and Σ n (on the device: no host sync per step), seconds
        self.totals = torch.zeros(2, dtype=torch.float64, device=strategy.device)
        self.elapsed = 0.0
        self._resumed_rank_state: dict[str, Any] | None = None
        self._stop = _StopRequest()
        self._finish_reason: str | None = None
        # step metrics every `log_every` steps (on_log): this interval's Σ loss·n and Σ n on the
        # device, its start, the host time spent waiting for batches, the last gradient norm
        self.log_every = log_every
        self._interval = torch.zeros(2, dtype=torch.float64, device=strategy.device)
        self._interval_start, self._interval_step, self._waited = time.perf_counter(), 0, 0.0
        self._paused_at: float | None = None
        self._grad_norm = math.nan
        self.last_log: dict[str, float] | None = None  # the latest step metrics (console view)
        self._view: ConsoleView | None = None

    def finish_early(self, reason: str) -> None:
        """End training after the current epoch (its checkpoint, metrics and model.pt are written as
        at the last epoch); its record gets `finished_early: reason`. For callbacks, which must ask
        it on every rank alike: they see the same all-reduced validation metrics."""
        self._finish_reason = reason

    @property
    def finished_early(self) -> str | None:
        """Why the run finished before its last epoch, or None."""
        return self.history[-1].get("finished_early") if self.history else None

    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        if resume:
            self.resume()
        self.strategy.barrier()
        self._call("on_train_start")
        # the first logging interval starts here, at the resumed step when resuming
        self._interval_start, self._interval_step = time.perf_counter(), self.step
        # a run that finished early and was stopped before its model.pt was written is done
        last = self.epoch if self.finished_early else self.epochs
        # on a terminal, rank 0 shows one table redrawn in place; elsewhere, a line per epoch
        self._view = ConsoleView(self) if self.progress else None
        if self._view is not None and not self._view.console.is_terminal:
            self._view = None
        with self._stop, self._view or contextlib.nullcontext():
            for epoch in range(self.epoch, last):
                self.set_epoch(epoch)
                record = self.train_epoch(epoch)
                if self.val_loader is not None and (
                    (epoch + 1) % self.val_every == 0 or epoch + 1 == self.epochs
                ):
                    record.update({f"val_{k}": v for k, v in self.validate().items()})
                    self._call("on_validation_end", record)
                if self._finish_reason is not None and epoch + 1 < self.epochs:
                    record["finished_early"] = self._finish_reason
                self.history.append(record)
                self.epoch, self.epoch_step = epoch + 1, 0
                self.save_checkpoint(best=record.get(f"val_{self.task.metric}"))
                if self.strategy.rank == 0:
                    self.write_metrics()
                    if self.progress and self._view is None:
                        print(_summary(record, self.epochs, self.task.metric), flush=True)
                self._call("on_epoch_end", record)
                if self.finished_early:
                    if self.progress:
                        print(f"finished early: {self.finished_early}", flush=True)
                    break
        if self.strategy.rank == 0:
            atomic_save(unwrap(self.model).state_dict(), self.run_dir / "model.pt")
            late = self.run_dir / STOP_FILE
            if late.exists():  # asked after the last check: nothing left to stop
                late.unlink(missing_ok=True)
                warnings.warn(
                    "a stop asked after the run's last check came too late: it has finished",
                    stacklevel=2,
                )
        self.strategy.barrier()
        self._call("on_train_end", self.history)
        return self.history

    def set_epoch(self, epoch: int) -> None:
        """Seed the epoch from (seed, rank, epoch); mid-epoch after a resume, skip the batches
        already trained and restore the exact RNG and augmentation states saved with them."""
        self.train_loader.set_epoch(epoch, skip_batches=self.epoch_step)
        torch.manual_seed(derive_seed(self.seed, epoch, self.strategy.rank))
        self.totals.zero_()
        self.elapsed = 0.0
        if self._resumed_rank_state is not None:
            state, self._resumed_rank_state = self._resumed_rank_state, None
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"])
            self.train_loader.load_state_dict(state["loader"])
            self.totals.copy_(state["totals"])
            self.elapsed = state["elapsed"]
        self._call("on_epoch_start", epoch)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        self.model.train()
        t0 = time.perf_counter() - self.elapsed
        if self._paused_at is not None:  # validation and checkpoints are not step time
            self._interval_start += time.perf_counter() - self._paused_at
        batches = iter(self.train_loader)
        with progress_bar(
            self.progress and self._view is None,
            f"epoch {epoch + 1}/{self.epochs}",
            self.steps_per_epoch,
            self.epoch_step,
        ) as advance:
            while self.epoch_step < self.steps_per_epoch:
                fetch = time.perf_counter()
                micro = next(batches, None)
                if micro is None:
                    break
                self._waited += time.perf_counter() - fetch
                loss = self.train_step(micro)
                n = sum(len(x) for x, _ in micro)
                self.totals[0] += loss.double() * n
                self.totals[1] += n
                self._interval[0] += loss.double() * n
                self._interval[1] += n
                self.epoch_step += 1
                if self.log_every and self.step % self.log_every == 0:
                    self._call("on_log", self.step_metrics())
                self.elapsed = time.perf_counter() - t0
                advance()
                self._call("on_step_end", self.step)
                self.end_step(loss)
        if self._unchecked:  # the epoch's last steps, before its checkpoint
            self._check(False)
        totals = self.strategy.all_reduce_sum(self.totals.clone()).cpu()
        self._paused_at = time.perf_counter()
        seconds = self._paused_at - t0
        return {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.schedule(self.step - 1),
            "train_loss": float(totals[0] / totals[1]),
            "epoch_seconds": seconds,
            "images_per_second": float(totals[1]) / seconds,
        }

    def end_step(self, loss: torch.Tensor) -> None:
        """The host's side of a finished step (`loss`: its device scalar): every `check_every`
        steps, and at a checkpoint step, the check below; else nothing that waits for the
        device."""
        self._unchecked.append(loss)
        checkpoint = bool(self.checkpoint_every) and self.step % self.checkpoint_every == 0
        if checkpoint or self.step % self.check_every == 0:
            self._check(checkpoint)

    def _check(self, checkpoint: bool) -> None:
        """The host's look at the steps since the last one (one wait for the device): the
        divergence guard reads their losses in order, rank 0 looks for a STOP file, and all
        ranks agree (one small all-reduce). Raises Diverged naming the first diverged step,
        Preempted for a stop (after a checkpoint, unless `stop --now`); else writes the
        checkpoint due at this step. Runs before any checkpoint: a diverged step's weights are
        never saved."""
        losses = torch.stack(self._unchecked).tolist() if self.divergence else []
        first = self.step - len(self._unchecked) + 1
        self._unchecked = []
        reason, at = None, self.step
        for i, value in enumerate(losses):
            reason = self.divergence.update(value)
            if reason is not None:
                at = first + i
                break
        if self.strategy.rank == 0:
            self._stop.check(self.run_dir)
        stop, abort, diverged = self._stop.agreed(self.strategy, reason is not None, self.run_dir)
        if diverged:
            cause = (
                # the first step's loss is the initial weights': no update, so no lr, made it
                "(before any update, so not the lr: the loss, the data or a transform gives "
                "non-finite values)"
                if at == 1 and reason is not None
                else "(a too high lr is the usual cause: lower train.optimizer.lr or lengthen "
                "the warmup)"
            )
            raise Diverged(
                f"training diverged at step {at}: "
                f"{reason or 'on another worker'}, lr {self.schedule(at - 1):.3g} {cause}; "
                + (
                    "the checkpoints before this step are kept"
                    if self._has_checkpoint()
                    else "no checkpoint was saved before it"
                )
            )
        if abort:
            raise Preempted(
                f"{self._stop.why} at step {self.step}, at once; "
                + (
                    "the last checkpoint is kept, continue with --resume"
                    if self._has_checkpoint()
                    else "no checkpoint was saved yet: --resume starts it again"
                )
            )
        if checkpoint:
            self.save_checkpoint()
        if stop:
            self.save_checkpoint()
            raise Preempted(
                f"{self._stop.why} at step {self.step}; checkpoint saved, continue with --resume"
            )

    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimiser step over this process's micro-batches: one per worker it plays (one under
        torchrun; K when simulating K workers, whose gradients add up to the all-reduced mean)."""
        lr = self.schedule(self.step)
        frozen = self.epoch < self.freeze_encoder_epochs
        for group in self.optimizer.param_groups:  # fine-tuning: the encoder's group is scaled
            scale = 0.0 if frozen and group.get("encoder") else group.get("lr_scale", 1.0)
            group["lr"] = lr * scale
        self.optimizer.zero_grad(set_to_none=True)
        # Fused, the K micro-batches share one forward pass (faster), BatchNorm still normalising
        # each alone (ghost_batchnorm); the loss stays per micro-batch, as on K workers.
        passes = [micro] if self.fuse_microbatches else [[m] for m in micro]
        loss = torch.zeros((), device=self.strategy.device)
        for group in passes:
            with torch.autocast(
                self.strategy.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                x = torch.cat([x for x, _ in group]) if len(group) > 1 else group[0][0]
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = self.model(x)
                chunks = logits.split([len(x) for x, _ in group])
                part = sum(
                    self.loss_fn(z, self.task.target(y)) for z, (_, y) in zip(chunks, group)
                ) / len(micro)
            self.scaler.scale(
                part
            ).backward()  # under DDP, gradients are all-reduced here, bucket by bucket
            loss += part.detach().float()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if self._log_due():
                self._grad_norm = float(norm)
        elif self._log_due():  # one host sync per logged step
            grads = [q.grad for q in self.model.parameters() if q.grad is not None]
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            self._grad_norm = float(norm) / (
                self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return loss

    def _log_due(self) -> bool:
        """Whether the step being taken ends a logging interval."""
        return bool(self.log_every) and (self.step + 1) % self.log_every == 0

    def step_metrics(self) -> dict[str, float]:
        """The logging interval that ends at this step, over all workers (collective: one small
        all-reduce): mean loss, lr, global img/s, seconds per step, the fraction of it spent
        waiting for data (this rank's), the gradient norm at this step."""
        interval = self.strategy.all_reduce_sum(self._interval.clone()).cpu()
        now = time.perf_counter()
        seconds = max(now - self._interval_start, 1e-9)
        steps = max(self.step - self._interval_step, 1)
        row = {
            "step": self.step,
            "epoch": self.epoch + self.epoch_step / self.steps_per_epoch,
            "loss": float(interval[0] / interval[1]) if interval[1] else math.nan,
            "lr": self.schedule(self.step - 1),
            "images_per_second": float(interval[1]) / seconds,
            "step_seconds": seconds / steps,
            "data_wait_fraction": self._waited / seconds,
            "grad_norm": self._grad_norm,
        }
        self._interval.zero_()
        self._interval_start, self._interval_step, self._waited = now, self.step, 0.0
        self.last_log = row
        return row

    def validate(self) -> dict[str, float]:
        return self.task.validate(
            unwrap(self.model), self.val_loader, self.num_classes, self.num_val_cases, self.strategy
        )

    def write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history, so a resumed run never duplicates a line."""
        write_atomic(
            self.run_dir / "metrics.jsonl", "".join(to_json(r) + "\n" for r in self.history)
        )

    def _rank_state(self) -> dict[str, Any]:
        return {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.strategy.device.type == "cuda" else None,
            "loader": self.train_loader.state_dict(),
            "totals": self.totals.cpu(),
            "elapsed": self.elapsed,
            # this rank's loss history as the guard saw it: a resumed run diverges where the
            # uninterrupted one would (was: a fresh guard took the diverging loss as its baseline)
            "divergence": self.divergence.state_dict() if self.divergence else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """The run's state on this rank: weights, optimiser and scaler, position, history. A
        checkpoint adds every rank's `_rank_state` as "ranks"."""
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "history": self.history,
            "best_metric": self.best_metric,
            "config_digest": self.config_digest,
            "world_size": self.strategy.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state: mid-epoch, each rank takes its own saved RNG and
        loader state at the next set_epoch. Raises SegscaleError for a mid-epoch checkpoint of
        another world size (its shards and RNG streams would not match)."""
        check_world_size(
            self.run_dir, state["epoch_step"], state["world_size"], self.strategy.world_size
        )
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]
        self.history, self.best_metric = list(state["history"]), state["best_metric"]
        ranks = state["ranks"]
        mine = ranks[min(self.strategy.rank, len(ranks) - 1)]  # another world size: at an epoch end
        if self.divergence and mine.get("divergence"):
            self.divergence.load_state_dict(mine["divergence"])
        if self.epoch_step:
            self._resumed_rank_state = ranks[self.strategy.rank]

    def _has_checkpoint(self) -> bool:
        """Whether the run folder holds a step checkpoint to resume from (for messages)."""
        return any((self.run_dir / "checkpoints").glob("step_*.pt"))

    def save_checkpoint(self, best: float | None = None) -> None:
        """Collective: every rank hands its RNG, augmentation and loss state to rank 0, which writes
        one checkpoint with all of them (and best.pt when `best` beats the best so far)."""
        ranks = self.strategy.gather_objects(self._rank_state())
        if self.strategy.rank != 0:
            return
        improved = best is not None and best > self.best_metric
        if improved:
            self.best_metric = best
        state = {**self.state_dict(), "ranks": ranks}
        path = write_checkpoint(self.run_dir, state, self.keep_checkpoints, improved)
        self._call("on_checkpoint", path)

    def resume(self) -> None:
        """Load the newest valid checkpoint of the run folder, if there is one."""
        state = load_latest(self.run_dir, (self.config_digest, *self.older_digests))
        if state is not None:
            self.load_state_dict(state)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is None:
                continue
            try:
                fn(self, *args)
            except (SegscaleError, Preempted, Diverged):  # said on purpose: as they are
                raise
            except Exception as e:
                if is_builtin(cb):  # our own: a bug, its traceback
                    raise
                # a user's callback: one line naming it, the hook and its line, as a worker
                # failing in it would be summed up
                raise raised_in(f"callback {type(cb).__name__}.{hook}", e) from e


# What the Trainer calls on each callback and tracker: hook → its arguments after the trainer.
HOOKS: dict[str, tuple[str, ...]] = {
    "on_train_start": (),
    "on_epoch_start": ("epoch",),
    "on_step_end": ("step",),
    "on_log": ("metrics",),
    "on_validation_end": ("record",),
    "on_epoch_end": ("record",),
    "on_checkpoint": ("path",),
    "on_train_end": ("history",),
}


def check_hooks(what: str, part: Any, tracker: bool = False) -> None:
    """Refuse a callback (or tracker) the Trainer would never call, or call and fail on: one
    with no hook of HOOKS, an `on_...` method that is no hook (a misspelt one is never called),
    or a hook that cannot take the Trainer's arguments; a tracker needs close(error) as well.
    Raises SegscaleError naming `what`."""
    import inspect

    methods = [a for a in dir(part) if a.startswith("on_") and callable(getattr(part, a))]
    stray = [a for a in methods if a not in HOOKS]
    if stray:
        raise SegscaleError(
            f"{what}: {stray[0]} is not a hook the Trainer calls{did_you_mean(stray[0], HOOKS)}; "
            f"the hooks: {', '.join(HOOKS)}"
        )
    calls = {h: HOOKS[h] for h in methods}
    if tracker:
        calls["close"] = ("error",)
        if not callable(getattr(part, "close", None)):
            raise SegscaleError(f"{what}: has no close(error) method, which ends its record")
    elif not calls:
        raise SegscaleError(
            f"{what}: has none of the Trainer's hooks ({', '.join(HOOKS)}); it would never be "
            "called"
        )
    for hook, args in calls.items():
        try:
            inspect.signature(getattr(part, hook)).bind(*([None] * (len(args) + (hook != "close"))))
        except TypeError:
            shown = ", ".join(("trainer", *args) if hook != "close" else args)
            raise SegscaleError(
                f"{what}: {hook}{inspect.signature(getattr(part, hook))} cannot be called as "
                f"{hook}({shown})"
            ) from None
        except ValueError:  # no signature to read (a builtin): left to run time
            continue


class EarlyStop:
    """Finish a run early (Trainer.finish_early) when its validation metric (higher is better)
    stops improving, or stays clearly below a reference curve. Stateless between calls: it reads
    the run's history, so a resumed run decides as an uninterrupted one would.

    Without `reference`: after `patience` validations in a row that do not beat the best so far
    by more than `min_delta` (Keras' and Lightning's EarlyStopping, MONAI's EarlyStopHandler).
    With `reference` ({epoch (1-based): value}, e.g. a baseline's curve): after `patience`
    validations in a row under the reference at the same epoch minus `margin` (a number, or
    {epoch: number} such as the reference's run-to-run spread there; default 0.05): the rule of
    Optuna's MedianPruner and of ASHA's early rungs, against one curve. Either way validations
    up to epoch `after` do not count (a warmup), and a NaN counts as no better.

    metric: the validation metric's name (`dice`: the record's `val_dice`), checked before launch
    against the task's validation metrics (`reads`), and at the first validation. Raises
    ValueError for an empty reference, patience < 1, a negative min_delta or margin, or a
    setting of the other rule (margin without reference, min_delta with one)."""

    def __init__(
        self,
        reference: dict[int | str, float] | None = None,
        margin: float | dict[int | str, float] | None = None,
        patience: int = 3,
        after: float = 0,
        metric: str = "dice",
        min_delta: float | None = None,
    ) -> None:
        if reference is not None and not reference:
            raise ValueError("early_stop: the reference curve is empty")
        if patience < 1:
            raise ValueError(f"early_stop: patience {patience}, expected at least 1")
        if reference is None and margin is not None:
            raise ValueError(
                "early_stop: margin is below a reference curve; without one, min_delta"
            )
        if reference is not None and min_delta is not None:
            raise ValueError("early_stop: min_delta is without a reference curve; with one, margin")
        if min_delta is not None and not 0 <= min_delta < math.inf:
            raise ValueError(f"early_stop: min_delta {min_delta}, expected 0 or more")
        margins = margin.values() if isinstance(margin, dict) else [margin or 0]
        if not all(0 <= m < math.inf for m in margins):
            raise ValueError(f"early_stop: margin {margin}, expected 0 or more")
        if reference is not None and not all(math.isfinite(v) for v in reference.values()):
            raise ValueError(f"early_stop: reference {reference}, expected finite values")
        from segscale.config import by_epoch

        self.reference = None if reference is None else by_epoch(reference, "early_stop reference")
        self.margin = (
            by_epoch(margin, "early_stop margin")
            if isinstance(margin, dict)
            else (0.05 if margin is None else margin)
        )
        self.min_delta = min_delta or 0.0
        self.patience, self.after, self.key = patience, after, f"val_{metric}"
        self.reads = (metric,)  # the validation metrics it needs (Plan.check)

    def below(self, record: dict[str, Any]) -> bool | None:
        """Whether a validation record lies under the reference (None: not comparable)."""
        epoch, value = record.get("epoch"), record.get(self.key)
        if value is None or epoch not in self.reference or epoch <= self.after:
            return None
        margin = self.margin if isinstance(self.margin, float | int) else self.margin.get(epoch, 0)
        return not value >= self.reference[epoch] - margin  # NaN counts as below

    def on_validation_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.key not in record:  # a task without validation_metrics: not checked before
            given = ", ".join(k[4:] for k in record if k.startswith("val_"))
            raise SegscaleError(
                f"early_stop: metric '{self.key[4:]}' is not among the validation's metrics "
                f"({given})"
            )
        history = [*trainer.history, record]
        reason = self._plateau(history) if self.reference is None else self._under(history)
        if reason:
            trainer.finish_early(reason)

    def _under(self, history: list[dict[str, Any]]) -> str | None:
        run = 0
        for r in history:
            verdict = self.below(r)
            if verdict is not None:
                run = run + 1 if verdict else 0
        if run < self.patience:
            return None
        last = history[-1]
        return (
            f"{self.key} {last[self.key]:.4f} at epoch {last['epoch']}, under the reference "
            f"({self.reference[last['epoch']]:.4f}) for {self.patience} validations in a row"
        )

    def _plateau(self, history: list[dict[str, Any]]) -> str | None:
        # the reference is the last value that improved by more than min_delta (Keras' rule);
        # the highest seen may lie above it by less
        best, best_epoch, stale = -math.inf, None, 0
        highest, highest_epoch = -math.inf, None
        for r in history:
            value = r.get(self.key)
            if value is None:
                continue
            if value > highest:
                highest, highest_epoch = value, r["epoch"]
            if value > best + (self.min_delta if best_epoch is not None else 0):
                best, best_epoch, stale = value, r["epoch"], 0
            elif r["epoch"] > self.after:
                stale += 1
        if stale < self.patience:
            return None
        if best_epoch is None:
            so_far = "no number yet"
        elif self.min_delta and highest_epoch != best_epoch:
            so_far = (
                f"{best:.4f} at epoch {best_epoch}, the last improvement by more than "
                f"{self.min_delta:g}; best {highest:.4f} at epoch {highest_epoch}"
            )
        else:
            so_far = f"best {best:.4f} at epoch {best_epoch}"
        better = f"by more than {self.min_delta:g} " if self.min_delta else ""
        return (
            f"{self.key} not improved {better}for {self.patience} validations in a row ({so_far})"
        )


class DivergenceGuard:
    """Says when a loss has diverged: NaN or inf, or its exponential moving average (`smoothing`)
    above `factor` × the lowest it has been for `patience` consecutive steps. The average keeps
    one hard batch from counting as a divergence. Host-side: the Trainer feeds it the losses
    of the steps since its last check, in order."""

    def __init__(self, factor: float = 10.0, patience: int = 3, smoothing: float = 0.9) -> None:
        self.factor, self.patience, self.smoothing = factor, patience, smoothing
        self.average: float | None = None
        self.lowest = math.inf
        self.above = 0

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "lowest": self.lowest, "above": self.above}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average, self.lowest, self.above = state["average"], state["lowest"], state["above"]

    def update(self, loss: float) -> str | None:
        """The reason, once the loss of this step makes it diverged; else None."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        s = self.smoothing
        self.average = loss if self.average is None else s * self.average + (1 - s) * loss
        self.lowest = min(self.lowest, self.average)
        self.above = self.above + 1 if self.average > self.factor * self.lowest else 0
        if self.above >= self.patience:
            return (
                f"smoothed loss {self.average:.4g} above {self.factor:g}× its lowest "
                f"{self.lowest:.4g} for {self.patience} steps"
            )
        return None


SAME_SIGNAL = 2.0  # seconds within which a second signal is taken as the first one's copy


class _StopRequest:
    """SIGTERM/SIGINT, or `segscale stop` (a STOP file in the run folder, seen by rank 0) →
    train on to the next check (Trainer.check_every), checkpoint, exit; a second signal, or
    `stop --now`, aborts at once. All ranks agree on stopping and on a divergence (one small
    all-reduce per check), so they stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.abort = False
        self._first = 0.0  # when the first signal came (time.monotonic)
        self.why = "stopped by a signal"
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        # A second signal aborts; one within SAME_SIGNAL seconds is the same request arriving
        # twice: Ctrl-C or a scheduler signals the whole process group, then torchrun's agent
        # passes its own copy on to the workers (it aborted every 2-worker run so stopped).
        now = time.monotonic()
        if self.requested and now - self._first > SAME_SIGNAL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        if not self.requested:
            self.requested, self._first = True, now

    def check(self, run_dir: Path) -> None:
        """A stop asked through the run folder (`segscale stop`): a file stat per check."""
        path = run_dir / STOP_FILE
        if not self.requested and path.exists():
            self.requested, self.why = True, self._who(path)
            self.abort = path.read_text().strip().partition("\n")[0].strip() == "now"

    @staticmethod
    def _who(path: Path) -> str:
        """Why, from a STOP file: "graceful|now[\nby whom]"."""
        try:
            who = path.read_text().strip().partition("\n")[2].strip()
        except OSError:  # gone already: the stop was asked all the same
            return "stopped on request"
        return f"stopped by {who or '`segscale stop`'}"

    def agreed(
        self, strategy: Strategy, diverged: bool = False, run_dir: Path | None = None
    ) -> tuple[bool, bool, bool]:
        """(stop, abort, diverged), each true on every rank when it is on any. A rank that did
        not see the request itself reads why from the run folder's STOP file when there is one,
        so every rank that reports the stop gives the same reason (torchrun may end the others
        before they print)."""
        signalled = self.requested and self.why == "stopped by a signal"
        flags = [self.requested, self.abort, diverged, signalled]
        if strategy.world_size > 1:
            summed = strategy.all_reduce_sum(
                torch.tensor(flags, dtype=torch.float32, device=strategy.device)
            )
            flags = [bool(v > 0) for v in summed.tolist()]
        if flags[0] and not self.requested:  # another rank saw the request: say why here too
            stop_file = run_dir / STOP_FILE if run_dir is not None else None
            self.why = (
                self._who(stop_file)
                if stop_file is not None and stop_file.exists()
                else "stopped by a signal"
                if flags[3]
                else "stopped on request"
            )
        return flags[0], flags[1], flags[2]


def _summary(record: dict[str, Any], epochs: int, metric: str = "dice") -> str:
    line = f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}"
    if f"val_{metric}" in record:
        name = "Dice" if metric == "dice" else metric.replace("_", " ")
        line += f"  val {name} {record[f'val_{metric}']:.4f}"
    return line + f"  lr {record['lr']:.3g}  {record['images_per_second']:.1f} img/s"

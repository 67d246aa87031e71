"""The engine: the only place where configuration becomes objects.

`plan(cfg)` resolves and checks every component before any process starts (missing data, unknown
model, kwargs that do not bind) without importing torch, so `segscale plan` answers at once;
`check_workers` and `check_model` (which do need torch) run before a launch; the workers then call
`train_worker` / `evaluate_worker`, which build the Trainer from the plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segscale._files import write_text_atomic
from segscale.config import RunConfig, load_config
from segscale.errors import SegscaleError
from segscale.imgmed.store import Store
from segscale.registry import (
    CALLBACKS,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    STRATEGIES,
    TASKS,
    TRACKERS,
    TRANSFORMS,
    check_kwargs,
)

if TYPE_CHECKING:
    import torch


@dataclass
class Plan:
    """Every component of a run, resolved and checked."""

    cfg: RunConfig
    store: Store
    task: Any  # a segscale.tasks object (or the user's)

    @property
    def num_classes(self) -> int:
        """The model's output classes: the store's for segmentation, the task's otherwise."""
        return int(self.task.num_outputs(self.store))

    @property
    def in_channels(self) -> int:
        return self.store.in_channels

    def describe(self) -> dict[str, Any]:
        """The CNN-Parallelism-Generator of Auto-CNNp for this run: each part, whether users can
        replace it (a registry entry or their own 'module:attr'), what fills it, its parameters."""
        c, t = self.cfg, self.cfg.train

        def part(
            extensible: bool, fills: Any, registry: Any = None, **params: Any
        ) -> dict[str, Any]:
            out: dict[str, Any] = {"extensible": extensible, "fills": fills}
            if registry is not None:
                out["source"] = "built-in" if fills in registry else "user"
            return {**out, "params": params}

        meta = self.store.meta
        return {
            "training_environment": {
                "communication_init": part(
                    False,
                    "torch.distributed via torchrun (gloo on CPU, NCCL on GPU)",
                    device=t.device,
                ),
                "device_placement": part(
                    False, "one process per device, by local rank", threads=t.threads
                ),
                "memory_allocation": part(
                    False,
                    "memory-mapped prepared store",
                    dataloader_workers=c.data.num_workers,
                    amp=t.amp,
                ),
            },
            "training_strategy": {
                "distributed_optimizer": part(
                    True,
                    t.strategy.name,
                    STRATEGIES,
                    **t.strategy.kwargs,
                    simulate_workers=t.simulate_workers,
                    simulate_fused=t.simulate_fused,
                    sync_batchnorm=t.sync_batchnorm,
                ),
                "optimizer": part(
                    True, t.optimizer.name, OPTIMIZERS, **t.optimizer.model_dump(exclude={"name"})
                ),
                "lr_schedule": part(
                    False,
                    "scaling rule, warmup, decay (replaceable by a callback)",
                    **t.schedule.model_dump(),
                ),
                "checkpoints_and_callbacks": part(
                    True,
                    [cb.name for cb in t.callbacks],
                    checkpoint_every=t.checkpoint_every,
                    keep_checkpoints=t.keep_checkpoints,
                ),
                "tracker": part(True, c.tracker.name, TRACKERS, **c.tracker.kwargs),
                "hyperparameters": part(
                    False,
                    "injected",
                    epochs=t.epochs,
                    batch_size_per_worker=t.batch_size,
                    seed=c.seed,
                    grad_clip=t.grad_clip,
                    deterministic=t.deterministic,
                ),
            },
            "injection": {
                "task": part(True, c.task.name, TASKS, **c.task.kwargs),
                "architecture": part(True, c.model.name, MODELS, **c.model.kwargs),
                "loss": part(True, t.loss, LOSSES),
                "dataset": part(
                    False,
                    str(c.data.store),
                    classes=meta["labels"],
                    channels=meta["channel_names"],
                    cases={s: len(v) for s, v in meta["splits"].items()},
                    augment=c.data.augment.model_dump(),
                ),
                "transform": part(
                    True,
                    c.data.transform.name if c.data.transform else None,
                    TRANSFORMS,
                    **(c.data.transform.kwargs if c.data.transform else {}),
                ),
            },
        }


def plan(cfg: RunConfig) -> Plan:
    store = Store.open(cfg.data.store)
    for split in (cfg.data.train_split, cfg.data.val_split):
        store.rows(split)  # raises a clear error for an empty split
    check_kwargs(TASKS, cfg.task.name, cfg.task.kwargs)
    try:
        task = TASKS.resolve(cfg.task.name)(**cfg.task.kwargs)
        task.num_outputs(store)
    except ValueError as e:
        raise SegscaleError(f"task '{cfg.task.name}' kwargs {cfg.task.kwargs}: {e}") from None
    check_kwargs(MODELS, cfg.model.name, cfg.model.kwargs)
    LOSSES.check(cfg.train.loss)  # an unknown name or a broken user path fails here
    if cfg.train.loss in LOSSES and cfg.train.loss not in getattr(task, "losses", LOSSES.names()):
        raise SegscaleError(
            f"train.loss '{cfg.train.loss}' does not fit the {cfg.task.name} task; "
            f"use {' | '.join(task.losses)} or your own 'pkg.mod:Class'"
        )
    OPTIMIZERS.check(cfg.train.optimizer.name)
    check_kwargs(STRATEGIES, cfg.train.strategy.name, cfg.train.strategy.kwargs)
    strategy = cfg.train.strategy
    compression = strategy.kwargs.get("compression", "none")
    if cfg.train.simulate_workers and (strategy.name != "allreduce" or compression != "none"):
        # the simulation accumulates exact gradients: another strategy's math would go unsimulated
        what = (
            f"'{strategy.name}'" if strategy.name != "allreduce" else f"compression '{compression}'"
        )
        raise SegscaleError(
            f"train.simulate_workers reproduces plain gradient all-reduce, not train.strategy "
            f"{what}: use strategy allreduce without compression, or real workers"
        )
    for cb in cfg.train.callbacks:
        check_kwargs(CALLBACKS, cb.name, cb.kwargs)
    check_kwargs(TRACKERS, cfg.tracker.name, cfg.tracker.kwargs)
    if cfg.data.transform is not None:
        check_kwargs(TRANSFORMS, cfg.data.transform.name, cfg.data.transform.kwargs)
    return Plan(cfg, store, task)


def check_model(p: Plan) -> None:
    """Build the model and run one batch of 2 through it before any worker starts: option values
    that bind but are wrong (an unknown activation, a bad depth) and a network that does not fit the
    task fail here. A real CPU forward in inference mode (40 ms for the demo network) rather than
    one on torch's meta device: meta tensors reach torch's Python reference kernels, which import
    sympy and torch._dynamo on first use, 1.3 s of every launch."""
    import torch

    size = p.store.images.shape[-1]
    model = build_model(p)
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, p.in_channels, size, size))
    except (RuntimeError, ValueError) as e:
        raise SegscaleError(
            f"model '{p.cfg.model.name}' fails on a batch of the store's "
            f"{p.in_channels}×{size}×{size} inputs: {e}"
        ) from None
    expected = p.task.output_shape(2, p.num_classes, size)
    if tuple(out.shape) != tuple(expected):
        raise SegscaleError(
            f"model '{p.cfg.model.name}' outputs {tuple(out.shape)} for a batch of 2; the "
            f"{p.cfg.task.name} task needs {tuple(expected)} (batch, classes{', H, W' if len(expected) == 4 else ''})"
        )


def check_workers(cfg: RunConfig, workers: int) -> None:
    """On GPUs each worker needs its own device: refuse more workers than GPUs before launching."""
    import torch

    from segscale.parallel.base import BF16_NEEDS_GPUS, uses_cuda

    if workers < 1:
        raise SegscaleError(f"--workers {workers}: expected at least 1")
    device = cfg.train.device
    on_cpu = not uses_cuda(device)
    if cfg.train.simulate_fused and not cfg.train.simulate_workers:
        raise SegscaleError(
            "train.simulate_fused applies to train.simulate_workers only; set both or neither"
        )
    if cfg.train.simulate_workers and workers > 1:
        raise SegscaleError(
            "train.simulate_workers runs K workers' math in one process: use --workers 1"
        )
    if on_cpu and cfg.train.sync_batchnorm and workers > 1:
        raise SegscaleError(
            "train.sync_batchnorm needs GPUs (torch's SyncBatchNorm is CUDA-only); drop it on CPU"
        )
    strategy = cfg.train.strategy
    bf16 = strategy.name == "allreduce" and strategy.kwargs.get("compression") == "bf16"
    if on_cpu and workers > 1 and bf16:
        raise SegscaleError(f"train.strategy: {BF16_NEEDS_GPUS}")
    if on_cpu:
        return
    gpus = torch.cuda.device_count()
    if workers > gpus:
        raise SegscaleError(
            f"--workers {workers} with train.device={device}: this machine has {gpus} GPU(s); "
            "use at most that many workers, or train.device=cpu"
        )


def steps_per_epoch_for(cfg: RunConfig, workers: int) -> int:
    """Optimiser steps per epoch for `workers` workers (each sampler shard, whole batches)."""
    store = Store.open(cfg.data.store)
    shard = -(-len(store.rows(cfg.data.train_split)) // workers)
    full = shard // cfg.train.batch_size if shard >= cfg.train.batch_size else 1
    return min(cfg.train.steps_per_epoch or full, full)


def build_model(p: Plan) -> torch.nn.Module:
    from segscale.models import create_model

    return create_model(p.cfg.model.name, p.in_channels, p.num_classes, **p.cfg.model.kwargs)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Create the run folder and save the resolved config; refuse to overwrite a finished or
    started run unless resuming it."""
    from segscale.config import save_config

    started = (run_dir / "checkpoints").is_dir() or (run_dir / "model.pt").exists()
    if started and not resume:
        raise SegscaleError(
            f"{run_dir}: already holds a run; pass --resume to continue it or --run-dir for a new one"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")  # atomic: every node of a multi-node run writes it


def train_worker(
    run_dir: Path, resume: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """Build everything from run_dir/config.yaml and train (one process of N)."""
    import torch

    from segscale.data import SliceDataset, TrainLoader, eval_loader
    from segscale.parallel import SimulatedStrategy, Strategy, create_strategy, ghost_batchnorm
    from segscale.repro import environment, seed_everything
    from segscale.schedules import build_schedule
    from segscale.tracking import flatten
    from segscale.train import Trainer

    cfg = load_config(run_dir / "config.yaml")
    p = plan(cfg)
    t = cfg.train
    # torchrun restarts failed workers with TORCHELASTIC_RESTART_COUNT > 0: carry on from the checkpoint
    resume = resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    strategy: Strategy
    if t.simulate_workers:
        strategy = SimulatedStrategy(t.simulate_workers, t.device, t.threads)
    else:
        strategy = create_strategy(t.strategy.name, t.device, t.strategy.kwargs, t.threads)
    tracker: Any = None
    error: BaseException | None = None
    try:
        if strategy.rank == 0:  # the one process that records the run
            tracker = TRACKERS.resolve(cfg.tracker.name)(
                run_dir=run_dir,
                run_name=cfg.name,
                params=flatten(cfg.settings()),
                **cfg.tracker.kwargs,
            )
        seed_everything(cfg.seed, t.deterministic)
        model = build_model(p)  # the same seed on every rank; DDP also broadcasts rank 0's weights
        if t.simulate_fused:  # one pass for the K micro-batches; BatchNorm still sees each alone
            model = ghost_batchnorm(model, t.simulate_workers or 1)
        if t.sync_batchnorm and strategy.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = strategy.wrap(model)
        transform = cfg.data.transform
        train_ds = SliceDataset(
            p.store,
            cfg.data.train_split,
            TRANSFORMS.resolve(transform.name)(**transform.kwargs) if transform else None,
        )
        val_ds = SliceDataset(p.store, cfg.data.val_split)
        # the workers this process plays: its own rank, or all K virtual ranks when simulating
        ranks = list(range(strategy.virtual_workers)) if t.simulate_workers else [strategy.rank]
        train_loader = TrainLoader(
            train_ds,
            t.batch_size,
            ranks,
            strategy.virtual_workers,
            strategy.device,
            cfg.seed,
            cfg.data.augment,
            cfg.data.num_workers,
        )
        val_loader = eval_loader(val_ds, t.batch_size, strategy.rank, strategy.world_size)
        steps = min(t.steps_per_epoch or len(train_loader), len(train_loader))
        if steps == 0:
            raise SegscaleError(
                f"train split has {len(train_ds)} slices: fewer than one batch per worker"
            )
        schedule = build_schedule(
            t.schedule, t.optimizer.lr, t.batch_size, strategy.virtual_workers, steps, t.epochs
        )
        optimizer = strategy.wrap_optimizer(
            OPTIMIZERS.resolve(t.optimizer.name)(model.parameters(), t.optimizer)
        )
        loss_fn = LOSSES.resolve(t.loss)().to(strategy.device)
        if strategy.rank == 0:
            record = {
                **environment(),
                "seed": cfg.seed,
                "config_digest": cfg.digest(),
                "peak_lr": schedule.peak_lr,
                "workers": strategy.virtual_workers,
                "simulated": bool(t.simulate_workers),
                "fused_microbatches": t.simulate_fused,
                "global_batch": t.batch_size * strategy.virtual_workers,
                "steps_per_epoch": steps,
            }
            (run_dir / "environment.json").write_text(json.dumps(record, indent=1))
        trainer = Trainer(
            model,
            optimizer,
            schedule,
            loss_fn,
            train_loader,
            val_loader,
            strategy,
            epochs=t.epochs,
            num_classes=p.num_classes,
            num_val_cases=len(val_ds.cases),
            task=p.task,
            run_dir=run_dir,
            seed=cfg.seed,
            steps_per_epoch=steps,
            val_every=t.val_every,
            grad_clip=t.grad_clip,
            config_digest=cfg.digest(),
            checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints,
            callbacks=[
                *(CALLBACKS.resolve(c.name)(**c.kwargs) for c in t.callbacks),
                *([tracker] if tracker else []),
            ],
            amp=t.amp,
            fuse_microbatches=t.simulate_fused,
            progress=progress,
        )
        return trainer.fit(resume=resume)
    except BaseException as e:
        error = e
        raise
    finally:
        if tracker is not None:
            tracker.close(error)
        strategy.close()


def load_trained_model(
    run_dir: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Plan]:
    import torch

    cfg = load_config(run_dir / "config.yaml")
    p = plan(cfg)
    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise SegscaleError(f"{run_dir}: no model.pt; train the run to the end first")
    model = build_model(p)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device).eval(), p


def evaluate_worker(run_dir: Path, split: str, out: Path) -> dict[str, Any]:
    """Evaluate run_dir/model.pt on a split, cases shared among the workers; rank 0 writes `out`
    (JSON) and the per-case CSV beside it."""
    from segscale.evaluation import write_case_csv
    from segscale.parallel import ProcessEnv

    cfg = load_config(run_dir / "config.yaml")
    strategy = ProcessEnv(
        cfg.train.device, cfg.train.threads
    )  # ranks, a device and gathers suffice
    try:
        model, p = load_trained_model(run_dir, strategy.device)
        evaluation = {
            "run": str(run_dir),
            "split": split,
            "workers": strategy.world_size,
            "labels": p.task.labels(p.store),
            **p.task.evaluate(model, p.store, split, strategy, cfg.train.batch_size * 2),
        }
        if strategy.rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, json.dumps(evaluation, indent=1))
            if "cases" in evaluation:
                write_case_csv(evaluation, out.with_suffix(".csv"))
        return evaluation
    finally:
        strategy.close()

"""The engine: the only place where configuration becomes objects.

`plan(cfg)` resolves and checks every component (missing data, unknown names, kwargs that do not
bind) without importing torch, so `segscale plan` answers at once. The Plan it returns builds
everything a run is made of, one method per part, for the worker processes (segscale.worker) and
for anything else that builds runs from a config:

    p = plan(load_config("cfg.yaml"))
    p.check(workers)                  # before a launch: devices, a real forward, the optimiser
    strategy = p.strategy()           # in each worker process
    trainer = p.trainer(strategy, run_dir)
    trainer.fit()

`steps_per_epoch(workers)` is the one formula for a run's steps; `schedule(workers)` the lr curve.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segscale._files import (
    REPEAT_STATE,
    RUN_LOCK,
    TUNE_STATE,
    differ,
    is_zoo_entry,
    lock_holder,
    not_a_record,
    not_a_run,
    to_json,
    write_atomic,
)
from segscale.config import SPEED_SETTINGS, RunConfig, by_epoch, load_config, save_config
from segscale.errors import SegscaleError, did_you_mean, raised_in
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
from segscale.tasks import TASK_API

if TYPE_CHECKING:
    import torch

    from segscale.data import TrainLoader
    from segscale.parallel import ProcessEnv, Strategy
    from segscale.schedules import Schedule
    from segscale.train import Trainer

# CPU workers of one node per core, at most: beyond, each gets a sliver of a core, and a
# thousand exhaust the file handles torch.distributed opens (a traceback from its launcher)
CPU_WORKERS_PER_CORE = 4


def check_workers(cfg: RunConfig, workers: int) -> None:
    """Whether this machine can run `workers` workers of `cfg` (train.device): at most
    CPU_WORKERS_PER_CORE per CPU core, at most one per GPU. Raises SegscaleError before anything
    is prepared or trained (Plan.check says it again before a launch)."""
    import torch

    from segscale.parallel.base import uses_cuda

    device = cfg.train.device
    if not uses_cuda(device):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if workers > CPU_WORKERS_PER_CORE * (cores or 1):
            raise SegscaleError(
                # workers: --workers, or the config's own (`workers: 9`, or its override)
                f"{workers} workers on this machine's {cores} CPU core(s): more than "
                f"{CPU_WORKERS_PER_CORE} processes per core (each gets a sliver of one, and so many "
                f"exhaust the file handles torch.distributed opens); use at most "
                f"{CPU_WORKERS_PER_CORE * (cores or 1)}, or train.simulate_workers={workers} "
                f"(--simulate-workers) for the math of {workers} workers in one process"
            )
    elif torch.cuda.device_count() == 0:
        raise SegscaleError(
            f"train.device={device}: torch sees no GPU on this machine; use train.device=cpu "
            "(or auto)"
        )
    elif workers > torch.cuda.device_count():
        raise SegscaleError(
            f"{workers} workers with train.device={device}: this machine has "
            f"{torch.cuda.device_count()} GPU(s); use at most that many workers, or "
            "train.device=cpu"
        )


@dataclass
class Plan:
    """Every component of a run, resolved and checked."""

    cfg: RunConfig
    store: Store
    task: Any  # a segscale.tasks object (or the user's)
    transfer: Any = None  # what check() loaded of model.pretrained (transfer.TransferReport)

    @property
    def num_classes(self) -> int:
        """The model's output classes: the store's for segmentation, the task's otherwise."""
        return int(self.task.num_outputs(self.store))

    @property
    def in_channels(self) -> int:
        return self.store.in_channels

    # ---- before a launch (these import torch)

    def check(self, workers: int, here: bool = True, said: set[str] | None = None) -> None:
        """Everything that needs torch, before any worker starts: devices for `workers` workers on
        this node (`here`; not for a job written for a cluster), the batch and lr schedule of
        `workers` workers, then a real batch of 2 through the model (option values that bind but
        are wrong, a network that does not fit the task) and the optimiser and loss built over it
        (kwargs the torch class does not take). Notes on the schedule and the pictures are
        warnings; `said`: the notes a caller checking several configs has shown (they are not
        shown again; the new ones are added). Raises SegscaleError."""
        from segscale.parallel.base import check_compression, uses_cuda

        t = self.cfg.train
        one_process(self.cfg, workers, cluster=not here)
        on_cpu = not uses_cuda(t.device) if here else t.device == "cpu"
        if on_cpu and t.sync_batchnorm and workers > 1:
            raise SegscaleError(
                "train.sync_batchnorm needs GPUs (torch's SyncBatchNorm is CUDA-only); drop it on CPU"
            )
        if t.strategy.name == "allreduce":
            compression = t.strategy.kwargs.get("compression", "none")
            check_compression(compression, "cpu" if on_cpu else "cuda", workers)
        if here:
            check_workers(self.cfg, workers)
        self._check_strategy()
        virtual = workers * (t.simulate_workers or 1)
        self.schedule(virtual)  # e.g. GreScale phase overlaps
        for note in [*self.scale_notes(virtual), *self.picture_notes()]:
            if said is None or note not in said:
                warnings.warn(note, stacklevel=2)
            if said is not None:
                said.add(note)
        self._check_model()
        if (
            self.cfg.tracker_config("tensorboard")
            and importlib.util.find_spec("tensorboard") is None
        ):
            raise SegscaleError(
                "tracker tensorboard needs the tensorboard package: pip install 'segscale[tensorboard]'"
            )
        with tempfile.TemporaryDirectory() as tmp:  # built, not started: kwargs values checked
            from segscale.train import check_hooks

            trackers = self.trackers(Path(tmp) / self.cfg.name)
            try:
                for spec, tracker in zip(self.cfg.tracker, trackers):
                    check_hooks(f"tracker '{spec.name}'", tracker, tracker=True)
            finally:  # one that opened a remote run when built must not leave it dangling
                for spec, tracker in zip(self.cfg.tracker, trackers):
                    _close_checked(f"tracker '{spec.name}'", tracker)

    def scale_notes(self, workers: int, steps_per_epoch: int | None = None) -> list[str]:
        """What the run, on `workers` (real × simulated) workers, is too short or too small
        for: run_length_notes, and a global batch larger than the training split (one short
        step per epoch, the lr scaled for a batch no step has). `steps_per_epoch`: given for a
        dataset other than the store (`segscale schedule --steps-per-epoch`), whose size the
        last note does not then judge. Warnings, not errors."""
        t = self.cfg.train
        steps = steps_per_epoch or self.steps_per_epoch(workers)
        notes = run_length_notes(t, steps)
        log_every = self.cfg.monitor.log_every
        # set on purpose (a short trial run with the default says nothing)
        default = type(self.cfg.monitor).model_fields["log_every"].default
        if log_every != default and log_every > t.epochs * steps:
            notes.append(
                f"monitor.log_every {log_every} is more than the run's {t.epochs * steps} steps: "
                "no step metrics (step/loss, step/lr, ...) are recorded"
            )
        if steps_per_epoch is not None:  # another dataset's: the store's size says nothing
            return notes
        slices = len(self.store.rows(self.cfg.data.train_split))
        if t.batch_size * workers > slices:
            notes.append(
                f"global batch {t.batch_size * workers} (train.batch_size {t.batch_size} × "
                f"{workers} workers) is more than the training split's {slices} slices: one "
                f"short step per epoch, with the lr scaled for {t.batch_size * workers}"
            )
        return notes

    def picture_notes(self) -> list[str]:
        """monitor.pictures above what the validation split can show: its cases' slices with
        foreground (each case's best slice, then others of the case). A warning, not an error."""
        count, split = self.cfg.monitor.pictures, self.cfg.data.val_split
        if not count or split is None or getattr(self.task, "metric", None) != "dice":
            return []
        if count <= len(self.store.cases(split)):  # one slice of each of `count` cases
            return []
        from segscale.evaluation import validation_slices

        shown = len(validation_slices(self.store, split, count))
        if shown >= count:
            return []
        return [
            f"monitor.pictures {count}: the validation split '{split}' has {shown} slice(s) to "
            f"show (a case's slices with foreground; one of a case without any), so {shown} are drawn"
        ]

    def _check_strategy(self) -> None:
        """The strategy built as one process would build it (its kwargs' values checked, e.g.
        local_sgd's period), without joining a process group: torchrun's rank variables are
        hidden while it is built, and this process's torch thread count is kept."""
        import os

        import torch

        hidden = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        saved = {k: os.environ.pop(k) for k in hidden if k in os.environ}
        threads = torch.get_num_threads()
        spec = self.cfg.train.strategy
        try:
            # on the CPU: its settings are checked here, the devices above; as one process of
            # one, so what it would say of a world of one (compression without effect) is not
            # about the run, whose workers say it when it is
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                strategy = _build(
                    f"train.strategy '{spec.name}' kwargs {spec.kwargs}", self.strategy, "cpu"
                )
            from segscale.parallel.base import Strategy

            if not isinstance(strategy, Strategy):  # what the Trainer calls on it
                members = {*Strategy.__annotations__, *vars(Strategy)}
                missing = [m for m in members if not m.startswith("_") and not hasattr(strategy, m)]
                raise SegscaleError(
                    f"train.strategy '{spec.name}' builds {type(strategy).__name__}, without "
                    f"{', '.join(sorted(missing))} of the strategy protocol "
                    "(segscale/parallel/base.py)"
                )
            strategy.close()
        finally:
            os.environ.update(saved)
            torch.set_num_threads(threads)

    def _check_model(self) -> None:
        """One training step's parts on a batch of 2 zeros, on the CPU: the model's forward (a
        tensor of the task's shape), the loss (a scalar), its backward, the optimiser over the
        model, each callback's hooks and the transform on three training samples. Whatever a user's
        part raises or returns wrong is one SegscaleError naming its key."""
        import torch

        from segscale.train import check_hooks

        size = self.store.images.shape[-1]
        model = self.model()
        if self.cfg.model.pretrained:  # found, readable and fitting, before any worker starts
            from segscale.transfer import load_pretrained

            self.transfer = load_pretrained(
                model, self.cfg.model.pretrained, preprocessing=self.store.meta["preprocessing"]
            )
            if self.transfer.note:
                warnings.warn(self.transfer.note, stacklevel=2)
        name = f"model '{self.cfg.model.name}'"
        out = _build(
            f"{name} on a batch of the store's {self.in_channels}×{size}×{size} inputs",
            model,
            torch.zeros(2, self.in_channels, size, size),
        )
        expected = self.task.output_shape(2, self.num_classes, size)
        model.eval()  # validation's mode (dropout off, BatchNorm's running statistics)
        with torch.no_grad():
            evaluated = _build(
                f"{name} in eval mode (validation) on a batch of {self.in_channels}×{size}×{size}",
                model,
                torch.zeros(2, self.in_channels, size, size),
            )
        model.train()
        for mode, got in (("", out), (" in eval mode (validation)", evaluated)):
            if not isinstance(got, torch.Tensor):
                raise SegscaleError(
                    f"{name} returns {type(got).__name__} for a batch{mode}; expected one tensor "
                    f"of {tuple(expected)}"
                )
            if tuple(got.shape) != tuple(expected):
                dims = ", H, W" if len(expected) == 4 else ""
                raise SegscaleError(
                    f"{name} outputs {tuple(got.shape)} for a batch of 2{mode}; the "
                    f"{self.cfg.task.name} task needs {tuple(expected)} (batch, classes{dims})"
                )
        check_optimizer(self.cfg, lambda: self.optimizer(model))
        spec = self.cfg.train.loss
        key = f"train.loss '{spec.name}' kwargs {spec.kwargs}"
        target = self.task.target(torch.zeros(2, size, size, dtype=torch.long))
        with _set_at(self.cfg, "train.loss.kwargs"):
            loss = _build(f"{key} fails on the model's output", self.loss(), out.float(), target)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise SegscaleError(
                f"{key} gives {shape} on the model's output; expected a scalar tensor (one number)"
            )
        if not torch.isfinite(loss.detach()).all():
            raise SegscaleError(
                f"{key} gives {loss.item()} on the model's output for a batch of zeros; expected "
                "a finite number (training would diverge at its first step)"
            )
        _build(f"{key}: its backward fails", loss.backward)
        given = getattr(self.task, "validation_metrics", None)
        given = given() if given else None
        for i, cb in enumerate(self.callbacks()):
            what = f"train.callbacks[{i}] '{self.cfg.train.callbacks[i].name}'"
            check_hooks(what, cb)
            reads = list(getattr(cb, "reads", ()))
            if reads and self.cfg.data.val_split is None:
                raise SegscaleError(
                    f"{what}: reads the validation metric '{reads[0]}', and data.val_split is "
                    "null (no validation); name a val_split or leave the callback out"
                )
            unknown = [m for m in getattr(cb, "reads", ()) if given is not None and m not in given]
            if unknown:  # it would wait for a metric that never comes: a run that never stops
                raise SegscaleError(
                    f"{what}: reads the validation metric '{unknown[0]}'"
                    f"{did_you_mean(unknown[0], given)}; the {self.cfg.task.name} task's: "
                    f"{', '.join(given)}"
                )
        transform = self.transform()
        if transform is not None:  # on a few training slices, as the training loader calls it
            from segscale.data import SliceDataset

            data = SliceDataset(
                self.store, self.cfg.data.train_split, transform, self.transform_key
            )
            shapes = {tuple(data[i][0].shape) for i in sorted({0, len(data) // 2, len(data) - 1})}
            if len(shapes) > 1:  # a batch stacks its samples
                raise SegscaleError(
                    f"{self.transform_key}: returns images of different shapes "
                    f"({', '.join(map(str, sorted(shapes)))}); a batch needs one (H, W): crop or "
                    "resize to a fixed size"
                )

    # ---- the parts of a run

    def trained_model(
        self, run_dir: Path, device: torch.device | str = "cpu", splits: bool = False
    ) -> torch.nn.Module:
        """This run's architecture with the weights run_dir/model.pt holds, in eval mode.
        Raises SegscaleError when the store was prepared again with other slices (with
        `splits`, for scoring: or another split), or the weights are damaged or do not fit."""
        import torch

        check_same_store(run_dir, self.store, splits)
        model = self.model()
        path = trained_weights(run_dir)
        from segscale.checkpoint import verify

        sidecar = path.with_name(path.name + ".sha256")
        problem = verify(path) if sidecar.is_file() else None  # runs before sidecars: not checked
        try:
            if problem:
                raise ValueError(problem)
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, pickled code
            raise SegscaleError(
                f"{path}: not readable weights ({e}); train the run again"
            ) from None
        fit_weights(model, weights, f"{path}: does not fit {run_dir / 'config.yaml'}'s model")
        return model.to(device).eval()

    def model(self) -> torch.nn.Module:
        """The architecture, freshly initialised from torch's global RNG: (N, in_channels, S, S)
        → the task's output, e.g. (N, num_classes, S, S) logits."""
        from segscale.models import create_model

        return create_model(
            self.cfg.model.name, self.in_channels, self.num_classes, **self.cfg.model.kwargs
        )

    def strategy(self, device: str | None = None) -> Strategy:
        """This process's strategy, from the torchrun environment (one process when not set):
        the simulation of train.simulate_workers workers, or train.strategy; on train.device
        unless `device` is given."""
        from segscale.parallel import SimulatedStrategy, create_strategy

        t = self.cfg.train
        device = device or t.device
        if t.simulate_workers:
            return SimulatedStrategy(t.simulate_workers, device, t.threads)
        return create_strategy(t.strategy.name, device, t.strategy.kwargs, t.threads)

    def process(self) -> ProcessEnv:
        """Ranks, a device and gathers without a training strategy: for evaluation."""
        from segscale.parallel import ProcessEnv

        return ProcessEnv(self.cfg.train.device, self.cfg.train.threads)

    def steps_per_epoch(self, workers: int) -> int:
        """Optimiser steps per epoch with `workers` (real or simulated) workers: whole batches of
        each worker's sampler shard (one short batch when a shard is smaller than a batch), capped
        by train.steps_per_epoch. The one formula: the loaders and the schedule agree with it."""
        train = len(self.store.rows(self.cfg.data.train_split))
        shard = -(-train // workers)  # DistributedSampler pads every shard to the longest
        batch = self.cfg.train.batch_size
        full = shard // batch if shard >= batch else 1
        return min(self.cfg.train.steps_per_epoch or full, full)

    def schedule(self, workers: int, steps_per_epoch: int | None = None) -> Schedule:
        """lr(step) for `workers` workers: the base lr scaled by the global batch, warmup, decay."""
        from segscale.schedules import build_schedule

        t = self.cfg.train
        steps = steps_per_epoch or self.steps_per_epoch(workers)
        return build_schedule(t.schedule, t.optimizer.lr, t.batch_size, workers, steps, t.epochs)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimiser over the model's parameters; with train.finetune options, two parameter
        groups: the encoder's (marked `encoder`, its `lr_scale`) and the rest, which the Trainer
        gives the schedule's lr × lr_scale (0 while the encoder is frozen)."""
        o, f = self.cfg.train.optimizer, self.cfg.train.finetune
        params: Any = model.parameters()
        if f.freeze_encoder_epochs or f.encoder_lr_scale != 1.0:
            from segscale.models import encoder_parameters
            from segscale.parallel import unwrap

            encoder = {id(q) for q in encoder_parameters(unwrap(model))}
            params = [
                {
                    "params": [q for q in model.parameters() if id(q) in encoder],
                    "encoder": True,
                    "lr_scale": f.encoder_lr_scale,
                },
                {"params": [q for q in model.parameters() if id(q) not in encoder]},
            ]
        return _build(
            f"train.optimizer '{o.name}' kwargs {o.kwargs}",
            OPTIMIZERS.resolve(o.name),
            params,
            o,
        )

    def loss(self) -> Any:
        """The loss, called as loss(logits, target) → a scalar tensor: an nn.Module, or any
        callable a user's factory builds. Raises SegscaleError when it is not callable."""
        spec = self.cfg.train.loss
        key = f"train.loss '{spec.name}' kwargs {spec.kwargs}"
        loss = _part(key, LOSSES, spec)
        if not callable(loss):
            raise SegscaleError(
                f"{key} builds {type(loss).__name__}; expected a callable loss(logits, target)"
            )
        return loss

    @property
    def transform_key(self) -> str:
        """How errors name the user's transform: "data.transform 'my.py:aug'"."""
        spec = self.cfg.data.transform
        return f"data.transform '{spec.name if spec else None}'"

    def transform(self) -> Any:
        """The user's per-sample training transform, or None when there is none. Raises
        SegscaleError when its factory fails or builds something that is not callable (a
        factory that returns None would otherwise train without it)."""
        spec = self.cfg.data.transform
        if spec is None:
            return None
        transform = _part(f"data.transform '{spec.name}' kwargs {spec.kwargs}", TRANSFORMS, spec)
        if not callable(transform):
            raise SegscaleError(
                f"{self.transform_key} builds {type(transform).__name__}; expected a callable "
                "(image, mask) → (image, mask)"
            )
        return transform

    def loaders(self, strategy: Strategy) -> tuple[TrainLoader, Any]:
        """The training loader (this process's shard, or every virtual rank's when simulating)
        and the exactly sharded validation loader (None without data.val_split)."""
        from segscale.data import SliceDataset, TrainLoader, eval_loader

        c, t = self.cfg, self.cfg.train
        train = SliceDataset(self.store, c.data.train_split, self.transform(), self.transform_key)
        # the workers this process plays: its own rank, or all K virtual ranks when simulating
        ranks = list(range(strategy.virtual_workers)) if t.simulate_workers else [strategy.rank]
        train_loader = TrainLoader(
            train,
            t.batch_size,
            ranks,
            strategy.virtual_workers,
            strategy.device,
            c.seed_for("data"),
            c.data.augment,
            c.data.num_workers,
            on_device=self.on_device(train, strategy.device),
        )
        if c.data.val_split is None:
            return train_loader, None
        val = SliceDataset(self.store, c.data.val_split)
        return train_loader, eval_loader(val, t.batch_size, strategy.rank, strategy.world_size)

    def on_device(self, train: Any, device: torch.device) -> bool:
        """data.on_device resolved: auto holds the training split on a GPU when it takes under a
        quarter of the GPU's free memory and no per-sample work (transform, DataLoader
        processes) is asked for."""
        import torch

        d = self.cfg.data
        if d.on_device != "auto":
            return d.on_device
        if device.type != "cuda" or d.transform is not None or d.num_workers:
            return False
        images, masks = self.store.images, self.store.masks
        rows = len(train.rows)
        need = rows * (images[0].nbytes + masks[0].nbytes)
        free, _ = torch.cuda.mem_get_info(device)
        return need < free / 4

    def callbacks(self) -> list[Any]:
        return [
            _build(
                f"train.callbacks[{i}] '{cb.name}' kwargs {cb.kwargs}",
                CALLBACKS.resolve(cb.name),
                **cb.kwargs,
            )
            for i, cb in enumerate(self.cfg.train.callbacks)
        ]

    def trackers(self, run_dir: Path) -> list[Any]:
        """The run's trackers (built on rank 0 only): callbacks with close(error)."""
        c = self.cfg
        return [
            _build(
                f"tracker '{t.name}' kwargs {t.kwargs}",
                TRACKERS.resolve(t.name),
                run_dir=run_dir,
                run_name=c.name,
                params=c.params(),
                **t.kwargs,
            )
            for t in c.tracker
        ]

    def trainer(
        self,
        strategy: Strategy,
        run_dir: Path,
        callbacks: list[Any] | None = None,
        progress: bool = True,
    ) -> Trainer:
        """A Trainer over this run's parts on `strategy`: seeded, the model wrapped for the
        strategy, the schedule scaled for its workers. `callbacks` come after the config's."""
        import torch

        from segscale.parallel import ghost_batchnorm, unwrap
        from segscale.repro import seed_everything
        from segscale.train import DivergenceGuard, Trainer

        c, t = self.cfg, self.cfg.train
        d = t.divergence
        seed_everything(c.seed_for("init"), t.deterministic)
        model = self.model()  # the same seed on every rank; DDP also broadcasts rank 0's weights
        if c.model.pretrained:  # every rank loads the same file (a resume then overwrites it)
            from segscale.transfer import RECORD, load_pretrained

            report = load_pretrained(model, c.model.pretrained)
            if strategy.rank == 0:
                write_atomic(run_dir / RECORD, to_json(report.as_dict(), indent=1))
                if progress:
                    print(report.summary(), flush=True)
        if t.simulate_fused:  # one pass for the K micro-batches; BatchNorm still sees each alone
            model = ghost_batchnorm(model, t.simulate_workers or 1)
        if t.sync_batchnorm and strategy.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        fast = speed_settings(t, strategy.device)
        if fast["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        model = strategy.wrap(model)
        if fast["compile"]:  # in place: the module, its state_dict and checkpoints stay as they are
            if t.deterministic:  # the public switch also makes inductor's kernels deterministic
                torch.use_deterministic_algorithms(True, warn_only=True)
            unwrap(model).compile(mode=None if fast["compile"] is True else fast["compile"])
        if fast["cudnn_benchmark"]:
            torch.backends.cudnn.benchmark = True
        train_loader, val_loader = self.loaders(strategy)
        steps = self.steps_per_epoch(strategy.virtual_workers)
        schedule = self.schedule(strategy.virtual_workers, steps)
        optimizer = strategy.wrap_optimizer(self.optimizer(model))
        loss_fn = self.loss()
        if isinstance(loss_fn, torch.nn.Module):  # a plain callable has no tensors to move
            loss_fn = loss_fn.to(strategy.device)
        return Trainer(
            model,
            optimizer,
            schedule,
            loss_fn,
            train_loader,
            val_loader,
            strategy,
            epochs=t.epochs,
            num_classes=self.num_classes,
            num_val_cases=0 if val_loader is None else len(val_loader.dataset.cases),
            task=self.task,
            run_dir=run_dir,
            seed=c.seed_for("data"),
            steps_per_epoch=steps,
            val_every=t.val_every,
            grad_clip=t.grad_clip,
            # what the run computes: a resume may change how fast (SPEED_SETTINGS); checkpoints
            # written before resume digests carry the digest of every setting
            config_digest=c.resume_digest(),
            older_digests=(c.digest(),),
            checkpoint_every=t.checkpoint_every,
            keep_checkpoints=t.keep_checkpoints,
            callbacks=[*self.callbacks(), *self.pictures(strategy), *(callbacks or [])],
            amp=fast["amp"],
            channels_last=fast["channels_last"],
            fuse_microbatches=t.simulate_fused,
            divergence=DivergenceGuard(d.factor, d.patience, d.smoothing) if d.enabled else None,
            progress=progress,
            log_every=c.monitor.log_every,
            freeze_encoder_epochs=t.finetune.freeze_encoder_epochs,
            check_every=fast["check_every"],
        )

    def pictures(self, strategy: Strategy) -> list[Any]:
        """Rank 0's validation picture grid (monitor.pictures slices; segmentation tasks only),
        before the trackers so they find the picture in the epoch's record."""
        from segscale.monitor import ValidationPictures

        count = self.cfg.monitor.pictures
        if strategy.rank != 0 or not count or getattr(self.task, "metric", None) != "dice":
            return []
        if self.cfg.data.val_split is None:
            return []
        return [ValidationPictures(self.store, self.cfg.data.val_split, count, self.num_classes)]

    def system_sampler(self, run_dir: Path, strategy: Strategy) -> Any:
        """This rank's system sampler (monitor.system_every; started by the caller)."""
        from segscale.monitor import SystemSampler

        return SystemSampler(run_dir, strategy.rank, self.cfg.monitor.system_every, strategy.device)

    def nondeterministic_ops(self, trainer: Trainer) -> list[str] | None:
        """On CUDA with train.deterministic: the ops of one training step (forward, loss,
        backward of a fresh copy of the model on a zero batch, under the run's autocast) that
        have no deterministic kernel there; None elsewhere (nothing to probe). Changes no state
        of the run: the probe's model and RNG draws are its own."""

        device, t = trainer.strategy.device, self.cfg.train
        if device.type != "cuda" or not t.deterministic:
            return None
        return self.probe_determinism(trainer)

    def probe_determinism(self, trainer: Trainer) -> list[str]:
        """nondeterministic_ops' probe, on any device (on CPU no op alerts)."""
        import torch

        from segscale.repro import nondeterministic_ops

        device = trainer.strategy.device

        size = self.store.images.shape[-1]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = self.model().to(device).train()
            if trainer.channels_last:
                model = model.to(memory_format=torch.channels_last)
            x = torch.zeros(2, self.in_channels, size, size, device=device)
            y = self.task.target(torch.zeros(2, size, size, dtype=torch.long, device=device))

            def step() -> None:
                with torch.autocast(
                    device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None
                ):
                    loss = trainer.loss_fn(model(x), y)
                loss.backward()

            return nondeterministic_ops(step)

    def record(self, trainer: Trainer, nondeterministic: list[str] | None = None) -> dict[str, Any]:
        """What environment.json holds for a run: the machine and software, how the config was
        scaled for this run's workers, and whether it is repeatable (`nondeterministic`: the ops
        nondeterministic_ops found, None when not probed)."""
        from segscale.repro import determinism, environment

        c, t, workers = self.cfg, self.cfg.train, trainer.strategy.virtual_workers
        meta = self.store.meta
        return {
            **environment(),
            "determinism": determinism(
                t.deterministic, trainer.strategy.device.type, t.strategy.name, nondeterministic
            ),
            "strategy": t.strategy.name,
            "store": {
                "path": str(self.store.path),
                **store_identity(meta),
                # prepare's input hash: the raw files with the preprocessing parameters
                "input_sha256": meta.get("input_hash"),
            },
            "seed": c.seed,
            "init_seed": c.seed_for("init"),
            "data_seed": c.seed_for("data"),
            "config_digest": c.digest(),
            "plugins": self.plugin_sources(),
            "peak_lr": trainer.schedule.peak_lr,
            "workers": workers,
            "simulated": bool(t.simulate_workers),
            "fused_microbatches": t.simulate_fused,
            "global_batch": t.batch_size * workers,
            "steps_per_epoch": trainer.steps_per_epoch,
            # the speed settings as resolved on this device (train.amp auto → bf16 or none)
            "data_on_device": trainer.train_loader.resident is not None,
            "loader_workers": c.data.num_workers,
            **{
                k: v
                for k, v in speed_settings(t, trainer.strategy.device).items()
                if k != "cudnn_benchmark"
            },
        }

    def plugin_sources(self) -> dict[str, dict[str, str | None]]:
        """The run's own plug-ins (components named by a path, not built in), by config key:
        {name, file, sha256}, the file that defines it and the SHA-256 of its bytes, so the
        record shows which code ran (None where no file can be found, e.g. a C extension)."""
        import hashlib
        import inspect

        c, t = self.cfg, self.cfg.train
        named = [
            ("model", c.model.name, MODELS),
            ("train.loss", t.loss.name, LOSSES),
            ("train.optimizer", t.optimizer.name, OPTIMIZERS),
            ("train.strategy", t.strategy.name, STRATEGIES),
            ("task", c.task.name, TASKS),
            ("data.transform", c.data.transform.name if c.data.transform else None, TRANSFORMS),
            *((f"train.callbacks[{i}]", cb.name, CALLBACKS) for i, cb in enumerate(t.callbacks)),
            *((f"tracker[{i}]", tr.name, TRACKERS) for i, tr in enumerate(c.tracker)),
        ]
        out: dict[str, dict[str, str | None]] = {}
        for key, name, registry in named:
            if name is None or name in registry:
                continue
            try:
                file = inspect.getsourcefile(registry.resolve(name))
            except TypeError:  # a builtin or an extension: no Python source
                file = None
            digest = hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else None
            out[key] = {"name": name, "file": file, "sha256": digest}
        return out

    def describe(self) -> dict[str, Any]:
        """The CNN-Parallelism-Generator of Auto-CNNp for this run: each part, whether users can
        replace it (a registry entry or their own 'module:attr'), what fills it, its parameters."""
        c, t = self.cfg, self.cfg.train

        def part(
            extensible: bool, fills: Any, registry: Any = None, **params: Any
        ) -> dict[str, Any]:
            out: dict[str, Any] = {"extensible": extensible, "fills": fills}
            if registry is not None and fills is not None:
                out["source"] = "built-in" if fills in registry else "user"
            return {**out, "params": params}

        meta = self.store.meta
        tuned: dict[str, Any] = {}  # fine-tuning: the source, and what check() loaded of it
        if c.model.pretrained:
            tuned = {"pretrained": c.model.pretrained, **t.finetune.model_dump()}
            if self.transfer is not None:
                tuned["pretrained_loaded"] = self.transfer.summary().partition(": ")[2]
        return {
            "training_environment": {
                "communication_init": part(
                    False,
                    "torch.distributed via torchrun (gloo on CPU, NCCL on GPU)",
                    device=t.device,
                    check_every=t.check_every,
                ),
                "device_placement": part(
                    False, "one process per device, by local rank", threads=t.threads
                ),
                "memory_allocation": part(
                    False,
                    "memory-mapped prepared store",
                    dataloader_workers=c.data.num_workers,
                    amp=t.amp,
                    channels_last=t.channels_last,
                    compile=t.compile,
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
                "tracker": (
                    part(True, c.tracker[0].name, TRACKERS, **c.tracker[0].kwargs)
                    if len(c.tracker) == 1
                    else part(
                        True, [t.name for t in c.tracker], **{t.name: t.kwargs for t in c.tracker}
                    )
                ),
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
                "architecture": part(True, c.model.name, MODELS, **c.model.kwargs, **tuned),
                "loss": part(True, t.loss.name, LOSSES, **t.loss.kwargs),
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


def _build(what: str, factory: Any, *args: Any, **kwargs: Any) -> Any:
    """factory(*args, **kwargs); whatever a user's component raises while it is built becomes one
    SegscaleError line naming the config key (a SegscaleError of its own passes as it is)."""
    try:
        return factory(*args, **kwargs)
    except SegscaleError:
        raise
    except Exception as e:
        raise SegscaleError(f"{what}: {type(e).__name__}: {e}") from None


def _part(what: str, registry: Any, spec: Any) -> Any:
    """The callable a loss or transform spec names: a user's function taken as it is (its
    kwargs bound), or what a factory builds (registry.is_the_part tells them apart)."""
    found = registry.resolve(spec.name)
    if registry.is_the_part(spec.name, spec.kwargs):
        return functools.partial(found, **spec.kwargs) if spec.kwargs else found
    return _build(what, found, **spec.kwargs)


def _close_checked(what: str, tracker: Any) -> None:
    """Close a tracker built only to be checked (close(None): nothing failed). A tracker without
    close, or whose close fails, is left to the check's own error or is one warning."""
    import inspect

    close = getattr(tracker, "close", None)
    if not callable(close):
        return
    try:  # a close that cannot take the error is check_hooks' one error, not a warning too
        inspect.signature(close).bind(None)
    except TypeError:
        return
    except ValueError:  # no signature to read (a builtin): tried as it is
        pass
    try:
        close(None)
    except Exception as e:
        warnings.warn(str(raised_in(f"{what} close(None), after its check,", e)), stacklevel=3)


def one_process(cfg: RunConfig, workers: int, cluster: bool = False) -> None:
    """Raise SegscaleError when a config that simulates workers would run on several (here, or
    in a `cluster` job, whose options the message names)."""
    if cfg.train.simulate_workers and workers > 1:
        one = "--nodes 1 --gpus-per-node 1" if cluster else "--workers 1"
        raise SegscaleError(
            f"train.simulate_workers runs K workers' math in one process: use {one}"
        )


def run_length_notes(train: Any, steps_per_epoch: int) -> list[str]:
    """What in train's settings the run is too short for: a warmup longer than the run (the
    scaled lr is never reached), step-decay milestones at or after its last epoch, an encoder
    frozen for the whole run. Warnings, not errors: a short trial run (train.epochs=1) of a
    long recipe is legitimate."""
    s, epochs, notes = train.schedule, train.epochs, []
    total = epochs * steps_per_epoch
    if s.rule == "standard" and (s.warmup_epochs or 0) > epochs:
        notes.append(
            f"train.schedule.warmup_epochs {s.warmup_epochs:g} is longer than the run "
            f"(epochs {epochs}): the scaled lr is never reached"
        )
    if s.rule == "standard" and (s.warmup_steps or 0) > total:
        notes.append(
            f"train.schedule.warmup_steps {s.warmup_steps} is longer than the run "
            f"({total} steps): the scaled lr is never reached"
        )
    if s.rule == "grescale":
        from segscale.schedules import Schedule

        shape = Schedule(1.0, 1.0, steps_per_epoch, total, s)  # its phases only
        if shape.warmup_steps <= total and shape.decay_phase_steps == 0:  # (longer: refused)
            notes.append(
                f"GreScale's decay phase is empty: it is train.schedule.decay_phase of the epochs "
                f"after the first {shape.warmup_steps / steps_per_epoch:g} (its warmup), and the "
                f"run has {epochs}; "
                + (
                    "the lr stays at its peak after the warmup"
                    if shape.warmup_steps < total
                    else "the warmup is the whole run: the lr reaches its peak at the last step"
                )
            )
    late = [m for m in s.decay_epochs if m >= epochs]
    if late:
        notes.append(
            f"train.schedule.decay_epochs {late}: at or after the last epoch (epochs "
            f"{epochs}); that decay does not happen in this run"
        )
    if train.finetune.freeze_encoder_epochs >= epochs:
        notes.append(
            f"train.finetune.freeze_encoder_epochs {train.finetune.freeze_encoder_epochs}"
            f": the run has {epochs} epochs, so the encoder does not train"
        )
    validated = [e for e in range(1, epochs + 1) if e % train.val_every == 0 or e == epochs]
    for i, cb in enumerate(train.callbacks):
        if cb.name == "early_stop":
            notes += _early_stop_notes(f"train.callbacks[{i}] early_stop", cb.kwargs, validated)
    return notes


def _early_stop_notes(what: str, kwargs: dict[str, Any], validated: list[int]) -> list[str]:
    """Why the built-in early_stop (kwargs already checked) can never finish a run that
    validates at the epochs `validated`: fewer counting validations than its patience."""
    patience, after = kwargs.get("patience", 3), kwargs.get("after", 0)
    reference = kwargs.get("reference")
    counted = [e for e in validated if e > after]
    if reference is not None:  # only validations at an epoch of the curve compare
        try:
            epochs = by_epoch(reference, what)
        except ValueError:  # refused when the callback is built
            return []
        counted = [e for e in counted if e in epochs]
    first_sets_best = reference is None and bool(counted) and counted[0] == validated[0]
    if first_sets_best:  # the first validation sets the best so far
        counted = counted[1:]
    if len(counted) >= patience:
        return []
    on = " at an epoch of its reference" if reference is not None else ""
    which = ", ".join(map(str, counted[:6])) + (", ..." if len(counted) > 6 else "")
    return [
        f"{what} can never finish this run: patience {patience}, but only {len(counted)} of "
        f"the run's {len(validated)} validations count{on} after epoch {after:g}"
        + (f" (epochs {which})" if counted else "")
        + ("; the first sets the best so far" if first_sets_best else "")
    ]


def _open_store(cfg: RunConfig) -> Store:
    try:
        return Store.open(cfg.data.store)
    except SegscaleError as e:  # a relative path was read from the working directory
        raise SegscaleError(f"data.store {e}") from None


def plan(cfg: RunConfig) -> Plan:
    """Resolve and check every component of `cfg` without importing torch: the store and its
    splits, each name or 'module:attr' path, and that each kind's kwargs bind to its factory
    beside what the engine passes it (a model's in_channels and num_classes, a strategy's device
    and threads, a tracker's run folder, name and params; a loss, task, callback or transform
    gets its kwargs only). Raises SegscaleError naming the key and what was expected."""
    store = _open_store(cfg)
    d = cfg.data
    if d.split_seed is not None or d.folds is not None:  # another train/validation partition
        store = store.repartition(d.train_split, d.val_split, d.split_seed or 0, d.folds, d.fold)
    for key in ("train_split", "val_split"):
        if getattr(cfg.data, key) is None:  # no validation
            continue
        try:
            store.rows(getattr(cfg.data, key))
        except SegscaleError as e:
            hint = "; data.val_split=null trains without validation" if key == "val_split" else ""
            raise SegscaleError(f"data.{key}: {e}{hint}") from None
    check_components(cfg)
    what = f"task '{cfg.task.name}' kwargs {cfg.task.kwargs}"
    task = _build(what, TASKS.resolve(cfg.task.name), **cfg.task.kwargs)
    missing = [a for a in TASK_API if not hasattr(task, a)]
    if missing:
        lacks = "none" if len(missing) == len(TASK_API) else "no " + ", ".join(missing)
        raise SegscaleError(
            f"task '{cfg.task.name}' has {lacks} of what a task has: {', '.join(TASK_API)} "
            "(segscale.tasks)"
        )
    _build(what, task.num_outputs, store)
    loss = cfg.train.loss
    if loss.name in LOSSES and loss.name not in getattr(task, "losses", LOSSES.names()):
        raise SegscaleError(
            f"train.loss '{loss.name}' does not fit the {cfg.task.name} task; "
            f"use {' | '.join(task.losses)} or your own 'pkg.mod:Class'"
        )
    return Plan(cfg, store, task)


def schedule_plan(cfg: RunConfig) -> Plan:
    """A Plan for the lr schedule alone, with steps per epoch given (Plan.schedule and
    scale_notes with `steps_per_epoch`): the components checked, no store opened (it may not
    be prepared yet). Its store and task are None. Raises SegscaleError as check_components."""
    check_components(cfg)
    return Plan(cfg, None, None)  # type: ignore[arg-type]


def check_components(cfg: RunConfig) -> None:
    """What plan checks of the config alone (no store, no torch): each component's name or
    'module:attr' path resolves and its kwargs fit its factory beside what the engine passes it.
    Raises SegscaleError naming the component (`segscale config convert` checks this much of a
    converted config, whose store may not be prepared yet)."""
    parts: list[tuple[str, Any, Any, dict[str, Any] | None]] = [
        ("task", TASKS, cfg.task, None),
        ("model", MODELS, cfg.model, {"in_channels": 1, "num_classes": 2}),
        ("train.loss", LOSSES, cfg.train.loss, None),
        ("train.strategy", STRATEGIES, cfg.train.strategy, {"device": "cpu", "threads": None}),
        *(
            (f"train.callbacks.{i}", CALLBACKS, cb, None)
            for i, cb in enumerate(cfg.train.callbacks)
        ),
        *(
            (f"tracker.{i}", TRACKERS, t, {"run_dir": None, "run_name": "", "params": {}})
            for i, t in enumerate(cfg.tracker)
        ),
        *([("data.transform", TRANSFORMS, cfg.data.transform, None)] if cfg.data.transform else []),
    ]
    for key, registry, spec, fixed in parts:
        with _set_at(cfg, f"{key}.name"):  # an unknown name or a broken user path fails here
            registry.check(spec.name)
        with _set_at(cfg, f"{key}.kwargs"):
            check_kwargs(registry, spec.name, spec.kwargs, fixed)
    with _set_at(cfg, "train.optimizer.name"):  # its kwargs go to the torch optimizer it returns
        OPTIMIZERS.check(cfg.train.optimizer.name)
    _callbacks_once_each(cfg)


def _callbacks_once_each(cfg: RunConfig) -> None:
    """Refuse a callback given twice, however it is spelt: a registered name or its
    'module:attr', kwargs in any order or with defaults written out. Its hooks would run twice:
    a pasted line, not a plan."""
    seen: list[tuple[tuple[str, str], dict[str, Any]]] = []
    for i, cb in enumerate(cfg.train.callbacks):
        found = CALLBACKS.path(cb.name)
        if found is None:  # a user's path, imported by the check above: named as Python does
            made = CALLBACKS.resolve(cb.name)
            found = f"{made.__module__}:{getattr(made, '__qualname__', cb.name)}"
        bound = CALLBACKS.signature(cb.name).bind_partial(**cb.kwargs)
        bound.apply_defaults()
        me = (_defined_in(found), dict(bound.arguments))
        if me in seen:  # compared by ==: kwargs with int and str keys can't be sorted
            first = cfg.train.callbacks[seen.index(me)].name
            source, attr = me[0]
            with _set_at(cfg, f"train.callbacks.{i}.name"):
                raise SegscaleError(
                    f"train.callbacks[{i}] '{cb.name}' is train.callbacks[{seen.index(me)}] "
                    f"'{first}' again (the same {attr} of {source}, with the same kwargs, "
                    "defaults included); give it once"
                )
        seen.append(me)


def _defined_in(path: str) -> tuple[str, str]:
    """(the file that defines it, attr) for a 'module:attr' path: one class reached under two
    module names (a plugin file given by its path, then as a module of the folder that put on
    sys.path) is one. The module's name stands for its file where none is found."""
    import sys

    module, _, attr = path.partition(":")
    origin = getattr(sys.modules.get(module), "__file__", None)
    if origin is None:  # a registered name's module, not imported yet: found, not run
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
    return (str(Path(origin).resolve()) if origin else module, attr)


def check_optimizer(cfg: RunConfig, build: Any = None) -> None:
    """Build the optimiser: `build()`, or the configured one over a single parameter (a config
    without a model yet). Kwargs its torch class refuses (`betaz`, a negative eps) and a factory
    that returns no torch optimiser raise SegscaleError prefixed with where they were set."""
    import torch

    o = cfg.train.optimizer
    if build is None:

        def build() -> Any:
            one = [torch.nn.Parameter(torch.zeros(1))]
            return _build(
                f"train.optimizer '{o.name}' kwargs {o.kwargs}", OPTIMIZERS.resolve(o.name), one, o
            )

    with _set_at(cfg, "train.optimizer.kwargs"):
        optimizer = build()
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SegscaleError(
            f"train.optimizer '{o.name}' returns {type(optimizer).__name__}; expected a "
            "torch.optim.Optimizer"
        )


@contextlib.contextmanager
def _set_at(cfg: RunConfig, key: str) -> Any:
    """A SegscaleError raised inside, about the part at config `key`, prefixed with where the
    key was set (RunConfig.where: the file's line or element, or the override)."""
    try:
        yield
    except SegscaleError as e:
        where = cfg.where(key)
        if where is None:
            raise
        raise SegscaleError(f"{where}: {e}") from None


def speed_settings(train: Any, device: torch.device) -> dict[str, Any]:
    """train.amp, channels_last, compile and check_every resolved for `device`, and whether cuDNN
    may pick its fastest kernels: amp auto is bf16 on a GPU that supports it and none elsewhere;
    channels_last auto is on for GPUs; check_every auto is 1 on CPU (a host read costs nothing
    there) and 10 on GPUs; cudnn.benchmark on GPUs when the run is not deterministic."""
    from segscale.parallel.base import resolve_amp

    cuda = device.type == "cuda"
    channels_last = cuda if train.channels_last == "auto" else train.channels_last
    return {
        "amp": resolve_amp(train.amp, device),
        "channels_last": channels_last,
        "compile": train.compile,
        "check_every": (10 if cuda else 1) if train.check_every == "auto" else train.check_every,
        "cudnn_benchmark": cuda and not train.deterministic,
    }


def inference_plan(cfg: RunConfig) -> Plan:
    """A Plan that builds and runs a trained model without its training data (a zoo entry): the
    store's description (labels, channels, preprocessing, slice size) is all it reads; no split
    needs any case. Raises SegscaleError for an unknown task or model, or kwargs that do not fit."""
    store = _open_store(cfg)
    check_kwargs(TASKS, cfg.task.name, cfg.task.kwargs)
    task = TASKS.resolve(cfg.task.name)(**cfg.task.kwargs)
    check_kwargs(MODELS, cfg.model.name, cfg.model.kwargs, {"in_channels": 1, "num_classes": 2})
    return Plan(cfg, store, task)


def has_started(run_dir: Path) -> bool:
    """Whether run_dir holds a run that has trained (checkpoints, or model.pt when finished)."""
    return (run_dir / "checkpoints").is_dir() or (run_dir / "model.pt").exists()


def check_run_dir(run_dir: Path) -> None:
    """Refuse a --run-dir that is a file, a prepared store, or inside one or a run's record
    folders, before anything is said about resuming it."""
    not_a_record(run_dir, "--run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise SegscaleError(f"{run_dir}: a file, not a run folder; give another --run-dir")
    if (run_dir / TUNE_STATE).is_file() or (run_dir / REPEAT_STATE).is_file():
        raise not_a_run(run_dir)  # a folder of runs: named, with one of them
    if is_zoo_entry(run_dir):  # a run would write over its checked files
        raise SegscaleError(
            f"{run_dir}: a zoo entry (a published model), not a run folder; train into a new "
            "--run-dir (model.pretrained: zoo:NAME starts from its weights)"
        )


def check_started(run_dir: Path, resume: bool) -> bool:
    """Whether `run_dir` holds a started run (checkpoints or model.pt); refuse one not asked to
    resume, one whose config.yaml is missing, and what check_run_dir refuses."""
    check_run_dir(run_dir)
    started = has_started(run_dir)
    if started and not (run_dir / "config.yaml").is_file():
        raise SegscaleError(
            f"{run_dir}: has checkpoints but no config.yaml, so what they were trained with is "
            "unknown here; put its config.yaml back, or train into a new --run-dir"
        )
    if started and not resume:
        if (run_dir / "model.pt").exists():
            raise SegscaleError(f"{run_dir}: holds a finished run; give --run-dir for a new one")
        raise SegscaleError(
            f"{run_dir}: already holds a run; pass --resume to continue it or --run-dir for a new one"
        )
    return started


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, workers: bool = False) -> None:
    """Create the run folder and save the resolved config; refuse to overwrite a finished or
    started run unless resuming it, and a folder a training is running in. `workers`: called by
    each worker of a run, where that last check is left to rank 0's own lock (one worker could
    see another of the same run, already started, holding it)."""
    try:
        holder = None if workers else lock_holder(run_dir / RUN_LOCK)
    except OSError:  # cannot be told here; the training's own lock still refuses a second one
        holder = None
    if holder is not None:
        raise SegscaleError(
            f"{run_dir}: a training is running in it ({holder}); stop it with `segscale stop "
            f"{run_dir}`, or train into a new --run-dir"
        )
    started = check_started(run_dir, resume)  # never a file, a store, or in a run's records
    if not workers and run_dir.is_dir() and not (run_dir / "config.yaml").is_file():
        # a user's folder: the run's files would mix with theirs (hidden ones: a write under way
        # on another node, or the file system's own)
        stray = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
        if stray:
            raise SegscaleError(
                f"{run_dir}: not empty ({', '.join(stray[:3])}) and not a run folder (no "
                "config.yaml); train into a new or empty --run-dir"
            )
    if started:  # resuming: only with the settings the run started with, on the same data
        before = load_config(run_dir / "config.yaml")
        if before.resume_digest() != cfg.resume_digest():
            changed = before.differing_keys(cfg, ignore=SPEED_SETTINGS)
            raise SegscaleError(
                f"{run_dir}: started with other settings ({differ(changed)}); "
                "resume it with the config it started with, or train into a new --run-dir"
            )
        check_same_store(run_dir, Store.open(cfg.data.store))
        faster = before.differing_keys(cfg)
        if faster and not workers:
            warnings.warn(
                f"{run_dir}: resumes with other speed settings ({differ(faster)}): how fast "
                "or when it saves, not what it computes; config.yaml records the new values",
                stacklevel=2,
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder of the path should be, no permission ...
        raise SegscaleError(f"{run_dir}: cannot create the run folder ({e.strerror})") from None
    save_config(cfg, run_dir / "config.yaml")  # atomic: every node of a multi-node run writes it


def require_segmentation(cfg: RunConfig, where: object, command: str) -> None:
    """Refuse a run of another task (classification) for a command built on per-case Dice and
    surface distances. Raises SegscaleError naming `where`."""
    if cfg.task.name != "segmentation":
        raise SegscaleError(
            f"{where}: a {cfg.task.name} run; `segscale {command}` works on per-case Dice and "
            "surface distances, which segmentation runs have"
        )


def store_identity(meta: dict[str, Any]) -> dict[str, str | None]:
    """What a run records of its store (environment.json's "store"): the sha256 of its slices
    and masks (content_sha256, which changes with any preprocessing) and of its split by case
    as prepared (splits_sha256; a data.split_seed partition is derived from it and the config).
    Not the raw files' bytes: re-compressing them changes nothing prepared."""
    import hashlib

    splits = meta.get("prepared_splits", meta.get("splits"))
    return {
        "content_sha256": meta.get("content_hash"),
        "splits_sha256": hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
        if splits
        else None,
    }


def check_same_store(run_dir: Path, store: Store, splits: bool = True) -> None:
    """Refuse a run whose store was prepared again, differently, since the run started: other
    slices (content_sha256: another preprocessing, other data) for anything that uses its model,
    and with `splits` (resuming, scoring) another split by case, which could put cases it trained
    on in its test split. Compared with environment.json's record; what a run did not record
    passes. Raises SegscaleError."""
    try:
        recorded = json.loads((run_dir / "environment.json").read_text()).get("store") or {}
    except (OSError, ValueError, AttributeError):
        return
    now = store_identity(store.meta)
    for key, what in (("content_sha256", "its slices"), ("splits_sha256", "its split by case")):
        if key == "splits_sha256" and not splits:
            continue
        then = recorded.get(key)
        if then and now[key] and then != now[key]:
            raise SegscaleError(
                f"{run_dir}: its store {store.path} was prepared again since the run started, "
                f"and {what} differ ({key} {then[:12]}, now {now[key][:12]}); prepare it as it "
                "was, or train a new run on it"
            )


def fit_weights(model: torch.nn.Module, weights: Any, what: str) -> None:
    """model.load_state_dict(weights), strictly; a mismatch is one SegscaleError: `what`, then
    the first thing that differs (a size mismatch, a missing or unexpected key)."""
    if not isinstance(weights, dict):
        raise SegscaleError(f"{what}: not a state dict ({type(weights).__name__})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        detail = next((x for x in lines if not x.startswith("Error(s)")), lines[0] if lines else "")
        raise SegscaleError(f"{what}: {detail[:300]}") from None


def check_store_exists(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse, in one line that says what to do, a finished run whose store is gone: its model
    needs what the store describes (preprocessing, classes), and scoring needs its data."""
    if not (Path(cfg.data.store) / "meta.json").is_file():
        raise SegscaleError(
            f"{run_dir}: its store {cfg.data.store} is gone, and the model needs what it "
            "describes (preprocessing, classes): prepare it again there, or, if you moved it, set "
            f"data.store in {run_dir / 'config.yaml'}; `segscale zoo publish` keeps a model with "
            "what it needs"
        )


def trained_weights(run_dir: Path) -> Path:
    """run_dir/model.pt; raises SegscaleError when the run has not finished."""
    weights = run_dir / "model.pt"
    if not weights.is_file() and is_zoo_entry(run_dir):
        raise SegscaleError(
            f"{run_dir}: a zoo entry (a published model), not a run; its weights are read by "
            "`segscale predict zoo:NAME` and `segscale export zoo:NAME`"
        )
    if not weights.is_file():
        raise SegscaleError(f"{run_dir}: no model.pt; train the run to the end first")
    return weights


def load_trained_model(
    run_dir: Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, Plan]:
    """A finished run's model (run_dir/model.pt) in eval mode on `device`, with its Plan.
    Raises SegscaleError when the run has no model.pt."""
    cfg = load_config(run_dir / "config.yaml")
    check_store_exists(run_dir, cfg)
    p = plan(cfg)
    return p.trained_model(run_dir, device), p

"""Learning-rate schedules as pure functions of the step (nanoGPT style): the Trainer asks
`lr(step)` and writes it into the optimiser, so resuming only needs the step count."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from segscale._files import save_signed_figure
from segscale.config import (
    GRESCALE_DECAY_COEFFICIENT,
    GRESCALE_DECAY_PHASE,
    GRESCALE_WARMUP_EPOCHS,
    ScheduleConfig,
)
from segscale.errors import SegscaleError

# in the metadata of every picture `segscale schedule` draws: drawing it again replaces its own
# picture, and nothing else without --force
MARK = "segscale schedule"


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The scaling rule: linear (Goyal et al., the thesis), square root, or none."""
    k = global_batch / reference_batch
    if rule == "linear":
        return base_lr * k
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule '{rule}' (linear | sqrt | none)")


@dataclass(frozen=True)
class Schedule:
    """lr(step) for a run: warmup from the base lr to the scaled peak, then decay."""

    base_lr: float
    peak_lr: float
    steps_per_epoch: int
    total_steps: int
    cfg: ScheduleConfig

    @property
    def warmup_steps(self) -> float:
        """Warmup length in steps: train.schedule.warmup_steps, or warmup_epochs × steps per epoch
        (the config refuses both); GreScale's default is 5 epochs."""
        if self.cfg.warmup_steps is not None:
            return float(self.cfg.warmup_steps)
        default = GRESCALE_WARMUP_EPOCHS if self.cfg.rule == "grescale" else 0.0
        epochs = self.cfg.warmup_epochs if self.cfg.warmup_epochs is not None else default
        return epochs * self.steps_per_epoch

    @property
    def decay_phase_steps(self) -> float:
        """GreScale: the decay phase's length in steps, decay_phase × the steps after the
        default 5-epoch warmup; the same whatever warmup the run uses (the thesis' fixed decay
        phase: a longer warmup shortens the stabilisation)."""
        fraction = (
            self.cfg.decay_phase if self.cfg.decay_phase is not None else GRESCALE_DECAY_PHASE
        )
        after_default = self.total_steps - GRESCALE_WARMUP_EPOCHS * self.steps_per_epoch
        return fraction * max(after_default, 0.0)

    def phases(self) -> tuple[float, float]:
        """GreScale: the steps where stabilisation and decay begin."""
        decay = self.decay_phase_steps
        return self.warmup_steps, self.total_steps - decay

    def __call__(self, step: int) -> float:
        warmup = self.warmup_steps
        if warmup > 0 and step < warmup:
            # from the unscaled base lr up to the scaled peak; a peak under the base lr (a
            # global batch under the reference batch) needs no warmup: it is held from the start
            # (was: a "warmup" down from the base lr, above what the batch was scaled for)
            start = min(self.base_lr, self.peak_lr)
            if self.cfg.warmup == "constant":
                return start
            # Gradual: linear from the unscaled base lr to the scaled peak (Goyal et al. 2017).
            return start + (self.peak_lr - start) * step / warmup
        if self.cfg.rule == "grescale":
            return self.peak_lr * self._grescale_decay(step)
        return self.peak_lr * self._decay(step)

    def _grescale_decay(self, step: int) -> float:
        """1 through stabilisation, then exp(−c · t / T) over the decay phase of T steps: the
        lr falls by the same factor every epoch (an exponential per-epoch decay, continuous in
        the step so that resuming mid-epoch gives the same lr), e^c-fold in all."""
        length = self.decay_phase_steps
        start = self.total_steps - length
        if length <= 0 or step < start:
            return 1.0
        c = self.cfg.decay_coefficient or GRESCALE_DECAY_COEFFICIENT
        return math.exp(-c * (step - start) / length)

    def _decay(self, step: int) -> float:
        cfg = self.cfg
        if cfg.decay == "none":
            return 1.0
        if cfg.decay == "step":
            epoch = step // self.steps_per_epoch
            return cfg.decay_factor ** sum(epoch >= e for e in cfg.decay_epochs)
        start = self.warmup_steps
        if cfg.decay == "exponential":
            return cfg.decay_factor ** ((step - start) / self.steps_per_epoch)
        t = min(1.0, max(0.0, (step - start) / max(1.0, self.total_steps - start)))
        floor = cfg.min_lr_ratio
        if cfg.decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if cfg.decay == "poly":
            return floor + (1 - floor) * (1 - t) ** cfg.poly_power
        raise ValueError(f"unknown decay '{cfg.decay}'")


def build_schedule(
    cfg: ScheduleConfig,
    base_lr: float,
    batch_size: int,
    world_size: int,
    steps_per_epoch: int,
    epochs: int,
) -> Schedule:
    reference = cfg.reference_batch or batch_size
    peak = scaled_lr(base_lr, batch_size * world_size, reference, cfg.scaling)
    schedule = Schedule(base_lr, peak, steps_per_epoch, steps_per_epoch * epochs, cfg)
    if cfg.rule == "grescale":
        warmup, decay = schedule.phases()
        default = cfg.warmup_epochs is None and cfg.warmup_steps is None
        # in the unit it was set in: steps for warmup_steps, else epochs
        key = "warmup_steps" if cfg.warmup_steps is not None else "warmup_epochs"
        length = (
            _count(warmup, "step")
            if key == "warmup_steps"
            else _count(warmup / steps_per_epoch, "epoch")
        )
        run = _count(epochs, "epoch") + (
            f", {schedule.total_steps} steps" if key == "warmup_steps" else ""
        )
        if warmup > schedule.total_steps:  # nothing but warmup: no phase to shorten but it
            raise SegscaleError(
                f"train.schedule: GreScale's warmup ({length}{', its default' if default else ''}) "
                f"is longer than the run ({run}): the scaled lr is never reached; train longer, "
                f"or set a shorter train.schedule.{key}"
            )
        if warmup > decay:
            raise SegscaleError(
                f"train.schedule: GreScale's warmup ({length}) runs into its decay phase "
                f"({(schedule.total_steps - decay) / steps_per_epoch:g} of {_count(epochs, 'epoch')}); "
                f"shorten {key} or decay_phase, or train longer"
            )
    return schedule


def _count(n: float, unit: str) -> str:
    """'1 epoch', '2.5 epochs'."""
    return f"{n:g} {unit}{'' if n == 1 else 's'}"


def plot_schedule(schedule: Schedule, out: Path, title: str) -> None:
    """Plot lr(step) over the whole run as a PNG, with epochs on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(schedule.total_steps)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([s / schedule.steps_per_epoch for s in steps], [schedule(s) for s in steps])
    if schedule.cfg.rule == "grescale":  # the three phases, shaded
        bounds = [0, *schedule.phases(), schedule.total_steps]
        for (a, b), name, shade in zip(
            itertools.pairwise(bounds), ("warmup", "stabilisation", "decay"), ("0.9", "0.97", "0.9")
        ):
            ax.axvspan(a / schedule.steps_per_epoch, b / schedule.steps_per_epoch, color=shade)
            ax.text(
                (a + b) / 2 / schedule.steps_per_epoch,
                0,
                name,
                ha="center",
                va="bottom",
                fontsize=7,
                transform=ax.get_xaxis_transform(),
            )
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # signed: a rerun replaces it only while unedited (an SVG changed in an editor is kept)
    save_signed_figure(fig, Path(out), MARK)
    plt.close(fig)

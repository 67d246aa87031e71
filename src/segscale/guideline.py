"""The thesis' scaling guideline (Fig. 6.3) as a pure state machine: no training inside.

Given the trials so far (each: the action that made it, its GreScale settings, its validation
scores), `Guideline.next` returns the next action and the settings to train with:

    start from GreScale's defaults;
    below `min_workers` (12, the thesis' threshold) train with them as they are;
    otherwise apply the actions in order: decrease the initial lr, increase the decay
    coefficient, increase the warmup period, increase the decay phase, change the optimiser.
    Repeat an action while it improves on the previous trial; when it does not, go back to the
    best trial so far and apply the next action. When a trial reaches the baseline, retrain its
    settings once with another seed ("model validation"), then stop; when that run misses the
    baseline (the thesis never saw it), the reach was luck: go on as if the trial had missed.
    When every action is exhausted, stop with the best trial.

Trials compare by validation Dice, then mean accuracy (MA), then mean IoU, as the thesis ranks
them (PA and fwIoU are dominated by the background). "Reached the baseline" means a Dice within
`reach_tolerance` of the baseline's (or within its run-to-run `noise`, when larger): the thesis validated 81.19% against a baseline of 81.32%
(Table 6.2) but not 80.93% (Table 6.3), so its noise allowance lay between 0.13 and 0.39 points;
the default is 0.25. Fed the thesis' own trials (Tables 6.1–6.8), the machine chooses the
actions the thesis chose, in the same order (tests/test_guideline.py). A trial that diverged
(NaN scores) never improves and never reaches the baseline. With `noise` (the spread of Dice
over repeated baseline runs), a trial improves on another only by more than that spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from segscale.config import (
    GRESCALE_DECAY_COEFFICIENT,
    GRESCALE_DECAY_PHASE,
    GRESCALE_WARMUP_EPOCHS,
)

ACTIONS = (
    "decrease_lr",
    "increase_decay_coefficient",
    "increase_warmup",
    "increase_decay_phase",
    "change_optimizer",
)


@dataclass(frozen=True)
class Scores:
    """Validation scores of a trial, as fractions (SegEval's dataset-level names)."""

    dice: float
    mean_accuracy: float
    mean_iou: float

    _NAMES = ("dice", "mean_accuracy", "mean_iou")

    @classmethod
    def of(cls, metrics: dict[str, float]) -> Scores:
        """From a metrics row: `dice`, `mean_accuracy`, `mean_iou` (or their `val_` names)."""
        values = [float(metrics.get(k, metrics.get(f"val_{k}", math.nan))) for k in cls._NAMES]
        return cls(*values)

    @property
    def ranked(self) -> tuple[float, float, float]:
        return (self.dice, self.mean_accuracy, self.mean_iou)

    @property
    def diverged(self) -> bool:
        return any(math.isnan(v) for v in self.ranked)

    def beats(self, other: Scores, margin: float = 0.0) -> bool:
        """Better by Dice, then MA, then mIoU (the first that differs decides). With a `margin`
        (the run-to-run noise of Dice), only a Dice higher by more than it is better."""
        if self.diverged:
            return False
        if other.diverged:
            return True
        if margin > 0:
            return self.dice > other.dice + margin
        for mine, theirs in zip(self.ranked, other.ranked):
            if not math.isclose(mine, theirs, rel_tol=0, abs_tol=1e-12):
                return mine > theirs
        return False


@dataclass(frozen=True)
class Settings:
    """What the guideline tunes: the initial (base) lr, GreScale's three phases, the optimiser."""

    lr: float
    warmup_epochs: float = GRESCALE_WARMUP_EPOCHS
    decay_phase: float = GRESCALE_DECAY_PHASE
    decay_coefficient: float = GRESCALE_DECAY_COEFFICIENT
    optimizer: str = "sgd"

    def overrides(self) -> list[str]:
        """Config overrides (`key=value`) that train with these settings."""
        return [
            f"train.optimizer.lr={self.lr!r}",
            f"train.optimizer.name={self.optimizer}",
            "train.schedule.rule=grescale",
            f"train.schedule.warmup_epochs={self.warmup_epochs!r}",
            f"train.schedule.decay_phase={self.decay_phase!r}",
            f"train.schedule.decay_coefficient={self.decay_coefficient!r}",
        ]


@dataclass(frozen=True)
class Steps:
    """The "small fixed steps" of each action (the thesis gives no sizes; these are ours)."""

    lr_factor: float = 0.5  # decrease_lr: the initial lr × this
    decay_coefficient: float = math.log(10)  # + this: the lr falls 10× further over the decay
    warmup_epochs: float = 2.0  # + this many epochs of warmup
    decay_phase: float = 1 / 14  # + half a seventh of the epochs after the default warmup
    optimizers: tuple[str, ...] = ("sgd", "adam")  # change_optimizer: the first not tried yet


@dataclass(frozen=True)
class Trial:
    action: str  # "defaults", one of ACTIONS, or "validate"
    settings: Settings
    scores: Scores | None = None  # None: not evaluated


@dataclass(frozen=True)
class Decision:
    action: str  # "defaults", one of ACTIONS, "validate", "done" or "exhausted"
    settings: Settings | None  # what to train next (the best trial's, when stopping)
    reason: str


@dataclass(frozen=True)
class Guideline:
    baseline: Scores  # the one-worker model's validation scores
    workers: int
    steps: Steps = field(default_factory=Steps)
    reach_tolerance: float = 0.0025  # Dice, as a fraction: 0.25 points
    min_workers: int = 12
    noise: float = 0.0  # the baseline's run-to-run spread of Dice (max − min over its runs)

    def reached(self, scores: Scores | None) -> bool:
        """Within max(reach_tolerance, noise) of the baseline's Dice, or above it."""
        return (
            scores is not None
            and not scores.diverged
            and scores.dice >= self.baseline.dice - max(self.reach_tolerance, self.noise)
        )

    def start(self, initial: float | Settings) -> Decision:
        """The first trial: GreScale's defaults at an initial lr, or the given settings."""
        settings = initial if isinstance(initial, Settings) else Settings(initial)
        return Decision("defaults", settings, "apply GreScale's default parameters")

    def next(self, trials: list[Trial]) -> Decision:
        """The next step after `trials` (oldest first, the first made by `start`)."""
        if not trials:
            raise ValueError("no trial yet: begin with Guideline.start")
        last = trials[-1]
        best = self.best(trials)
        missed = ""
        if last.action == "validate":
            if self.reached(last.scores):
                return Decision("done", last.settings, "the validation run reached the baseline")
            # another seed missed: the trial's reach was luck; go on as if it had missed
            trials = trials[:-1]
            last, missed = trials[-1], "its validation run missed the baseline"
        if self.workers < self.min_workers:
            return Decision(
                "done",
                last.settings,
                f"{self.workers} workers: under {self.min_workers}, GreScale's defaults are used",
            )
        if self.reached(last.scores) and not missed:
            return Decision(
                "validate", last.settings, "reached the baseline: retrain once with another seed"
            )
        if last.action == "defaults":
            why = missed or "the defaults miss the baseline"
            return self._apply(ACTIONS[0], last.settings, why, trials)
        earlier = [t for t in trials[:-1] if t.scores is not None and t.action != "validate"]
        previous = earlier[-1].scores if earlier else None
        improved = last.scores is not None and (
            previous is None or last.scores.beats(previous, self.noise)
        )
        if improved:
            again = self._apply(last.action, last.settings, "it improved: repeat it", trials)
            if again.settings is not None:
                return again
        index = ACTIONS.index(last.action) + 1
        while index < len(ACTIONS):
            decision = self._apply(
                ACTIONS[index], best.settings, f"{last.action} did not improve: next action", trials
            )
            if decision.settings is not None:
                return decision
            index += 1
        return Decision("exhausted", best.settings, "every action tried: keep the best trial")

    def best(self, trials: list[Trial]) -> Trial:
        """The best evaluated trial (the first when none was evaluated)."""
        best = trials[0]
        for t in trials[1:]:
            if t.scores is not None and (best.scores is None or t.scores.beats(best.scores)):
                best = t
        return best

    def _apply(self, action: str, settings: Settings, reason: str, trials: list[Trial]) -> Decision:
        s = self.steps
        if action == "decrease_lr":
            changed = replace(settings, lr=settings.lr * s.lr_factor)
        elif action == "increase_decay_coefficient":
            changed = replace(
                settings, decay_coefficient=settings.decay_coefficient + s.decay_coefficient
            )
        elif action == "increase_warmup":
            changed = replace(settings, warmup_epochs=settings.warmup_epochs + s.warmup_epochs)
        elif action == "increase_decay_phase":
            phase = settings.decay_phase + s.decay_phase
            if phase >= 1:
                return Decision(action, None, "the decay phase cannot grow further")
            changed = replace(settings, decay_phase=phase)
        else:  # the first optimiser of `Steps.optimizers` that no trial has used yet
            tried = {t.settings.optimizer for t in trials}
            left = [name for name in s.optimizers if name not in tried]
            if not left:
                return Decision(action, None, "no optimiser left to try")
            changed = replace(settings, optimizer=left[0])
        return Decision(action, changed, reason)

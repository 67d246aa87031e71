"""`segscale tune`: from a config that trains well on one worker to one that trains as well on K,
by running the thesis' scaling guideline (segscale.guideline, Fig. 6.3) for real.

    baseline: the config on one worker, R times (seeds seed, seed+1, ...), or given run folders
    trials:   GreScale on K workers (real, or simulated in one process), each the action the
              guideline asks for, until a trial reaches the baseline and its validation run
              (another seed) is done, every action is exhausted, or the budget is spent
    test:     the baseline runs and the chosen trial, scored once on the test split
    output:   tune.md (the thesis' Tables 6.1–6.10 as one table), tune.png, tuned.yaml

Past the thesis: every decision reads the validation split only; "reached" and "improved" are
judged against the baseline's run-to-run spread (segscale.guideline.Guideline.noise); a trial
whose validation Dice stays clearly under the baseline's curve is finished early
(segscale.train.EarlyStop) and the compute that saved is reported; the state lives in
OUT/tune.json, written atomically after every step, so rerunning the same command after a
SIGTERM or a crash continues: finished runs are not retrained, a run in flight resumes from its
checkpoint. Every baseline and trial is a normal run folder under OUT, and with the MLflow
tracker a child of one tuning run.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from segscale._files import (
    EVALUATION,
    TUNE_STATE,
    differ,
    job_state,
    keep_edited,
    read_jsonl,
    read_record,
    signed,
    write_atomic,
)
from segscale.config import (
    GRESCALE_DECAY_COEFFICIENT,
    GRESCALE_DECAY_PHASE,
    GRESCALE_WARMUP_EPOCHS,
    NO_MOMENTUM,
    RunConfig,
    apply_override,
    save_config,
    validate,
)
from segscale.engine import (
    check_workers,
    has_started,
    plan,
    prepare_run_dir,
    require_segmentation,
)
from segscale.errors import (
    DIVERGED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    Preempted,
    SegscaleError,
    check_seeds,
)
from segscale.guideline import Decision, Guideline, Scores, Settings, Trial
from segscale.launch import launch, start_worker_server
from segscale.tracking import ParentRun, nest_under

STATE = TUNE_STATE
OUTPUTS = ("tune.md", "tune.png", "tuned.yaml", STATE)  # the tuning run's artifacts
MARK = "written by segscale tune"  # signed into tune.md, tuned.yaml and tune.png (_files)
# replaced on a rerun only while unedited (or --force): its texts, and its picture signed alike
TEXTS = ("tune.md", "tuned.yaml", "tune.png")
METRICS = ("dice", "pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")  # tune.md's columns
LEARNT_NOTHING = 0.01  # a baseline's validation Dice under this: no model to scale
WIDE_NOISE = 0.10  # a baselines' Dice spread over this makes "reached the baseline" loose


@dataclass(frozen=True)
class TuneOptions:
    """What `segscale tune` was asked; a rerun with other options is refused (another --out)."""

    workers: int  # K: the workers the tuned config is for
    simulate: bool = False  # K workers' math in one process (train.simulate_workers)
    baseline_runs: int = 2  # R: one-worker runs to train, seeds seed..seed+R-1
    baselines: tuple[str, ...] = ()  # finished one-worker run folders to use instead
    max_trials: int = 10
    max_hours: float | None = None
    min_workers: int = 12  # the thesis' threshold: below it, GreScale's defaults are kept
    patience: int = 3  # early stop: validations in a row under the baseline's curve
    margin: float = 0.05  # early stop: Dice under the baseline's curve, beyond its spread
    method: str = "guideline"  # guideline (the thesis' Fig. 6.3) | optuna (TPE)

    def signature(self) -> dict[str, Any]:
        # what decides; the budget (max_trials, max_hours) may grow on a rerun
        keep = (
            "workers", "simulate", "baseline_runs", "baselines", "min_workers", "method",
            "patience", "margin",
        )  # fmt: skip
        return {k: v for k, v in asdict(self).items() if k in keep} | {
            "baselines": list(self.baselines)
        }


@dataclass
class RunResult:
    """One trained run as the tuner sees it: validation scores at its last validation."""

    run_dir: str
    seed: int
    status: str  # finished | finished_early | diverged | refused | running
    scores: dict[str, float] = field(default_factory=dict)  # val metrics, without "val_"
    curve: dict[str, float] = field(default_factory=dict)  # epoch → val Dice
    epochs: int = 0  # epochs trained
    seconds: float = 0.0
    reason: str = ""


def tune(
    config: Path,
    overrides: list[str] | None,
    options: TuneOptions,
    out: Path,
    progress: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Run the guideline for `options.workers` workers; returns the state (as OUT/tune.json).
    tune.md and tuned.yaml edited since an earlier run wrote them are refused unless `force`.
    Raises SegscaleError for bad input, Preempted when a run was stopped (rerun to continue)."""
    from segscale.config import load_config

    cfg = load_config(config, overrides)
    require_segmentation(cfg, config, "tune")
    if cfg.data.val_split is None:
        raise SegscaleError(
            f"{config}: data.val_split is null; the guideline decides on validation Dice, "
            "so tuning needs a validation split"
        )
    k = options.workers
    if k < 2:
        raise SegscaleError(f"--workers {k}: tuning is for 2 or more workers")
    if options.max_trials < 1:
        raise SegscaleError(f"--max-trials {options.max_trials}: expected at least 1")
    hours = options.max_hours
    if hours is not None and not 0 < hours < math.inf:  # NaN too
        raise SegscaleError(f"--max-hours {hours:g}: expected a finite positive number")
    if not 0 <= options.margin < 1:
        raise SegscaleError(f"--margin {options.margin:g}: expected a Dice margin in [0, 1)")
    given = [Path(b).resolve() for b in options.baselines]
    twice = next((b for i, b in enumerate(given) if b in given[:i]), None)
    if twice is not None:
        raise SegscaleError(f"--baseline {twice}: given twice; its spread would count as none")
    for option, value in (("--min-workers", options.min_workers), ("--patience", options.patience)):
        if value < 1:
            raise SegscaleError(f"{option} {value}: expected at least 1")
    if options.method not in ("guideline", "optuna"):
        raise SegscaleError(f"--method {options.method}: expected guideline or optuna")
    if not options.baselines and options.baseline_runs < 1:
        raise SegscaleError(f"--baseline-runs {options.baseline_runs}: expected at least 1")
    # the baselines' seeds, seed to seed + R - 1, and a validation trial's seed + 1
    runs = max(2, 0 if options.baselines else options.baseline_runs)
    check_seeds(
        cfg.seed, runs, f"seed {cfg.seed}: the baselines' (--baseline-runs) and a check's (+1)"
    )
    seeds: dict[tuple[int, int], Path] = {}
    for b in given:  # copies of one run train identically: a spread of none
        if (b / "config.yaml").is_file():
            key = tuple(load_config(b / "config.yaml").seed_for(k) for k in ("init", "data"))
            if key in seeds:
                raise SegscaleError(
                    f"--baseline {b}: the same seeds as --baseline {seeds[key]} (a copy of one "
                    "run trains identically); give baselines trained with other seeds"
                )
            seeds[key] = b
    baselines = [_given_baseline(cfg, b) for b in given]  # checked before OUT is made
    said: set[str] = set()  # a note on the config is not said again for a trial of the same
    plan(cfg).check(1, said=said)
    if not options.simulate:
        check_workers(cfg, options.workers)  # the trials' workers: before a baseline trains
        start_worker_server()
    out = out.resolve()
    keep_edited(out, STATE, OUTPUTS, TEXTS, MARK, force)
    tuner = _Tuner(cfg, options, out, progress, said)
    return tuner.run(baselines)


class _Tuner:
    def __init__(
        self,
        cfg: RunConfig,
        options: TuneOptions,
        out: Path,
        progress: bool,
        said: set[str],
    ) -> None:
        self.cfg, self.options, self.out, self.progress = cfg, options, out, progress
        self.said = said  # the notes tune has shown: not again for each trial
        self.signature = {"config": cfg.digest(), **options.signature()}
        self._check_defaults()  # before OUT is claimed: a rerun with more epochs may use it
        self.state = job_state(
            out / STATE,
            self.signature,
            {"baselines": [], "trials": [], "seconds": 0.0},
            "tuning",
        )
        self.tracking = ParentRun(
            cfg.tracker_config("mlflow"),
            out,
            f"{cfg.name}-tune",
            {"segscale.tune": str(out)},
            self.state.get("mlflow_run_id"),
        )
        self.search = _OptunaSearch(out, cfg.seed) if options.method == "optuna" else None

    # ---- the whole job

    def run(self, given: list[RunResult]) -> dict[str, Any]:
        """The whole job; `given`: the --baseline runs, already read."""
        try:
            self._baselines(given)
            guide = self._guideline()
            self._sync()
            self._trials(guide)
            self._test()
            self._write_outputs()
            self.tracking.finish(OUTPUTS, "FINISHED")
            if self.state["decision"]["action"] == "refused":
                raise SegscaleError(f"no tuned settings: {self.state['decision']['reason']}")
        except Preempted:
            self.tracking.finish([], "KILLED")
            raise
        return self.state

    # ---- state

    def _save(self) -> None:
        write_atomic(self.out / STATE, json.dumps(self.state, indent=1))

    def _say(self, line: str) -> None:
        if self.progress:
            print(f"[tune] {line}", flush=True)

    # ---- the one-worker baseline

    def _baselines(self, given: list[RunResult]) -> None:
        if given and not self.state["baselines"]:
            self.state["baselines"] = [asdict(b) for b in given]
            self._save()
        for i in range(len(self.state["baselines"]), 0 if given else self.options.baseline_runs):
            self.state["baselines"].append(
                asdict(RunResult(str(self.out / f"baseline-{i + 1}"), self.cfg.seed + i, "running"))
            )
            self._save()
        for i, b in enumerate(self.state["baselines"]):
            if b["status"] != "running":
                continue
            self._say(
                f"baseline {i + 1}/{len(self.state['baselines'])}: one worker, seed {b['seed']}"
            )
            raw = self.cfg.model_dump(mode="json")
            raw["seed"], raw["name"] = b["seed"], f"{self.cfg.name}-baseline-{i + 1}"
            result = self._train(self._finish_config(raw, f"baseline-{i + 1}"), b, workers=1)
            if result.status != "finished":
                raise SegscaleError(
                    f"baseline {i + 1} ({b['run_dir']}) {result.status}: {result.reason or 'no validation'}; "
                    "the one-worker config must train before it can be scaled"
                )
            _learnt_something(b["run_dir"], b["scores"]["dice"])  # before training the next
        curves = [b["scores"] for b in self.state["baselines"]]
        dice = [s["dice"] for s in curves]
        for b, d in zip(self.state["baselines"], dice):
            _learnt_something(b["run_dir"], d)
        if max(dice) - min(dice) > WIDE_NOISE:
            warnings.warn(
                f"the baselines' validation Dice spread over {max(dice) - min(dice):.2f} "
                f"({', '.join(f'{d:.2f}' for d in dice)}): trials within that of the baseline "
                "count as reaching it; train the baselines longer or give more of them",
                stacklevel=2,
            )
        self._say(
            f"baseline: validation Dice {_mean(dice):.4f} (spread {max(dice) - min(dice):.4f}, {len(dice)} runs)"
        )

    def _guideline(self) -> Guideline:
        runs = self.state["baselines"]
        mean = {m: _mean([b["scores"].get(m, math.nan) for b in runs]) for m in METRICS}
        dice = [b["scores"]["dice"] for b in runs]
        return Guideline(
            Scores.of(mean),
            self.options.workers,
            min_workers=self.options.min_workers,
            noise=max(dice) - min(dice),
        )

    # ---- the trials

    def _trials(self, guide: Guideline) -> None:
        trials = self.state["trials"]
        decision = self._next(guide)
        while decision.action not in ("done", "exhausted"):
            running = trials and trials[-1]["status"] == "running"
            if not running:
                best = guide.best(self._as_trials()).settings if trials else None
                # refused trials count too: no endless refusals
                if len(trials) >= self.options.max_trials:
                    reason = f"--max-trials {self.options.max_trials} reached"
                    decision = Decision("budget", best, reason)
                    break
                hours = self.options.max_hours
                if hours is not None and self.state["seconds"] / 3600 >= hours:
                    spent = "spent" if trials else "spent before any trial"
                    decision = Decision("budget", best, f"--max-hours {hours:g} {spent}")
                    break
                trials.append(self._new_trial(len(trials) + 1, decision))
                self._save()
            trial = trials[-1]
            self._say(f"trial {trial['index']}: {trial['action']} ({trial['change']})")
            self._run_trial(trial, guide)
            if self.search is not None:
                self.search.tell_finished(self.state["trials"])
            self._say(f"trial {trial['index']}: {_verdict(trial)}")
            self._track(trial)
            decision = self._next(guide)
        best = guide.best(self._as_trials()) if trials else None
        chosen = next(
            (
                t
                for t in trials
                if best is not None and _settings(t) == best.settings and t["status"] != "refused"
            ),
            None,
        )
        action, reason, settings = decision.action, decision.reason, decision.settings
        refused = [t for t in trials if t["status"] == "refused" and _settings(t) == settings]
        if settings is not None and chosen is None and refused:
            # the settings it ends with never trained: no tuned.yaml that `train` would refuse
            action, settings = "refused", None
            reason += f"; but those settings cannot train this config: {refused[-1]['reason']}"
        elif chosen is not None and not guide.reached(Scores.of(chosen["scores"])):
            reason += (
                f"; the chosen trial (validation Dice {chosen['scores'].get('dice', math.nan):.4f})"
                f" did not reach the baseline ({guide.baseline.dice:.4f})"
            )
        self.state["decision"] = {
            "action": action,
            "reason": reason,
            "settings": asdict(settings) if settings else None,
            "trial": chosen["index"] if chosen else None,
        }
        self._save()
        self._say(f"{action}: {reason}")

    def _next(self, guide: Guideline) -> Decision:
        trials = self.state["trials"]
        if not trials:
            return guide.start(self._initial_settings())
        if trials[-1]["status"] == "running":  # continue it first
            return Decision(trials[-1]["action"], _settings(trials[-1]), "resume")
        done = self._as_trials()
        if self.search is None:
            return guide.next(done)
        # Optuna's trials stop as the guideline's do: the baseline reached, then validated
        last = done[-1]
        if last.action == "validate" or guide.workers < guide.min_workers:
            return guide.next(done)
        if guide.reached(last.scores):
            return Decision("validate", last.settings, "reached the baseline: another seed")
        return Decision("optuna", None, "TPE's next suggestion")

    def _as_trials(self) -> list[Trial]:
        return [
            Trial(
                t["action"],
                _settings(t),
                None if t["status"] == "refused" else Scores.of(t["scores"]),
            )
            for t in self.state["trials"]
        ]

    def _initial_settings(self) -> Settings:
        t = self.cfg.train
        s = t.schedule
        grescale = s.rule == "grescale"
        return Settings(
            lr=t.optimizer.lr,
            warmup_epochs=(
                s.warmup_epochs
                if grescale and s.warmup_epochs is not None
                else GRESCALE_WARMUP_EPOCHS
            ),
            decay_phase=s.decay_phase if grescale and s.decay_phase else GRESCALE_DECAY_PHASE,
            decay_coefficient=(
                s.decay_coefficient
                if grescale and s.decay_coefficient
                else GRESCALE_DECAY_COEFFICIENT
            ),
            optimizer=t.optimizer.name,
        )

    def _new_trial(self, index: int, decision: Decision) -> dict[str, Any]:
        number = None
        if self.search is not None and decision.action in ("defaults", "optuna"):
            number, settings = self.search.ask(self._initial_settings(), decision.settings)
            decision = Decision(decision.action, settings, decision.reason)
        assert decision.settings is not None
        seed = self.cfg.seed + (1 if decision.action == "validate" else 0)
        result = RunResult(str(self.out / f"trial-{index:02d}"), seed, "running")
        # the trial it starts from: the one its settings differ from least (the latest of equals)
        earlier = [_settings(t) for t in self.state["trials"]]
        previous = min(
            reversed(earlier), key=lambda e: _differences(e, decision.settings), default=None
        )
        return {
            "index": index,
            "action": decision.action,
            "reason": decision.reason,
            "settings": asdict(decision.settings),
            "change": _change(previous, decision.settings, decision.action),
            "optuna_number": number,
            **asdict(result),
        }

    def _run_trial(self, trial: dict[str, Any], guide: Guideline) -> None:
        settings = _settings(trial)
        try:
            cfg = self.trial_config(
                settings, trial["seed"], trial["index"], trial["action"] != "validate"
            )
            plan(cfg).check(1 if self.options.simulate else self.options.workers, said=self.said)
        except SegscaleError as e:  # e.g. a warmup grown into the decay phase
            trial.update(status="refused", reason=str(e))
            self._save()
            return
        self._train(cfg, trial, workers=1 if self.options.simulate else self.options.workers)

    def _track(self, trial: dict[str, Any]) -> None:
        """The trial's validation scores on the tuning run; its action and status on its own."""
        scores = {f"trial_val_{m}": v for m, v in trial["scores"].items() if m in METRICS}
        self.tracking.log_metrics(scores, trial["index"])
        tags = {"segscale.tune.action": trial["action"], "segscale.tune.status": trial["status"]}
        self.tracking.tag_child(Path(trial["run_dir"]), tags)

    def _sync(self) -> None:
        if self.search is not None:  # a trial that finished as the tuner stopped
            self.search.tell_finished(self.state["trials"])

    def trial_config(
        self, settings: Settings, seed: int, index: int, early_stop: bool
    ) -> RunConfig:
        """The config of a trial: the base config with `settings` as GreScale on K workers."""
        raw = self._trial_raw(settings, seed, index, early_stop)
        return self._finish_config(raw, f"trial-{index:02d}")

    def _trial_raw(
        self, settings: Settings, seed: int, index: int, early_stop: bool
    ) -> dict[str, Any]:
        raw = self.cfg.model_dump(mode="json")
        for item in settings.overrides():
            apply_override(raw, item)
        if (
            settings.optimizer in NO_MOMENTUM
        ):  # adam reads no momentum: a config giving it is refused
            for key in ("momentum", "nesterov"):
                raw["train"]["optimizer"].pop(key, None)
        schedule = raw["train"]["schedule"]
        for key in (
            "decay",
            "warmup",
            "warmup_steps",
            "decay_epochs",
            "decay_factor",
            "poly_power",
            "min_lr_ratio",
        ):
            schedule.pop(key, None)  # GreScale has its own warmup and decay
        raw["seed"], raw["name"] = seed, f"{self.cfg.name}-trial-{index:02d}"
        raw["workers"] = None
        if self.options.simulate:
            raw["train"]["simulate_workers"] = self.options.workers
        if early_stop:
            raw["train"]["callbacks"] = [*raw["train"]["callbacks"], self._early_stop(settings)]
        return raw

    def _check_defaults(self) -> None:
        """Under --min-workers the tuning is GreScale's defaults alone: settings that cannot
        train this config are refused before any baseline trains (hours, on a real config)."""
        k, least = self.options.workers, self.options.min_workers
        if k >= least:
            return
        raw = self._trial_raw(self._initial_settings(), self.cfg.seed, 1, early_stop=False)
        try:
            cfg = validate(raw, source=f"{self.out.name}/trial-01")
            plan(cfg).check(1 if self.options.simulate else k, said=self.said)
        except SegscaleError as e:
            s = self.cfg.train.schedule
            # the config's own warmup and decay are kept only under GreScale's rule
            ignored = s.rule != "grescale" and any(
                v is not None for v in (s.warmup_epochs, s.warmup_steps, s.decay_phase)
            )
            hint = (
                f"; the config's warmup and decay apply with train.schedule.rule=grescale "
                f"(it is {s.rule})"
                if ignored
                else ""
            )
            raise SegscaleError(
                f"no tuned settings: {k} workers: under {least}, GreScale's defaults are used; "
                f"but those settings cannot train this config: {e}{hint}"
            ) from None

    def _early_stop(self, settings: Settings) -> dict[str, Any]:
        """The baselines' mean validation Dice per epoch, with margin + their spread there."""
        curves = [b["curve"] for b in self.state["baselines"]]
        epochs = sorted(set.intersection(*(set(c) for c in curves)), key=int)
        reference = {int(e): _mean([c[e] for c in curves]) for e in epochs}
        margin = {
            int(e): self.options.margin + max(c[e] for c in curves) - min(c[e] for c in curves)
            for e in epochs
        }
        kwargs = {
            "reference": reference,
            "margin": margin,
            "patience": self.options.patience,
            "after": settings.warmup_epochs,  # never during warmup, when the lr is still climbing
        }
        return {"name": "early_stop", "kwargs": kwargs}

    def _finish_config(self, raw: dict[str, Any], what: str) -> RunConfig:
        parent = self.tracking.run_id()
        if parent and "mlflow_run_id" not in self.state:
            self.state["mlflow_run_id"] = parent
            self._save()
        nest_under(raw, parent)
        return validate(raw, source=f"{self.out.name}/{what}")

    def _train(self, cfg: RunConfig, entry: dict[str, Any], workers: int) -> RunResult:
        run_dir = Path(entry["run_dir"])
        started = has_started(run_dir)
        code = 0
        t0 = time.monotonic()
        # a finished trial too: it must be this config's run, trained on this store's data
        prepare_run_dir(cfg, run_dir, resume=started)
        if not (run_dir / "model.pt").is_file():
            args = ["train", str(run_dir), *(["--resume"] if started else [])]
            if not self.progress:
                args.append("--no-progress")
            code = launch(args, workers)
        seconds = time.monotonic() - t0
        entry["seconds"] = entry.get("seconds", 0.0) + seconds
        self.state["seconds"] += seconds
        if code == DIVERGED_EXIT_CODE:
            entry.update(
                status="diverged",
                scores=dict.fromkeys(METRICS, math.nan),
                reason="the loss diverged",
            )
            entry["curve"] = _read_metrics(run_dir)[1]
        elif code != 0:
            self._save()
            if code == PREEMPTED_EXIT_CODE or code > 128:
                raise Preempted(
                    f"stopped during {run_dir.name}; rerun the same command to continue"
                )
            raise SegscaleError(f"{run_dir.name} failed (exit code {code}); see the messages above")
        else:
            scores, curve, epochs, finished_early = _read_metrics(run_dir)
            entry.update(
                status="finished_early" if finished_early else "finished",
                scores=scores,
                curve=curve,
                epochs=epochs,
                reason=finished_early or "",
            )
        self._save()
        return RunResult(**{k: entry[k] for k in RunResult.__dataclass_fields__})

    # ---- the test split, once

    def _test(self) -> None:
        chosen = self.state["decision"]["trial"]
        settings = self.state["decision"]["settings"]
        picked = [  # the chosen trial, and the validation run of its settings
            t
            for t in self.state["trials"]
            if t["index"] == chosen or (t["action"] == "validate" and t["settings"] == settings)
        ]
        todo = [*self.state["baselines"], *(picked if chosen is not None else [])]
        split = self.cfg.data.test_split
        for entry in todo:
            if entry.get("test") is not None:
                continue
            run_dir = Path(entry["run_dir"])
            out = run_dir / f"evaluation-{split}.json"  # where `segscale evaluate` puts it
            self._say(f"scoring {run_dir.name} on the test split")
            t0 = time.monotonic()
            code = launch(["evaluate", str(run_dir), "--split", split, "--out", str(out)], 1)
            self.state["seconds"] += time.monotonic() - t0
            if code != 0:
                raise SegscaleError(
                    f"evaluating {run_dir.name} on '{split}' failed (exit code {code})"
                )
            dataset = read_record(out, EVALUATION, "evaluation", metrics=True)["dataset"]
            entry["test"] = {m: dataset.get(m) for m in METRICS}
            self._save()

    # ---- outputs

    def _write_outputs(self) -> None:
        from segscale.report import plot_tuning, tuning_table

        decision = self.state["decision"]
        if decision["settings"] is not None:
            settings = Settings(**decision["settings"])
            cfg = self.trial_config(settings, self.cfg.seed, 0, early_stop=False)
            raw = cfg.model_dump(mode="json")
            raw["name"], raw["workers"] = self.cfg.name, self.options.workers
            raw["train"]["simulate_workers"] = None
            raw["tracker"] = [t.model_dump(mode="json") for t in self.cfg.tracker]
            # signed: edited by hand, it is kept on a rerun
            save_config(validate(raw, source="tuned.yaml"), self.out / "tuned.yaml", MARK)
        schedules = {}
        for t in self.state["trials"]:
            if t["status"] == "refused":
                continue
            p = plan(self.trial_config(_settings(t), t["seed"], t["index"], early_stop=False))
            schedules[t["index"]] = p.schedule(self.options.workers)
        plot_tuning(self.state, schedules, self.out / "tune.png", MARK)
        text = tuning_table(self.state, self.cfg.name, self.options.workers, self.options.simulate)
        write_atomic(self.out / "tune.md", signed(f"<!-- {MARK} -->\n{text}", MARK))
        self._say(
            f"wrote {self.out / 'tune.md'}, tune.png{', tuned.yaml' if decision['settings'] else ''}"
        )


# ---- helpers


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _settings(entry: dict[str, Any]) -> Settings:
    return Settings(**entry["settings"])


def _differences(a: Settings, b: Settings) -> int:
    return sum(getattr(a, k) != getattr(b, k) for k in Settings.__dataclass_fields__)


def _change(previous: Settings | None, now: Settings, action: str) -> str:
    """What the action changed, e.g. 'lr 0.01 → 0.005'."""
    if previous is None or action == "validate":
        return (
            "seed + 1"
            if action == "validate"
            else (
                f"lr {now.lr:g}, warmup {now.warmup_epochs:g} ep, decay phase {now.decay_phase:.3g}, "
                f"c {now.decay_coefficient:.3g}, {now.optimizer}"
            )
        )
    names = {
        "lr": "lr",
        "warmup_epochs": "warmup (epochs)",
        "decay_phase": "decay phase",
        "decay_coefficient": "decay coefficient",
        "optimizer": "optimizer",
    }
    parts = []
    for key, name in names.items():
        a, b = getattr(previous, key), getattr(now, key)
        if a != b:
            fmt = (lambda v: v) if isinstance(a, str) else (lambda v: f"{v:.4g}")
            parts.append(f"{name} {fmt(a)} → {fmt(b)}")
    return ", ".join(parts) or "no change"


def _verdict(trial: dict[str, Any]) -> str:
    if trial["status"] == "refused":
        return f"not trained: {trial['reason']}"
    if trial["status"] == "diverged":
        return "diverged"
    line = f"validation Dice {trial['scores'].get('dice', math.nan):.4f}"
    if trial["status"] == "finished_early":
        line += f" (finished early at epoch {trial['epochs']}: under the baseline's curve)"
    return line


def _read_metrics(run_dir: Path) -> tuple[dict[str, float], dict[str, float], int, str | None]:
    """(last validation's metrics, epoch → val Dice, epochs trained, why it finished early)."""
    path = run_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    validated = [r for r in rows if "val_dice" in r]
    if not validated:
        raise SegscaleError(
            f"{run_dir}: no validation in metrics.jsonl; the tuner reads validation Dice"
        )
    last = validated[-1]
    scores = {
        k[4:]: float(v)
        for k, v in last.items()
        if k.startswith("val_") and isinstance(v, int | float)
    }
    curve = {str(r["epoch"]): float(r["val_dice"]) for r in validated}
    return scores, curve, int(rows[-1]["epoch"]), rows[-1].get("finished_early")


def _given_baseline(cfg: RunConfig, run_dir: Path) -> RunResult:
    """A finished one-worker run of the same settings (seed and name aside) as a baseline."""
    from segscale.config import load_config

    run_dir = run_dir.resolve()
    if not (run_dir / "model.pt").is_file() or not (run_dir / "config.yaml").is_file():
        raise SegscaleError(
            f"--baseline {run_dir}: not a finished run folder (no config.yaml or model.pt)"
        )
    theirs = load_config(run_dir / "config.yaml")
    changed = cfg.differing_keys(theirs, ignore=("seed", "name", "workers"))
    if changed:
        raise SegscaleError(
            f"--baseline {run_dir}: trained with other settings ({differ(changed)}); "
            "a baseline is the same config on one worker"
        )
    env = run_dir / "environment.json"
    world = read_record(env, (), "run environment").get("workers", 1) if env.is_file() else 1
    if world != 1 or theirs.train.simulate_workers:
        raise SegscaleError(f"--baseline {run_dir}: trained on {world} workers; a baseline has one")
    scores, curve, epochs, early = _read_metrics(run_dir)
    if early:
        raise SegscaleError(
            f"--baseline {run_dir}: finished early ({early}); a baseline trains to the end"
        )
    _learnt_something(run_dir, scores.get("dice", math.nan))
    return RunResult(str(run_dir), theirs.seed, "finished", scores, curve, epochs)


def _learnt_something(run_dir: Path | str, dice: float) -> None:
    """Refuse a baseline whose validation Dice is under LEARNT_NOTHING (or NaN): there is no
    model to scale and nothing to compare trials with."""
    if not dice >= LEARNT_NOTHING:
        raise SegscaleError(
            f"baseline {run_dir}: validation Dice {dice:.4f}, it learnt nothing; the one-worker "
            "config must train before it can be scaled (more epochs, another lr)"
        )


class _OptunaSearch:
    """`--method optuna`: Optuna's TPE over the settings the guideline tunes, in the tuner process
    only (each trial is its own launched job: no study inside DDP ranks). The study lives in
    OUT/optuna.db, so a rerun continues it. The first trial is the guideline's (GreScale's
    defaults), so both methods start from the same point; pruning is the baseline-curve rule
    both share (segscale.train.EarlyStop). The ranges cover what the guideline's steps reach in
    a few repeats: lr down to 1/32 of the initial, decay coefficient up by 4 × ln 10, warmup up
    by 8 epochs, the decay phase up by 4/14 (at most 0.9), and the optimisers of Steps."""

    def __init__(self, out: Path, seed: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.study = optuna.create_study(
            study_name="segscale-tune",
            storage=f"sqlite:///{out / 'optuna.db'}",
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed),
        )

    def _space(self, initial: Settings) -> dict[str, Any]:
        from segscale.guideline import Steps

        d, s = self.optuna.distributions, Steps()
        return {
            "lr": d.FloatDistribution(initial.lr * s.lr_factor**5, initial.lr, log=True),
            "decay_coefficient": d.FloatDistribution(
                initial.decay_coefficient, initial.decay_coefficient + 4 * s.decay_coefficient
            ),
            "warmup_epochs": d.FloatDistribution(
                initial.warmup_epochs, initial.warmup_epochs + 4 * s.warmup_epochs
            ),
            "decay_phase": d.FloatDistribution(
                initial.decay_phase,
                max(initial.decay_phase, min(0.9, initial.decay_phase + 4 * s.decay_phase)),
            ),
            "optimizer": d.CategoricalDistribution(sorted({*s.optimizers, initial.optimizer})),
        }

    def ask(self, initial: Settings, first: Settings | None) -> tuple[int, Settings]:
        """A new trial's number and settings; `first` (the defaults) is enqueued as the first."""
        if first is not None and not self.study.trials:
            self.study.enqueue_trial(asdict(first))
        trial = self.study.ask(self._space(initial))
        return trial.number, Settings(**trial.params)

    def tell_finished(self, trials: list[dict[str, Any]]) -> None:
        """Tell the study every finished trial it does not know the result of yet."""
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        running = self.optuna.trial.TrialState.RUNNING
        for t in trials:
            number = t.get("optuna_number")
            if number is None or t["status"] == "running" or states.get(number) != running:
                continue
            if t["status"] == "refused":
                self.study.tell(number, state=self.optuna.trial.TrialState.FAIL)
            else:  # a diverged model segments nothing: Dice 0
                dice = t["scores"].get("dice", math.nan)
                self.study.tell(number, 0.0 if math.isnan(dice) else dice)

"""`segscale methods RUN_DIR|REPEAT_DIR`: a methods section in Markdown, written from what the run
recorded (its config, its store's description, environment.json, its evaluation, the repeat's
variability report), and a checklist against the thesis' reproducibility recommendations
(Fig. 5.5) and the training-related items of CLAIM (Mongan et al., Radiology: AI 2020), marking
what is covered and what the authors must add by hand. Nothing is invented: what the record
lacks is named as missing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from segscale._files import EVALUATION, TUNE_STATE, not_a_run, read_record
from segscale.config import RunConfig, load_config
from segscale.engine import check_same_store, check_store_exists
from segscale.errors import SegscaleError
from segscale.imgmed.store import Store
from segscale.repeat import STATE, read_repeat
from segscale.transfer import recorded_source

FIG_5_5 = "thesis Fig. 5.5"
CLAIM = "CLAIM"


def _optional(path: Path, keys: tuple[str, ...], what: str, metrics: bool = False) -> Any:
    """A record segscale wrote, or None when there is none; one that is there but cannot be
    read is an error (a methods section must not say "not recorded" of a damaged record)."""
    return read_record(path, keys, what, metrics) if path.exists() else None


def _record(target: Path) -> dict[str, Any]:
    """What a run folder, or a repeat folder's first run, recorded. Raises SegscaleError for a
    run of another task, an unfinished run or repeat, or a record that cannot be read."""
    target = target.resolve()
    repeat = None
    run_dir = target
    if (target / STATE).exists():
        repeat = read_repeat(target)
        if not repeat.runs:
            raise SegscaleError(f"{target}: a repeat folder with no run yet")
        run_dir = repeat.run_dir(repeat.runs[0])
    if not (run_dir / "config.yaml").is_file():
        raise not_a_run(target, "a `segscale repeat` folder")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.task.name not in ("segmentation", "classification"):  # a plug-in task's metrics
        raise SegscaleError(
            f"{run_dir}: a '{cfg.task.name}' run; methods describes segmentation and "
            "classification runs"
        )
    if not (run_dir / "model.pt").is_file():
        raise SegscaleError(
            f"{run_dir}: has not finished (no model.pt); finish it (`segscale train "
            f"{run_dir / 'config.yaml'} --run-dir {run_dir} --resume`) before describing it"
        )
    variability = None
    if repeat is not None:
        repeat.require_finished()
        variability = read_record(
            target / "variability.json", ("runs", "vary", "metrics"), "repeat report", True
        )
    check_store_exists(run_dir, cfg)
    store = Store.open(cfg.data.store)  # read once; a damaged one is one line
    # it describes the store as the run used it: one prepared again since is refused
    check_same_store(run_dir, store)
    store_meta = store.meta
    source = store_meta.get("source")
    try:  # the raw dataset's own description: the user's file, read if it can be
        dataset = json.loads((Path(source) / "dataset.json").read_text()) if source else None
    except (OSError, ValueError):
        dataset = None
    keys = EVALUATION if cfg.task.name == "segmentation" else ("split", "dataset", "slices")
    evaluation = _optional(
        run_dir / f"evaluation-{cfg.data.test_split}.json", keys, "evaluation", True
    )
    tuning = None
    if (run_dir.parent / TUNE_STATE).exists():  # a tuner's trial or baseline
        tuning = read_record(run_dir.parent / TUNE_STATE, ("trials",), "tuner state")
    return {
        "target": target,
        "run_dir": run_dir,
        "cfg": cfg,
        "store": store_meta,
        "dataset": dataset if isinstance(dataset, dict) else {},
        "environment": _optional(run_dir / "environment.json", (), "run environment") or {},
        "evaluation": evaluation,
        "variability": variability,
        "tuning": tuning,
    }


# the first line of what `segscale methods` writes (hidden in rendered Markdown): a second run
# replaces its own file, and nothing else without --force
MARK = "<!-- written by segscale methods"


def _initialisation(cfg: RunConfig, run_dir: Path) -> str:
    """How the network's weights started: random (its init seed), or model.pretrained with
    what RUN_DIR/pretrained.json says was loaded, and the fine-tuning settings."""
    random = f"random initialisation (init seed {cfg.seed_for('init')})"
    source, report = recorded_source(run_dir, cfg.model.pretrained)
    if source is None:
        return random
    text = f"fine-tuned from {source}"  # a zoo entry with its version; a local path by its name
    if report is not None:
        adapted, skipped = len(report.get("adapted", [])), len(report.get("skipped", []))
        text += (
            f" ({100 * report['fraction']:.1f}% of the weights from it: {len(report['loaded'])} "
            f"tensors loaded, {adapted} adapted to other input channels, {skipped} of other "
            f"shapes left as initialised)"
        )
    finetune = cfg.train.finetune
    if finetune.freeze_encoder_epochs:
        text += f"; the encoder frozen for the first {finetune.freeze_encoder_epochs} epoch(s)"
    if finetune.encoder_lr_scale != 1:
        text += f"; the encoder's lr × {finetune.encoder_lr_scale:g}"
    whole = report is not None and report["fraction"] >= 1
    return text if whole else f"{text}; the rest {random}"


def methods(target: Path) -> str:
    """The methods section and its checklist, as Markdown. Raises SegscaleError when `target` is
    neither a run folder nor a repeat folder, or its store cannot be read."""
    r = _record(target)
    cfg: RunConfig = r["cfg"]
    store, dataset, env = r["store"], r["dataset"], r["environment"]
    t, s, pre = cfg.train, cfg.train.schedule, store["preprocessing"]
    splits = {k: len(v) for k, v in store.get("splits", {}).items()}
    slices = {k: sum(c["count"] for c in store.get("cases", []) if c["split"] == k) for k in splits}
    total = sum(splits.values())
    checks: list[tuple[str, str, bool, str]] = []  # (source, item, covered, what to add)

    lines = [f"{MARK} from {target} -->", "# Methods", "", "## Data", ""]
    modality = ", ".join(store.get("channel_names", [])) or "not recorded"
    described = bool(dataset.get("description"))
    lines.append(
        f"Dataset: {store.get('name', 'unnamed')} "
        f"({dataset.get('description', 'no description recorded').rstrip('.')}). "
        f"Imaging: {modality}; {total} cases. Source: {dataset.get('reference', 'not recorded')}; "
        f"licence: {dataset.get('licence', 'not recorded')}."
    )
    checks.append(
        (
            FIG_5_5,
            "dataset: acquisition/modality, dimensions, sample size, link",
            described and "reference" in dataset,
            "a download link or citation of the dataset, the scanner and acquisition protocol",
        )
    )
    size = (
        f"resampled to {pre['spacing']} mm pixels centred in {pre['size']}²"
        if pre.get("spacing")
        else f"resized to {pre['size']}×{pre['size']}"
    )
    selection = (
        f"{pre['slices']} evenly spaced slices per case" if pre.get("slices")
        else f"the slices within {pre['foreground_margin']} of the foreground" if pre.get("foreground_margin") is not None
        else "every slice"
    )  # fmt: skip
    lines.append(
        f"Preprocessing (segscale ImgMed): 2D slices along axis {pre['axis']} ({selection}), "
        f"{size}, intensity normalisation {pre['normalize']}"
        + (
            f" after clipping to the {pre['clip'][0]}–{pre['clip'][1]} percentiles"
            if pre.get("clip")
            else ""
        )
        + (" inside the body" if pre.get("nonzero") else "")
        + f"; {sum(slices.values())} slices in all."
    )
    ratio = ", ".join(f"{k} {v} cases ({slices.get(k, 0)} slices)" for k, v in splits.items())
    lines.append(
        f"Split by case (seed {store.get('seed')}): {ratio}; fractions: validation "
        f"{store.get('val_fraction')}, test {store.get('test_fraction')}."
        + (
            f" For this run the training and validation cases were dealt into "
            f"{cfg.data.folds} folds (split seed {cfg.data.split_seed or 0}), fold "
            f"{cfg.data.fold} validating; the test cases unchanged."
            if cfg.data.folds is not None
            else f" For this run the training and validation cases were drawn again from their "
            f"pool (split seed {cfg.data.split_seed}, as many validation cases); the test "
            "cases unchanged."
            if cfg.data.split_seed is not None
            else ""
        )
    )
    checks.append((FIG_5_5, "train/validation/test ratios", bool(splits), "the split"))
    aug = cfg.data.augment
    if aug.enabled:
        parts = [
            f"rotation ±{aug.rotation}°",
            f"zoom {aug.zoom[0]}–{aug.zoom[1]}",
            f"translation ±{aug.translation:g} of the size",
        ]
        parts += ["horizontal flips"] * aug.flip + (
            [f"intensity ±{aug.intensity:g}"] if aug.intensity else []
        )
        per_epoch = (
            t.steps_per_epoch * t.batch_size * max(1, t.simulate_workers or 1)
            if t.steps_per_epoch
            else slices.get(cfg.data.train_split, 0)
        )
        lines.append(
            f"Augmentation on the fly, a new random draw per slice and epoch ({', '.join(parts)}): "
            f"{per_epoch} augmented training slices per epoch, {per_epoch * t.epochs} over training."
        )
    else:
        lines.append("No data augmentation.")
    checks.append((FIG_5_5, "augmentation and the final sample count", True, ""))

    lines += ["", "## Model and training", ""]
    kwargs = ", ".join(f"{k}={v}" for k, v in cfg.model.kwargs.items()) or "defaults"
    lines.append(
        f"Network: {cfg.model.name} ({kwargs}), {len(store['labels'])} output classes ({', '.join(store['labels'].values())})."
        if cfg.task.name == "segmentation"
        else f"Network: {cfg.model.name} ({kwargs}), a slice classifier (task "
        f"{cfg.task.name}, {cfg.task.kwargs or 'any foreground class'}: whether a slice shows "
        "it)."
    )
    lines.append(f"Initialisation: {_initialisation(cfg, r['run_dir'])}.")
    checks.append((CLAIM, "model description and initialisation of its parameters", True, ""))
    workers = env.get("workers", cfg.workers or 1)
    opt = t.optimizer
    hyper = [f"lr {opt.lr:g} for a batch of {s.reference_batch or t.batch_size}"]
    if opt.name == "sgd":
        hyper.append(f"momentum {opt.momentum}" + (" (Nesterov)" if opt.nesterov else ""))
    hyper += [f"weight decay {opt.weight_decay:g}"] + [f"{k} {v}" for k, v in opt.kwargs.items()]
    lines.append(
        f"Optimiser: {opt.name} ({', '.join(hyper)}); loss {t.loss.name}; {t.epochs} epoch{'s' if t.epochs != 1 else ''}; "
        f"batch {t.batch_size} per worker × {workers} worker(s) = global batch "
        f"{env.get('global_batch', t.batch_size * workers)}"
        + (
            f" ({t.simulate_workers} workers simulated in one process)"
            if t.simulate_workers
            else ""
        )
        + (f"; {t.steps_per_epoch} steps per epoch" if t.steps_per_epoch else "")
        + (f"; gradient clipping at norm {t.grad_clip}" if t.grad_clip else "")
        + (f"; mixed precision {amp}" if (amp := env.get("amp", t.amp)) != "none" else "")
        + "."
    )
    if s.rule == "grescale":
        sched = (
            f"GreScale (linear lr scaling to the global batch, gradual warmup over "
            f"{s.warmup_epochs if s.warmup_epochs is not None else 5:g} epochs, decay phase "
            f"{s.decay_phase or 3 / 7:.3g} of the epochs after a 5-epoch warmup, decay coefficient "
            f"{s.decay_coefficient or 4.605:.3g})"
        )
    else:
        warm = (
            f"{s.warmup} warmup over {s.warmup_epochs:g} epochs"
            if s.warmup_epochs
            else f"{s.warmup} warmup over {s.warmup_steps} steps"
            if s.warmup_steps
            else "no warmup"
        )
        sched = f"{s.scaling} lr scaling to the global batch, {warm}, {s.decay} decay"
    peak = env.get("peak_lr")
    lines.append(
        f"Learning-rate schedule: {sched}" + (f"; peak lr {peak:.4g}" if peak else "") + "."
    )
    checks.append((FIG_5_5, "optimiser and every hyperparameter", True, ""))
    if cfg.data.val_split is None:
        lines.append(
            "No validation during training (data.val_split: null): the final model is the last "
            "epoch's weights (model.pt), after a fixed number of epochs."
        )
    else:
        lines.append(
            f"Validation every {t.val_every} epoch(s) on the validation split; the final model is "
            "the last epoch's weights (model.pt; the best validation checkpoint is kept as "
            "best.pt)."
        )
    checks.append(
        (CLAIM, "training details: stopping criterion and selection of the final model", True, "")
    )
    if r["tuning"] is not None:
        tuning = r["tuning"]
        lines.append(
            f"Hyperparameters tuned with `segscale tune` (the GreScale scaling guideline, thesis Fig. "
            f"6.3): {len(tuning.get('trials', []))} trials against {len(tuning.get('baselines', []))} "
            "one-worker baseline runs, decisions on the validation split only."
        )
    checks.append(
        (
            FIG_5_5,
            "the tuning method",
            r["tuning"] is not None,
            "how the hyperparameters were chosen (e.g. manual, grid search, `segscale tune`)",
        )
    )

    lines += ["", "## Runs and variability", ""]
    v = r["variability"]
    if v is not None:
        d = v["metrics"].get("dice") or {
            k: math.nan for k in ("mean", "sd", "ci_low", "ci_high", "min", "max")
        }
        what = {
            "seed": "every random seed",
            "init": "the weight initialisation only",
            "order": "the data order only",
            "split": "only which training cases validate (the test cases fixed)",
            "fold": "the validation fold of a k-fold cross-validation (the test cases fixed)",
        }[v["vary"]]
        lines.append(
            f"The setting was trained {v['runs']} times, varying {what}, everything else frozen; "
            f"test Dice {d['mean']:.4f} ± {d['sd']:.4f} (mean ± SD; 95% CI of the mean "
            f"[{d['ci_low']:.4f}, {d['ci_high']:.4f}]; range {d['min']:.4f}–{d['max']:.4f})."
        )
        a = v.get("agreement")
        if a and a["icc"] != a["icc"]:
            lines.append("Every run gave every test case the same Dice: no spread between runs.")
        elif a:
            lines.append(
                f"Agreement between runs on per-case Dice: ICC(A,1) = {a['icc']:.3f} (95% CI "
                f"{a['ci_low']:.3f}–{a['ci_high']:.3f}; two-way random effects, absolute "
                f"agreement, single measurement); runs effect F = {a['f_runs']:.3g}, p = {a['p_runs']:.3g}."
            )
        cv = v.get("cross_validation")
        if cv and cv.get("dice"):
            c = cv["dice"]
            lines.append(
                f"{v['runs']}-fold cross-validation: each of the {c['n']} training cases scored "
                f"by the run whose fold held it out, Dice {c['mean']:.4f} ± {c['sd']:.4f} (mean ± "
                "SD over cases)."
            )
    else:
        lines.append("One run: no spread over runs is reported.")
    checks.append(
        (
            FIG_5_5,
            "several runs per setting, their number and spread",
            v is not None and v["runs"] >= 2,
            "repeated runs: `segscale repeat CONFIG --runs 5`"
            if cfg.task.name == "segmentation"  # repeat scores segmentations
            else "repeated runs (train the config with other seeds) and their spread",
        )
    )
    deterministic = (
        "deterministic kernels and seeded randomness"
        if t.deterministic
        else "non-deterministic kernels allowed"
    )
    lines.append(f"Determinism: {deterministic}.")

    lines += ["", "## Evaluation", ""]
    e = r["evaluation"]
    if e is not None and r["variability"] is not None:  # a repeat: the first run stands for them
        lines.append(f"The first run ({r['run_dir'].name}) in detail:")
    if e is not None and cfg.task.name == "classification":
        ds = e["dataset"]
        lines.append(
            f"On the {e['split']} split ({e['slices']} slices), per slice: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in ds.items())
            + "; the confusion matrix is in the evaluation record."
        )
        enough = len(ds) >= 3
    elif e is not None:
        ds = e["dataset"]
        names = [
            k
            for k in (
                "dice",
                "mean_iou",
                "pixel_accuracy",
                "mean_accuracy",
                "fw_iou",
                "sensitivity",
                "specificity",
            )
            if k in ds
        ]
        cs = e.get("case_summary", {})
        lines.append(
            f"On the {e['split']} split ({len(e['cases'])} cases), SegEval: "
            + ", ".join(f"{k} {ds[k]:.4f}" for k in names)
            + "".join(_distance(k, cs[k]) for k in ("hd95", "assd") if k in cs)
            + ". Dice: foreground classes only; a class absent from both masks is excluded (nnU-Net's convention)."
        )
        enough = len(names) + sum(k in cs for k in ("hd95", "assd")) >= 3
    else:
        lines.append(
            f"No evaluation on the {cfg.data.test_split} split was found (`segscale evaluate`)."
        )
        enough = False
    checks.append(
        (
            FIG_5_5,
            "at least three evaluation metrics",
            enough,
            "an evaluation on the test split: `segscale evaluate`",
        )
    )

    lines += ["", "## Hardware and software", ""]
    if env:
        gpus = ", ".join(env.get("gpus", [])) or f"CPU only ({env.get('cpu_count', '?')} cores)"
        lines.append(
            f"Trained on {gpus}; {env.get('platform', 'platform not recorded')}; Python "
            f"{env.get('python', '?')}, PyTorch {env.get('torch', '?')}"
            + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
            + f", segscale {env.get('segscale', '?')} (torch.distributed, "
            f"{t.strategy.name} strategy)."
        )
    else:
        lines.append(
            "The hardware and software were not recorded (the run has no environment.json)."
        )
    checks.append(
        (
            FIG_5_5,
            "infrastructure: hardware and software",
            bool(env),
            "the hardware (GPU model, memory) and software versions",
        )
    )
    checks.append(
        (
            FIG_5_5,
            "a containerised environment",
            False,
            "the container image the runs used (its name and digest)",
        )
    )
    checks.append(
        (
            CLAIM,
            "ethics approval, data use agreements, patient consent",
            False,
            "your institution's approval and the data's terms",
        )
    )
    checks.append(
        (
            CLAIM,
            "the code and trained model's availability",
            False,
            "where the code, config and weights are published"
            + (" (e.g. `segscale zoo publish`)" if cfg.task.name == "segmentation" else ""),
        )
    )

    lines += [
        "",
        "## Checklist",
        "",
        "| source | item | covered | to add by hand |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {src} | {item} | {'yes' if ok else 'no'} | {'' if ok else add} |"
        for src, item, ok, add in checks
    ]
    return "\n".join(lines) + "\n"


def _distance(name: str, summary: dict[str, Any]) -> str:
    """'; HD95 4.12 ± 1.30 mm (per case)' from a metric's case summary; a distance no case
    defines (an empty prediction or reference in every case) is said to be undefined, as
    `compare` says it, not written as nan."""
    mean = summary.get("mean")
    if mean is None or not math.isfinite(mean):
        return f"; {name.upper()} undefined (no case with both masks non-empty)"
    sd = summary.get("sd")
    spread = f" ± {sd:.2f}" if summary.get("n", 0) > 1 and sd is not None else ""
    return f"; {name.upper()} {mean:.2f}{spread} mm (per case)"

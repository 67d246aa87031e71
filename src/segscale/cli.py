"""The `segscale` command: thin wrappers over the API. User errors print one line, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from segscale._files import (
    REPEAT_STATE,
    file_sha256,
    from_json,
    is_zoo_entry,
    not_a_run,
    to_json,
    write_atomic,
)
from segscale.errors import (
    PREEMPTED_EXIT_CODE,
    SEED_MAX,
    USER_ERROR_EXIT_CODE,
    Preempted,
    SegscaleError,
    expected_by,
    shown,
)

if TYPE_CHECKING:
    from segscale.config import RunConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # help texts are plain: [--x] and [default: ...] must show, not be read as rich markup
    rich_markup_mode=None,
    help="Train CNN segmentation models for medical images on one or many workers, from one config file.",
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Config overrides: key.sub=value ..., or ~key.sub to remove a key the file sets.",
        show_default=False,
    ),
]


def _numbers(text: str | None, n: int, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise SegscaleError(f"{option} '{text}': expected {n} comma-separated numbers")
    return values


@app.command("prepare")
def prepare_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="Decathlon/nnU-Net folder (dataset.json), a DICOM folder (images/<case>/ series + "
            "masks/<case>.nii.gz) or a 2D folder (images/ + masks/ pictures)."
        ),
    ],
    output: Annotated[Path, typer.Argument(help="Prepared store to write.")],
    size: Annotated[int, typer.Option(help="Resize slices to SIZE × SIZE.")] = 256,
    channels: Annotated[
        str | None,
        typer.Option(
            help="Channels of 4D images to keep, by index or by dataset.json name: '1', '0,1', 'T1gd'."
        ),
    ] = None,
    axis: Annotated[
        int, typer.Option(help="Slicing axis of the volumes (0, 1, 2).", min=0, max=2)
    ] = 2,
    slices: Annotated[
        int | None, typer.Option(help="N evenly spaced slices per case (default: all).")
    ] = None,
    normalize: Annotated[
        str, typer.Option(help="zscore | minmax | none (per case, per channel).")
    ] = "zscore",
    val: Annotated[float, typer.Option(help="Fraction of cases for validation.")] = 0.1,
    test: Annotated[float, typer.Option(help="Fraction of cases for testing.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the case split.", min=0, max=SEED_MAX)] = 0,
    label_map: Annotated[
        str | None, typer.Option(help="2D masks: raw value → class, e.g. '0:1,255:0'.")
    ] = None,
    clip: Annotated[
        str | None,
        typer.Option(help="Clip intensities to these percentiles first, e.g. '0.5,99.5'."),
    ] = None,
    nonzero: Annotated[
        bool, typer.Option(help="Normalise with statistics of the nonzero voxels (the body) only.")
    ] = False,
    foreground_margin: Annotated[
        int | None, typer.Option(help="Keep only slices within this many of one with foreground.")
    ] = None,
    spacing: Annotated[
        float | None,
        typer.Option(
            help="Resample slices to this in-plane spacing (mm) and centre them in SIZE × SIZE "
            "(cropped or padded), instead of stretching each to SIZE."
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(help="Processes preparing cases in parallel (default: the cores).", min=1),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace a store made otherwise (by augment, or from another dataset)."
        ),
    ] = False,
) -> None:
    """Slice, resize and normalise a raw dataset into a prepared store, split by case; in parallel,
    resuming an interrupted run."""
    import os

    from segscale.imgmed import Preprocessing, prepare
    from segscale.imgmed.prepare import parse_label_map
    from segscale.imgmed.sources import channel_indices
    from segscale.imgmed.transforms import MAX_SIZE

    if not 8 <= size <= MAX_SIZE:  # more: a slice no memory holds (Preprocessing says why)
        raise SegscaleError(f"--size {size}: expected 8 to {MAX_SIZE} pixels a side")
    if axis not in (0, 1, 2):
        raise SegscaleError(f"--axis {axis}: expected 0, 1 or 2")
    if normalize not in ("zscore", "minmax", "none"):
        raise SegscaleError(f"--normalize {normalize}: expected zscore, minmax or none")
    chans = channel_indices(source, channels.split(",")) if channels is not None else None
    from segscale._files import not_a_record

    not_a_record(output, "OUTPUT", store_ok=True)  # a store, but not inside one or a run's records
    prep = Preprocessing(
        size=size,
        axis=axis,
        channels=chans,
        slices=slices,
        normalize=normalize,
        clip=_numbers(clip, 2, "--clip"),  # type: ignore[arg-type]
        nonzero=nonzero,
        foreground_margin=foreground_margin,
        spacing=spacing,
    )
    path, written = prepare(
        source,
        output,
        prep,
        val_fraction=val,
        test_fraction=test,
        seed=seed,
        label_map=parse_label_map(label_map),
        jobs=jobs or os.cpu_count() or 1,
        force=force,
    )
    meta = json.loads((path / "meta.json").read_text())
    counts = {s: len(v) for s, v in meta["splits"].items()}
    state = "wrote" if written else "up to date:"
    typer.echo(f"{state} {path} ({sum(c['count'] for c in meta['cases'])} slices; cases {counts})")


def _load(config: Path, overrides: list[str] | None):
    from segscale.config import load_config

    return load_config(config, overrides or [])


@app.command("plan")
def plan_cmd(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Resolve and check every component of a run, without starting it."""
    from segscale.engine import plan

    cfg = _load(config, overrides)
    p = plan(cfg)
    p.check(cfg.workers or 1)  # what `train` checks before launch: a real batch through it all
    described = p.describe()
    if as_json:
        typer.echo(json.dumps(described, indent=1))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    # paths and values are text, not markup: a '[' in them would be read as a style
    tree = Tree(f"[bold]{escape(str(config))}[/bold]: every part resolved and checked")
    for section, parts in described.items():
        branch = tree.add(f"[bold]{section.replace('_', ' ')}[/bold]")
        for name, p in parts.items():
            mark = "[green]extensible[/green]" if p["extensible"] else "[dim]fixed[/dim]"
            source = f" ({escape(str(p['source']))})" if "source" in p else ""
            fills = escape(str(p["fills"]))
            node = branch.add(f"{name.replace('_', ' ')} [{mark}]: {fills}{source}")
            for key, value in p["params"].items():
                if value not in (None, {}, []):
                    node.add(f"[dim]{key}[/dim] = {escape(str(value))}")
    Console().print(tree)


@app.command("train")
def train_cmd(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Overrides = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes on this node (GPUs, or CPU processes) [default: the config's "
            "workers, else 1]",
            show_default=False,
            min=1,
        ),
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<name>).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the run folder's latest checkpoint.")
    ] = False,
    nodes: Annotated[
        int, typer.Option(help="Number of nodes (multi-node: run this on each).", min=1)
    ] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank (0..nodes-1).", min=0)] = 0,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT of the rendezvous, for --nodes > 1.")
    ] = None,
    max_restarts: Annotated[
        int, typer.Option(help="Restarts of failed workers by the elastic agent.", min=0)
    ] = 0,
    simulate_workers: Annotated[
        int | None,
        typer.Option(
            help="Run the math of K synchronous workers in this one process (the same as "
            "train.simulate_workers=K; add train.simulate_fused=true for one pass per step).",
            metavar="K",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train a model: one process, or N through torch.distributed.run (DDP)."""
    from segscale.launch import check_nodes, launch, start_worker_server

    if simulate_workers is not None:  # an override, so the run folder's config records it
        overrides = [*(overrides or []), f"train.simulate_workers={simulate_workers}"]

    check_nodes(nodes, node_rank, rdzv_endpoint)  # before the run folder is written
    if (workers or 1) > 1 or nodes > 1:
        start_worker_server()  # its imports run on another core while the run is checked
    from segscale.engine import check_run_dir, plan, prepare_run_dir

    cfg = _load(config, overrides)
    p = plan(cfg)
    workers = workers or cfg.workers or 1
    p.check(workers)
    run_dir = (run_dir or Path("runs") / cfg.name).resolve()
    check_run_dir(run_dir)
    if resume and not (run_dir / "checkpoints").is_dir():
        typer.echo(
            f"--resume: {run_dir} holds no checkpoint yet; training from the start", err=True
        )
    prepare_run_dir(cfg, run_dir, resume)
    if resume and (run_dir / "model.pt").is_file():
        typer.echo(f"{run_dir}: finished already (model.pt); nothing to train")
        return
    if resume:
        from segscale.checkpoint import check_world_size, resume_point

        point = resume_point(run_dir)
        if point:  # before the workers start, as each would refuse it
            check_world_size(run_dir, *point, workers * nodes, f": use --workers {point[1]}")
        _say_rescaled(run_dir, cfg, workers * (cfg.train.simulate_workers or 1))
    args = ["train", str(run_dir), *(["--resume"] if resume else [])]
    code = launch(
        args,
        workers,
        nodes=nodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        max_restarts=max_restarts,
    )
    if code != 0:
        raise typer.Exit(code)
    typer.echo(f"trained: {run_dir}")


@app.command("tune")
def tune_cmd(
    config: Annotated[Path, typer.Argument(help="A config that trains well on one worker.")],
    overrides: Overrides = None,
    workers: Annotated[int, typer.Option(help="K: the workers to tune for.", min=2)] = ...,
    simulate: Annotated[
        bool,
        typer.Option(
            help="Train each trial as K workers' math in one process (train.simulate_workers), "
            "so K = 12-18 can be tuned on one machine and the result used on K real workers."
        ),
    ] = False,
    baseline: Annotated[
        list[Path] | None,
        typer.Option(help="A finished one-worker run of this config to reuse (repeatable)."),
    ] = None,
    baseline_runs: Annotated[
        int, typer.Option(help="One-worker runs to train (seeds seed, seed+1, ...).", min=1)
    ] = 2,
    max_trials: Annotated[int, typer.Option(help="At most this many trials.", min=1)] = 10,
    max_hours: Annotated[
        float | None, typer.Option(help="Start no trial after this many hours of training.")
    ] = None,
    min_workers: Annotated[
        int,
        typer.Option(help="Below this many workers GreScale's defaults are kept (the thesis: 12)."),
    ] = 12,
    patience: Annotated[
        int,
        typer.Option(
            help="Finish a trial early after this many validations under the baseline.", min=1
        ),
    ] = 3,
    margin: Annotated[
        float, typer.Option(help="...by more than this much Dice plus the baseline's spread.")
    ] = 0.05,
    method: Annotated[
        str,
        typer.Option(
            help="guideline: the thesis' flowchart (Fig. 6.3); optuna: TPE over the same "
            "settings, with the same budget and early stopping."
        ),
    ] = "guideline",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: runs/<name>-tune-K).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace tune.md and tuned.yaml in --out edited by hand since it was written.",
        ),
    ] = False,
) -> None:
    """Tune GreScale for K workers with the thesis' guideline: one-worker baseline, then trials
    until one matches it; writes tune.md, tune.png and tuned.yaml. Rerun to continue after a stop."""
    from segscale.tune import TuneOptions, tune

    options = TuneOptions(
        workers=workers,
        simulate=simulate,
        baseline_runs=baseline_runs,
        baselines=tuple(str(b.resolve()) for b in baseline or ()),
        max_trials=max_trials,
        max_hours=max_hours,
        min_workers=min_workers,
        patience=patience,
        margin=margin,
        method=method,
    )
    if out is None:
        out = Path("runs") / f"{_load(config, overrides).name}-tune-{workers}"
    state = tune(config, overrides, options, out, force=force)
    decision = state["decision"]
    chosen = f"trial {decision['trial']}" if decision["trial"] else "no trial"
    typer.echo(
        f"{decision['action']}: {decision['reason']}; chosen: {chosen}; see {out / 'tune.md'}"
    )


@app.command("repeat")
def repeat_cmd(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Overrides = None,
    runs: Annotated[int, typer.Option(help="How many runs.", min=2)] = 5,
    vary: Annotated[
        str,
        typer.Option(
            help="seed: every seed differs; init: only the weight init (init_seed); order: only "
            "the data order, augmentation and dropout (data_seed); split: only which training "
            "cases validate (data.split_seed), the test split fixed; fold: k-fold "
            "cross-validation with k = --runs (data.folds, data.fold), each training case "
            "scored by the run that held it out."
        ),
    ] = "seed",
    workers: Annotated[int, typer.Option(help="Workers per run.", min=1)] = 1,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: runs/<name>-repeat).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace variability.md in --out edited by hand since it was written."
        ),
    ] = False,
) -> None:
    """Train one config N times, one source of randomness varied, test each run, and report the
    spread: per metric mean, SD, 95% CI, min/max; per case; ICC(A,1) between runs. Resumable."""
    cfg = _load(config, overrides)  # a bad config refused before torch is imported
    out = Path("runs") / f"{cfg.name}-repeat" if out is None else out
    from segscale.repeat import RepeatOptions, repeat

    options = RepeatOptions(runs, vary, workers)
    report = repeat(config, overrides, options, out, force=force, loaded=cfg)
    dice = report["metrics"].get("dice")
    line = (
        f"{report['split']} Dice {dice['mean']:.4f} ± {dice['sd']:.4f} (SD over {report['runs']} runs)"
        if dice
        else f"{report['split']} Dice undefined in some run"
    )
    a = report["agreement"]
    if a is not None and a["icc"] == a["icc"]:
        line += f"; ICC(A,1) {a['icc']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
    elif a is not None:
        line += "; no spread between runs (ICC undefined)"
    typer.echo(f"{line}; see {out / 'variability.md'}")


@app.command("compare")
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="A: a run folder or a `segscale repeat` folder.")],
    b: Annotated[Path, typer.Argument(help="B: a run or repeat folder, the same cases scored.")],
    split: Annotated[str, typer.Option(help="The split both were scored on.")] = "test",
    out: Annotated[
        Path,
        typer.Option(help="Writes OUT.md and OUT.json (replacing only an earlier comparison)."),
    ] = Path("comparison"),
) -> None:
    """B against A: each metric with its spread over runs, and paired tests (t, Wilcoxon) on
    per-case Dice; B is said to beat A only when both tests say so."""
    for folder in (a, b):
        _a_folder(folder, "a `segscale repeat` folder")
    from segscale.compare import compare, comparison_files, write_comparison

    md, js = comparison_files(out)
    result = compare(a, b, split)
    write_comparison(result, md, js)
    t = result["paired"]
    if t is not None:
        typer.echo(
            f"per-case Dice B − A: {t['mean_difference']:+.4f} [{t['ci_low']:+.4f}, "
            f"{t['ci_high']:+.4f}] over {t['n']} cases; t p = {t['p_t']:.3g}, "
            f"Wilcoxon p = {t['p_wilcoxon']:.3g}"
        )
    typer.echo(f"{result['verdict']}; wrote {md}, {js}")


@app.command("methods")
def methods_cmd(
    target: Annotated[Path, typer.Argument(help="A run folder or a `segscale repeat` folder.")],
    out: Annotated[Path, typer.Option(help="The Markdown file to write.")] = Path("methods.md"),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out file it did not write.")
    ] = False,
) -> None:
    """A methods section written from what the run recorded, with a checklist against the
    thesis' Fig. 5.5 and CLAIM's training items: what is covered, what to add by hand."""
    from segscale._files import output_file, signed

    _a_folder(target, "a `segscale repeat` folder")
    from segscale.methods import MARK, methods

    out = output_file(out, "--out", overwrite=force, own=MARK, signed=True)
    text = methods(target)
    write_atomic(out, signed(text, MARK))  # edited by hand, it is replaced only with --force
    missing = text.count("| no |")
    typer.echo(f"wrote {out}; {missing} checklist item(s) to add by hand")


@app.command("stop")
def stop_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The folder of a running training.")],
    now: Annotated[
        bool, typer.Option("--now", help="Stop at once, without a new checkpoint.")
    ] = False,
) -> None:
    """Stop a running training from any shell that sees its run folder: at its next check
    (train.check_every: the end of this step on CPU, within 10 steps on GPUs), with a
    checkpoint (continue with --resume); --now: at once, from the last checkpoint."""
    from segscale._files import RUN_LOCK, lock_holder, write_atomic
    from segscale.errors import STOP_FILE

    run_dir = run_dir.resolve()
    if not (run_dir / "config.yaml").is_file():
        raise not_a_run(run_dir)
    if is_zoo_entry(run_dir):
        raise SegscaleError(f"{run_dir}: a zoo entry (a published model); nothing trains there")
    if (run_dir / "model.pt").is_file():
        raise SegscaleError(f"{run_dir}: the run has finished; there is nothing to stop")
    try:
        running = lock_holder(run_dir / RUN_LOCK) is not None
    except OSError:  # a file system without flock: the request is left for a run to find
        running = True
    if not running:
        raise SegscaleError(
            f"{run_dir}: no training is running in it (a starting one takes its lock within "
            "seconds; ask again then); nothing to stop"
        )
    write_atomic(run_dir / STOP_FILE, "now\n" if now else "graceful\n")
    when = "at once" if now else "at its next check (train.check_every steps), after a checkpoint"
    typer.echo(f"asked {run_dir.name} to stop {when}; continue it with --resume")


@app.command("ui")
def ui_cmd(
    runs_dir: Annotated[
        Path, typer.Argument(help="The folder that holds the runs and their mlflow.db.")
    ] = Path("runs"),
    port: Annotated[int, typer.Option(help="Port to serve on.", min=1, max=65535)] = 5000,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 shows it to the whole network.")
    ] = "127.0.0.1",
    allowed_hosts: Annotated[
        str,
        typer.Option(
            help="Host names the browser may reach it by besides this machine's names and "
            "addresses, localhost and private addresses (e.g. a proxy's): comma-separated, "
            "* for any."
        ),
    ] = "",
) -> None:
    """The MLflow UI over the runs' store: every run's metrics, system metrics per rank, validation
    pictures and artifacts; set the tag segscale.stop = true on a running run to stop it. Needs the
    full MLflow: pip install 'segscale[ui]'. Ctrl-C ends it."""
    import os
    import sys

    from segscale.tracking import ui_command

    command = ui_command(runs_dir, host, port, allowed_hosts)
    import socket

    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host  # an address to open
    typer.echo(
        f"MLflow UI of {runs_dir.resolve()}: http://{shown}:{port}  (starting: it answers in a "
        "few seconds; Ctrl-C ends it)"
    )
    sys.stdout.flush()
    # the server replaces this process: a signal to it (Ctrl-C, kill, a test's terminate) ends it
    os.execv(command[0], command)


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A trained run folder (or use --pred/--ref).")
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Split of the store to evaluate [default: the config's data.test_split]"),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Results file (default: RUN_DIR/evaluation-SPLIT.json, or ./evaluation.json).",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Worker processes (results are identical for any number).", min=1)
    ] = 1,
    pred: Annotated[
        Path | None,
        typer.Option(help="Folder of predicted masks (NIfTI/PNG) to score, with --ref."),
    ] = None,
    ref: Annotated[
        Path | None, typer.Option(help="Folder of reference masks with the same file names.")
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            help="With --pred/--ref: the label values, e.g. '1,2' or '1:liver,2:tumour' "
            "[default: a dataset.json beside the references, else inferred with a warning]"
        ),
    ] = None,
    label_map: Annotated[
        str | None,
        typer.Option(
            help="With --pred/--ref: raw value to class, as prepare's, e.g. '0:1,255:0' where 0 "
            "is the foreground; scored as `evaluate RUN` scores a store prepared with it."
        ),
    ] = None,
) -> None:
    """SegEval metrics at three levels (dataset, case, slice): JSON, per-case CSV and pictures."""
    overlays = None  # a run's: its best, median and worst case
    if (pred is None) != (ref is None):
        raise SegscaleError(
            "--pred and --ref go together: a folder of predictions and one of references"
        )
    if pred is not None and ref is not None:
        if run_dir is not None:
            raise SegscaleError("give either RUN_DIR or --pred/--ref, not both")
        if split is not None:
            raise SegscaleError("--split applies to a run folder's store, not to --pred/--ref")
        if workers != 1:
            raise SegscaleError("--workers applies to a run folder; --pred/--ref is one process")
        from segscale.imgmed.prepare import parse_label_map, parse_labels

        declared = parse_labels(labels) if labels is not None else None
        label_values = parse_label_map(label_map)
        out = _results_file(json_out or Path("evaluation.json"))
        from segscale._files import apart_from_input

        for folder in (pred, ref):  # its .png would be read back as a mask by the next evaluation
            apart_from_input(out, folder, "--json" if json_out else "--json (default)")
        # torch, through the metrics: after the refusals above, which need none
        from segscale.evaluation import evaluate_folders, write_evaluation

        evaluation = evaluate_folders(pred, ref, declared, label_values)
        write_evaluation(evaluation, out)
    else:
        from segscale.launch import launch

        if run_dir is None:
            raise SegscaleError("give a run folder, or --pred DIR --ref DIR")
        if labels is not None or label_map is not None:
            option = "--labels" if labels is not None else "--label-map"
            raise SegscaleError(f"{option} applies to --pred/--ref; a run's labels are its store's")
        run_dir = run_dir.resolve()
        if not (run_dir / "config.yaml").is_file():
            raise not_a_run(run_dir)
        if split is not None and not split.strip():
            raise SegscaleError(
                f"--split {split!r}: empty; give a split of the run's store (e.g. test)"
            )
        from segscale.engine import check_store_exists, trained_weights
        from segscale.imgmed import Store

        trained_weights(run_dir)  # a finished run, before any worker starts
        cfg = _load(run_dir / "config.yaml", None)
        check_store_exists(run_dir, cfg)
        split = split or cfg.data.test_split
        Store.open(cfg.data.store).rows(split)  # a split with no cases: one line, nothing written
        out = _results_file(json_out or run_dir / f"evaluation-{split}.json", run_dir)
        code = launch(["evaluate", str(run_dir), "--split", split, "--out", str(out)], workers)
        if code != 0:
            raise typer.Exit(code)
        evaluation = from_json(out.read_text())
        if evaluation.get("task") == "classification":
            from segscale.report import plot_confusion, print_metrics

            plot_confusion(evaluation, out.with_suffix(".png"))
            _record_beside(out, [out.with_suffix(".png")])
            print_metrics(evaluation)
            typer.echo(f"wrote {out}, {out.with_suffix('.png').name}")
            return
        overlays = _overlays_file(out)
        _plot_overlays(run_dir, evaluation, overlays)
    from segscale.report import plot_case_dice, print_metrics

    plot_case_dice(evaluation, out.with_suffix(".png"))
    written = [out.with_suffix(".csv"), out.with_suffix(".png"), *([overlays] if overlays else [])]
    _record_beside(out, written)
    print_metrics(evaluation)
    typer.echo(f"wrote {out}, {', '.join(f.name for f in written)}")


def _say_rescaled(run_dir: Path, cfg: RunConfig, workers: int) -> None:
    """Warn when a run resumes on another number of workers than it trained on: from an epoch
    end that is allowed, but the global batch and the scaled lr change with it."""
    import warnings

    from segscale._files import read_record

    env = run_dir / "environment.json"
    before = read_record(env, (), "run environment").get("workers") if env.is_file() else None
    if isinstance(before, int) and before != workers:
        b = cfg.train.batch_size
        warnings.warn(
            f"{run_dir.name} trained on {before} worker(s) and resumes on {workers}: the global "
            f"batch goes from {b * before} to {b * workers} and the lr is scaled for {workers} "
            "(environment.json keeps the earlier setting under 'earlier')",
            stacklevel=2,
        )


def _a_folder(path: Path, alternative: str) -> None:
    """Refuse a run argument that is missing or a file before the command imports its module
    (torch: seconds), with the message the module's own check gives (_files.not_a_run)."""
    if not Path(path).is_dir():
        raise not_a_run(path, alternative)


def _results_file(path: Path, run_dir: Path | None = None) -> Path:
    """The evaluation's JSON path, resolved and writable, ending in .json (the .csv and .png
    written beside it take its name: x.csv would be overwritten by the CSV). Raises
    SegscaleError before anything runs."""
    from segscale._files import output_file

    if Path(path).is_dir():
        raise SegscaleError(
            f"--json {Path(path).resolve()}: a folder; give the results file's name"
        )
    if Path(path).suffix.lower() != ".json":
        raise SegscaleError(
            f"--json {path}: expected a .json file name (the per-case .csv and .png beside it "
            "take its name)"
        )
    out = output_file(path, "--json", of_run=run_dir)  # the run's own evaluation, or none
    recorded = None  # the digests of what an earlier evaluation wrote beside it
    if out.is_file():  # replaced only when it is an earlier evaluation (never environment.json)
        try:
            earlier = json.loads(out.read_text())
        except (OSError, ValueError):
            earlier = None
        keys = set(earlier) if isinstance(earlier, dict) else set()
        # a run's evaluation names its split, one of folders its --pred and --ref
        if not ("dataset" in keys and ("split" in keys or {"pred", "ref"} <= keys)):
            raise SegscaleError(f"--json {out}: exists and is not an evaluation; give another name")
        recorded = earlier.get(BESIDE)  # type: ignore[union-attr]
    # the table and pictures written beside it: an earlier evaluation's when it is one (checked
    # above), else nobody's to replace (a user's results.csv beside a new results.json was)
    for beside in (out.with_suffix(".csv"), out.with_suffix(".png"), _overlays_file(out)):
        try:  # never a run's record or a store's file
            output_file(beside, "--json", of_run=run_dir)
        except SegscaleError as e:  # named for what was given: the .json
            why = str(e).split(f"{beside}: ", 1)[-1]
            raise SegscaleError(
                f"--json {out}: the evaluation writes {beside.name} beside it: {why}"
            ) from None
        if beside.exists() and not out.is_file():
            raise SegscaleError(
                f"--json {out}: {beside.name} is there already, and not from an evaluation "
                f"(the evaluation writes its table and pictures beside the .json); give "
                "another name"
            )
        # the earlier evaluation's own, unchanged since (one written before digests were
        # recorded is taken as its own)
        if (
            beside.is_file()
            and isinstance(recorded, dict)
            and recorded.get(beside.name) != file_sha256(beside)
        ):
            how = "changed since" if beside.name in recorded else "not written by"
            raise SegscaleError(
                f"--json {out}: {beside.name} beside it was {how} the evaluation that wrote "
                "the .json, and would be replaced; move it or give another name"
            )
    return out


BESIDE = "beside"  # the evaluation JSON's key: sha256 of each file written beside it


def _record_beside(out: Path, files: list[Path]) -> None:
    """Record in the evaluation JSON `out` the sha256 of each of `files` written beside it, so
    an evaluation to the same name later replaces them only while they are unchanged."""
    evaluation = json.loads(out.read_text())
    evaluation[BESIDE] = {f.name: file_sha256(f) for f in files if f.is_file()}
    write_atomic(out, to_json(evaluation, indent=1))


def _overlays_file(results: Path) -> Path:
    """The overlays picture an evaluation writes beside its results file."""
    return results.with_name(f"{results.stem}-overlays.png")


def _plot_overlays(run_dir: Path, evaluation: dict, out: Path) -> None:
    from segscale.engine import load_trained_model
    from segscale.evaluation import pick_examples, plot_examples

    model, p = load_trained_model(run_dir)
    plot_examples(pick_examples(model, p.store, evaluation), out, p.num_classes)


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[
        str,
        typer.Argument(
            help="A trained run folder, a finished `segscale repeat` folder (its runs as one "
            "ensemble: mean softmax), or zoo:NAME[@VERSION] (a zoo model)."
        ),
    ],
    inputs: Annotated[
        list[Path], typer.Argument(help="NIfTI volumes or 2D images (or folders of them).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Folder for the masks: the inputs' file names (a picture's mask is a .png, lossless).",
        ),
    ],
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.", min=1)] = 16,
    amp: Annotated[
        str, typer.Option(help="auto (bf16 on a GPU that supports it) | none | bf16")
    ] = "auto",
    zoo: Annotated[
        str | None,
        typer.Option(
            help="With zoo:NAME: the zoo (folder or URL) [default: SEGSCALE_ZOO, else the shipped one]"
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Replace files of the masks' names that predict did not write (its own masks "
            "are always replaced)."
        ),
    ] = False,
) -> None:
    """Segment images with a run's model or a zoo model; masks keep each input's shape and header
    geometry."""
    if out.exists() and not out.is_dir():
        raise SegscaleError(f"--out {out}: a file; give a folder for the masks")
    if not run_dir.startswith("zoo:"):
        _a_folder(Path(run_dir), "a zoo entry (zoo:NAME[@VERSION])")
    from segscale.predict import predict

    if run_dir.startswith("zoo:"):  # pulled (or found in the cache) and verified first
        from segscale.hub import pull

        source: Path | list[Path] = pull(run_dir, zoo)
    elif zoo is not None:
        raise SegscaleError(f"--zoo applies to zoo:NAME models; {run_dir} is a folder")
    elif (Path(run_dir) / REPEAT_STATE).is_file():  # its runs as one ensemble
        from segscale.repeat import finished_runs

        source = finished_runs(Path(run_dir).resolve())
        typer.echo(f"an ensemble of {len(source)} runs: {', '.join(r.name for r in source)}")
    else:
        source = Path(run_dir).resolve()
    written = predict(
        source, inputs, out, batch_size=batch_size, device=device, amp=amp, force=force
    )
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(
        f"segmented {written.slices} slices in {written.seconds:.2f} s of model time "
        f"({written.images_per_second:.0f} img/s on {device})"
    )


@app.command("export")
def export_cmd(
    source: Annotated[
        str, typer.Argument(help="A trained run folder, or zoo:NAME[@VERSION] (a zoo model).")
    ],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript")] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            help="File to write [default: RUN_DIR/model.onnx or model.torchscript.pt; for "
            "zoo:NAME[@V], ./NAME[-V].onnx or .torchscript.pt]"
        ),
    ] = None,
    zoo: ZooOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")] = False,
) -> None:
    """Export a model to run without segscale: ONNX (onnxruntime, TensorRT, ...) or TorchScript,
    with a dynamic batch size and its preprocessing and classes in the file's metadata. The
    export is run against PyTorch on a second batch size and kept only when they agree."""
    from segscale.export import TOLERANCE, export, file_name  # no torch until it exports

    if source.startswith("zoo:"):
        from segscale.hub import pull

        path = pull(source, zoo)
        if out is None:  # in the working directory, named after the entry
            out = Path(file_name(fmt, source.removeprefix("zoo:").replace("@", "-")))
    else:
        path = Path(source).resolve()
    written = export(path, fmt, out, force=force)
    typer.echo(f"wrote {written} (checked against PyTorch: max |Δ logits| ≤ {TOLERANCE:g})")


@app.command("schedule")
def schedule_cmd(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Overrides = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Workers the lr is scaled for (default: the config's `workers`, else 1; "
            "× train.simulate_workers when set).",
            min=1,
            show_default=False,
        ),
    ] = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(
            help="Steps per epoch (default: from the store; given, no store is read).",
            min=1,
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Picture to write (.png, .pdf or .svg).")] = Path(
        "schedule.png"
    ),
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out file it did not write.")
    ] = False,
) -> None:
    """Plot the learning-rate curve of a config for N workers."""
    import warnings

    from segscale._files import output_file
    from segscale.engine import one_process, plan, schedule_plan
    from segscale.schedules import MARK, plot_schedule

    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise SegscaleError(f"--out {out}: expected a .png, .pdf or .svg file name")
    out = output_file(out, "--out", overwrite=force, own=MARK, signed=True)
    cfg = _load(config, overrides)
    t = cfg.train
    one_process(cfg, workers or cfg.workers or 1)  # as `train` refuses it
    # as `train` runs it: the config's workers by default, each simulating K when set
    workers = (workers or cfg.workers or 1) * (t.simulate_workers or 1)
    # a schedule for another dataset's steps needs no store (it may not be prepared yet)
    p = plan(cfg) if steps_per_epoch is None else schedule_plan(cfg)
    schedule = p.schedule(workers, steps_per_epoch)
    for note in p.scale_notes(workers, steps_per_epoch):
        warnings.warn(note, stacklevel=2)
    title = (
        f"{cfg.name}: {workers} worker(s), global batch {t.batch_size * workers}, "
        f"{t.schedule.scaling} scaling{', GreScale' if t.schedule.rule == 'grescale' else ''}"
    )
    plot_schedule(schedule, out, title)
    typer.echo(
        f"peak lr {schedule.peak_lr:.4g} (base {schedule.base_lr:.4g}, {workers} worker(s), "
        f"global batch {t.batch_size * workers}); wrote {out}"
    )


@app.command("launch")
def launch_cmd(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Overrides = None,
    slurm: Annotated[
        bool, typer.Option("--slurm", help="Write an sbatch script (srun + torchrun).")
    ] = False,
    nodes: Annotated[int, typer.Option(help="Nodes to ask for.", min=1)] = 1,
    gpus_per_node: Annotated[
        int | None,
        typer.Option(
            help="GPUs (= workers) per node [default: the config's workers / --nodes, else 1]",
            min=1,
            max=64,
        ),
    ] = None,
    time: Annotated[str, typer.Option(help="Slurm time limit.")] = "04:00:00",
    partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<name>).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Script to write (default: RUN_DIR/job.sbatch).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Write the job for a run already started.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out file it did not write.")
    ] = False,
) -> None:
    """Write a cluster job for a config (checked first, as `train` checks it), to submit with
    sbatch; submitting it again continues the run from its newest checkpoint."""
    import re
    import shlex
    import warnings

    from segscale._files import (
        apart_from_input,
        differ,
        other_run,
        output_file,
        signed,
        write_atomic,
    )
    from segscale.config import load_config
    from segscale.engine import check_run_dir, has_started, plan, prepare_run_dir
    from segscale.launch import MARK, sbatch_script

    if not slurm:
        raise SegscaleError("say which scheduler: --slurm (the only one so far)")
    # both go into #SBATCH lines: a line break would end the header and run as a command
    # Slurm's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, or no limit
    slurm_time = r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE"
    if not re.fullmatch(slurm_time, time) or (re.fullmatch(r"\d+", time) and len(time) > 9):
        raise SegscaleError(
            f"--time {time!r}: expected a Slurm time, e.g. 04:00:00, 1-12:00:00 or UNLIMITED"
        )
    if partition is not None and not re.fullmatch(r"[\w.-]+(,[\w.-]+)*", partition):
        raise SegscaleError(f"--partition {partition!r}: expected a partition name (or a,b)")
    cfg = _load(config, overrides)
    if gpus_per_node is None:  # as `train` takes the config's workers
        gpus_per_node = max(1, (cfg.workers or 1) // nodes)
    if cfg.workers and cfg.workers != nodes * gpus_per_node:
        warnings.warn(
            f"{config}: workers {cfg.workers}, and the job has {nodes * gpus_per_node} "
            f"(--nodes {nodes} × --gpus-per-node {gpus_per_node}): the global batch and the "
            f"scaled lr are those of {nodes * gpus_per_node}",
            stacklevel=1,
        )
    run_dir = (run_dir or Path("runs") / cfg.name).resolve()
    check_run_dir(run_dir)
    if shlex.quote(str(run_dir)) != str(run_dir):  # #SBATCH lines are not shell: no quoting
        raise SegscaleError(
            f"--run-dir {str(run_dir)!r}: a path with spaces, quotes or other shell characters "
            "cannot go into an sbatch script; choose another --run-dir"
        )
    script = run_dir / "job.sbatch"
    if script.exists():  # an earlier job of launch's is replaced; a user's own only with --force
        output_file(script, "--out (default)", overwrite=force, own=MARK, signed=True)
    if resume and (run_dir / "model.pt").is_file():
        raise SegscaleError(f"{run_dir}: finished already (model.pt); no job to write")
    started = has_started(run_dir)
    if resume and not started:  # the job resumes anyway; --resume says the run is expected
        raise SegscaleError(
            f"--resume: {run_dir} has not started (no checkpoint); leave --resume out"
        )
    if (run_dir / "config.yaml").is_file() and not started:  # a job may be queued for it
        before = load_config(run_dir / "config.yaml")
        if before.digest() != cfg.digest():
            raise SegscaleError(
                f"{run_dir}: holds a job not started yet for other settings "
                f"({differ(before.differing_keys(cfg))}); a queued job would run these: give "
                "another --run-dir, or remove the folder"
            )
    if out:  # never over the config, the store, or a file of the run besides its job
        given = Path(out).resolve()
        if given.is_relative_to(run_dir) and given != run_dir / "job.sbatch":
            raise SegscaleError(f"--out {given}: inside the run folder; its job is job.sbatch")
        other = other_run(given, run_dir)
        if other is not None:  # it would pass for that run's job
            raise SegscaleError(f"--out {given}: inside the run folder {other}, another run's")
        apart_from_input(apart_from_input(out, config), cfg.data.store, "--out")
    # the model, loss, optimiser, plug-ins, and the batch and lr schedule of the cluster's
    # workers; not this machine's devices (the GPUs are the cluster's). After the checks of
    # paths and folders (instant), before --out's folder is made
    plan(cfg).check(nodes * gpus_per_node, here=False)
    if out:
        script = output_file(out, "--out", overwrite=force, own=MARK, signed=True)
    if resume and started:
        _say_rescaled(run_dir, cfg, nodes * gpus_per_node)
    prepare_run_dir(cfg, run_dir, resume)
    job = sbatch_script(run_dir, nodes, gpus_per_node, time, partition, cfg.name)
    write_atomic(script, signed(job, MARK))  # edited by hand, it is replaced only with --force
    typer.echo(f"wrote {script}; submit with: sbatch {script}")


zoo_app = typer.Typer(
    help="Pretrained models: publish a run, list a zoo, pull an entry (verified by sha256).",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")

ZooOption = Annotated[
    str | None,
    typer.Option(help="A zoo folder or http(s) URL [default: SEGSCALE_ZOO, else the shipped one]"),
]


@zoo_app.command("publish")
def zoo_publish_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished segmentation run folder.")],
    name: Annotated[str, typer.Option(help="The model's name (letters, digits, . _ -).")],
    zoo: Annotated[str, typer.Option(help="The zoo folder to publish into.")],
    version: Annotated[str, typer.Option(help="The entry's version.")] = "1",
    licence: Annotated[
        str,
        typer.Option(
            help="The weights' licence: an SPDX expression (CC-BY-4.0, MIT OR Apache-2.0, LicenseRef-x)."
        ),
    ] = "CC-BY-4.0",
    description: Annotated[str, typer.Option(help="One paragraph for the model card.")] = "",
) -> None:
    """Publish a run's model: safetensors weights, config, store description, metadata with the
    sha256 of every file, a model card; added to the zoo's index.json. A run tracked by MLflow
    also gets the entry as artifacts and in MLflow's model registry."""
    from segscale.zoo import log_to_mlflow, publish

    entry = publish(run_dir, name, zoo, version, licence, description)
    typer.echo(f"published {name}@{version}: {entry} (card: {entry / 'card.md'})")
    logged = log_to_mlflow(run_dir, entry)
    if logged:
        typer.echo(logged)


@zoo_app.command("list")
def zoo_list_cmd(zoo: ZooOption = None) -> None:
    """The models of a zoo: name, version, classes, input, test Dice, licence."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from segscale.hub import default_zoo, entries

    table = Table("model", "classes", "input", "network", "test Dice", "licence")
    listed = entries(zoo)
    # name@version whole: the other columns wrap first
    table.columns[0].min_width = max(
        (len(f"{e['name']}@{e['version']}") for e in listed), default=5
    )
    for e in listed:
        dice = f"{e['dice']:.4f}" if isinstance(e.get("dice"), float) else "–"
        channels = ", ".join(map(str, e.get("channels") or [])) or "?"
        row = (
            f"{e['name']}@{e['version']}",
            ", ".join(map(str, e.get("classes") or [])) or "?",
            f"{channels}, {e.get('size', '?')}²",
            str(e.get("architecture", "?")),
            dice,
            str(e.get("licence", "?")),
        )
        table.add_row(*map(escape, row))  # an index's text, not rich markup
    Console().print(table)
    typer.echo(f"zoo: {zoo or default_zoo()}")


@zoo_app.command("pull")
def zoo_pull_cmd(
    ref: Annotated[str, typer.Argument(help="NAME or NAME@VERSION (default: the newest).")],
    zoo: ZooOption = None,
) -> None:
    """Download an entry into the cache (SEGSCALE_CACHE, default ~/.cache/segscale), every file
    checked against the zoo's sha256; prints the local folder."""
    from segscale.hub import pull

    typer.echo(pull(ref, zoo))


config_app = typer.Typer(help="Work with config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("convert")
def config_convert_cmd(
    source: Annotated[
        Path, typer.Argument(help="A config file (XML in the thesis' form, or YAML).")
    ],
    to: Annotated[str, typer.Option("--to", help="Output format: yaml.")] = "yaml",
    out: Annotated[Path | None, typer.Option(help="File to write (default: print).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out file it did not write.")
    ] = False,
) -> None:
    """Convert an Auto-CNNp XML config into the equivalent validated YAML."""
    import yaml

    if to != "yaml":
        raise SegscaleError(f"--to {to}: only yaml is supported")
    from segscale._files import apart_from_input, output_file, signed, write_atomic
    from segscale.config import as_written, read_raw

    mark = "# written by segscale config convert"
    target = (
        output_file(apart_from_input(out, source), "--out", force, mark, signed=True)
        if out
        else None
    )
    from segscale.engine import check_components, check_optimizer

    cfg = _load(source, None)
    check_components(cfg)  # names and kwargs; the store may not be prepared yet
    # the optimiser's kwargs go to torch's class, whose signature check_components can't read
    check_optimizer(cfg)
    # what the source file says, paths as it wrote them (relative to the working directory)
    text = yaml.safe_dump(as_written(cfg, read_raw(source).raw), sort_keys=False)
    if target:  # marked: converting again replaces it, and nothing else without --force
        write_atomic(target, signed(f"{mark} from {source}\n{text}", mark))
        typer.echo(f"wrote {out}")
    else:
        typer.echo(text, nl=False)


imgmed_app = typer.Typer(
    help="ImgMed: read, inspect and convert medical images.", no_args_is_help=True
)
app.add_typer(imgmed_app, name="imgmed")


@imgmed_app.command("check")
def imgmed_check_cmd(
    source: Annotated[
        Path,
        typer.Argument(help="Decathlon/nnU-Net folder, images/ + masks/, or DICOM images/<case>/."),
    ],
    label_map: Annotated[
        str | None, typer.Option(help="2D masks: raw value → class, e.g. '0:1,255:0'.")
    ] = None,
    axis: Annotated[
        int, typer.Option(help="The slicing axis prepare will use (0, 1, 2).", min=0, max=2)
    ] = 2,
) -> None:
    """Check a raw dataset before preparing it: every problem of every case in one pass (what
    prepare would refuse, and what is worth a look), as a table with the problems numbered
    below it; exit 1 when any case would be refused."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from segscale.imgmed.check import check_source
    from segscale.imgmed.prepare import parse_label_map

    result = check_source(source, parse_label_map(label_map), axis)
    console = Console()
    if result.refused:
        typer.echo(f"refused: {result.refused}", err=True)
        raise typer.Exit(1)
    cases = [c for c in result.cases if not c.stray]
    strays = len(result.cases) - len(cases)
    extra = f", {strays} file(s) that make no case" if strays else ""
    # no vertical rules: the row of a 3D case fits 80 columns
    table = Table(
        title=escape(f"{source}: {len(cases)} cases{extra}"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("case", "status", "shape", "spacing (mm)", "axes", "classes", "problems"):
        table.add_column(col, overflow="fold")
    # a problem names files and geometry: in a cell it folds into a column of fragments, so the
    # table shows its number and the problem is one line below (wrapped by the terminal)
    problems: list[str] = []
    for c in result.cases:
        status = "[red]refused[/red]" if c.refused else "[yellow]look[/yellow]" if c.notes else "ok"
        spacing = "×".join(f"{v:.3g}" for v in c.spacing) if c.spacing else "-"
        numbers = []
        for kind, text in [
            *([("refused", c.refused)] if c.refused else []),
            *(("look", n) for n in c.notes),
        ]:
            problems.append(f"{escape(c.case)} ({kind}): {escape(text)}")
            numbers.append(f"#{len(problems)}")
        table.add_row(
            escape(c.case),
            status,
            "×".join(map(str, c.shape)) if c.shape else "-",
            spacing,
            c.axes or "-",
            ",".join(map(str, c.classes)) or "-",
            ", ".join(numbers),
        )
    console.print(table)
    for i, line in enumerate(problems, 1):
        console.print(f"#{i} {line}", soft_wrap=True, highlight=False)
    for line in [*result.notes, *result.skipped]:
        console.print(f"note: {escape(line)}", soft_wrap=True, highlight=False)
    refused = sum(1 for c in cases if c.refused)
    if refused or strays:
        said = [f"{refused} of {len(cases)} cases would be refused by prepare"] if refused else []
        if strays:  # prepare refuses these before it reads any case
            said.append(f"{strays} file(s) make no case, which prepare refuses first")
        typer.echo("; ".join(said), err=True)
        raise typer.Exit(1)
    typer.echo(f"all {len(cases)} cases can be prepared")


@imgmed_app.command("info")
def imgmed_info_cmd(
    paths: Annotated[list[Path], typer.Argument(help="Files or DICOM series folders.")],
) -> None:
    """What each file holds: format (from its content), shape, type, spacing, orientation, values."""
    import warnings

    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from segscale.imgmed import load
    from segscale.imgmed.files import list_files
    from segscale.imgmed.io import picture_note, sniff

    def dicom(p: Path) -> bool:
        try:
            return sniff(p) == "dicom"
        except SegscaleError:
            return False

    table = Table()
    for col in ("path", "format", "shape", "dtype", "spacing (mm)", "axes", "min", "max", "note"):
        table.add_column(col, overflow="fold")
    shown: list[Path] = []
    for path in paths:  # a folder of images that is no DICOM series: each of its files
        files = list_files(path) if path.is_dir() else []
        shown += files if files and not any(map(dicom, files)) else [path]
    failed = 0
    names = _short_names(shown)
    for path in shown:
        try:
            with warnings.catch_warnings(record=True) as said:  # in its row's note, not above
                warnings.simplefilter("always")
                image = load(path, check_finite=False)
        except SegscaleError as e:
            failed += 1
            table.add_row(Text(names[path]), *["-"] * 7, Text(str(e), style="red"))
            continue
        a = image.array
        axes = "-"
        if image.affine is not None:
            from segscale.imgmed.geometry import axis_codes

            axes = axis_codes(image.affine)
        spacing = "-" if image.spacing is None else " × ".join(f"{v:.3g}" for v in image.spacing)
        bad = int(a.size - np.count_nonzero(np.isfinite(a))) if a.dtype.kind == "f" else 0
        note = f"{bad} NaN or infinite voxel(s): prepare refuses it" if bad else ""
        if image.kind == "image":  # a picture read in another mode than stored (RGBA as RGB)
            note = "; ".join(n for n in (picture_note(path), note) if n)
        # what reading it warned of (a gzipped file named .nii), without the path the row names
        heard = [
            str(w.message).removeprefix(f"{path}: ")
            for w in said
            if issubclass(w.category, UserWarning)  # a library's deprecations are not the file's
        ]
        note = "; ".join(n for n in (*heard, note) if n)
        table.add_row(
            Text(names[path]),
            image.kind,
            " × ".join(map(str, a.shape)),
            str(a.dtype),
            spacing,
            axes,
            f"{np.nanmin(a):.4g}" if bad < a.size else "nan",
            f"{np.nanmax(a):.4g}" if bad < a.size else "nan",
            Text(note, "yellow"),
        )
    console = Console()
    if not console.is_terminal:  # a log or a pipe: whole paths, not 80 columns
        console = Console(width=200)
    console.print(table)
    if failed:
        raise typer.Exit(1)


def _short_names(paths: list[Path]) -> dict[Path, str]:
    """Each path by its file name, or by enough of its folders to tell it from the others
    (imagesTr/a.nii.gz beside labelsTr/a.nii.gz)."""
    names: dict[Path, str] = {}
    for path in paths:
        parts = path.parts
        for k in range(1, len(parts) + 1):
            name = str(Path(*parts[-k:]))
            if sum(p.parts[-k:] == parts[-k:] for p in paths) == 1 or k == len(parts):
                names[path] = name
                break
    return names


@imgmed_app.command("convert")
def imgmed_convert_cmd(
    src: Annotated[
        Path,
        typer.Argument(
            help="NIfTI, DICOM series folder, picture, .npy/.npz, or a folder of PNG slices."
        ),
    ],
    dst: Annotated[
        Path, typer.Argument(help="Output file (format from its name), or a folder for PNG slices.")
    ],
    axis: Annotated[
        int, typer.Option(help="Slicing axis for PNG export (0, 1, 2).", min=0, max=2)
    ] = 2,
    window: Annotated[
        str | None,
        typer.Option(help="LOW,HIGH intensities mapped to 0..255 (default: 0.5-99.5 percentiles)."),
    ] = None,
    spacing: Annotated[
        str | None, typer.Option(help="X,Y,Z mm for a stack of pictures without slices.json.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing DST file.")] = False,
) -> None:
    """Convert between formats: DICOM → NIfTI, NIfTI → PNG slices, PNG slices → NIfTI, JPEG → PNG."""
    from segscale.imgmed import convert

    written = convert(
        src,
        dst,
        axis,
        _numbers(window, 2, "--window"),
        _numbers(spacing, 3, "--spacing"),  # type: ignore[arg-type]
        force=force,
    )
    where = dst if len(written) > 1 else written[0]
    typer.echo(f"wrote {len(written)} file(s): {where}")


@imgmed_app.command("augment")
def imgmed_augment_cmd(
    store: Annotated[Path, typer.Argument(help="A prepared store.")],
    out: Annotated[Path, typer.Argument(help="The augmented store to write.")],
    to: Annotated[int, typer.Option("--to", help="Training slices in the new store.")],
    preset: Annotated[
        str | None, typer.Option(help="left-atrium: the thesis' Table 2.1 values.")
    ] = None,
    rotation: Annotated[float | None, typer.Option(help="Max rotation, degrees (±).")] = None,
    zoom: Annotated[str | None, typer.Option(help="Zoom range MIN,MAX.")] = None,
    translation: Annotated[
        float | None, typer.Option(help="Max shift, fraction of the size.")
    ] = None,
    flip: Annotated[bool | None, typer.Option(help="Random flips.")] = None,
    intensity: Annotated[float | None, typer.Option(help="Intensity jitter std.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random warps.", min=0, max=SEED_MAX)] = 0,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace a store made otherwise (by prepare, or from another store)."
        ),
    ] = False,
) -> None:
    """Grow a store's training split to N slices with augmented copies (image and mask warped
    alike); validation and test cases are copied untouched."""
    from pydantic import ValidationError

    from segscale.config import AugmentConfig
    from segscale.imgmed.augment import PRESETS, augment_store

    if preset is not None and preset not in PRESETS:
        raise SegscaleError(f"--preset {preset}: expected one of {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else AugmentConfig(enabled=True)
    given = {
        "rotation": rotation,
        "zoom": _numbers(zoom, 2, "--zoom"),
        "translation": translation,
        "flip": flip,
        "intensity": intensity,
    }
    try:
        cfg = AugmentConfig(
            **{**base.model_dump(), **{k: v for k, v in given.items() if v is not None}}
        )
    except ValidationError as e:  # one line naming the option, not pydantic's report
        err = e.errors()[0]
        option = f"--{err['loc'][0]}" if err["loc"] else "augmentation options"
        why = str(err["ctx"]["error"]) if err["type"] == "value_error" else expected_by(err)
        raise SegscaleError(
            f"{option} {given.get(option[2:], '')}: {why}".replace(" :", ":")
        ) from None
    if cfg == AugmentConfig(enabled=True):
        raise SegscaleError("no augmentation asked for: give --preset or --rotation/--zoom/...")
    from segscale._files import apart_from_input, output_dir

    out = output_dir(apart_from_input(out, store, "OUT"), "OUT", store_ok=True)
    path, written = augment_store(store, out, to, cfg, seed, force=force)
    typer.echo(f"{'wrote' if written else 'up to date:'} {path} ({to} training slices)")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    workers: Annotated[
        int | None,
        typer.Option(help="Training workers [default: the config's workers, else 2].", min=1),
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Prepare the bundled left-atrium sample, train with 2 workers, evaluate, write a report."""
    from segscale.demo import run_demo

    run_demo(out, workers, overrides)


# Click's UsageError and ClickException, from whichever Click typer raises them (its own copy
# in newer typer, else click itself)
_CLICK_ERRORS = tuple(
    next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
    for name in ("UsageError", "ClickException")
)


def _command_path(args: list[str]) -> str:
    """The command the arguments name ("segscale imgmed check"), for a usage error Click raised
    before it made the command's context (an option missing its value): the words that name a
    group's commands, up to the first that does not."""
    command = typer.main.get_command(app)
    path = ["segscale"]
    for word in args:
        commands = getattr(command, "commands", {})
        if word not in commands:
            break
        command = commands[word]
        path.append(word)
    return " ".join(path)


def main() -> None:
    import warnings

    from segscale.errors import one_line_warning  # not worker's torch: --help needs none

    warnings.formatwarning = one_line_warning  # type: ignore[assignment]
    try:
        # not standalone: a usage error comes here, to be one line like every other refusal
        # (Click's own is four: the usage, a hint and the error); --help and typer.Exit give
        # their exit code back
        code = app(prog_name="segscale", standalone_mode=False)
    except _CLICK_ERRORS[0] as e:  # a missing argument, an unknown option, a value of bad type
        if type(e).__name__ == "NoArgsIsHelpError":  # a group given no command: its help
            e.show()
            sys.exit(e.exit_code)
        where = e.ctx.command_path if e.ctx is not None else _command_path(sys.argv[1:])
        cause = e.__cause__  # typer checks a value's type with pydantic: its errors, in words
        if hasattr(cause, "errors") and hasattr(e, "message"):
            error = cause.errors()[0]
            e.message = f"{expected_by(error)}, got {shown(error.get('input'))}"
        typer.echo(f"error: {where}: {e.format_message()} (see {where} --help)", err=True)
        sys.exit(e.exit_code)
    except _CLICK_ERRORS[1] as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # end of input where a prompt waited
        typer.echo("aborted", err=True)
        sys.exit(1)
    except SegscaleError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(USER_ERROR_EXIT_CODE)
    except Preempted as e:  # a resumable job stopped with its state kept: the same command goes on
        typer.echo(f"preempted: {e}", err=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        if not (e.filename and e.strerror):
            raise
        # a file the system refused (permission, disk full, a file where a folder should be):
        # the path and the reason, not a traceback of where segscale happened to touch it
        other = f" → {e.filename2}" if e.filename2 else ""
        typer.echo(f"error: {e.filename}{other}: {e.strerror}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

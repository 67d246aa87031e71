"""`segscale demo`: the main job on the bundled left-atrium sample, end to end.

prepare → train (2 workers) → evaluate on held-out cases → report (Markdown + pictures).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from segscale._files import from_json
from segscale.config import load_config
from segscale.engine import load_trained_model, plan, prepare_run_dir
from segscale.errors import SegscaleError
from segscale.imgmed import Preprocessing, prepare
from segscale.launch import launch, start_worker_server


def resource(name: str) -> Path:
    return Path(str(resources.files("segscale") / "resources" / name))


def prepare_demo_store(output: Path, progress: bool = True) -> Path:
    """The bundled sample prepared as the demo uses it (128², 10% validation, 25% test cases)."""
    store, _ = prepare(
        resource("sample_la"),
        output,
        Preprocessing(size=128),
        val_fraction=0.1,
        test_fraction=0.25,
        seed=0,
        progress=progress,
    )
    return store


def run_demo(out: Path, workers: int = 2, overrides: list[str] | None = None) -> dict:
    from segscale.evaluation import pick_examples
    from segscale.report import print_metrics, write_report

    if workers > 1:
        start_worker_server()  # its imports overlap the preparation
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = prepare_demo_store(out / "prepared")
    cfg = load_config(resource("demo.yaml"), [f"data.store={store}", *(overrides or [])])
    plan(cfg).check(workers)
    run_dir = out / "run"
    if run_dir.exists():  # the demo owns its folder: a rerun starts afresh
        shutil.rmtree(run_dir)
    prepare_run_dir(cfg, run_dir, resume=False)
    if launch(["train", str(run_dir)], workers=workers) != 0:
        raise SegscaleError(f"training failed; see the messages above and {run_dir}")
    evaluation_path = out / "evaluation.json"
    if (
        launch(
            [
                "evaluate",
                str(run_dir),
                "--split",
                cfg.data.test_split,
                "--out",
                str(evaluation_path),
            ],
            workers=workers,
        )
        != 0
    ):
        raise SegscaleError("evaluation failed; see the messages above")
    evaluation = from_json(evaluation_path.read_text())
    print_metrics(evaluation)
    model, p = load_trained_model(run_dir)
    examples = pick_examples(model, p.store, evaluation)
    report = write_report(out, run_dir, evaluation, examples, p.num_classes, p.task.metric)
    print(f"report: {report}")
    return evaluation

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from segscale import worker
from segscale.config import save_config, validate
from segscale.engine import prepare_run_dir
from segscale.errors import SegscaleError


def make_run(tmp_path: Path, store: Path, name: str = "run", **train) -> Path:
    cfg = validate(tiny_config(store, **train))
    run_dir = tmp_path / name
    prepare_run_dir(cfg, run_dir, resume=False)
    return run_dir


def test_single_process_training_writes_a_complete_run(tmp_path, real_store):
    run_dir = make_run(tmp_path, real_store, epochs=3, steps_per_epoch=6, keep_checkpoints=2)
    history = worker.train(run_dir, progress=False)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3] and lines == history
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]  # it learns
    assert 0.0 <= lines[-1]["val_dice"] <= 1.0 and lines[-1]["step"] == 18
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == [
        "best.pt",
        "best.pt.sha256",
        "step_00000012.pt",
        "step_00000012.pt.sha256",
        "step_00000018.pt",
        "step_00000018.pt.sha256",
    ]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["seed"] == 0 and env["world_size"] == 1 and env["torch"] == torch.__version__
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 3


def test_resume_continues_exactly(tmp_path, real_store):
    """A run interrupted after epoch 1 and resumed ends with the same weights, bit for bit."""
    full = make_run(tmp_path, real_store, "full")
    worker.train(full, progress=False)
    cut = make_run(tmp_path, real_store, "cut")
    worker.train(cut, progress=False)
    (cut / "checkpoints" / "step_00000006.pt").unlink()
    (cut / "model.pt").unlink()
    history = worker.train(cut, resume=True, progress=False)
    assert [r["epoch"] for r in history] == [1, 2]
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(cut / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_started_run_is_not_overwritten_and_resume_checks_the_config(tmp_path, real_store):
    run_dir = make_run(tmp_path, real_store, epochs=1)
    worker.train(run_dir, progress=False)
    cfg = validate(tiny_config(real_store, epochs=1))
    with pytest.raises(SegscaleError, match="holds a finished run; give --run-dir for a new one"):
        prepare_run_dir(cfg, run_dir, resume=False)
    (run_dir / "model.pt").rename(run_dir / "kept.pt")  # started, not finished
    with pytest.raises(SegscaleError, match="already holds a run; pass --resume"):
        prepare_run_dir(cfg, run_dir, resume=False)
    (run_dir / "kept.pt").rename(run_dir / "model.pt")
    other = validate(tiny_config(real_store, epochs=1, batch_size=2))
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(
        SegscaleError, match=r"started with other settings \(train.batch_size differs\)"
    ):
        prepare_run_dir(other, run_dir, resume=True)
    assert (run_dir / "config.yaml").read_text() == saved  # refused before anything is written
    save_config(other, run_dir / "config.yaml")  # a folder edited by hand: the checkpoint says no
    with pytest.raises(SegscaleError, match="written by a different configuration"):
        worker.train(run_dir, resume=True, progress=False)


def tiny_trainer(run_dir: Path, store_path: Path, model: torch.nn.Module, lr: float, **kw):
    """A Trainer built by hand (no engine) over the test store: plain SGD at a constant lr."""
    from segscale.data import SliceDataset, TrainLoader, eval_loader
    from segscale.imgmed import Store
    from segscale.losses import DiceCELoss
    from segscale.parallel import AllReduceStrategy
    from segscale.train import Trainer

    store = Store.open(store_path)
    strategy = AllReduceStrategy("cpu")
    augment = validate(tiny_config(store_path)).data.augment
    val = SliceDataset(store, "val")
    return Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        lambda step: lr,
        DiceCELoss(),
        TrainLoader(SliceDataset(store, "train"), 4, [0], 1, strategy.device, 0, augment),
        eval_loader(val, 4, 0, 1),
        strategy,
        num_classes=2,
        num_val_cases=len(val.cases),
        run_dir=run_dir,
        progress=False,
        **kw,
    )


def test_callbacks_are_duck_typed(tmp_path, real_store):
    from segscale.models import create_model

    class Recorder:  # defines only some hooks
        def __init__(self):
            self.calls = []

        def on_epoch_end(self, trainer, record):
            self.calls.append(("epoch_end", record["epoch"]))

        def on_train_end(self, trainer, history):
            self.calls.append(("train_end", len(history)))

    rec = Recorder()
    model = create_model("unet", 1, 2, base_channels=4, depth=2)
    trainer = tiny_trainer(
        tmp_path, real_store, model, 0.01, epochs=2, steps_per_epoch=2, callbacks=[rec]
    )
    trainer.fit()
    assert rec.calls == [("epoch_end", 1), ("epoch_end", 2), ("train_end", 2)]


def test_seeding_turns_on_deterministic_kernels_without_loading_the_compiler():
    # torch.use_deterministic_algorithms imports torch._inductor (1.2 s per worker); segscale sets
    # the same flags without it. Run in a fresh interpreter: this one may have the compiler loaded.
    code = (
        "import sys, torch; from segscale.repro import seed_everything; seed_everything(0); "
        "print(torch.are_deterministic_algorithms_enabled(), "
        "torch.is_deterministic_algorithms_warn_only_enabled(), 'torch._inductor' in sys.modules, "
        "torch.utils.deterministic.fill_uninitialized_memory)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False", "False"]


@pytest.mark.skipif(sys.platform != "linux", reason="a glibc setting")
def test_workers_keep_freed_memory_instead_of_faulting_it_in_every_step():
    """By default glibc maps a training step's big activations afresh every step, each 4 KiB a
    page fault (~1,700 per step of this small net). A worker's process environment keeps freed
    blocks for reuse (measured 0-100 faults per step), unless SEGSCALE_KEEP_FREED_MEMORY=0."""
    code = (
        "import resource, sys, torch\n"
        "from segscale.models import create_model\n"
        "from segscale.parallel.base import ProcessEnv\n"
        "if sys.argv[1] == 'worker': ProcessEnv('cpu', 1)\n"
        "torch.set_num_threads(1)\n"
        "model = create_model('resunet', 1, 2, base_channels=8, depth=2)\n"
        "x = torch.randn(8, 1, 64, 64)\n"
        "for _ in range(2): model(x).square().mean().backward()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): model(x).square().mean().backward()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SEGSCALE_KEEP_FREED_MEMORY"}
    runs = {
        "plain": ("plain", env),
        "worker": ("worker", env),
        "opted out": ("worker", {**env, "SEGSCALE_KEEP_FREED_MEMORY": "0"}),
    }
    faults = {
        name: int(
            subprocess.run(
                [sys.executable, "-c", code, how], env=e, capture_output=True, text=True, check=True
            ).stdout
        )
        for name, (how, e) in runs.items()
    }
    assert faults["worker"] * 4 < faults["plain"], faults
    assert faults["worker"] * 4 < faults["opted out"], faults


def test_grad_clip_bounds_an_sgd_step_by_the_clip_norm(tmp_path, real_store):
    """With plain SGD at lr 1, one step moves the weights by exactly the (clipped) gradient: its
    norm is at most train.grad_clip with clipping, and far more without it."""
    from segscale.models import create_model

    def step_norm(clip: float | None) -> float:
        torch.manual_seed(0)
        model = create_model("unet", 1, 2, base_channels=4, depth=2)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        run_dir = tmp_path / str(clip)
        tiny_trainer(
            run_dir, real_store, model, 1.0, epochs=1, steps_per_epoch=1, grad_clip=clip
        ).fit()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return float((after - before).norm())

    clipped, free = step_norm(1e-3), step_norm(None)
    assert 0 < clipped <= 1e-3 * (1 + 1e-4)
    assert free > 10 * clipped


def test_a_store_without_validation_cases_trains_with_val_split_null(tmp_path):
    """`prepare --val 0` (a final model on every non-test case) was a store no config could
    train: the empty validation split was refused. data.val_split: null trains without
    validation, and what needs one says so before launch."""
    from conftest import prepared_sample
    from segscale.engine import plan
    from segscale.methods import methods

    store = prepared_sample(tmp_path, 4, 0.0, 0.25)
    with pytest.raises(SegscaleError, match=r"split 'val' has no cases .*val_split=null trains"):
        plan(validate(tiny_config(store)))
    raw = tiny_config(store, epochs=2, steps_per_epoch=1)
    raw["data"]["val_split"] = None
    run_dir = tmp_path / "run"
    prepare_run_dir(validate(raw), run_dir, resume=False)
    worker.train(run_dir, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert not any(k.startswith("val_") for r in rows for k in r)
    assert (run_dir / "model.pt").is_file() and not (run_dir / "checkpoints" / "best.pt").exists()
    assert "No validation during training (data.val_split: null)" in methods(run_dir)
    early = {
        **raw,
        "train": {
            **raw["train"],
            "callbacks": [{"name": "early_stop", "kwargs": {"reference": {1: 0.5}}}],
        },
    }
    with pytest.raises(SegscaleError, match=r"reads the validation metric 'dice', and data.val_"):
        plan(validate(early)).check(1)
    with pytest.raises(SegscaleError, match="split_seed draws which training cases validate"):
        validate({**raw, "data": {**raw["data"], "split_seed": 1}})
    from conftest import cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    r = cli("tune", tmp_path / "c.yaml", "--workers", 2, "--out", tmp_path / "tuned")
    assert r.returncode == 2 and "tuning needs a validation split" in r.stderr, r.stderr
    assert not (tmp_path / "tuned").exists()


def test_methods_call_a_distance_that_no_case_defines_undefined():
    """Every case with an empty prediction or reference gives HD95 and ASSD no value: the
    methods text said 'HD95 nan mm', where compare says undefined."""
    from segscale.methods import _distance

    nan = float("nan")
    assert _distance("hd95", {"mean": nan, "sd": nan, "n": 3}) == (
        "; HD95 undefined (no case with both masks non-empty)"
    )
    assert _distance("assd", {"mean": 1.234, "sd": 0.5, "n": 2}) == (
        "; ASSD 1.23 ± 0.50 mm (per case)"
    )
    assert _distance("hd95", {"mean": 4.0, "sd": None, "n": 1}) == "; HD95 4.00 mm (per case)"

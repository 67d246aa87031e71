"""The engine's Plan builds every part of a run; options either take effect or are refused."""

import json

import pytest
import torch

from conftest import tiny_config
from segscale.config import validate
from segscale.engine import plan
from segscale.errors import ConfigError, SegscaleError
from segscale.parallel import SimulatedStrategy


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_steps_per_epoch_is_what_the_loader_yields(real_store, workers, batch_size):
    """The one formula (schedule, `segscale schedule`, the Trainer) against the loader's batches,
    with the shards DistributedSampler cuts for K workers (simulated: every rank in one process)."""
    cfg = tiny_config(real_store, batch_size=batch_size, steps_per_epoch=None)
    if workers > 1:
        cfg["train"]["simulate_workers"] = workers
    p = plan(validate(cfg))
    train_loader, _ = p.loaders(SimulatedStrategy(workers, "cpu"))
    assert p.steps_per_epoch(workers) == len(train_loader) == len(list(train_loader))
    capped = plan(validate({**cfg, "train": {**cfg["train"], "steps_per_epoch": 1}}))
    assert capped.steps_per_epoch(workers) == 1


def test_the_trainer_is_built_from_plan_parts(tmp_path, real_store):
    cfg = tiny_config(real_store, simulate_workers=2, epochs=3)
    cfg["train"]["schedule"] = {"scaling": "linear", "warmup_epochs": 1}
    p = plan(validate(cfg))
    trainer = p.trainer(SimulatedStrategy(2, "cpu"), tmp_path, progress=False)
    assert trainer.steps_per_epoch == p.steps_per_epoch(2) == 3
    assert trainer.schedule.peak_lr == pytest.approx(0.02)  # 0.01 × 2 workers
    assert trainer.schedule(0) == pytest.approx(0.01)  # warmup starts at the base lr
    record = p.record(trainer)
    assert record["global_batch"] == 8 and record["simulated"] and record["peak_lr"] == 0.02


def test_adam_refuses_momentum_and_nesterov(real_store):
    for extra, named in (({"momentum": 0.5}, "momentum"), ({"nesterov": True}, "nesterov")):
        opt = {"name": "adamw", "lr": 0.01, **extra}
        with pytest.raises(
            ConfigError, match=f"adamw has no {named}; its moments are kwargs.betas"
        ):
            validate(tiny_config(real_store, optimizer=opt))
    validate(tiny_config(real_store, optimizer={"name": "sgd", "lr": 0.1, "nesterov": True}))


def test_optimizer_kwargs_reach_the_torch_optimizer(real_store):
    opt = {"name": "adam", "lr": 0.01, "kwargs": {"betas": [0.5, 0.6], "eps": 1e-3}}
    p = plan(validate(tiny_config(real_store, optimizer=opt)))
    built = p.optimizer(p.model())
    assert isinstance(built, torch.optim.Adam)
    assert tuple(built.param_groups[0]["betas"]) == (0.5, 0.6)
    assert built.param_groups[0]["eps"] == 1e-3


def test_optimizer_kwargs_the_class_does_not_take_fail_before_launch(real_store):
    opt = {"name": "sgd", "lr": 0.01, "kwargs": {"betas": [0.5, 0.6]}}
    p = plan(validate(tiny_config(real_store, optimizer=opt)))
    with pytest.raises(SegscaleError, match=r"train.optimizer 'sgd' kwargs .*betas"):
        p.check(1)


def test_warmup_in_epochs_and_in_steps_is_refused(real_store):
    with pytest.raises(ConfigError, match="give warmup_epochs or warmup_steps, not both"):
        validate(tiny_config(real_store, schedule={"warmup_epochs": 2, "warmup_steps": 10}))
    one = validate(tiny_config(real_store, schedule={"warmup_steps": 10}))
    assert plan(one).schedule(1).warmup_steps == 10
    # a run folder's config.yaml (every field written) loads again
    assert validate(json.loads(one.model_dump_json())) == one


def test_every_component_takes_the_string_shorthand_and_kwargs(real_store, tmp_path):
    plugin = tmp_path / "parts.py"
    plugin.write_text(
        "class Callback:\n    def __init__(self, every=1):\n        self.every = every\n"
        "def transform(scale=1.0):\n    return lambda image, mask: (image * scale, mask)\n"
    )
    cfg = tiny_config(real_store, callbacks=[f"{plugin}:Callback"])
    cfg.update(model="unet", task="segmentation", tracker="none")
    cfg["train"].update(strategy="allreduce", loss={"name": "dice", "kwargs": {"smooth": 0.5}})
    cfg["data"]["transform"] = f"{plugin}:transform"
    p = plan(validate(cfg))
    assert p.loss().smooth == 0.5
    assert [type(cb).__name__ for cb in p.callbacks()] == ["Callback"]
    cfg["train"]["loss"] = {"name": "dice", "kwargs": {"smoth": 0.5}}
    with pytest.raises(SegscaleError, match=r"loss 'dice' kwargs \['smoth'\].*accepted: smooth"):
        plan(validate(cfg))


def test_params_flatten_the_settings(real_store):
    params = validate(tiny_config(real_store)).params()
    assert params["train.optimizer.lr"] == 0.01 and params["model.kwargs.depth"] == 2
    assert params["train.loss.name"] == "dice_ce" and "tracker.name" not in params

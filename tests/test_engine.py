"""The engine's Plan builds every part of a run; options either take effect or are refused."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

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


def test_a_loss_or_transform_may_be_a_plain_function(real_store, tmp_path):
    """`def loss(logits, target, **kwargs)` and `def aug(image, mask)` are the parts themselves
    (their kwargs bound), beside factories that build them; one that is neither names both forms."""
    plugin = tmp_path / "funcs.py"
    plugin.write_text(
        "import torch.nn.functional as F\n"
        "def ce(logits, target, weight=1.0):\n"
        "    return weight * F.cross_entropy(logits, target)\n"
        "def flip(image, mask):\n"
        "    return image.flip(-1), mask.flip(-1)\n"
        "def one_argument(logits):\n"
        "    return logits.mean()\n"
        "class Weighted:\n"
        "    def __call__(self, logits, target):\n"
        "        return 3 * F.cross_entropy(logits, target)\n"
        "weighted = Weighted()\n"
    )
    cfg = tiny_config(real_store)
    cfg["train"]["loss"] = {"name": f"{plugin}:ce", "kwargs": {"weight": 2.0}}
    cfg["data"]["transform"] = f"{plugin}:flip"
    p = plan(validate(cfg))
    p.check(1)  # runs both on real samples and a real batch
    logits, target = torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4))
    assert p.loss()(logits, target) == pytest.approx(
        2 * torch.nn.functional.cross_entropy(logits, target).item()
    )
    image, mask = torch.arange(4.0).reshape(1, 2, 2), torch.tensor([[0, 1], [1, 0]])
    flipped = p.transform()(image, mask)
    assert flipped[0].tolist() == [[[1.0, 0.0], [3.0, 2.0]]] and flipped[1].tolist() == [
        [1, 0],
        [0, 1],
    ]
    cfg["train"]["loss"] = {"name": f"{plugin}:ce", "kwargs": {"weigth": 2.0}}
    with pytest.raises(
        SegscaleError,
        match=r"kwargs \['weigth'\]: got an unexpected keyword argument 'weigth'.*f\(logits, t",
    ):
        plan(validate(cfg))
    # a callable object (a MONAI DiceLoss() instance) is the loss itself
    cfg["train"]["loss"] = f"{plugin}:weighted"
    assert plan(validate(cfg)).loss()(logits, target) == pytest.approx(
        3 * torch.nn.functional.cross_entropy(logits, target).item()
    )
    cfg["train"]["loss"] = f"{plugin}:one_argument"
    with pytest.raises(SegscaleError, match=r"missing a required argument: 'logits'.*a loss is"):
        plan(validate(cfg))


def test_params_flatten_the_settings(real_store):
    params = validate(tiny_config(real_store)).params()
    assert params["train.optimizer.lr"] == 0.01 and params["model.kwargs.depth"] == 2
    assert params["train.loss.name"] == "dice_ce" and "tracker.name" not in params


PLUGINS = """
class Boom:
    def __init__(self, level=1):
        raise ValueError(f"boom {level}")

def boom_transform():
    raise RuntimeError("no transform today")

class BoomLoss:
    def __init__(self):
        raise ValueError("boom loss")

class VectorLoss:  # forgot to reduce
    def __call__(self, out, target):
        return out.mean(dim=(1, 2, 3))

class NoHooks:
    pass

class Misspelt:
    def on_stepend(self, trainer, step):
        pass

class OneArgument:
    def on_step_end(self, trainer):
        pass

def no_optimizer(parameters, config):
    return None

def not_a_transform():
    return 3

class BoomStrategy:
    def __init__(self, device, threads, hops=1):
        raise ValueError(f"no route in {hops} hops")

def returns_none():  # was: trained without a transform, and said nothing
    return None

def mask255():
    return lambda image, mask: (image, mask * 255)

def swapped():
    return lambda image, mask: (mask, image)

def nan_image():
    return lambda image, mask: (image * float("nan"), mask)

class RandomSize:  # a batch cannot stack these
    def __init__(self):
        self.calls = 0

    def __call__(self, image, mask):
        self.calls += 1
        size = 32 if self.calls % 2 else 28
        return image[:, :size, :size], mask[:size, :size]

class NaNLoss:
    def __call__(self, logits, target):
        return logits.sum() * float("nan")

def eval_only_bad(in_channels, num_classes):  # wrong only in validation's mode
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(in_channels, num_classes, 1)

        def forward(self, x):
            y = self.conv(x)
            return y if self.training else y[..., :-1]

    return Net()

def eval_tuple(in_channels, num_classes):  # a tuple only in validation's mode
    net = eval_only_bad(in_channels, num_classes)
    net.forward = lambda x: net.conv(x) if net.training else (net.conv(x),)
    return net

class NoBarrier:
    def __init__(self, device, threads):
        import torch

        self.rank, self.world_size, self.local_rank, self.virtual_workers = 0, 1, 0, 1
        self.device = torch.device("cpu")

    def wrap(self, model):
        return model

    def wrap_optimizer(self, optimizer):
        return optimizer

    def all_reduce_sum(self, tensor):
        return tensor

    def gather_objects(self, obj):
        return [obj]

    def close(self):
        pass
"""


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "loss",
            {"name": "dice", "kwargs": {"smooth": "abc"}},
            r"loss 'dice' kwargs: smooth 'abc' does not fit float",
        ),
        ("loss", "PLUGIN:BoomLoss", r"train.loss '.*:BoomLoss' kwargs \{\}: ValueError: boom loss"),
        (
            "callbacks",
            [{"name": "PLUGIN:Boom", "kwargs": {"level": 3}}],
            r"train.callbacks\[0\].*boom 3",
        ),
        (
            "optimizer",
            {"name": "adam", "lr": 0.01, "kwargs": {"betas": [0.9]}},
            r"train.optimizer 'adam'",
        ),
        (
            "transform",
            "PLUGIN:boom_transform",
            r"data.transform .*RuntimeError: no transform today",
        ),
        ("loss", "PLUGIN:VectorLoss", r"gives \(2,\) on the model's output; expected a scalar"),
        (
            "callbacks",
            ["PLUGIN:NoHooks"],
            r"train.callbacks\[0\] .*has none of the Trainer's hooks",
        ),
        (
            "callbacks",
            ["PLUGIN:Misspelt"],
            r"on_stepend is not a hook .*did you mean 'on_step_end'",
        ),
        (
            "callbacks",
            ["PLUGIN:OneArgument"],
            r"on_step_end\(trainer\) cannot be called as on_step_end\(trainer, step\)",
        ),
        (
            "optimizer",
            {"name": "PLUGIN:no_optimizer", "lr": 0.01},
            r"returns NoneType; expected a torch.optim.Optimizer",
        ),
        ("transform", "PLUGIN:not_a_transform", r"builds int; expected a callable"),
        (
            "callbacks",
            [{"name": "early_stop", "kwargs": {"reference": {"1": 0.5}, "metric": "dcie"}}],
            r"reads the validation metric 'dcie' \(did you mean 'dice'\?\); the segmentation",
        ),
        (
            "strategy",
            {"name": "local_sgd", "kwargs": {"period": 0}},
            r"local_sgd period 0: expected at least 1",
        ),
        (
            "strategy",
            {"name": "PLUGIN:BoomStrategy", "kwargs": {"hops": 2}},
            r"train.strategy '.*:BoomStrategy' kwargs \{'hops': 2\}: ValueError: no route in 2",
        ),
        ("transform", "PLUGIN:returns_none", r"builds NoneType; expected a callable"),
        (
            "transform",
            "PLUGIN:mask255",
            r"mask255' on la2018_\d+ \(row \d+ of the store\): returns mask values 0\.\.255; "
            r"expected class values 0\.\.1",
        ),
        ("transform", "PLUGIN:nan_image", r"returns an image with NaN or infinite values"),
        ("transform", "PLUGIN:swapped", r"returns an image of shape \(32, 32\); expected \(1, H"),
        ("transform", "PLUGIN:RandomSize", r"returns images of different shapes \(\(1, 28, 28\)"),
        ("loss", "PLUGIN:NaNLoss", r"NaNLoss' kwargs \{\} gives nan .*expected a finite number"),
        (
            "model",
            {"name": "PLUGIN:eval_only_bad"},
            r"outputs \(2, 2, 32, 31\) for a batch of 2 in eval mode \(validation\)",
        ),
        (
            "model",
            {"name": "PLUGIN:eval_tuple"},
            r"returns tuple for a batch in eval mode \(validation\); expected one tensor",
        ),
        (
            "strategy",
            "PLUGIN:NoBarrier",
            r"builds NoBarrier, without barrier of the strategy protocol",
        ),
    ],
    ids=[
        "loss-value",
        "loss-plugin",
        "callback",
        "optimizer-kwarg-value",
        "transform",
        "loss-not-scalar",
        "callback-no-hooks",
        "callback-misspelt-hook",
        "callback-hook-signature",
        "optimizer-returns-none",
        "transform-not-callable",
        "callback-reads-unknown-metric",
        "strategy-value",
        "strategy-plugin",
        "transform-returns-none",
        "transform-mask-values",
        "transform-nan-image",
        "transform-swapped",
        "transform-sizes-differ",
        "loss-nan",
        "model-eval-mode",
        "model-eval-mode-tuple",
        "strategy-protocol",
    ],
)
def test_user_components_that_fail_when_built_fail_before_launch(
    tmp_path, real_store, key, value, message
):
    """Each is one SegscaleError naming the key, from Plan.check (was: a traceback in every
    worker, after the run folder was written)."""
    plugin = tmp_path / "plug.py"
    plugin.write_text(PLUGINS)
    value = json.loads(json.dumps(value).replace("PLUGIN", str(plugin)))
    cfg = tiny_config(real_store)
    if key == "model":
        cfg["model"] = value
    else:
        (cfg["data"] if key == "transform" else cfg["train"])[key] = value
    with pytest.raises(SegscaleError, match=message):
        plan(validate(cfg)).check(1)


def test_a_plugin_file_that_does_not_load_is_one_line(tmp_path, real_store):
    plugin = tmp_path / "broken.py"
    plugin.write_text("def f(:\n")
    cfg = tiny_config(real_store, loss=f"{plugin}:f")
    with pytest.raises(SegscaleError, match=r"broken.py .* fails to load: SyntaxError"):
        plan(validate(cfg))


def test_adam_refuses_momentum_even_at_its_default_and_its_saved_config_loads(real_store):
    with pytest.raises(ConfigError, match="adam has no momentum"):
        validate(tiny_config(real_store, optimizer={"name": "adam", "lr": 0.1, "momentum": 0.9}))
    saved = validate(tiny_config(real_store)).model_dump(mode="json")  # adam: nothing unread
    assert "momentum" not in saved["train"]["optimizer"]
    assert validate(saved).train.optimizer.name == "adam"
    sgd = validate(tiny_config(real_store, optimizer={"name": "sgd", "lr": 0.1}))
    assert sgd.model_dump()["train"]["optimizer"]["momentum"] == 0.9


@pytest.mark.parametrize(
    "schedule, message",
    [
        (
            {"decay": "cosine", "decay_epochs": [5]},
            "decay_epochs takes effect only with decay: step",
        ),
        ({"decay": "step"}, "decay: step needs decay_epochs"),
        ({"decay": "cosine", "decay_factor": 0.5}, "decay_factor takes effect only with"),
        ({"decay": "cosine", "poly_power": 2}, "poly_power takes effect only with decay: poly"),
        ({"min_lr_ratio": 0.1}, "min_lr_ratio takes effect only with decay: cosine or poly"),
        ({"scaling": "none", "reference_batch": 64}, "reference_batch takes effect only with"),
        ({"warmup": "constant"}, "warmup: constant takes effect only with warmup_epochs"),
    ],
)
def test_schedule_options_the_rule_would_ignore_are_refused(real_store, schedule, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(real_store, schedule=schedule))


def test_config_messages_inside_lists_and_optional_sections(real_store, tmp_path):
    cfg = tiny_config(real_store, callbacks=[{"nmae": "x"}])
    with pytest.raises(
        ConfigError, match=r"unknown key 'train.callbacks.0.nmae'.*valid keys here: name, kwargs"
    ):
        validate(cfg)
    cfg = tiny_config(real_store)
    cfg["data"]["transform"] = {"name": "x.py:y", "kwarg": {}}
    with pytest.raises(ConfigError, match=r"'data.transform.kwarg' \(did you mean 'kwargs'\?\)"):
        validate(cfg)
    plugin = tmp_path / "cb.py"
    plugin.write_text("class C:\n    pass\n")
    one = validate(tiny_config(real_store, callbacks=f"{plugin}:C"))  # one callback, no list
    assert [c.name for c in one.train.callbacks] == [f"{plugin}:C"]
    cfg = tiny_config(real_store)
    cfg["data"]["val_split"] = "nosuch"
    with pytest.raises(SegscaleError, match=r"data.val_split: .*split 'nosuch' has no cases"):
        plan(validate(cfg))


def test_the_xml_config_refuses_an_unknown_element(tmp_path):
    from segscale.config import load_config

    text = (Path(__file__).parents[1] / "examples" / "brats_unet_autocnnp.xml").read_text()
    bad = tmp_path / "bad.xml"
    bad.write_text(text.replace("parallelism-degree", "parallelism-degre"))
    with pytest.raises(
        ConfigError,
        match=r"unknown element <parallelism-degre> \(did you mean 'parallelism-degree'\?\)",
    ):
        load_config(bad)


def test_the_torchrun_entry_takes_overrides_anywhere_and_resumes_after_a_restart(
    tmp_path, real_store, monkeypatch
):
    from segscale import worker

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(real_store)))
    run = tmp_path / "run"
    args = ["train", str(config), "--run-dir", str(run), "train.epochs=1", "--no-progress"]
    assert worker.main(args) == 0  # overrides after --run-dir (was: unrecognized arguments)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 1
    assert worker.main(args) == 2  # started: not overwritten
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun's restart of that worker
    assert worker.main(args) == 0


def test_names_and_paths_that_name_no_component_are_one_line(tmp_path, real_store):
    plugin = tmp_path / "things.py"
    plugin.write_text("answer = 42\nclass NotATask:\n    metric = 'dice'\n")
    for changes, message in [
        ({"model": {"name": f"{plugin}:answer"}}, r"model '.*:answer' is a int, not something"),
        ({"model": {"name": "UNET"}}, r"unknown model 'UNET' \(did you mean 'unet'\?\)"),
        ({"task": f"{plugin}:NotATask"}, r"task '.*' has no num_outputs, labels, .*evaluate of"),
    ]:
        cfg = tiny_config(real_store)
        cfg.update(changes)
        with pytest.raises(SegscaleError, match=message):
            plan(validate(cfg))


def test_a_run_too_short_for_its_settings_is_warned_of_not_refused(real_store):
    """A trial run (train.epochs=1) of a long recipe is legitimate: a warning says what of the
    recipe it will not reach."""
    cfg = tiny_config(
        real_store,
        epochs=2,
        schedule={"warmup_epochs": 5, "decay": "step", "decay_epochs": [1, 3]},
    )
    with pytest.warns(UserWarning) as seen:
        plan(validate(cfg)).check(1)
    said = " | ".join(str(w.message) for w in seen)
    assert "warmup_epochs 5 is longer than the run (epochs 2)" in said
    assert "decay_epochs [3]: at or after the last epoch" in said


def test_a_note_said_for_one_config_is_not_said_again_for_the_next(real_store):
    """tune checks the user's config, then each trial of the same settings: a note was printed
    once per check, in one process."""
    cfg = validate(tiny_config(real_store, epochs=2, schedule={"warmup_epochs": 5}))
    said: set[str] = set()
    with pytest.warns(UserWarning, match="warmup_epochs 5 is longer than the run"):
        plan(cfg).check(1, said=said)
    assert any("warmup_epochs 5" in note for note in said)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all the second time
        plan(cfg).check(1, said=said)


def test_a_global_batch_larger_than_the_training_split_is_said(real_store):
    """Its lr is scaled for a batch no step has (seen in a 16-worker simulated trial: global
    batch 64 on 44 slices, without a word)."""
    cfg = validate(tiny_config(real_store, batch_size=16, simulate_workers=4, steps_per_epoch=None))
    with pytest.warns(UserWarning, match=r"global batch 64 .* more than the training split's 36"):
        plan(cfg).check(1)


RUNTIME_PLUGINS = """
import torch

class RaiseAtStep:  # a callback that fails at step 2, after plan checked it
    def on_step_end(self, trainer, step):
        if step == 2:
            raise ValueError("callback blew up")

class RaiseSometimes:  # a transform that fails on the 5th sample, after plan's three
    def __init__(self):
        self.calls = 0

    def __call__(self, image, mask):
        self.calls += 1
        if self.calls == 5:
            raise ValueError("bad sample")
        return image, mask

class LossAtStep:  # a loss that fails at its 3rd call (plan's is the 1st)
    def __init__(self):
        self.calls = 0

    def __call__(self, logits, target):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("loss blew up")
        return torch.nn.functional.cross_entropy(logits, target)

class CloseRaises:  # a tracker that fails when it ends its record
    def __init__(self, run_dir, run_name, params):
        pass

    def on_epoch_end(self, trainer, record):
        pass

    def close(self, error):
        raise RuntimeError("close blew up")

class HookRaises:  # a tracker whose hook fails: left out, and still closed
    def __init__(self, run_dir, run_name, params):
        self.run_dir = run_dir

    def on_step_end(self, trainer, step):
        raise RuntimeError("hook blew up")

    def close(self, error):
        (self.run_dir / "closed").write_text(repr(error))

def net(in_channels, num_classes):
    from blocks import head  # a module beside this file, as a model folder holds its parts

    return head(in_channels, num_classes)
"""


def test_a_plugin_failing_during_training_is_named_in_one_line(tmp_path, real_store):
    """With one worker a user's callback or transform raising mid-run was a 60-line traceback
    through the CLI with no error line; a user's tracker failing in close() failed a finished
    run; a plug-in file could not import the module beside it."""
    from conftest import cli

    def line(text):  # where in the plug-in file a statement is
        return RUNTIME_PLUGINS.splitlines().index(text) + 1

    plugin = tmp_path / "plugs" / "runtime.py"
    plugin.parent.mkdir()
    plugin.write_text(RUNTIME_PLUGINS)
    (plugin.parent / "blocks.py").write_text(
        "import torch\n\ndef head(c, k):\n    return torch.nn.Conv2d(c, k, 3, padding=1)\n"
    )

    def train(name, **settings):
        cfg = tiny_config(real_store, epochs=1, **settings.pop("train", {}))
        cfg.update(settings)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return cli("train", path, "--workers", "1", "--run-dir", tmp_path / name)

    r = train("cb", train={"callbacks": [f"{plugin}:RaiseAtStep"]})
    at = line('            raise ValueError("callback blew up")')
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: callback RaiseAtStep.on_step_end raised ValueError: callback blew up ({plugin}:{at})"
    )
    r = train("tf", data={"store": str(real_store), "transform": f"{plugin}:RaiseSometimes"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data.transform '{plugin}:RaiseSometimes' on la2018_")
    at = line('            raise ValueError("bad sample")')
    assert last.endswith(f"raised ValueError: bad sample ({plugin}:{at})")
    r = train("loss", train={"loss": f"{plugin}:LossAtStep"})  # not a hook: its traceback
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" in r.stderr and "typer" not in r.stderr
    assert lines[-1] == "error: the worker failed, with this error: RuntimeError: loss blew up"
    r = train("trk", tracker=f"{plugin}:CloseRaises")
    at = line('        raise RuntimeError("close blew up")')
    assert r.returncode == 0 and (tmp_path / "trk" / "model.pt").is_file()
    assert (
        f"warning: tracker CloseRaises.close raised RuntimeError: close blew up ({plugin}:{at}); "
        "it records nothing more of this run"
    ) in r.stderr
    r = train("hook", tracker=f"{plugin}:HookRaises")
    assert r.returncode == 0 and r.stderr.count("warning: tracker HookRaises.on_step_end") == 1
    assert (tmp_path / "hook" / "closed").read_text() == "None"
    r = train("sib", model={"name": f"{plugin}:net"})
    assert r.returncode == 0, r.stderr
    # the record names the code that ran: each own plug-in's file and its digest
    import hashlib

    env = json.loads((tmp_path / "sib" / "environment.json").read_text())
    assert env["plugins"] == {
        "model": {
            "name": f"{plugin}:net",
            "file": str(plugin),
            "sha256": hashlib.sha256(plugin.read_bytes()).hexdigest(),
        }
    }
    env = json.loads((tmp_path / "trk" / "environment.json").read_text())
    assert list(env["plugins"]) == ["tracker[0]"]  # the built-in model, loss, ... are not


def test_kwargs_torch_refuses_name_the_line_that_set_them(tmp_path, real_store):
    """Checked when plan builds the optimiser and the loss, after validation: the file's line
    was lost ('train.optimizer adam kwargs ...' alone)."""
    import yaml

    from segscale.config import load_config

    cfg = tiny_config(real_store, optimizer={"name": "adam", "lr": 1e-3, "kwargs": {"betaz": 1}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    lines = path.read_text().splitlines()
    line = lines.index(next(t for t in lines if "betaz" in t))  # its kwargs: line, 1-based
    with pytest.raises(SegscaleError, match=rf"^{re.escape(str(path))}:{line}: train.optimizer"):
        plan(load_config(path)).check(1)
    with pytest.raises(SegscaleError, match=r"^override 'train.optimizer.kwargs=\{betaz: 2\}'"):
        plan(load_config(path, ["train.optimizer.kwargs={betaz: 2}"])).check(1)

"""Transfer learning: model.pretrained from a run, a file or a zoo entry, loading what fits and
saying what did not."""

import json
import shutil

import pytest
import torch
import yaml

from conftest import tiny_config, trained_run
from segscale import worker
from segscale.config import validate
from segscale.engine import plan, prepare_run_dir
from segscale.errors import SegscaleError
from segscale.registry import MODELS
from segscale.transfer import load_pretrained


def unet(in_channels: int, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(in_channels * 10 + num_classes)
    return MODELS.resolve("unet")(
        in_channels=in_channels, num_classes=num_classes, base_channels=4, depth=2
    )


def test_other_classes_and_channels_load_what_fits(tmp_path):
    from safetensors.torch import save_file

    source = unet(1, 2)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = unet(2, 3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_pretrained(target, str(path))
    state = target.state_dict()
    skipped = {s["name"] for s in report.skipped}
    adapted = {a["name"] for a in report.adapted}
    assert len(adapted) == 1 and len(skipped) >= 1  # the first conv; the 3-class head
    for name in skipped:  # kept as initialised
        assert torch.equal(state[name], before[name])
    for name in report.loaded:
        assert torch.equal(state[name], source.state_dict()[name])
    # the adapted stem answers a constant 2-channel input as the source did a constant 1-channel
    (stem,) = adapted
    w_src, w_dst = source.state_dict()[stem], state[stem]
    assert torch.allclose(w_dst.sum(1), w_src.sum(1), atol=1e-6)
    assert 0.9 < report.fraction < 1.0
    assert "adapted" in report.summary() and "skipped" in report.summary()


def test_another_architecture_is_refused(tmp_path):
    other = MODELS.resolve("resunet")(in_channels=1, num_classes=2, base_channels=4, depth=2)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(
        SegscaleError, match=r"only .*% of the model's weights fit .*same architecture"
    ):
        load_pretrained(unet(1, 2), str(path))
    with pytest.raises(SegscaleError, match="no such file or folder"):
        load_pretrained(unet(1, 2), str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(SegscaleError, match="not a PyTorch state dict or safetensors file"):
        load_pretrained(unet(1, 2), str(tmp_path / "junk.pt"))


def test_fine_tuning_from_a_run_and_from_a_zoo_entry(tmp_path, real_store, monkeypatch):
    from segscale.methods import methods
    from segscale.zoo import publish

    source = trained_run(real_store, tmp_path / "source", epochs=1, steps_per_epoch=2)
    trained = torch.load(source / "model.pt", weights_only=True)
    publish(source, "tiny", tmp_path / "zoo")
    monkeypatch.setenv("SEGSCALE_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("SEGSCALE_CACHE", str(tmp_path / "cache"))
    for name, spec in (("from-run", str(source)), ("from-zoo", "zoo:tiny@1")):
        cfg = tiny_config(
            real_store, epochs=1, steps_per_epoch=1, optimizer={"name": "sgd", "lr": 1e-12}
        )
        cfg["model"]["pretrained"] = spec
        run = tmp_path / name
        config = validate(cfg)
        checked = plan(config)
        checked.check(1)  # resolved and fitted before any worker starts
        architecture = checked.describe()["injection"]["architecture"]["params"]
        assert architecture["pretrained"] == spec
        assert architecture["pretrained_loaded"].startswith(f"{len(trained)} tensors loaded")
        prepare_run_dir(config, run, resume=False)
        worker.train(run, progress=False)
        report = json.loads((run / "pretrained.json").read_text())
        assert report["fraction"] == 1.0 and not report["skipped"] and report["source"] == spec
        tuned = torch.load(run / "model.pt", weights_only=True)
        # an lr of 1e-12 moves nothing measurable: the run started from the source's weights
        conv = next(k for k in trained if k.endswith("weight") and trained[k].dim() == 4)
        assert torch.allclose(tuned[conv], trained[conv], atol=1e-6)
        # the methods section says so (it said "random initialisation")
        shown = "zoo:tiny@1" if name == "from-zoo" else "local weights (source)"
        assert (
            f"Initialisation: fine-tuned from {shown} (100.0% of the weights from it: "
            f"{len(report['loaded'])} tensors loaded, 0 adapted" in methods(run)
        )
        # a published fine-tuned model says what it came from; a local path is not published
        entry = publish(run, name, tmp_path / "zoo")
        assert yaml.safe_load((entry / "config.yaml").read_text())["model"]["pretrained"] is None
        info = json.loads((entry / "segscale-model.json").read_text())
        assert info["fine_tuned_from"] == shown and str(tmp_path) not in json.dumps(info)
        assert f"fine-tuned from {shown}" in (entry / "card.md").read_text()
    # a source that saw inputs prepared otherwise is named, with what differs (a warning)
    from segscale.transfer import preprocessing_note

    here = json.loads((real_store / "meta.json").read_text())["preprocessing"]
    for spec in (str(source), "zoo:tiny@1"):
        assert preprocessing_note(spec, here) is None
        note = preprocessing_note(spec, {**here, "normalize": "minmax", "size": 48})
        assert f"normalize {here['normalize']} there, minmax here; size 32 there, 48 here" in note
    # a weights file of a run is read as its run's; one alone records nothing
    assert "size 32 there, 48 here" in preprocessing_note(str(source / "model.pt"), {"size": 48})
    (tmp_path / "alone").mkdir()
    shutil.copy(source / "model.pt", tmp_path / "alone" / "weights.pt")
    assert preprocessing_note(str(tmp_path / "alone" / "weights.pt"), {}) is None
    # plan's check pulls a zoo source once (each pull verifies every cached file), and hands the
    # preprocessing warning over with the report, not into the run's record
    import segscale.hub

    pulls, pull = [], segscale.hub.pull
    monkeypatch.setattr(segscale.hub, "pull", lambda *a, **k: pulls.append(a) or pull(*a, **k))
    cfg = tiny_config(real_store)
    cfg["model"]["pretrained"] = "zoo:tiny"
    checked = plan(validate(cfg))
    monkeypatch.setitem(checked.store.meta, "preprocessing", {**here, "size": 48})
    with pytest.warns(UserWarning, match="size 32 there, 48 here"):
        checked.check(1)
    # a zoo source without a version is recorded with the one it resolved to
    assert len(pulls) == 1 and checked.transfer.source == "zoo:tiny@1"
    assert "note" not in checked.transfer.as_dict()
    bad = validate({**tiny_config(real_store), "model": {"name": "unet", "pretrained": "zoo:none"}})
    with pytest.raises(SegscaleError, match="no model 'none'"):
        plan(bad).check(1)


def encoder_and_rest(state: dict) -> tuple[dict, dict]:
    """A UNet's parameters (not BatchNorm's running statistics) split into encoder and rest."""
    params = {
        k: v
        for k, v in state.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    encoder = {k: v for k, v in params.items() if k.startswith("down.")}
    return encoder, {k: v for k, v in params.items() if k not in encoder}


def test_a_frozen_encoder_is_not_updated_until_its_epochs_are_over(tmp_path, real_store):
    source = trained_run(real_store, tmp_path / "source")
    pretrained = torch.load(source / "model.pt", weights_only=True)
    cfg = tiny_config(
        real_store, epochs=2, steps_per_epoch=2, finetune={"freeze_encoder_epochs": 1}
    )
    cfg["model"]["pretrained"] = str(source)
    run = tmp_path / "tuned"
    prepare_run_dir(validate(cfg), run, resume=False)
    worker.train(run, progress=False)

    after_one = torch.load(run / "checkpoints" / "step_00000002.pt", weights_only=False)["model"]
    encoder, rest = encoder_and_rest(after_one)
    assert encoder and all(torch.equal(v, pretrained[k]) for k, v in encoder.items())
    assert any(not torch.equal(v, pretrained[k]) for k, v in rest.items())
    final_encoder, _ = encoder_and_rest(torch.load(run / "model.pt", weights_only=True))
    assert any(not torch.equal(v, after_one[k]) for k, v in final_encoder.items())


def test_the_encoder_learns_at_its_own_lr_scale(tmp_path, real_store):
    class Lrs:
        def __init__(self):
            self.seen = []

        def on_step_end(self, trainer, step):
            self.seen.append(
                [(g.get("encoder", False), g["lr"]) for g in trainer.optimizer.param_groups]
            )

    cfg = validate(
        tiny_config(real_store, epochs=1, steps_per_epoch=2, finetune={"encoder_lr_scale": 0.1})
    )
    run = tmp_path / "run"
    prepare_run_dir(cfg, run, resume=False)
    p = plan(cfg)
    strategy = p.strategy()
    lrs = Lrs()
    trainer = p.trainer(strategy, run, [lrs], progress=False)
    trainer.fit()
    strategy.close()
    assert len(lrs.seen) == 2
    for (enc, enc_lr), (dec, dec_lr) in lrs.seen:
        assert enc and not dec and enc_lr == pytest.approx(0.1 * dec_lr) and dec_lr > 0
    encoder = {id(q) for q in trainer.model.down.parameters()}  # exactly the contracting path
    assert {id(q) for q in trainer.optimizer.param_groups[0]["params"]} == encoder


def test_fine_tuning_a_model_without_an_encoder_is_one_line_before_launch(tmp_path, real_store):
    from conftest import ROOT

    cfg = tiny_config(real_store, finetune={"encoder_lr_scale": 0.5})
    cfg["model"] = {"name": f"{ROOT / 'examples' / 'plugins' / 'tiny_net.py'}:tiny_net"}
    with pytest.raises(SegscaleError, match="has no encoder that segscale can find"):
        plan(validate(cfg)).check(1)
    # unset, the options leave the digest of configs written before them
    plain = validate(tiny_config(real_store))
    assert "finetune" not in plain.settings()["train"]
    assert (
        validate(tiny_config(real_store, finetune={"encoder_lr_scale": 0.5})).digest()
        != plain.digest()
    )

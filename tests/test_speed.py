"""The speed settings on CPU: batches gathered from a device-resident split are the DataLoader's,
training with them is bit-identical, and amp/channels_last/compile resolve per device."""

import json

import pytest
import torch

from conftest import tiny_config
from segscale import worker
from segscale.config import AugmentConfig, validate
from segscale.data import SliceDataset, TrainLoader
from segscale.engine import plan, prepare_run_dir, speed_settings
from segscale.errors import ConfigError, SegscaleError
from segscale.imgmed import Store


@pytest.mark.parametrize("ranks", [[0], [0, 1]])  # one worker; two simulated workers
def test_device_resident_batches_are_the_dataloaders(real_store, ranks):
    data = SliceDataset(Store.open(real_store), "train")
    augment = AugmentConfig(enabled=True, rotation=20, zoom=(0.9, 1.1))
    loaders = [
        TrainLoader(data, 4, ranks, len(ranks), torch.device("cpu"), 7, augment, on_device=on)
        for on in (False, True)
    ]
    assert loaders[1].resident is not None and len(loaders[0]) == len(loaders[1])
    for epoch, skip in ((0, 0), (1, 2)):  # a fresh epoch; a resumed one, 2 batches in
        for loader in loaders:
            loader.set_epoch(epoch, skip_batches=skip)
        steps = [list(loader) for loader in loaders]
        assert len(steps[0]) == len(steps[1]) == len(loaders[0]) - skip > 0
        for a, b in zip(*steps):
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb) and yb.dtype == torch.int64


def test_training_on_a_resident_split_is_bit_identical(tmp_path, real_store):
    weights = {}
    for on in (False, True):
        cfg = tiny_config(real_store, epochs=2, steps_per_epoch=3)
        cfg["data"]["on_device"] = on
        cfg["data"]["augment"] = {"enabled": True, "rotation": 15}
        run = tmp_path / str(on)
        prepare_run_dir(validate(cfg), run, resume=False)
        worker.train(run, progress=False)
        weights[on] = torch.load(run / "model.pt", weights_only=True)
        assert json.loads((run / "environment.json").read_text())["data_on_device"] is on
    assert all(torch.equal(weights[False][k], weights[True][k]) for k in weights[False])


def test_speed_settings_resolve_per_device(tmp_path, real_store):
    cpu = torch.device("cpu")
    auto = validate(tiny_config(real_store)).train
    assert speed_settings(auto, cpu) == {
        "amp": "none", "channels_last": False, "compile": False, "check_every": 1,
        "cudnn_benchmark": False,
    }  # fmt: skip
    assert (
        speed_settings(validate(tiny_config(real_store, check_every=7)).train, cpu)["check_every"]
        == 7
    )
    chosen = validate(tiny_config(real_store, amp="bf16", channels_last=True)).train
    assert (
        speed_settings(chosen, cpu)["amp"] == "bf16"
        and speed_settings(chosen, cpu)["channels_last"]
    )
    # unset, they leave the digest configs had before them; set, they are recorded
    plain = validate(tiny_config(real_store))
    settings = plain.settings()
    assert "channels_last" not in settings["train"] and "on_device" not in settings["data"]
    assert "check_every" not in settings["train"]  # when the host looks, never what is trained
    assert validate(tiny_config(real_store, check_every=7)).digest() == plain.digest()
    for bad in (0, -1, 1.5, True, "AUTO", None):  # (was: true read as 1; 0 'should be auto')
        with pytest.raises(ConfigError, match=r"check_every': expected auto or a whole number"):
            validate(tiny_config(real_store, check_every=bad))
    assert validate(tiny_config(real_store, compile=True)).digest() != plain.digest()


def test_channels_last_and_bf16_train_on_cpu_like_the_defaults(tmp_path, real_store):
    rows = {}
    for name, extra in (("default", {}), ("fast", {"channels_last": True, "amp": "bf16"})):
        run = tmp_path / name
        prepare_run_dir(
            validate(tiny_config(real_store, steps_per_epoch=3, **extra)), run, resume=False
        )
        rows[name] = worker.train(run, progress=False)
        env = json.loads((run / "environment.json").read_text())
        assert env["channels_last"] is bool(extra) and env["amp"] == extra.get("amp", "none")
    # bf16 rounds differently: the same training, to bf16's precision
    for a, b in zip(rows["default"], rows["fast"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)


def test_on_device_refuses_per_sample_work(real_store):
    cfg = tiny_config(real_store)
    cfg["data"].update(on_device=True, num_workers=2)
    with pytest.raises(SegscaleError, match="on_device gathers batches on the device"):
        plan(validate(cfg))


def test_the_gpu_benchmark_checks_and_measures_on_cpu(tmp_path):
    """benchmarks/gpu.py --quick: its correctness checks pass (else it exits 1) and it reports
    every chosen variant; fp32, bf16, channels_last, everything at once (compile included), and
    that with the host's check after every step."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick", "--variants", "1,2,3,5,6",
         "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "check compiled vs eager logits" in done.stdout and "FAILED" not in done.stdout
    result = json.loads(out.read_text())
    assert list(result["variants"]) == [
        "fp32", "bf16", "+ channels_last", "+ data on device", "check every step"
    ]  # fmt: skip
    for row in result["variants"].values():
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and 0 <= row["data_wait"] < 1
    assert result["flops_per_image"] > 1e6 and result["peak_tflops"] is None


def test_the_determinism_probe_leaves_the_run_untouched(tmp_path, real_store):
    """The run-start probe for CUDA ops without deterministic kernels trains a copy of its own:
    on CPU (where nothing alerts) it finds none, and the run's weights and RNG are as before."""
    cfg = validate(tiny_config(real_store))
    prepare_run_dir(cfg, tmp_path / "run", resume=False)
    p = plan(cfg)
    strategy = p.strategy()
    trainer = p.trainer(strategy, tmp_path / "run", progress=False)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    assert p.probe_determinism(trainer) == []
    assert p.nondeterministic_ops(trainer) is None  # not probed off CUDA
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    strategy.close()

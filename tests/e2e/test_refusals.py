"""Bad command lines refused by the real CLI before anything starts: one line, exit 2, nothing
written."""

import pytest
import torch

from conftest import cli, tiny_config
from segscale.config import save_config, validate


@pytest.fixture
def run_dir(tmp_path, real_store):
    """A run folder as training leaves it (the weights are not read before these refusals)."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(validate(tiny_config(real_store)), run / "config.yaml")
    (run / "model.pt").write_bytes(b"")
    return run


def refused(r, message: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_evaluate_refusals(run_dir, tmp_path):
    refused(cli("evaluate", run_dir, "--split", "nosuch"), "split 'nosuch' has no cases")
    assert not list(run_dir.glob("evaluation*"))  # was: a Dice 1.0 file, then an IndexError
    refused(cli("evaluate", run_dir, "--json", tmp_path), "a folder; give the results file")
    (run_dir / "model.pt").unlink()
    refused(cli("evaluate", run_dir, "--workers", 2), "no model.pt; train the run to the end")


def test_predict_refusals(run_dir, tmp_path):
    image = tmp_path / "x.nii.gz"
    image.write_bytes(b"")
    taken = tmp_path / "taken.txt"
    taken.write_text("a file")
    refused(cli("predict", run_dir, image, "--out", taken), "a file; give a folder for the masks")
    if not torch.cuda.is_available():
        refused(
            cli("predict", run_dir, image, "--out", tmp_path / "m", "--device", "cuda"),
            "no CUDA device is available",
        )


def test_train_refuses_a_node_layout_torchrun_cannot_start(tmp_path, real_store):
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(real_store)))
    run = tmp_path / "run"
    args = ("train", config, "--run-dir", run, "--nodes", 2, "--rdzv-endpoint", "localhost:1")
    refused(cli(*args, "--node-rank", 5), "--node-rank 5: expected 0..1 for --nodes 2")
    assert not run.exists()  # was: config.yaml written, then a wait for node 5 that never comes
    r = cli("train", config, "--run-dir", run, "--nodes", 0)
    assert r.returncode == 2 and not run.exists(), r.stderr


def test_help_and_a_missing_run_or_config_are_answered_without_importing_torch(tmp_path):
    """Every command line imported torch (seconds) before its first check: --help and a
    mistyped path waited for it."""
    import subprocess
    import sys

    missing = tmp_path / "nosuch"
    for args, message in (
        (["--help"], None),
        (["evaluate", missing], "no such file or folder"),
        (["predict", missing, tmp_path, "--out", tmp_path / "m"], "no such file or folder"),
        (["export", missing], "no such file or folder"),
        (["export", tmp_path, "--format", "tflite"], "expected one of onnx, torchscript"),
        (["compare", missing, tmp_path], "no such file or folder"),
        (["methods", missing], "no such file or folder"),
        (["repeat", missing.with_suffix(".yaml"), "--out", tmp_path / "r"], "cannot read config"),
        (["train", missing.with_suffix(".yaml")], "cannot read config"),
        (["plan", missing.with_suffix(".yaml")], "cannot read config"),
    ):
        probe = (
            "import sys\nfrom segscale.cli import main\n"
            f"sys.argv = ['segscale', *{[str(a) for a in args]!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('torch' in sys.modules, code, file=sys.stderr)\n"
        )
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert r.stderr.splitlines()[-1] == f"False {0 if message is None else 2}", r.stderr
        assert message is None or message in r.stderr, r.stderr

"""`segscale demo`, one of the README's two commands: what it refuses before preparing or training
anything, and what its folder holds after a (tiny) run."""

import json

import pytest

from conftest import cli
from segscale._files import RUN_LOCK, held_lock

TINY = ("train.epochs=1", "train.steps_per_epoch=2", "tracker=none")


def test_the_demo_refuses_before_it_writes_or_deletes_anything(tmp_path, real_store):
    """It deleted OUT/run unchecked (a user's folder, or one a training was running in) and
    wrote over a report there; a classification demo failed after training; a test split with
    no cases was found after training; a bad --out was a traceback-like 'Error' with exit 1."""
    (tmp_path / "file").write_text("x")
    done = cli("demo", "--out", tmp_path / "file", *TINY)
    assert done.returncode == 2 and "is a file; give a folder" in done.stderr
    mine = tmp_path / "mine"
    (mine / "run").mkdir(parents=True)
    (mine / "run" / "important.txt").write_text("precious")
    (mine / "run" / "config.yaml").write_text("name: x\n")  # a run of the user's own
    done = cli("demo", "--out", mine, *TINY)
    assert done.returncode == 2 and "its run/ or prepared/ is not an earlier demo's" in done.stderr
    (mine / ".segscale-demo").write_text("")  # an earlier demo's folder, training in it
    with held_lock(mine / "run" / RUN_LOCK, 1, "test"):
        done = cli("demo", "--out", mine, *TINY)
    assert done.returncode == 2 and "a training is running in its run/" in done.stderr
    assert (mine / "run" / "important.txt").read_text() == "precious"
    (mine / "run" / "important.txt").rename(mine / "notes.md")
    done = cli("demo", "--out", mine, *TINY)
    assert done.returncode == 2 and "files the demo did not write (e.g. notes.md)" in done.stderr
    assert (mine / "notes.md").read_text() == "precious"
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "run").symlink_to(mine / "run")
    done = cli("demo", "--out", linked, *TINY)
    assert done.returncode == 2 and "its run is not a folder of its own" in done.stderr
    out = tmp_path / "out"
    for args, message in (
        (("train.epoch=1",), "unknown key 'train.epoch'"),
        (
            ("task=classification", "model.name=cnn", "train.loss=ce"),
            "the demo reports a segmentation",
        ),
        ((f"data.store={real_store}", "data.test_split=nosuch"), "split 'nosuch' has no cases"),
        (("model.name=unetz",), "unknown model 'unetz'"),  # was: after preparing the store
        (("workers=500",), "500 workers on this machine's"),  # was: a launcher traceback
        ((f"data.store={tmp_path / 'nowhere'}",), "nowhere"),
    ):
        done = cli("demo", "--out", out, *TINY, *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "data.store=" + str(out) not in done.stderr  # an override the user never gave
        assert not out.exists(), list(out.iterdir())  # nothing written, not even its mark


@pytest.mark.filterwarnings("ignore")
def test_a_tiny_demo_records_what_ran_where_methods_finds_it(tmp_path, real_store):
    """workers=1 trained on 2 workers (the --workers default) while config.yaml said 1; the
    evaluation lay outside run/, so `methods` said the run had none; the report was titled 'run'."""
    out = tmp_path / "demo"
    done = cli("demo", "--out", out, *TINY, f"data.store={real_store}", "workers=1", "name=mine")
    assert done.returncode == 0, done.stderr
    env = json.loads((out / "run" / "environment.json").read_text())
    assert env["workers"] == 1 and env["global_batch"] == 8
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation == json.loads((out / "run" / "evaluation-test.json").read_text())
    assert (out / "report.md").read_text().startswith("# segscale report: mine\n")
    dice = evaluation["case_summary"]["dice"]["mean"]
    verdict = f"Mean per-case Dice {dice:.4f}; overrides were given, so the 0.80 bar"
    assert verdict in done.stdout and verdict in (out / "report.md").read_text()
    done = cli("methods", out / "run", "--out", tmp_path / "methods.md")
    assert done.returncode == 0, done.stderr
    assert (
        f"{evaluation['case_summary']['dice']['mean']:.3f}" in (tmp_path / "methods.md").read_text()
    )
    # a rerun replaces its own run
    done = cli("demo", "--out", out, *TINY, f"data.store={real_store}", "workers=1", "name=mine")
    assert done.returncode == 0, done.stderr


def test_a_folder_is_an_earlier_demos_only_by_its_mark_or_the_demos_own_run(tmp_path):
    """A user's run (another name) trained on a store of the bundled sample at OUT/prepared was
    taken for an older demo's and deleted."""
    import yaml

    from segscale.demo import MARK, _made_by_demo, resource

    out = tmp_path / "out"
    (out / "prepared").mkdir(parents=True)
    (out / "run").mkdir()
    meta = {"source": str(resource("sample_la")), "preprocessing": {"size": 128}}
    (out / "prepared" / "meta.json").write_text(json.dumps(meta))
    config = yaml.safe_load(resource("demo.yaml").read_text())
    config["data"]["store"] = str(out / "prepared")
    for name, made in (("mine", False), ("demo", True)):
        config["name"] = name
        (out / "run" / "config.yaml").write_text(yaml.safe_dump(config))
        assert _made_by_demo(out) is made
    config["name"] = "mine"
    (out / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    (out / MARK).write_text("")
    assert _made_by_demo(out)


def test_the_default_recipe_must_clear_the_bar():
    from segscale.demo import bar_verdict

    assert bar_verdict(0.853, False).endswith("clears the 0.80 bar of the default recipe.")
    assert bar_verdict(0.79, False).startswith("Below the 0.80 bar")
    assert "does not apply" in bar_verdict(0.16, True)

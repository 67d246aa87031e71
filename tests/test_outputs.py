"""Commands that write one file replace their own earlier output, and a user's file only with
--force: `config convert --out`, `schedule --out`, `launch --out` (each used to write over any
file it was given, a user's config or job script included)."""

import re

import pytest
import yaml

from conftest import cli, tiny_config, trained_run
from segscale._files import not_a_record, output_dir, output_file
from segscale.errors import SegscaleError


def test_a_command_replaces_its_own_file_and_a_users_only_with_force(tmp_path, real_store):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(real_store)))
    mine = "my own file\n"
    for command, out, first in (
        (["config", "convert", config], tmp_path / "converted.yaml", "# written by"),
        (["schedule", config], tmp_path / "lr.png", None),
        (
            ["launch", config, "--slurm", "--run-dir", tmp_path / "runs" / "tiny"],
            tmp_path / "job.sh",
            "#!/bin/bash",
        ),
    ):
        name = " ".join(map(str, command[: 2 if command[0] == "config" else 1]))
        out.write_text(mine)
        r = cli(*command, "--out", out)
        assert r.returncode == 2, r.stderr
        assert f"exists and is not an earlier output of segscale {name}" in r.stderr, r.stderr
        assert out.read_text() == mine
        r = cli(*command, "--out", out, "--force")
        assert r.returncode == 0, r.stderr
        written = out.read_bytes()
        assert written != mine.encode()
        r = cli(*command, "--out", out)  # its own: replaced without --force
        assert r.returncode == 0, r.stderr
        if first is not None:  # a text: once edited by hand, replaced only with --force
            assert out.read_text().startswith(first)
            edited = out.read_text().replace("\n", "\n# my note\n", 2)
            out.write_text(edited)
            r = cli(*command, "--out", out)
            assert r.returncode == 2, r.stderr
            assert f"exists and was edited since segscale {name} wrote it" in r.stderr, r.stderr
            assert out.read_text() == edited
            assert cli(*command, "--out", out, "--force").returncode == 0
            # the digest taken out (and the mark kept) is an edit too
            unsigned = re.sub(r" sha256:[0-9a-f]{16}", "", out.read_text()) + "# mine\n"
            out.write_text(unsigned)
            r = cli(*command, "--out", out)
            assert r.returncode == 2 and "was edited since" in r.stderr, r.stderr
            assert out.read_text() == unsigned
        else:  # a picture: signed in its metadata, a valid file still, edits found all the same
            from PIL import Image

            with Image.open(out) as picture:
                picture.load()  # the PNG chunk's checksum holds for the signed text
                assert re.fullmatch(
                    r"segscale schedule sha256:[0-9a-f]{16}", picture.info["Software"]
                )
            for ending, edit in ((".svg", b"<!-- mine -->\n"), (".pdf", b"%mine\n")):
                drawn = out.with_suffix(ending)
                assert cli(*command, "--out", drawn).returncode == 0
                assert cli(*command, "--out", drawn).returncode == 0  # its own: replaced
                drawn.write_bytes(drawn.read_bytes() + edit)  # an editor's change, say
                r = cli(*command, "--out", drawn)
                assert r.returncode == 2 and "was edited since segscale schedule" in r.stderr
    # launch's default job, RUN_DIR/job.sbatch: a user's own is not replaced either
    mine_job = tmp_path / "runs" / "mine"
    mine_job.mkdir(parents=True)
    (mine_job / "job.sbatch").write_text(mine)
    r = cli("launch", config, "--slurm", "--run-dir", mine_job)
    assert r.returncode == 2 and "not an earlier output of segscale launch" in r.stderr, r.stderr
    assert (mine_job / "job.sbatch").read_text() == mine
    converted = yaml.safe_load((tmp_path / "converted.yaml").read_text())
    assert converted["data"]["store"] == str(real_store)


def test_no_output_goes_into_a_store_or_over_a_runs_records(tmp_path, real_store):
    """methods --out RUN/config.yaml broke the run; launch --out STORE/meta.json and export
    --force over it broke the store. No command writes there, --force or not."""
    run = trained_run(real_store, tmp_path / "run")
    for path in (
        run / "config.yaml",
        run / "model.pt",
        run / "model.pt.sha256",
        run / "environment.json",
        run / "packages.txt",
        run / "evaluation-test.json",  # another run's evaluation there fooled compare
        run / "checkpoints" / "step_00000001.pt",
        run / "system" / "x.jsonl",
    ):
        with pytest.raises(SegscaleError, match=f"a record of the run {run}; write to another"):
            output_file(path, "--out", overwrite=True)
    # folders: no run, mask or store goes into a store or a run's record folders
    for folder in (real_store, real_store / "sub", run / "pictures", run / "checkpoints" / "x"):
        with pytest.raises(SegscaleError, match=r"prepared store|a record of the run"):
            output_dir(folder, "--out")
    with pytest.raises(SegscaleError, match=r"--run-dir .*: is a prepared store"):
        not_a_record(real_store, "--run-dir")  # as prepare_run_dir checks train's --run-dir
    assert output_dir(real_store, "OUT", store_ok=True) == real_store  # prepare, augment
    # a command's own run: evaluate RUN writes its evaluation, a tracker its folder
    assert output_file(run / "evaluation-test.json", "--json", of_run=run).parent == run
    assert output_dir(run / "tensorboard", of_run=run) == run / "tensorboard"
    for path in (real_store / "meta.json", real_store / "new.png"):
        with pytest.raises(SegscaleError, match="inside the prepared store"):
            output_file(path, "--out", overwrite=True)
    assert output_file(run / "model.onnx") == run / "model.onnx"  # beside them: an export
    r = cli("methods", run, "--out", run / "config.yaml", "--force")
    assert r.returncode == 2 and "a record of the run" in r.stderr, r.stderr
    # methods.md is written to be edited: once it is, it is replaced only with --force
    text = tmp_path / "methods.md"
    assert cli("methods", run, "--out", text).returncode == 0
    assert cli("methods", run, "--out", text).returncode == 0  # its own, unedited
    text.write_text(text.read_text() + "\nMy addition.\n")
    r = cli("methods", run, "--out", text)
    assert r.returncode == 2 and "was edited since segscale methods wrote it" in r.stderr
    assert text.read_text().endswith("My addition.\n")


def test_a_run_goes_into_a_new_or_empty_folder_or_its_own(tmp_path, real_store):
    """train --run-dir into a user's folder mixed the run's files with theirs."""
    from segscale.config import validate
    from segscale.engine import prepare_run_dir

    cfg = validate(tiny_config(real_store))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(SegscaleError, match=r"mine: not empty \(notes.txt\) and not a run"):
        prepare_run_dir(cfg, mine, resume=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".nfs0001").write_text("")  # a file system's own: hidden
    for folder in (tmp_path / "empty", tmp_path / "new"):
        prepare_run_dir(cfg, folder, resume=False)
        prepare_run_dir(cfg, folder, resume=False)  # its own config: set up again
        assert (folder / "config.yaml").is_file()


def test_a_resumable_job_claims_a_new_or_empty_folder_only(tmp_path):
    """tune --out and repeat --out trained into a finished run, a store or anyone's folder."""
    from segscale._files import job_state

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SegscaleError, match=r"busy: not empty, and no tuning started there"):
        job_state(busy / "tune.json", {"a": 1}, {"trials": []}, "tuning")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new"):
        state = job_state(folder / "tune.json", {"a": 1}, {"trials": []}, "tuning")
        assert state == {"signature": {"a": 1}, "trials": []}
        (folder / "baseline-1").mkdir()  # the job's own work: a rerun goes on
        assert job_state(folder / "tune.json", {"a": 1}, {"trials": []}, "tuning") == state
    with pytest.raises(SegscaleError, match=r"holds a tuning started with other settings \(a "):
        job_state(tmp_path / "new" / "tune.json", {"a": 2}, {"trials": []}, "tuning")


def test_a_tune_or_repeat_folder_given_as_a_run_names_its_runs(tmp_path):
    """export, predict, methods and compare told a tune or repeat folder only that it was
    'neither a run folder nor ...'."""
    from segscale._files import not_a_run

    tune, repeat = tmp_path / "t", tmp_path / "r"
    for folder, state, run in ((tune, "tune.json", "trial-01"), (repeat, "repeat.json", "run-1")):
        (folder / run).mkdir(parents=True)
        (folder / state).write_text("{}")
        (folder / run / "config.yaml").write_text("name: x\n")
    (tune / "tuned.yaml").write_text("name: x\n")
    said = str(not_a_run(tune, "a zoo entry (zoo:NAME[@VERSION])"))
    assert said == (
        f"{tune}: a `segscale tune` folder, not a run folder or a zoo entry (zoo:NAME[@VERSION]); "
        f"give one of its runs ({tune / 'trial-01'}), or train {tune / 'tuned.yaml'}"
    )
    assert (
        f"a `segscale repeat` folder, not a run folder; give one of its runs ({repeat / 'run-1'})"
        in str(not_a_run(repeat))
    )
    # the run named is the trial the tuning chose, not a one-worker baseline
    import json

    from segscale.engine import check_run_dir

    for run in ("baseline-1", "trial-02"):
        (tune / run).mkdir()
        (tune / run / "config.yaml").write_text("name: x\n")
    assert f"give one of its runs ({tune / 'trial-01'})" in str(not_a_run(tune))
    state = {"decision": {"trial": 2}, "trials": [{"index": 2, "run_dir": str(tune / "trial-02")}]}
    (tune / "tune.json").write_text(json.dumps(state))
    assert f"give one of its runs ({tune / 'trial-02'})" in str(not_a_run(tune))
    # as train's or launch's --run-dir: named too (was: "not empty and not a run folder")
    for folder in (tune, repeat):
        with pytest.raises(SegscaleError, match=r"folder, not a run folder; give one of its runs"):
            check_run_dir(folder)

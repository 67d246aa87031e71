"""Commands that write one file replace their own earlier output, and a user's file only with
--force: `config convert --out`, `schedule --out`, `launch --out` (each used to write over any
file it was given, a user's config or job script included)."""

import yaml

from conftest import cli, tiny_config


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
        if first is not None:
            assert out.read_text().startswith(first)
    converted = yaml.safe_load((tmp_path / "converted.yaml").read_text())
    assert converted["data"]["store"] == str(real_store)

"""Offline augmentation: a store's training split grown to N slices, aligned, seeded, usable."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import cli, write_msd
from segscale.config import AugmentConfig
from segscale.errors import DataError
from segscale.imgmed import Preprocessing, Store, prepare
from segscale.imgmed.augment import PRESETS, augment_store


@pytest.fixture
def store(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=5)
    path, _ = prepare(
        raw,
        tmp_path / "store",
        Preprocessing(size=16, normalize="none"),
        val_fraction=0.2,
        test_fraction=0.2,
        progress=False,
    )
    return path


def test_the_training_split_grows_to_n_and_the_rest_is_untouched(store, tmp_path):
    src = Store.open(store)
    have = len(src.rows("train"))
    out, written = augment_store(
        store, tmp_path / "aug", have + 25, PRESETS["left-atrium"], seed=1, progress=False
    )
    aug = Store.open(out)
    assert written and len(aug.rows("train")) == have + 25
    for split in ("val", "test"):
        np.testing.assert_array_equal(aug.images[aug.rows(split)], src.images[src.rows(split)])
        np.testing.assert_array_equal(aug.masks[aug.rows(split)], src.masks[src.rows(split)])
    new = [c for c in aug.cases("train") if "augmented_from" in c]
    assert sum(c["count"] for c in new) == 25 and new[0]["id"].endswith("_aug1")
    assert aug.meta["augmented"]["to"] == have + 25
    # image and mask got the same warp: the bright blob (image 2, background 0) stays under the mask
    rows = np.concatenate([np.arange(c["start"], c["start"] + c["count"]) for c in new])
    x, y = aug.images[rows][:, 0], aug.masks[rows]
    inside, outside = x[y == 1], x[(y == 0) & (x != 0)]
    assert inside.mean() > 1.5 and outside.mean() < 0.5
    origin = {c["id"]: c for c in src.cases()}
    for c in new:  # each copy is its source case's slices, warped
        first = origin[c["augmented_from"]]["start"]
        before = src.images[first : first + c["count"]]
        after = aug.images[c["start"] : c["start"] + c["count"]]
        assert before.shape == after.shape and not np.allclose(before, after)
    # the same seed gives the same store; a rerun is a no-op
    again, _ = augment_store(
        store, tmp_path / "again", have + 25, PRESETS["left-atrium"], seed=1, progress=False
    )
    assert Store.open(again).meta["content_hash"] == aug.meta["content_hash"]
    assert (
        augment_store(store, out, have + 25, PRESETS["left-atrium"], seed=1, progress=False)[1]
        is False
    )
    with pytest.raises(DataError, match=f"expected more than the {have} slices"):
        augment_store(store, tmp_path / "x", have, AugmentConfig(rotation=10), progress=False)
    # more than the disk holds: one line at once (was: memory grew listing 10^10 copies)
    with pytest.raises(DataError, match=r"x: the store needs .* GB \(.* slices of .*\), and"):
        augment_store(store, tmp_path / "x", 10**13, AugmentConfig(rotation=10), progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_cli_augment_and_train_on_the_result(store, tmp_path):
    have = len(Store.open(store).rows("train"))
    cmd = [
        sys.executable,
        "-m",
        "segscale.cli",
        "imgmed",
        "augment",
        str(store),
        str(tmp_path / "a"),
    ]
    r = subprocess.run(
        [*cmd, "--to", str(have * 2), "--preset", "left-atrium", "--flip"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    aug = Store.open(tmp_path / "a")
    assert (
        aug.meta["augmented"]["augment"]["flip"]
        and aug.meta["augmented"]["augment"]["rotation"] == 45
    )
    r = subprocess.run([*cmd, "--to", "5"], capture_output=True, text=True)
    assert r.returncode == 2 and "no augmentation asked for" in r.stderr, r.stderr


def test_a_source_split_again_makes_the_augmented_store_again(store, tmp_path):
    """The source prepared again with another split (the same slices, so the same content
    hash): its augmented store was kept "up to date", with the old split's test cases."""
    total = len(Store.open(store).rows("train")) * 3  # the same --to for both
    out, _ = augment_store(store, tmp_path / "aug", total, PRESETS["left-atrium"], progress=False)
    resplit, _ = prepare(
        tmp_path / "raw",
        tmp_path / "resplit",
        Preprocessing(size=16, normalize="none"),
        val_fraction=0.2,
        test_fraction=0.2,
        seed=7,
        progress=False,
    )
    before, after = Store.open(store).meta, Store.open(resplit).meta
    assert after["splits"] != before["splits"], "the seed must move a case"
    assert after["content_hash"] == before["content_hash"], "the same slices"
    # the augmented store grew from the other store: replaced only when asked
    with pytest.raises(DataError, match=r"augmented from .*store, not augmented from .*resplit"):
        augment_store(resplit, out, total, PRESETS["left-atrium"], progress=False)
    _, written = augment_store(
        resplit, out, total, PRESETS["left-atrium"], progress=False, force=True
    )
    assert (
        written
        and Store.open(out).meta["splits"]["test"] == Store.open(resplit).meta["splits"]["test"]
    )


def test_a_store_of_another_origin_is_replaced_only_with_force(store, tmp_path):
    """augment over a store prepare made (and prepare over an augmented one) replaced it without
    a word; a store made again from its own source with other settings still is."""
    raw, prep = tmp_path / "raw", Preprocessing(size=16, normalize="none")
    other, _ = prepare(raw, tmp_path / "other", prep, progress=False)
    meta = (other / "meta.json").read_text()
    to = str(len(Store.open(store).rows("train")) * 2)
    done = cli("imgmed", "augment", store, other, "--to", to, "--preset", "left-atrium")
    assert done.returncode == 2 and f"{other}: a store prepared from {raw}" in done.stderr
    assert "not augmented from" in done.stderr and "--force" in done.stderr
    assert (other / "meta.json").read_text() == meta
    done = cli("imgmed", "augment", store, other, "--to", to, "--preset", "left-atrium", "--force")
    assert done.returncode == 0, done.stderr
    assert Store.open(other).meta["augmented"]["source"] == str(store)
    done = cli("prepare", raw, other, "--size", "16")
    assert done.returncode == 2 and f"a store augmented from {store}" in done.stderr
    # the same dataset with other settings: the store is made again
    _, written = prepare(raw, store, Preprocessing(size=24, normalize="none"), progress=False)
    assert written and Store.open(store).images.shape[-1] == 24

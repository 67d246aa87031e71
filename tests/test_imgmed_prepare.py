"""prepare in parallel and resumable; intensity options; slices near the foreground."""

import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import write_msd
from segscale.errors import PREEMPTED_EXIT_CODE, DataError
from segscale.imgmed import Preprocessing, Store, prepare
from segscale.imgmed.transforms import normalize, select_slices


def test_parallel_prepare_writes_the_same_store_as_one_process(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=4)
    one, _ = prepare(raw, tmp_path / "one", Preprocessing(size=16), progress=False, jobs=1)
    two, _ = prepare(raw, tmp_path / "two", Preprocessing(size=16), progress=False, jobs=2)
    a, b = Store.open(one), Store.open(two)
    assert a.meta["content_hash"] == b.meta["content_hash"]
    np.testing.assert_array_equal(a.images, b.images)
    assert a.cases() == b.cases()
    assert not (tmp_path / ".two.partial").exists()  # cleaned up after success


def test_a_failed_run_resumes_from_its_finished_cases(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=5)
    clean, _ = prepare(raw, tmp_path / "clean", Preprocessing(size=16), progress=False)
    label = raw / "labelsTr" / "case_003.nii.gz"
    good = label.read_bytes()
    img = nib.load(str(label))
    broken = np.asarray(img.dataobj).copy()
    broken[0, 0, 0] = 7  # a label value dataset.json does not declare
    nib.save(nib.Nifti1Image(broken, img.affine), label)
    out = tmp_path / "store"
    with pytest.raises(DataError, match=r"case_003.nii.gz: label values \[7\] not declared"):
        prepare(raw, out, Preprocessing(size=16), progress=False, jobs=1)
    partial = tmp_path / ".store.partial"
    done = {p.name: p.stat().st_mtime_ns for p in partial.iterdir()}
    # the failing case stops nothing: every other case is prepared and kept for the rerun
    assert sorted(n.split("-")[0] for n in done) == ["case_000", "case_001", "case_002", "case_004"]
    label.write_bytes(good)  # the user fixes the file and runs again
    prepare(raw, out, Preprocessing(size=16), progress=False, jobs=1)
    assert Store.open(out).meta["content_hash"] == Store.open(clean).meta["content_hash"]
    assert not partial.exists()


def test_resume_reuses_chunks_and_does_not_recompute_them(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=3)
    label = raw / "labelsTr" / "case_002.nii.gz"
    good = label.read_bytes()
    label.write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match=r"case_002\.nii\.gz"):
        prepare(raw, tmp_path / "s", Preprocessing(size=16), progress=False)
    partial = tmp_path / ".s.partial"
    stamps = {p.name: p.stat().st_mtime_ns for p in partial.iterdir()}
    label.write_bytes(good)
    # a chunk that no longer matches its case's files is not reused
    (raw / "imagesTr" / "case_001.nii.gz").write_bytes(
        (raw / "imagesTr" / "case_000.nii.gz").read_bytes()
    )
    written = []
    original = np.savez

    def spy(f, **arrays):  # watch which cases get computed, in this process
        written.append(arrays["images"].shape)
        return original(f, **arrays)

    np.savez = spy
    try:
        prepare(raw, tmp_path / "s", Preprocessing(size=16), progress=False, jobs=1)
    finally:
        np.savez = original
    assert len(written) == 2  # case_001 (changed) and case_002; case_000's chunk was reused
    assert len(stamps) == 2


def test_normalisation_inside_the_body_and_percentile_clipping():
    x = np.zeros((1, 10, 10), np.float32)
    x[0, 2:8, 2:8] = np.arange(36, dtype=np.float32).reshape(6, 6) + 100
    whole = normalize(x, "zscore")
    body = normalize(x, "zscore", nonzero=True)
    inside = x[0, 2:8, 2:8]
    np.testing.assert_allclose(
        body[0, 2:8, 2:8], (inside - inside.mean()) / inside.std(), rtol=1e-5
    )
    assert (body[0][x[0] == 0] == 0).all()  # the background stays 0
    assert abs(float(whole.mean())) < 1e-5  # statistics over everything
    clipped = normalize(x, "none", clip=(10, 90), nonzero=True)
    lo, hi = np.percentile(inside, (10, 90))
    assert clipped[0, 2:8, 2:8].min() == pytest.approx(lo) and clipped.max() == pytest.approx(hi)


def test_slices_near_the_foreground():
    fg = np.zeros(20, dtype=bool)
    fg[[5, 6, 12]] = True
    assert select_slices(20, None, fg, 1).tolist() == [4, 5, 6, 7, 11, 12, 13]
    assert select_slices(20, None, fg, 0).tolist() == [5, 6, 12]
    assert select_slices(20, 3, fg, 2).tolist() == [3, 8, 14]  # 3 evenly among 3..8, 10..14
    assert select_slices(5, None, np.zeros(5, bool), 1).tolist() == [0, 1, 2, 3, 4]  # none: all


def test_cli_prepare_with_every_option_records_them(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=3, shape=(24, 20, 12))
    base = [sys.executable, "-m", "segscale.cli", "prepare", str(raw), str(tmp_path / "s")]
    cmd = [*base, "--size", "16", "--clip", "1,99", "--nonzero", "--foreground-margin", "1"]
    r = subprocess.run([*cmd, "--jobs", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    store = Store.open(tmp_path / "s")
    p = store.meta["preprocessing"]
    assert p["clip"] == [1.0, 99.0] and p["nonzero"] and p["foreground_margin"] == 1
    for case in store.cases():
        label = np.asarray(nib.load(case["label"]).dataobj)
        has = np.flatnonzero(label.any((0, 1)))
        kept = case["slice_indices"]
        assert kept == list(range(max(0, has.min() - 1), min(12, has.max() + 2)))
    r = subprocess.run([*base, "--clip", "99,1"], capture_output=True, text=True)
    assert r.returncode == 2 and "clip (99.0, 1.0): expected percentiles" in r.stderr, r.stderr
    # a size no memory holds: refused before any case is read (was: torch's allocator, or the
    # kernel killing a worker)
    for size in ("100000", "0"):
        r = subprocess.run([*base, "--size", size, "--force"], capture_output=True, text=True)
        assert r.returncode == 2 and f"--size {size}: expected 8 to 8192 pixels" in r.stderr


def test_cli_channels_by_modality_name(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=3, channels=2)  # modalities mod0, mod1
    base = [sys.executable, "-m", "segscale.cli", "prepare", str(raw)]
    r = subprocess.run(
        [*base, str(tmp_path / "s"), "--size", "16", "--channels", "mod1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    store = Store.open(tmp_path / "s")
    assert store.meta["channel_names"] == ["mod1"] and store.meta["preprocessing"]["channels"] == [
        1
    ]
    r = subprocess.run(
        [*base, str(tmp_path / "t"), "--channels", "mod2"], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "no channel named 'mod2' (did you mean 'mod1'?); channels: 0: mod0, 1: mod1" in r.stderr


def test_the_listing_3_1_pipeline_equals_prepare_with_the_same_settings(tmp_path):
    from segscale.imgmed import Pipeline

    raw = write_msd(tmp_path / "raw", num_cases=3, channels=2)
    base = Pipeline(raw).channels("mod1").slices(axis=2, count=3).resize(16)
    store = (
        base.normalize("minmax", clip=(1, 99))
        .split(0.2, 0.2, 1)
        .prepare(tmp_path / "a", progress=False)
    )
    same = Preprocessing(size=16, channels=(1,), slices=3, normalize="minmax", clip=(1, 99))
    path, _ = prepare(
        raw, tmp_path / "b", same, val_fraction=0.2, test_fraction=0.2, seed=1, progress=False
    )
    assert store.meta["content_hash"] == Store.open(path).meta["content_hash"]
    assert base.prep.normalize == "zscore"  # steps return new pipelines; the base is unchanged
    with pytest.raises(DataError, match=r"no channel named 'T1gd'.*channels: 0: mod0, 1: mod1"):
        Pipeline(raw).channels("T1gd").prepare(tmp_path / "c", progress=False)


def test_resampling_to_a_spacing_and_back_keeps_masks_within_one_pixel():
    import torch
    from scipy.ndimage import binary_dilation, binary_erosion

    from segscale.imgmed.transforms import Plane, from_grid, to_grid

    a, b = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    mask = (((a - 20) / 12) ** 2 + ((b - 15) / 8) ** 2 < 1).astype(np.uint8)[None]
    prep = Preprocessing(size=32, spacing=1.0)
    plane = Plane.of(prep, (40, 30), (0.7, 1.3))  # 40×0.7 = 28 px, 30×1.3 = 39 px: pad and crop
    assert plane.resampled == (28, 39) and plane.offset == (2, -4)
    grid = to_grid(mask, plane, 32, masks=True)
    assert grid.shape == (1, 32, 32) and grid.sum() > 0
    logits = torch.nn.functional.one_hot(grid.long(), 2).permute(0, 3, 1, 2).float()
    back = from_grid(logits, plane, 32).argmax(1).numpy()
    assert back.shape == mask.shape
    edge = binary_dilation(mask[0]) & ~binary_erosion(mask[0])
    wrong = back[0] != mask[0]
    assert wrong.sum() < 0.1 * mask.sum() and not (wrong & ~edge).any()
    # without a target spacing the plane is the old stretch to size × size
    assert Plane.of(Preprocessing(size=32), (40, 30), (0.7, 1.3)).resampled == (32, 32)
    # a spacing no slice can be resampled to: one line (was: a NaN or int64 overflow traceback)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(DataError, match=r"expected a finite positive size in mm"):
            Preprocessing(size=32, spacing=bad)
    with pytest.raises(
        DataError, match=r"spacing 1e-300 mm: a 40×30 slice .* resamples to 3.9e\+301"
    ):
        Plane.of(Preprocessing(size=32, spacing=1e-300), (40, 30), (0.7, 1.3))


def test_prepare_at_a_target_spacing_records_it_and_evaluates_in_mm(tmp_path):
    from segscale.evaluation import store_spacing

    raw = write_msd(tmp_path / "raw", num_cases=3)  # 24 × 20 voxels of 0.7 × 0.8 mm
    path, _ = prepare(raw, tmp_path / "s", Preprocessing(size=16, spacing=1.0), progress=False)
    store = Store.open(path)
    assert store.meta["preprocessing"]["spacing"] == 1.0
    case = store.cases()[0]
    # 24 × 0.7 = 16.8 → 17 px and 20 × 0.8 = 16 px: each pixel is ~1 mm whatever the size
    assert store_spacing(case, store)[1:] == pytest.approx((24 * 0.7 / 17, 20 * 0.8 / 16))
    rows = store.masks[case["start"] : case["start"] + case["count"]]
    label = np.asarray(nib.load(case["label"]).dataobj)
    assert abs(int(rows.sum()) - int(label.sum()) * (0.7 * 0.8)) < 0.1 * label.sum()


def test_a_refused_store_write_is_one_line_and_leaves_no_store(tmp_path):
    """A file-size limit makes the OS refuse the write (EFBIG), as a full disk would (ENOSPC)."""
    import resource
    import signal

    raw = write_msd(tmp_path / "raw", num_cases=3)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    r = subprocess.run(
        [sys.executable, "-m", "segscale.cli", "prepare", str(raw), str(tmp_path / "s")],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp")]


def test_an_empty_volume_is_named(tmp_path):
    raw = write_msd(tmp_path / "raw", num_cases=3)
    empty = np.zeros((24, 20, 0), np.float32)
    nib.save(nib.Nifti1Image(empty, np.eye(4)), raw / "imagesTr" / "case_001.nii.gz")
    nib.save(
        nib.Nifti1Image(empty.astype(np.uint8), np.eye(4)), raw / "labelsTr" / "case_001.nii.gz"
    )
    with pytest.raises(DataError, match=r"case_001\.nii\.gz: empty image"):
        prepare(raw, tmp_path / "s", Preprocessing(size=16), progress=False)


def test_ctrl_c_stops_a_parallel_prepare_at_once_and_the_rerun_resumes(tmp_path):
    """Ctrl-C reaches the terminal's whole process group: parent and workers at once."""
    import os
    import signal
    import time

    import psutil

    raw = write_msd(tmp_path / "raw", num_cases=30, shape=(64, 64, 32))
    out, partial = tmp_path / "store", tmp_path / ".store.partial"
    args = [sys.executable, "-m", "segscale.cli", "prepare", raw, out, "--size", "128"]
    proc = subprocess.Popen(
        [*map(str, args), "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group, as a terminal gives it
    )
    try:
        deadline = time.monotonic() + 120
        while not (partial.is_dir() and any(partial.glob("*.npz"))):  # first case done
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers  # the pool's processes are running cases
        before = len(list(partial.glob("*.npz")))
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == PREEMPTED_EXIT_CODE
        said = proc.stdout.read().decode()
        assert re.search(r"preempted: .*store: interrupted with \d+ of 30 cases prepared", said)
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers left running after Ctrl-C: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = len(list(partial.glob("*.npz")))
    assert f"with {kept} of 30 cases" in said
    # the cases in hand finish and are kept (two running, three queued), no others, however
    # fast the machine; nothing is published
    assert before <= kept <= before + 5 + 2 and kept < 30 and not out.exists()
    rerun = subprocess.run([*map(str, args), "--jobs", "2"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert Store.open(out).meta["cases"] and not partial.exists()

"""ImgMed I/O: one load/save pair checked by content, DICOM series, conversion and export."""

import resource
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from segscale.errors import DataError
from segscale.imgmed import convert, load, save, stack_pictures

SEGSCALE = [sys.executable, "-m", "segscale.cli"]


def write_series(
    folder,
    volume,
    *,
    spacing=(0.8, 0.7),
    step=2.5,
    slope=2.0,
    intercept=-100.0,
    orientation=(1, 0, 0, 0, 1, 0),
    origin=(-50.0, 30.0, 10.0),
    uid=None,
    names=None,
):
    """volume (columns, rows, slices) of stored integers, one file per slice, shuffled names."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    n = volume.shape[2]
    shuffled = np.random.default_rng(n).permutation(n)
    names = names or [f"IM{i:04d}" for i in shuffled]  # file order is not slice order
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.SeriesDescription = uid, "t1"
        ds.InstanceNumber = n - k  # deliberately reversed: order comes from positions
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelSpacing = [spacing[0], spacing[1]]  # row spacing, column spacing
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(np.array(origin) + k * step * normal)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / names[k], enforce_file_format=True)
    return uid


def test_a_dicom_series_loads_in_slice_order_with_rescale_and_its_affine(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 1000, size=(6, 5, 7))
    write_series(tmp_path / "series", stored)
    image = load(tmp_path / "series")
    assert image.kind == "dicom" and image.array.shape == (6, 5, 7)
    np.testing.assert_allclose(image.array, stored * 2.0 - 100.0)
    # voxel (i, j, k) → LPS origin + i·0.7·x + j·0.8·y + k·2.5·z, then LPS → RAS
    expected = np.array([[-0.7, 0, 0, 50.0], [0, -0.8, 0, -30.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected, atol=1e-9)
    assert image.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_an_oblique_series_keeps_its_orientation_through_nifti(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    orientation = (c, s, 0, 0, 0, -1)  # a tilted coronal-like plane
    stored = np.arange(4 * 3 * 5).reshape(4, 3, 5)
    write_series(tmp_path / "obl", stored, orientation=orientation, slope=1.0, intercept=0.0)
    convert(tmp_path / "obl", tmp_path / "obl.nii.gz")
    dicom, nifti = load(tmp_path / "obl"), nib.load(str(tmp_path / "obl.nii.gz"))
    np.testing.assert_allclose(nifti.affine, dicom.affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nifti.dataobj), stored)
    # the slice normal is row × column direction, in RAS
    normal = np.cross([c, s, 0], [0, 0, -1]) * [-1, -1, 1]
    np.testing.assert_allclose(dicom.affine[:3, 2] / 2.5, normal, atol=1e-9)
    # what prepare reads of a series before loading it: the axis codes the loader gives it
    from segscale.imgmed.dicom import series_axis_codes
    from segscale.imgmed.geometry import axis_codes

    write_series(tmp_path / "ax", stored)
    for folder in ("obl", "ax"):
        codes = series_axis_codes(tmp_path / folder)
        assert codes == axis_codes(load(tmp_path / folder).affine)
    assert series_axis_codes(tmp_path / "ax") == "LPS"


def test_dicom_folders_that_are_not_one_clean_series_are_refused(tmp_path):
    vol = np.zeros((4, 4, 3))
    write_series(tmp_path / "mixed", vol, uid="1.2.3.4", names=["a1", "a2", "a3"])
    write_series(
        tmp_path / "mixed", vol, uid="1.2.3.5", origin=(0, 0, 50), names=["b1", "b2", "b3"]
    )
    with pytest.raises(
        DataError, match=r"mixes 2 DICOM series: 1\.2\.3\.4 \(3 files, t1\); 1\.2\.3\.5"
    ):
        load(tmp_path / "mixed")
    write_series(tmp_path / "gap", np.zeros((4, 4, 4)), names=["s0", "s1", "s2", "s3"])
    (tmp_path / "gap" / "s1").unlink()  # the second slice along the normal
    with pytest.raises(DataError, match=r"slice spacing varies from 2\.5 to 5 mm"):
        load(tmp_path / "gap")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"junk: a folder of files of unknown content, no DICOM"):
        load(tmp_path / "junk")


def test_content_decides_and_bad_content_is_named(tmp_path):
    save(np.zeros((8, 8), np.uint8), tmp_path / "a.png")
    (tmp_path / "a.png").rename(tmp_path / "fake.nii.gz")
    with pytest.raises(DataError, match=r"fake\.nii\.gz: named like a nifti file but holds image"):
        load(tmp_path / "fake.nii.gz")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [np.inf, 2.0]]))
    with pytest.raises(DataError, match=r"nan\.npy: 2 NaN or infinite voxel\(s\) of 4"):
        load(tmp_path / "nan.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 5)))
    with pytest.raises(DataError, match=r"empty image \(shape \(0, 5\)\)"):
        load(tmp_path / "empty.npy")
    # read as shape (0,) by nibabel: named with the header's
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 5), np.float32), np.eye(4)), tmp_path / "e.nii.gz")
    with pytest.raises(DataError, match=r"empty image \(shape \(0, 5, 5\)\)"):
        load(tmp_path / "e.nii.gz")
    save(np.ones((4, 4, 4), np.float32), tmp_path / "v.nii.gz")
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: cannot read"):
        load(tmp_path / "cut.nii.gz")
    with pytest.raises(DataError, match="pictures take 2D uint8/uint16 arrays"):
        save(np.ones((4, 4), np.float32), tmp_path / "f.png")
    # the reason, where it is known, not "truncated or corrupt?"; an empty file said alike
    np.savez(tmp_path / "two.npz", x=np.zeros(3), y=np.ones(3))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "zero.nii.gz").write_bytes(b"")
    for name, message in (
        ("two.npz", r"two\.npz: an \.npz without an 'array' entry \(\['x', 'y'\]\)$"),
        ("obj.npy", r"obj\.npy: holds Python objects \(a pickled npy\)"),
        ("zero.nii.gz", r"zero\.nii\.gz: empty file$"),
    ):
        with pytest.raises(DataError, match=message):
            load(tmp_path / name)
    from segscale.imgmed.io import check_nifti

    with pytest.raises(DataError, match=r"zero\.nii\.gz: empty file$"):
        check_nifti(tmp_path / "zero.nii.gz")  # imgmed check's reader said "not gzip-compressed"


def test_arrays_and_affines_that_place_no_image_are_refused_where_they_are_read(tmp_path):
    """A .npy of one number was converted to a NIfTI of shape (0,); an .npz's 3×3 or zero
    affine, or a NIfTI's zero sform, crashed deep in nibabel (or showed 1 mm spacing)."""
    np.save(tmp_path / "one.npy", np.float32(3))
    np.save(tmp_path / "row.npy", np.ones(5))
    np.save(tmp_path / "k.npy", np.ones((4, 4), np.complex64))
    volume = np.ones((4, 4, 4), np.uint8)
    np.savez(tmp_path / "small.npz", array=volume, affine=np.eye(3))
    np.savez(tmp_path / "zero.npz", array=volume, affine=np.zeros((4, 4)))
    flat = np.diag([1.0, 1.0, 0.0, 1.0])
    np.savez(tmp_path / "flat.npz", array=volume, affine=flat)
    np.savez(tmp_path / "huge.npz", array=volume, affine=np.diag([1e300, 1e300, 1e300, 1.0]))
    header = nib.Nifti1Image(volume, np.eye(4)).header
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(volume, None, header), tmp_path / "s0.nii.gz")
    for name, message in (
        ("one.npy", r"one\.npy: a 0-D array \(shape \(\)\); expected an image"),
        ("row.npy", r"row\.npy: a 1-D array \(shape \(5,\)\)"),
        ("k.npy", r"k\.npy: complex64 values; expected real numbers$"),
        ("small.npz", r"small\.npz: its 'affine' is float64 of shape \(3, 3\); expected a 4×4"),
        ("zero.npz", r"zero\.npz: its 'affine' has NaN or infinite values, or a last row"),
        ("flat.npz", r"flat\.npz: its 'affine' maps the voxels onto a plane or a point"),
        ("huge.npz", r"huge\.npz: its 'affine' has values beyond ±1e\+06 mm \(largest 1e\+300\)"),
        ("s0.nii.gz", r"s0\.nii\.gz: its header's affine .* onto a plane or a point"),
    ):
        with pytest.raises(DataError, match=message):
            load(tmp_path / name)
    np.savez(tmp_path / "good.npz", array=volume, affine=np.diag([0.5, 0.5, 2.0, 1.0]))
    assert load(tmp_path / "good.npz").spacing == (0.5, 0.5, 2.0)


def test_a_new_nifti_holds_its_geometry_in_the_qform_too(tmp_path):
    """A DICOM series converted to NIfTI had qform_code 0: tools that read the qform alone put
    it at the origin with 1 mm voxels. A shear (a gantry tilt) is the sform's alone."""
    rotated = np.array([[0, -0.7, 0, 10], [0.9, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1.0]])
    save(np.zeros((4, 5, 3), np.uint8), tmp_path / "r.nii.gz", rotated)
    header = nib.load(tmp_path / "r.nii.gz").header
    assert int(header["qform_code"]) == int(header["sform_code"]) > 0
    np.testing.assert_allclose(header.get_qform(), rotated, atol=1e-6)
    sheared = np.diag([1.0, 1.0, 2.0, 1.0])
    sheared[1, 2] = 0.4
    save(np.zeros((4, 5, 3), np.uint8), tmp_path / "s.nii.gz", sheared)
    header = nib.load(tmp_path / "s.nii.gz").header
    assert int(header["qform_code"]) == 0 and int(header["sform_code"]) > 0
    np.testing.assert_allclose(header.get_sform(), sheared)


def test_a_refused_write_names_the_file_and_leaves_nothing(tmp_path):
    """A file-size limit makes the OS refuse the write (EFBIG), as a full disk would (ENOSPC)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    code = (
        "import numpy as np, sys\n"
        "from segscale.errors import DataError\n"
        "from segscale.imgmed import save\n"
        "for name in ('v.npy', 'v.npz', 'v.nii.gz', 'v.png'):\n"
        "    a = np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)\n"
        "    try:\n"
        "        save(a, sys.argv[1] + '/' + name)\n"
        "    except DataError as e:\n"
        "        print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    refused = ("File too large", "disk full?")  # numpy reports a short write without errno
    assert len(lines) == 4 and all(any(w in line for w in refused) for line in lines), r.stdout
    assert [line.split(":")[0] for line in lines] == [
        f"cannot write {tmp_path}/v.{ext}" for ext in ("npy", "npz", "nii.gz", "png")
    ]
    assert list(tmp_path.iterdir()) == []  # no torn file, no temporary left behind


def test_npz_keeps_the_affine_and_numpy_round_trips(tmp_path):
    a, affine = (
        np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32),
        np.diag([2, 3, 4, 1.0]),
    )
    save(a, tmp_path / "v.npz", affine)
    back = load(tmp_path / "v.npz")
    np.testing.assert_array_equal(back.array, a)
    np.testing.assert_array_equal(back.affine, affine)


def test_png_slices_stack_back_into_the_original_geometry(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.normal(100, 20, size=(12, 9, 6)).astype(np.float32)
    affine = np.array([[0, -1.2, 0, 10], [0.9, 0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    save(volume, tmp_path / "v.nii.gz", affine)
    for axis in (0, 1, 2):
        out = tmp_path / f"slices{axis}"
        written = convert(tmp_path / "v.nii.gz", out, axis=axis, window=(40, 160))
        assert len(written) == volume.shape[axis] and written[0].name == "v_000.png"
        back = stack_pictures(out)
        # the window undone: the intensities again, up to half an 8-bit step of the window
        np.testing.assert_allclose(back.array, np.clip(volume, 40, 160), atol=120 / 255 / 2 + 1e-4)
        assert back.array.dtype == np.float32
        np.testing.assert_allclose(back.affine, affine)
        convert(out, tmp_path / f"back{axis}.nii.gz")
        nifti = nib.load(str(tmp_path / f"back{axis}.nii.gz"))
        np.testing.assert_allclose(nifti.affine, affine, atol=1e-6)


def test_cli_info_and_convert(tmp_path):
    write_series(tmp_path / "s", np.arange(4 * 4 * 3).reshape(4, 4, 3))
    r = subprocess.run(
        [*SEGSCALE, "imgmed", "convert", str(tmp_path / "s"), str(tmp_path / "s.nii.gz")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [*SEGSCALE, "imgmed", "info", str(tmp_path / "s.nii.gz"), str(tmp_path / "s")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.count("4 × 4 × 3") == 2, r.stdout
    # a picture read in another mode than stored says so (an RGBA showed 3 channels unexplained)
    from PIL import Image

    Image.fromarray(np.zeros((6, 5, 4), np.uint8)).save(tmp_path / "rgba.png")
    r = subprocess.run(
        [*SEGSCALE, "imgmed", "info", str(tmp_path / "rgba.png")], capture_output=True, text=True
    )
    assert (
        "6 × 5 × 3" in r.stdout and "stored as RGBA, read as RGB (transparency dropped)" in r.stdout
    )
    # what reading a file warns of is its row's note (was: printed above the table, or lost)
    import gzip

    volume = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / "v0.nii")
    volume.write_bytes(gzip.compress((tmp_path / "v0.nii").read_bytes()))
    r = subprocess.run([*SEGSCALE, "imgmed", "info", str(volume)], capture_output=True, text=True)
    assert "named .nii but gzip-compressed; read by its content" in r.stdout, r.stdout
    assert "gzip" not in r.stderr, r.stderr
    # a palette or 1-bit picture reads otherwise as a mask: both said (was: "read as RGB" alone)
    from segscale.imgmed.io import picture_note

    palette = Image.fromarray(np.eye(4, dtype=np.uint8)).convert("P")
    palette.save(tmp_path / "p.png", transparency=0)
    Image.fromarray(np.eye(4, dtype=bool)).save(tmp_path / "bit.png")
    assert picture_note(tmp_path / "p.png") == (
        "stored as P (palette), read as RGB (transparency dropped) as an image, as its palette "
        "indices as a mask"
    )
    assert picture_note(tmp_path / "bit.png") == (
        "stored as 1-bit, read as grey 0/255 as an image, as 0/1 as a mask"
    )
    r = subprocess.run(
        [
            *SEGSCALE,
            "imgmed",
            "convert",
            str(tmp_path / "s"),
            str(tmp_path / "x.png"),
            "--window",
            "1,2,3",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--window '1,2,3': expected 2 comma-separated numbers" in r.stderr


def test_prepare_a_dataset_of_dicom_series_with_nifti_masks(tmp_path):
    from segscale.imgmed import Preprocessing, Store, prepare

    root = tmp_path / "dicom_set"
    rng = np.random.default_rng(5)
    (root / "masks").mkdir(parents=True)
    for i in range(3):
        stored = rng.integers(0, 400, size=(20, 16, 5))
        write_series(root / "images" / f"patient{i}", stored)
        volume = load(root / "images" / f"patient{i}")
        mask = np.zeros(volume.array.shape, np.uint8)
        mask[5:12, 4:10, 1:4] = 1
        save(mask, root / "masks" / f"patient{i}.nii.gz", volume.affine)
    (root / "labels.json").write_text('{"0": "background", "1": "lesion"}')
    path, _ = prepare(
        root,
        tmp_path / "store",
        Preprocessing(size=16),
        val_fraction=0.34,
        test_fraction=0.34,
        progress=False,
    )
    store = Store.open(path)
    assert store.meta["source_kind"] == "dicom" and store.meta["labels"]["1"] == "lesion"
    assert len(store.masks) == 15 and store.masks.max() == 1
    case = store.cases()[0]
    np.testing.assert_allclose(case["affine"], load(root / "images" / case["id"]).affine)
    # a mask on another grid is refused, naming both
    save(np.zeros((20, 16, 4), np.uint8), root / "masks" / "patient1.nii.gz")
    with pytest.raises(
        DataError, match=r"patient1\.nii\.gz: mask shape \(20, 16, 4\) does not match"
    ):
        prepare(root, tmp_path / "store2", Preprocessing(size=16), progress=False)
    (root / "masks" / "patient1.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient1: DICOM series without a mask"):
        prepare(root, tmp_path / "store3", Preprocessing(size=16), progress=False)


def test_written_files_get_the_permissions_of_a_plain_write(tmp_path):
    """Atomic writes go through mkstemp, which makes files 0600; outputs are for others too."""
    import os

    from segscale._files import write_atomic

    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        saved = save(np.zeros((4, 4), np.uint8), tmp_path / "m.png")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert saved.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_the_python_api_takes_paths_as_strings(tmp_path):
    """As documented in docs/imgmed.md: convert("scan.nii.gz", "slices/", axis=2)."""
    from segscale.imgmed import export_slices

    volume = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    nifti = str(save(volume, str(tmp_path / "scan.nii.gz")))
    written = convert(nifti, str(tmp_path / "slices"), axis=2)
    assert [p.name for p in written] == ["scan_000.png", "scan_001.png", "scan_002.png"]
    back = convert(str(tmp_path / "slices"), str(tmp_path / "back.nii.gz"))
    assert load(back[0]).array.shape == (4, 5, 3)
    assert stack_pictures(str(tmp_path / "slices")).array.shape == (4, 5, 3)
    assert len(export_slices(load(nifti), str(tmp_path / "again"))) == 3


def test_a_series_whose_slices_disagree_on_spacing_or_line_is_refused(tmp_path):
    """Only the first file's PixelSpacing was read (a slice at 1 mm among 0.8 mm ones gave the
    whole volume 1 mm), and a slice moved 5 mm in-plane was placed where its pixels are not."""
    import pydicom

    for name, change in (
        ("spacing", lambda ds: setattr(ds, "PixelSpacing", [1.0, 1.0])),
        (
            "moved",
            lambda ds: setattr(
                ds,
                "ImagePositionPatient",
                [ds.ImagePositionPatient[0] + 5, *ds.ImagePositionPatient[1:]],
            ),
        ),
    ):
        folder = tmp_path / name
        write_series(folder, np.zeros((6, 5, 5)), names=[f"s{k}" for k in range(5)])
        ds = pydicom.dcmread(folder / "s2")
        change(ds)
        ds.save_as(folder / "s2", enforce_file_format=True)
        message = {
            "spacing": r"s2: PixelSpacing \[1.0, 1.0\] mm, but s\d has \[0.8, 0.7\]",
            "moved": r"s2: its ImagePositionPatient lies 5 mm off the line",
        }[name]
        with pytest.raises(DataError, match=message):
            load(folder)


def test_positions_written_rounded_still_load(tmp_path):
    """The in-plane check refused a CBCT series of 0.076 mm voxels whose positions were written
    to 0.01 mm (a tenth of a pixel, depth included); rounding is not a moved slice."""
    import pydicom

    folder = tmp_path / "cbct"
    write_series(folder, np.zeros((6, 5, 40)), spacing=(0.076, 0.076), step=0.076)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [round(float(v), 2) for v in ds.ImagePositionPatient]
        ds.save_as(f, enforce_file_format=True)
    assert load(folder).array.shape == (6, 5, 40)

"""DICOM decoding against pydicom's own pixel pipeline, and the `dicom` adapter."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

from effft.data.decode import (
    BadImageError,
    DicomWindow,
    image_size,
    read_image,
)
from effft.data.sources import dicom
from effft.errors import EffftError

CR_MONOCHROME1 = "dicomdirtests/77654033/CR1/6154"  # 16x16, windowed, rescaled


def _file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} not installed"
    return str(path)


def _reference(ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    """pydicom's modality LUT then VOI, normalised by the window's output range, to uint8."""
    values = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    bits = int(ds.BitsStored)
    lo, hi = ((0, 2**bits - 1) if ds.PixelRepresentation == 0
              else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    if "RescaleSlope" in ds:
        lo, hi = (v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (lo, hi))
    shown = (values - lo) / (hi - lo)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        shown = 1 - shown
    return np.rint(np.clip(shown, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("CT_small.dcm", (128, 128, 3)), ("MR_small.dcm", (64, 64, 3)),
     ("JPEG2000.dcm", (1024, 256, 3)), ("US1_J2KI.dcm", (480, 640, 3)),
     ("examples_palette.dcm", (350, 800, 3)), ("examples_ybr_color.dcm", (240, 320, 3)),
     ("SC_rgb_16bit.dcm", (100, 100, 3)), ("RG1_UNCR.dcm", (1955, 1841, 3)),
     ("RG3_J2KR.dcm", (1760, 1760, 3)), ("emri_small_RLE.dcm", (64, 64, 3))],
)
def test_reads_to_shape_and_dtype(name: str, shape: tuple[int, int, int]) -> None:
    out = read_image(_file(name))
    assert out.shape == shape and out.dtype == np.uint8
    assert out.max() > out.min()  # not blank
    assert image_size(_file(name)) == (shape[1], shape[0])
    assert read_image(_file(name), channels=1).shape == shape[:2] + (1,)


def test_file_window_matches_pydicom() -> None:
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    assert "WindowCenter" in ds
    np.testing.assert_allclose(read_image(_file("MR_small.dcm"), channels=1)[:, :, 0],
                               _reference(ds, ds.pixel_array), atol=1)


def test_monochrome1_inverted_after_windowing() -> None:
    path = _file(CR_MONOCHROME1)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "WindowCenter" in ds
    out = read_image(path, channels=1)[:, :, 0]
    np.testing.assert_allclose(out, _reference(ds, ds.pixel_array), atol=1)


def test_monochrome1_large_radiograph_bright_where_viewer_shows_bright() -> None:
    ds = pydicom.dcmread(_file("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array[::8, ::8].astype(float)
    out = read_image(_file("RG1_UNCR.dcm"), channels=1)[::8, ::8, 0].astype(float)
    # MONOCHROME1 stores dense (bone) as low values: shown bright, so output falls as raw rises
    assert np.corrcoef(raw.ravel(), out.ravel())[0, 1] < -0.8
    # UNCR is the uncompressed copy of the lossless JPEG 2000 file: the same pixels
    j2k = read_image(_file("RG1_J2KR.dcm"), channels=1)[::8, ::8, 0].astype(float)
    np.testing.assert_array_equal(j2k, out)


def test_rescale_slope_intercept_applied() -> None:
    path = _file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" in ds and "WindowCenter" not in ds
    hu = apply_modality_lut(ds.pixel_array, ds)
    # no window in the file: min-max of the modality values, so compare against a recipe
    # window where the intercept matters: centre 40 HU, width 400 HU (soft tissue)
    out = read_image(path, channels=1, window=DicomWindow(center=40, width=400))[:, :, 0]
    ref = copy.deepcopy(ds)
    ref.WindowCenter, ref.WindowWidth = 40, 400
    expected = apply_windowing(hu, ref)
    bits = int(ds.BitsStored)
    lo = -(2 ** (bits - 1)) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hi = (2 ** (bits - 1) - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(out, np.rint((expected - lo) / (hi - lo) * 255), atol=1)
    # without slope/intercept the same window over raw values would look different
    raw_window = np.clip((ds.pixel_array - 39.5) / 399 + 0.5, 0, 1) * 255
    assert np.abs(out - raw_window).mean() > 10
    default = read_image(path, channels=1)[:, :, 0].astype(float)
    np.testing.assert_allclose(default, np.rint((hu - hu.min()) / np.ptp(hu) * 255), atol=1)


def test_recipe_window_overrides_file_window() -> None:
    path = _file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    median = float(np.median(ds.pixel_array))
    narrow = read_image(path, channels=1, window=DicomWindow(center=median, width=2))
    saturated = np.isin(narrow, (0, 255)).mean()
    assert saturated > 0.95
    assert not np.array_equal(narrow, read_image(path, channels=1))


def test_enhanced_ct_window_and_rescale_from_functional_groups() -> None:
    path = _file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and "RescaleSlope" not in ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    flat = copy.deepcopy(ds)
    del flat.SharedFunctionalGroupsSequence, flat.PerFrameFunctionalGroupsSequence
    flat.RescaleSlope = shared.PixelValueTransformationSequence[0].RescaleSlope
    flat.RescaleIntercept = shared.PixelValueTransformationSequence[0].RescaleIntercept
    flat.WindowCenter = shared.FrameVOILUTSequence[0].WindowCenter
    flat.WindowWidth = shared.FrameVOILUTSequence[0].WindowWidth
    frames = ds.pixel_array
    for index in range(2):
        out = read_image(path, channels=1, frame=index)[:, :, 0]
        np.testing.assert_allclose(out, _reference(flat, frames[index]), atol=1)


def test_multi_frame_selection() -> None:
    path = _file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    assert dicom.header(str(path)).frames == 10 == ds.pixel_array.shape[0]
    frames = [read_image(path, channels=1, frame=i)[:, :, 0] for i in (0, 3, 9)]
    for i, out in zip((0, 3, 9), frames):
        raw = ds.pixel_array[i].astype(float)
        np.testing.assert_allclose(out, np.rint((raw - raw.min()) / np.ptp(raw) * 255), atol=1)
    assert not np.array_equal(frames[0], frames[2])
    np.testing.assert_array_equal(read_image(path), read_image(path, frame=5))  # middle
    with pytest.raises(BadImageError, match="frame 10 asked for, but the file has 10"):
        read_image(path, frame=10)


def test_colour_photometrics() -> None:
    rgb = read_image(_file("SC_rgb.dcm"))
    np.testing.assert_array_equal(rgb, pydicom.dcmread(_file("SC_rgb.dcm")).pixel_array)
    ybr = read_image(_file("SC_ybr_full_uncompressed.dcm"))  # the same picture stored as YBR
    assert np.abs(ybr.astype(int) - rgb).mean() < 2
    deep = read_image(_file("SC_rgb_16bit.dcm"))  # 16 bits per sample scaled to 8
    assert np.abs(deep.astype(int) - rgb).max() <= 1
    ds = pydicom.dcmread(_file("examples_palette.dcm"))
    lut = apply_color_lut(ds.pixel_array, ds)
    assert lut.dtype == np.uint16
    np.testing.assert_allclose(read_image(_file("examples_palette.dcm")),
                               np.rint(lut / 65535 * 255), atol=1)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_lossless_encodings_agree(name: str) -> None:
    np.testing.assert_array_equal(read_image(_file(name)), read_image(_file("MR_small.dcm")))


def test_patient_id() -> None:
    assert dicom.header(_file("CT_small.dcm")).patient == "1CT1"
    assert dicom.header(_file("emri_small.dcm")).patient is None


def test_bad_dicom_files(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="pixel data") as info:
        read_image(_file("MR_truncated.dcm"))
    assert info.value.path == _file("MR_truncated.dcm")
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(BadImageError) as info:
        read_image(noise)
    assert str(noise) in str(info.value)
    with pytest.raises(EffftError, match="both"):
        DicomWindow(center=40)


# ---------------------------------------------------------------- adapter


def _tree(root: Path) -> Path:
    (root / "ct").mkdir(parents=True)
    (root / "mr" / "series1").mkdir(parents=True)
    shutil.copy(_file("CT_small.dcm"), root / "ct" / "a.dcm")
    shutil.copy(_file("693_J2KI.dcm"), root / "ct" / "B.DCM")
    shutil.copy(_file("MR_small.dcm"), root / "mr" / "series1" / "IM0001")  # no suffix
    shutil.copy(_file("emri_small.dcm"), root / "mr" / "multi.dcm")  # no PatientID
    (root / "mr" / "notes.txt").write_text("not an image")
    (root / "mr" / ".DS_Store").write_bytes(b"\0" * 300)
    (root / "ct" / "broken.dcm").write_bytes(b"\0" * 50)  # header unreadable
    return root


def test_adapter_class_folders(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    source = dicom.load(root, dicom.Options(), channels=3)
    assert source.classes == ["ct", "mr"] and source.task == "binary"
    by_name = {Path(i.path).name: i for i in source.items}
    assert set(by_name) == {"a.dcm", "B.DCM", "IM0001", "multi.dcm"}
    assert by_name["a.dcm"].group == "1CT1" and by_name["B.DCM"].group == "CQ500-CT-310"
    assert by_name["IM0001"].group == "4MR1" and by_name["multi.dcm"].group is None
    assert [Path(b.path).name for b in source.bad] == ["broken.dcm"]
    assert source.bad[0].reason
    img = source.read(by_name["a.dcm"], 1)
    assert img.shape == (128, 128, 1) and img.dtype == np.uint8
    assert dicom.load(root, dicom.Options(group_by_patient=False), channels=1).items[0].group \
        is None


def test_adapter_window_and_frame(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    options = dicom.Options(window_center=40, window_width=400, frame=2)
    source = dicom.load(root, options, channels=1)
    frames = {Path(i.path).name: i.frame for i in source.items}
    assert frames == {"a.dcm": None, "B.DCM": None, "IM0001": None, "multi.dcm": 2}
    multi = next(i for i in source.items if i.frame == 2)
    np.testing.assert_array_equal(
        source.read(multi, 1),
        read_image(multi.path, channels=1, window=DicomWindow(40, 400), frame=2))
    assert not np.array_equal(source.read(multi, 1), read_image(multi.path, channels=1))
    # a frame the multi-frame file lacks: the file is reported, not dropped silently
    source = dicom.load(root, dicom.Options(frame=12), channels=1)
    assert {Path(b.path).name: b.reason for b in source.bad}["multi.dcm"] == (
        "frame 12 asked for (data.dicom.frame), but the file has 10 frame(s)")
    assert "multi.dcm" not in {Path(i.path).name for i in source.items}
    with pytest.raises(ValueError, match="both"):
        dicom.Options(window_center=40)


def test_adapter_csv(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    (root / "labels.csv").write_text(
        "path,label,split,group\n"
        "ct/a.dcm,normal,train,\n"
        "ct/B.DCM,lesion,test,p7\n"
        "mr/series1/IM0001,normal,val,\n"
        f"{root / 'mr' / 'multi.dcm'},other,train,\n")
    source = dicom.load(root, dicom.Options(csv="labels.csv"), channels=3)
    assert source.classes == ["lesion", "normal", "other"] and source.task == "multiclass"
    assert [(Path(i.path).name, i.target, i.split, i.group) for i in source.items] == [
        ("a.dcm", 1, "train", "1CT1"), ("B.DCM", 0, "test", "p7"),
        ("IM0001", 1, "val", "4MR1"), ("multi.dcm", 2, "train", None)]
    with pytest.raises(EffftError, match="no column 'diagnosis'"):
        dicom.load(root, dicom.Options(csv="labels.csv", label_column="diagnosis"), channels=3)


def test_adapter_errors(tmp_path: Path) -> None:
    with pytest.raises(EffftError, match="does not exist"):
        dicom.load(tmp_path / "nope", dicom.Options(), channels=3)
    (tmp_path / "one" / "only").mkdir(parents=True)
    shutil.copy(_file("CT_small.dcm"), tmp_path / "one" / "only" / "a.dcm")
    with pytest.raises(EffftError, match="only one class"):
        dicom.load(tmp_path / "one", dicom.Options(), channels=3)
    (tmp_path / "one" / "empty").mkdir()
    (tmp_path / "one" / "empty" / "x.png").write_bytes(b"png")
    with pytest.raises(EffftError, match=r"empty holds no DICOM files"):
        dicom.load(tmp_path / "one", dicom.Options(), channels=3)
    (tmp_path / "flat").mkdir()
    with pytest.raises(EffftError, match="no class folders"):
        dicom.load(tmp_path / "flat", dicom.Options(), channels=3)


def test_missing_pydicom_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(EffftError, match=r"pip install 'effft\[dicom\]'"):
        read_image(_file("CT_small.dcm"))

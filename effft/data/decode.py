"""Read any supported image file into an HWC uint8 array: the one place pixels are decoded.

Choices made here (and why):
  - Transparency (RGBA, LA, palette with a transparent colour) is composited on white: a
    transparent background is usually "paper", and dropping alpha would expose whatever
    colour the encoder left under it (often black or noise).
  - Grey images with more than 8 bits (16-bit PNG/TIFF, 32-bit integer or float TIFF) are
    scaled by the image's own minimum and maximum to 0..255. A 12-bit detector stored in a
    16-bit container would come out almost black if scaled by the dtype's full range; min-max
    is what a viewer shows by default. A constant image becomes all zeros.
  - Grey -> 3 channels repeats the grey value; colour -> 1 channel is the ITU-R 601 luma
    (Pillow's "L" conversion).
  - EXIF orientation is applied, so pixels are as a photo viewer shows them.
  - Decompression bombs (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels) are refused, and
    truncated files are errors: nothing is silently padded.
  - DICOM: modality LUT / rescale slope and intercept, then the VOI window (the recipe's, else
    the file's VOI LUT or window, else the frame's min-max), then MONOCHROME1 is inverted so
    that what a viewer shows bright is bright here. Multi-frame files give the middle frame
    unless a frame is asked for (the middle slice of a volume is the likeliest to show the
    anatomy; frame 0 is often a scout or an empty edge slice).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from effft.errors import EffftError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp",
     ".pgm", ".ppm", ".pbm", ".pnm", ".gif", ".jp2", ".j2k", ".tga"}
) | DICOM_SUFFIXES
# Files that operating systems and tools leave in image folders: never images, never reported.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageError(EffftError):
    """A file that cannot be decoded into an image."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


@dataclass(frozen=True)
class DicomWindow:
    """A VOI window for DICOM (in modality units, e.g. HU). Both None: the file's own window."""

    center: float | None = None
    width: float | None = None

    def __post_init__(self) -> None:
        if (self.center is None) != (self.width is None):
            raise EffftError(
                f"DICOM window needs both a centre and a width (got centre={self.center}, "
                f"width={self.width}): set both window_center and window_width, or neither"
            )
        if self.width is not None and self.width <= 0:
            raise EffftError(f"DICOM window width must be positive, got {self.width}")

    @property
    def given(self) -> bool:
        return self.center is not None


def has_dicom_magic(path: str | os.PathLike[str]) -> bool:
    """True when the file has the DICOM preamble marker "DICM" at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True for a file this module can read: by suffix, or a suffix-less file with DICOM magic.

    Hidden files and the clutter operating systems leave in folders are False.
    """
    p = Path(path)
    name = p.name
    if not name or name.startswith(".") or name.lower() in _JUNK_NAMES:
        return False
    suffix = p.suffix.lower()
    if suffix:
        return suffix in IMAGE_SUFFIXES
    return p.is_file() and has_dicom_magic(p)


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or (not path.suffix and has_dicom_magic(path))


def read_image(
    path: str | os.PathLike[str],
    *,
    channels: int = 3,
    window: DicomWindow | None = None,
    frame: int | None = None,
) -> np.ndarray:
    """Decode a file into an HWC uint8 array with `channels` (1 or 3) channels.

    `window` and `frame` apply to DICOM files only. Raises `BadImageError` naming the path when
    the file is empty, truncated, corrupt, too large or of a kind that cannot be decoded.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise BadImageError(p, f"cannot open the file ({e.strerror or e})") from e
    if size == 0:
        raise BadImageError(p, "empty file (0 bytes)")
    if _is_dicom(p):
        arr = _read_dicom(p, window=window, frame=frame)
    else:
        arr = _read_pillow(p)
    return _to_channels(arr, channels)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) as `read_image` would return it, read from the header where possible."""
    p = Path(path)
    if _is_dicom(p):
        ds = _dcmread(p, stop_before_pixels=True)
        return int(ds.Columns), int(ds.Rows)
    try:
        with Image.open(p) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's fault
        raise BadImageError(p, _reason(e)) from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# ---------------------------------------------------------------- Pillow formats


def _reason(e: BaseException) -> str:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"image too large, refused as a possible decompression bomb ({e}); if you "
                "trust the file, raise PIL.Image.MAX_IMAGE_PIXELS")
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image Pillow recognises (corrupt, or not the format its suffix says)"
    text = str(e).strip() or type(e).__name__
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return f"file is truncated ({text})"
    return f"{type(e).__name__}: {text}"


def _read_pillow(p: Path) -> np.ndarray:
    """The decoded pixels: uint8 HW or HWC (RGB), or a float HW array for deep grey."""
    try:
        with Image.open(p) as im:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a warning is easy to
            # miss in a data loader, so any image over the limit is refused here
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} pixels exceeds the limit of {limit}")
            im.seek(0)  # first frame of GIF / multi-page TIFF
            im.load()
            im = ImageOps.exif_transpose(im)
            return _pillow_to_array(im)
    except BadImageError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow plugins raise many types on bad input
        raise BadImageError(p, _reason(e)) from e


def _pillow_to_array(im: Image.Image) -> np.ndarray:
    if im.mode in _HIGH_DEPTH_MODES:
        return _minmax(np.asarray(im).astype(np.float64)) * 255.0
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, rgba)
        return np.asarray(flat.convert("L" if im.mode in ("LA", "La") else "RGB"))
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))  # RGB, P, CMYK, YCbCr, LAB, HSV, ...


def _minmax(a: np.ndarray) -> np.ndarray:
    """Scale to 0..1 by the array's own range; a constant array becomes zeros."""
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(a, dtype=np.float64)
    return (a - lo) / (hi - lo)


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """HW or HWC (1/3 channels), uint8 or float in 0..255 -> HWC uint8 with `channels`."""
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    have = arr.shape[2]
    if have == channels:
        return np.ascontiguousarray(arr)
    if channels == 3:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    grey = Image.fromarray(np.ascontiguousarray(arr)).convert("L")
    return np.asarray(grey)[:, :, None]


# ---------------------------------------------------------------- DICOM


def _pydicom() -> Any:
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401
    except ImportError as e:
        raise EffftError(
            "reading DICOM files needs pydicom: install it with pip install 'effft[dicom]'"
        ) from e
    return pydicom


def _dcmread(p: Path, *, stop_before_pixels: bool = False) -> Dataset:
    pydicom = _pydicom()
    try:
        # force: a .dcm file without the 128-byte preamble is still DICOM (older writers)
        ds = pydicom.dcmread(p, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on bad input
        raise BadImageError(p, f"not a readable DICOM file ({_reason(e)})") from e
    if len(ds) == 0:
        raise BadImageError(p, "no DICOM data could be parsed (truncated, or not DICOM)")
    if "Rows" not in ds or "Columns" not in ds:
        raise BadImageError(p, "DICOM file without an image (no Rows/Columns: a report, "
                               "a DICOMDIR or a truncated file)")
    return ds


def read_dicom_header(path: str | os.PathLike[str]) -> Dataset:
    """The file's DICOM header (no pixels); `BadImageError` when it is not DICOM or has no image."""
    return _dcmread(Path(path), stop_before_pixels=True)


def _read_dicom(p: Path, *, window: DicomWindow | None, frame: int | None) -> np.ndarray:
    ds = _dcmread(p)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise BadImageError(p, "DICOM file has no pixel data")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise BadImageError(p, f"frame {frame} asked for, but the file has {n_frames} "
                               f"frame(s) (0..{n_frames - 1})")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    pydicom = _pydicom()
    try:
        arr = pydicom.pixels.pixel_array(ds, index=index if n_frames > 1 else None)
        if photometric == "PALETTE COLOR":
            arr = pydicom.pixels.apply_color_lut(arr, ds)
    except Exception as e:  # noqa: BLE001 - decoder plugins raise many types on bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = f" (transfer syntax {syntax.name})" if syntax is not None else ""
        if "plugins" in str(e):
            hint += ", no installed decoder handles it (see pydicom's list of decoder plugins)"
        raise BadImageError(p, f"cannot decode the DICOM pixel data{hint}: {_reason(e)}") from e
    if arr.ndim == 3:  # colour: RGB (YBR is converted by pixel_array), or palette output
        bits = 16 if arr.dtype == np.uint16 and photometric == "PALETTE COLOR" else \
            int(ds.get("BitsStored", 8) or 8)
        return arr.astype(np.float64) * (255.0 / (2**bits - 1))
    return _grey_dicom(arr, ds, index=index, window=window, photometric=photometric)


def _frame_attr(ds: Dataset, index: int, sequence: str, keyword: str) -> Any:
    """A value from the top level, else the frame's (or the shared) functional group."""
    if keyword in ds:
        return ds[keyword].value
    for groups, i in (("PerFrameFunctionalGroupsSequence", index),
                      ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq and len(seq) > i and sequence in seq[i] and len(seq[i][sequence].value):
            item = seq[i][sequence].value[0]
            if keyword in item:
                return item[keyword].value
    return None


def _first(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _grey_dicom(arr: np.ndarray, ds: Dataset, *, index: int, window: DicomWindow | None,
                photometric: str) -> np.ndarray:
    pixels = _pydicom().pixels
    if ds.get("ModalityLUTSequence"):
        values = pixels.apply_modality_lut(arr, ds).astype(np.float64)
    else:
        values = arr.astype(np.float64)
        slope = _frame_attr(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _frame_attr(ds, index, "PixelValueTransformationSequence",
                                "RescaleIntercept")
        if slope is not None and intercept is not None:
            values = values * float(slope) + float(intercept)

    if window is not None and window.given:
        shown = apply_window(values, center=window.center, width=window.width)
    elif ds.get("VOILUTSequence") and "LUTData" in ds.VOILUTSequence[0]:
        lut = ds.VOILUTSequence[0]
        top = 2 ** int(lut.LUTDescriptor[2]) - 1  # LUT entries are indexed by integers
        shown = pixels.apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64) / top
    else:
        center = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowCenter"))
        width = _first(_frame_attr(ds, index, "FrameVOILUTSequence", "WindowWidth"))
        function = _frame_attr(ds, index, "FrameVOILUTSequence", "VOILUTFunction")
        if center is not None and width is not None and float(width) > 0:
            shown = apply_window(values, center=float(center), width=float(width),
                                 function=str(function or "LINEAR"))
        else:
            shown = _minmax(values)
    if photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return np.clip(shown, 0.0, 1.0) * 255.0


def apply_window(values: np.ndarray, *, center: float, width: float,
                 function: str = "LINEAR") -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2/.3) mapped to 0..1."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    # LINEAR: the standard's half-pixel offsets; a width below 1 is a hard threshold
    c, w = center - 0.5, max(width - 1.0, 0.0)
    if w == 0:
        return (values > c).astype(np.float64)
    return np.clip((values - c) / w + 0.5, 0.0, 1.0)

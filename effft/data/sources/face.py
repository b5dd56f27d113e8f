"""The `face` adapter: face identification from one folder of photos per person.

    root/<person>/**/<image>

The person is the class (so splits stratify by person; items carry no group). With `detect`
on, a frontal-face detector runs once per image when the data set is loaded: the largest face
found is the crop that `read` returns, widened by `margin` of the face box on each side and
clamped to the image. The detector is scikit-image's LBP frontal-face cascade: it installs
from PyPI with its model inside, runs offline on the CPU, and needs no GPU. It finds upright,
roughly frontal faces of at least `min_size` pixels (turned or tilted heads, profiles and
very dark photos are often missed), which is why `no_face: keep` (use the whole picture) is
the default. Images are given a border before detection so faces that fill the photo are
found too.

Images without a detected face are listed in `source.no_face` (paths) and
`source.no_face_files` (with what was done to them), not in `source.bad`: `bad` is for files
that cannot be used at all, and these are used uncropped or left out by the user's choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ...console import console
from ...errors import EffftError
from ..decode import BadImageError, read_image
from ._common import BadFile, Item, Source, files_under, subfolders
from .folder import image_file

log = logging.getLogger(__name__)

DETECT_SIDE = 320  # images are shrunk to this long side for detection: the cascade's cost
# grows with the pixel count, and faces worth a crop are still well above its 24 px window
SCALE_STEP = 1.1  # between detector scales: finer finds more tight crops, at some speed
PAD = 0.15  # border added (edge pixels repeated) before detection: the cascade needs a little
# context around a face, and photos cropped tight to the face (ID photos, face data sets) lack
# it; on 92x112 face crops this raises the share of faces found from about 84% to 99%
PROGRESS_FROM = 50  # detection takes tens of ms per image: show progress beyond this many


class Options(BaseModel):
    """Keys of `data.face`."""

    model_config = ConfigDict(extra="forbid")

    detect: bool = True
    """Find the face in each image and train on the crop (false: whole images)."""
    margin: float = Field(0.2, ge=0.0, le=2.0)
    """Added on each side of the face box, as a fraction of its size."""
    no_face: Literal["keep", "drop"] = "keep"
    """Images where no face is found: keep them uncropped, or drop them."""
    min_size: int = Field(24, ge=1)
    """Smallest face (pixels, in the original image) the detector looks for. Photos are shrunk
    to 320 px on the long side for detection and the detector's window is 24 px, so faces
    smaller than 7.5% of a large photo's long side are not found whatever this says."""


@dataclass(frozen=True)
class Box:
    """A face box in image pixels."""

    top: int
    left: int
    height: int
    width: int

    def widened(self, margin: float, image_height: int, image_width: int) -> Box:
        """The box grown by `margin` of its size on each side, clamped to the image."""
        dy, dx = round(self.height * margin), round(self.width * margin)
        top, left = max(0, self.top - dy), max(0, self.left - dx)
        bottom = min(image_height, self.top + self.height + dy)
        right = min(image_width, self.left + self.width + dx)
        return Box(top=top, left=left, height=bottom - top, width=right - left)


@dataclass
class FaceSource(Source):
    """Photos of people; `read` returns the face crop where a face was found."""

    boxes: dict[str, Box | None] = field(default_factory=dict)
    margin: float = 0.2
    no_face: list[str] = field(default_factory=list)

    no_face_action: Literal["keep", "drop"] = "keep"

    @property
    def no_face_files(self) -> list[BadFile]:
        """The images without a detected face, with what was done to them (for the run log).

        They are not in `bad`: `bad` lists files that cannot be used at all, while these are
        used uncropped (`no_face: keep`) or left out by the user's choice (`no_face: drop`).
        """
        action = "kept uncropped" if self.no_face_action == "keep" else "left out"
        return [BadFile(p, f"no face found ({action}, data.face.no_face)") for p in self.no_face]

    def read(self, item: Item, channels: int) -> np.ndarray:
        return crop(read_image(item.path, channels=channels), self.boxes.get(item.path), self.margin)


def crop(image: np.ndarray, box: Box | None, margin: float) -> np.ndarray:
    """`image` cut to `box` widened by `margin` (clamped to the image); whole when no box."""
    if box is None:
        return image
    b = box.widened(margin, image.shape[0], image.shape[1])
    return np.ascontiguousarray(image[b.top:b.top + b.height, b.left:b.left + b.width])


class FaceDetector:
    """The largest upright frontal face in an image, via scikit-image's LBP cascade."""

    def __init__(self, *, min_size: int = 24) -> None:
        try:
            from skimage.data import lbp_frontal_face_cascade_filename
            from skimage.feature import Cascade
        except ImportError as e:
            raise EffftError("face detection needs scikit-image: install it with "
                             "pip install 'effft[face]' (or set data.face.detect: false)") from e
        self._cascade: Any = Cascade(lbp_frontal_face_cascade_filename())
        self.min_size = min_size

    def largest_face(self, grey: np.ndarray) -> Box | None:
        """The largest face in an HW (or HW1) uint8 image, in its pixels; None when none."""
        grey = grey[:, :, 0] if grey.ndim == 3 else grey
        h, w = grey.shape
        scale = min(1.0, DETECT_SIDE / max(h, w))
        small = grey
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))
        window = max(24, round(self.min_size * scale))
        pad = round(PAD * max(small.shape))
        padded = np.pad(small, pad, mode="edge")
        if min(padded.shape) < window:
            return None
        found = self._cascade.detect_multi_scale(
            img=padded, scale_factor=SCALE_STEP, step_ratio=1, min_size=(window, window),
            max_size=padded.shape)
        if not found:
            return None
        best = max(found, key=lambda d: d["width"] * d["height"])
        top, left = (best["r"] - pad) / scale, (best["c"] - pad) / scale
        bottom = (best["r"] - pad + best["height"]) / scale
        right = (best["c"] - pad + best["width"]) / scale
        top, left = max(0, round(top)), max(0, round(left))  # clamp to the image
        bottom, right = min(h, round(bottom)), min(w, round(right))
        if bottom - top < 1 or right - left < 1:
            return None
        return Box(top=top, left=left, height=bottom - top, width=right - left)


def _person_images(root: Path) -> tuple[list[str], list[list[Path]]]:
    people = subfolders(root)
    if len(people) < 2:
        what = f"one person folder ({people[0].name})" if people else "no person folders"
        raise EffftError(f"{root} has {what}: face identification needs a sub-folder of "
                         f"photos for each of at least two people, e.g. {root}/alice/1.jpg")
    images = []
    for d in people:
        files, _ = files_under(d, image_file)
        if not files:
            raise EffftError(f"person folder {d} holds no images: add photos of "
                             f"{d.name}, or remove the folder")
        images.append(files)
    return [d.name for d in people], images


def _detect_all(paths: list[str], detector: FaceDetector) -> dict[str, Box | None | BadFile]:
    found: dict[str, Box | None | BadFile] = {}

    def one(path: str) -> None:
        try:
            found[path] = detector.largest_face(read_image(path, channels=1))
        except BadImageError as e:
            found[path] = BadFile(path, e.reason)

    if len(paths) < PROGRESS_FROM:
        for p in paths:
            one(p)
        return found
    columns = (TextColumn("finding faces"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("faces", total=len(paths))
        for p in paths:
            one(p)
            bar.advance(task)
    return found


def load(root: Path, options: Options, *, channels: int) -> Source:
    """One class per person folder under `root`; faces found and cropped when `detect`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EffftError(f"face data folder {root} does not exist or is not a folder: set "
                         "data.root to the folder holding one sub-folder of photos per person")
    classes, images = _person_images(root)
    pairs = [(str(p), index) for index, files in enumerate(images) for p in files]
    if not options.detect:
        return FaceSource(items=[Item(path=p, target=t) for p, t in pairs], classes=classes,
                          task="multiclass")
    detector = FaceDetector(min_size=options.min_size)
    found = _detect_all([p for p, _ in pairs], detector)
    items, bad, boxes, no_face = [], [], {}, []
    for path, target in pairs:
        result = found[path]
        if isinstance(result, BadFile):
            bad.append(result)
            continue
        boxes[path] = result
        if result is None:
            no_face.append(path)
            if options.no_face == "drop":
                continue
        items.append(Item(path=path, target=target))
    log.info("face detection under %s: a face in %d of %d images", root,
             sum(b is not None for b in boxes.values()), len(pairs))
    if no_face:
        log.warning("no face found in %d of %d images under %s (%s), e.g. %s", len(no_face),
                    len(pairs), root, "kept uncropped" if options.no_face == "keep"
                    else "dropped", no_face[0])
    lost = sorted(set(classes) - {classes[i.target] for i in items})
    if lost:
        raise EffftError(f"no usable image left for {lost} under {root} (no face found, or "
                         "unreadable): add clearer frontal photos, or set "
                         "data.face.no_face: keep")
    return FaceSource(items=items, classes=classes, task="multiclass", bad=bad, boxes=boxes,
                      margin=options.margin, no_face=no_face, no_face_action=options.no_face)

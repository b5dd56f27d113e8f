"""A trained run rebuilt from its checkpoint alone, to be applied to new images.

The checkpoint's `effft` entry gives the model, the class names, the task and threshold, the
InputSpec the run was trained with and the recipe's data section. Images are read as the run's
data adapter read them: DICOM with the recipe's window, and for face runs the largest face
found and cropped with the recipe's margin (where none is found, the whole image).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import EffftError
from ..input import InputSpec
from ..runs.layout import input_spec, load_checkpoint_meta

_META_KEYS = ("model_name", "in_chans", "classes", "task")


@dataclass
class LoadedRun:
    """A trained model and what is needed to feed it, rebuilt from an effft checkpoint."""

    ckpt: Path
    model: torch.nn.Module
    classes: list[str]
    task: str
    threshold: float
    spec: InputSpec
    eval_entries: list | None  # the recipe's data.augment.eval; None: the default
    window: Any  # decode.DicomWindow from the recipe's data.dicom, or None
    face: Any = None  # sources.face.Options of a run trained on detected face crops, else None
    data_root: Path | None = None  # the recipe's data.root: what the run was trained on
    walked: bool = False  # whether its adapter found the images by walking data_root's folders
    temperature: torch.Tensor | None = None  # divides the logits: the calibration fitted on val
    tta: str = "none"  # the recipe's metrics.tta: how the run's test figures were made
    head: str | None = None  # embedding runs: the head (arcface, cosface, softmax); None for classifiers
    operating: dict[str, float] = field(default_factory=dict)  # embedding runs: the thresholds chosen on val
    _detector: Any = field(default=None, repr=False)

    @property
    def is_embedding(self) -> bool:
        return self.head is not None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """An embedding run's L2-normalised embeddings of a batch (as its test made them: with
        the mirror image too where its recipe says metrics.tta: flip)."""
        from ..train.embedding import embed

        assert self.head is not None
        return embed(self.model, x, head=self.head, flip=self.tta == "flip")

    def refuse_embedding(self, command: str) -> None:
        """An embedding run names no classes: say which commands it has instead of `command`."""
        if self.is_embedding:
            raise EffftError(f"{self.ckpt} is an embedding run (task: embedding): it names no classes, so {command} "
                             "does not apply; enrol people with effft enroll, then effft identify, or compare two "
                             "photos with effft verify")

    @property
    def in_chans(self) -> int:
        return self.spec.channels

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for a batch, divided by the run's temperature where it has one (so
        that softmax or sigmoid give its calibrated probabilities)."""
        out = self.model(x)
        return out if self.temperature is None else out / self.temperature.to(out.device)

    def read(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, bool | None]:
        """The image as the run's training read it, and whether a face was found in it.

        DICOM files get the recipe's window; for a run trained on face crops the largest face is
        found and cut out with the recipe's margin, as the face adapter did (the whole image when
        none is found). The flag is None for runs that do not detect faces. Raises
        `decode.BadImageError` for a file that cannot be read.
        """
        from ..data.decode import read_image

        image = read_image(path, channels=self.in_chans, window=self.window)
        if self.face is None:
            return image, None
        from ..data.sources.face import FaceDetector, crop

        if self._detector is None:
            self._detector = FaceDetector(min_size=self.face.min_size)
        grey = read_image(path, channels=1)  # the detector sees what it saw in training
        box = self._detector.largest_face(grey)
        return crop(image, box, self.face.margin), box is not None

    def for_reading(self) -> LoadedRun:
        """A copy that reads images as this run does, without the model (a placeholder stands in):
        what loader workers are given. Each copy makes its own face detector."""
        return replace(self, model=torch.nn.Identity(), temperature=None, _detector=None)

    def eval_pipeline(self) -> Any:
        """The run's eval pipeline (albumentations), ending in a CxHxW float tensor."""
        from ..data.transforms import build_pipeline

        return build_pipeline(train=False, entries=self.eval_entries, spec=self.spec)


def load_run(target: Path, *, data: dict[str, Any] | None = None) -> LoadedRun:
    """The model of a run directory or effft checkpoint, in eval mode, with its InputSpec.

    Images are read and prepared as the run's recipe's `data` section says, or as `data` (a
    recipe's data section as a dict) says where it is given.
    """
    from ..data.decode import DicomWindow
    from ..model.registry import create_model

    ckpt, meta = load_checkpoint_meta(Path(target))
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise EffftError(f"the 'effft' entry of {ckpt} lacks {', '.join(missing)}: write it again with effft fit")
    spec = input_spec(meta, ckpt)
    try:
        data = (meta["recipe"].get("data") or {}) if data is None else data
        augment = data.get("augment") or {}
        entries = augment.get("eval")
        dicom = data.get("dicom") or {}
        window = DicomWindow(center=dicom.get("window_center"), width=dicom.get("window_width"))
        face = None
        if data.get("adapter") == "face":
            from ..data.sources.face import Options as FaceOptions

            face = FaceOptions(**(data.get("face") or {}))
            face = face if face.detect else None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # pydantic's errors are ValueErrors
        raise EffftError(f"the 'effft' entry of {ckpt} is malformed ({exc!r}): was the file edited?") from None
    classes = [str(c) for c in meta["classes"]]
    num_classes, embedding_dim, head = len(classes), None, None
    if meta["task"] == "embedding":
        try:
            head, dim = str(meta["embedding"]["head"]), meta["embedding"]["dim"]
            num_classes = len(meta["embedding"]["train_people"]) if head == "softmax" else 0
            embedding_dim = None if head == "softmax" else int(dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise EffftError(f"the 'effft' entry of {ckpt} lacks its embedding ({exc!r}): was the file edited?") from None
    model = create_model(str(meta["model_name"]), num_classes=num_classes, in_chans=int(meta["in_chans"]),
                         pretrained=ckpt, embedding_dim=embedding_dim)
    model.eval()
    return LoadedRun(
        ckpt=ckpt, model=model, classes=classes, task=str(meta["task"]),
        threshold=float(meta.get("threshold", 0.5)), spec=spec,
        temperature=None if meta.get("temperature") is None else torch.tensor(meta["temperature"], dtype=torch.float32),
        eval_entries=None if entries in (None, "default") else list(entries),
        window=window if window.given else None, face=face,
        data_root=Path(str(data["root"])) if data.get("root") else None,
        walked=data.get("adapter") in ("folder", "face", "dicom"),
        tta=str((meta["recipe"].get("metrics") or {}).get("tta", "none")),
        head=head, operating={str(k): float(v) for k, v in (meta.get("operating_thresholds") or {}).items()}
        if head is not None else {},
    )


def find_images(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, and the image files under folders (recursively, sorted)."""
    from ..data.decode import is_image_file

    found: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file():
            found.append(p)  # named by the user: read it, and report it if it is no image
        else:
            raise EffftError(f"{p} does not exist: give image files or folders of images")
    if not found:
        raise EffftError(f"no image files found in {', '.join(str(p) for p in paths)}")
    return found



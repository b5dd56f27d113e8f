"""Image pipelines (albumentations 2.x) that follow the run's `InputSpec`.

Defaults, with `size` the spec's size (data.image_size, or the weights' input size):
  - train: RandomResizedCrop(size, scale=(0.25, 1)) + HorizontalFlip + a light ColorJitter
    (colour images only). The crop keeps at least a quarter of the image rather than the
    8% used to train on ImageNet from scratch: fine-tuning sets are small, and in medical
    images the finding is easily cropped away.
  - eval: shorter side resized to floor(size / crop_pct), then CenterCrop(size): the crop
    the weights were evaluated with (`crop_mode: squash`: both sides resized to
    floor(size / crop_pct), ignoring the aspect ratio, then the centre crop).
Both end with Normalize(mean, std of the spec) and ToTensorV2, and use the spec's
interpolation. A recipe may replace either list with its own entries `{Name: {arg: value}}`;
Normalize and ToTensorV2 are appended when the list lacks them. Grey inputs stay one channel:
the tensor is 1xHxW.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from ..input import InputSpec

SIZE_STAND_IN = 224  # the size a transform is checked with before the run's input size is known

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
TRAIN_SCALE = (0.25, 1.0)


def _transform_names() -> dict[str, type]:
    names = {"ToTensorV2": ToTensorV2}
    for name in dir(A):
        obj = getattr(A, name)
        if (inspect.isclass(obj) and not inspect.isabstract(obj) and not name.startswith("_")
                and issubclass(obj, (A.BasicTransform, A.BaseCompose))
                and obj not in (A.BasicTransform, A.BaseCompose)):
            names[name] = obj
    return names


TRANSFORMS = _transform_names()


def interpolation(spec: InputSpec) -> int:
    """The cv2 flag for the spec's interpolation name (bicubic when unknown)."""
    return INTERPOLATIONS.get(spec.interpolation, cv2.INTER_CUBIC)


def _format_albumentations_error(name: str, args: dict, e: Exception) -> str:
    # albumentations re-raises its pydantic error as a plain ValueError "from" it
    source = next((x for x in (e, e.__cause__) if callable(getattr(x, "errors", None))), None)
    if source is None:
        return f"{name}: {e}"
    errors = source.errors
    by_arg: dict[str, list[str]] = {}
    for err in errors():
        arg = str(err["loc"][0]) if err["loc"] else "(arguments)"
        msg = err["msg"].removeprefix("Value error, ")
        msgs = by_arg.setdefault(arg, [])
        if msg not in msgs:  # a union type repeats the argument once per branch
            msgs.append(msg)
    parts = [f"bad argument {arg!r}" + (f" = {args[arg]!r}" if arg in args else "")
             + f": {'; or '.join(msgs)}" for arg, msgs in by_arg.items()]
    return f"{name}: {'; '.join(parts)}"


def build_transform(entry: Any, size: int = SIZE_STAND_IN) -> Any:
    """An albumentations transform from a recipe entry `{Name: {arg: value}}` (or `"Name"`).

    A transform that must be told its output size (RandomResizedCrop's `size`, Resize's or
    CenterCrop's `height` and `width`) and is not told it makes `size` x `size` images: the
    run's input size, so a list follows `data.image_size` (the recipe check passes a stand-in).
    Raises ValueError naming the transform, the bad argument and close matches of a misspelt
    name or argument. Compositions (OneOf, SomeOf, Sequential) take `transforms: [entries]`.
    """
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(f"a transform is written {{Name: {{argument: value}}}}, e.g. "
                         f"{{HorizontalFlip: {{p: 0.5}}}}; got {entry!r}")
    (name, args), = entry.items()
    cls = TRANSFORMS.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(TRANSFORMS), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else \
            " (see the albumentations list of transforms)"
        raise ValueError(f"unknown transform {name!r}{hint}")
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise ValueError(f"{name}: arguments are written as a mapping {{argument: value}}, "
                         f"got {args!r}")
    _check_argument_names(name, cls, args)
    if issubclass(cls, A.BaseCompose):
        inner = args.get("transforms")
        if not isinstance(inner, list) or not inner:
            raise ValueError(f"{name}: needs transforms: [a list of transforms]")
        args = {**args, "transforms": [build_transform(x, size) for x in inner]}
    args = _sized(cls, args, size)
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:  # albumentations checks its arguments with pydantic
        raise ValueError(_format_albumentations_error(name, args, e)) from None


def _sized(cls: type, args: dict, size: int) -> dict:
    """`args` with the output size filled in where the transform requires one and none is given."""
    params = inspect.signature(cls.__init__).parameters
    required = {p for p, v in params.items() if v.default is inspect.Parameter.empty}
    if "size" in required and "size" not in args:
        return {**args, "size": (size, size)}
    if {"height", "width"} <= required and not {"height", "width"} & set(args):
        return {**args, "height": size, "width": size}
    return args


def takes_input_size(name: str) -> bool:
    """Whether transform `name`, written without an output size, makes images of the input size."""
    cls = TRANSFORMS.get(name)
    return cls is not None and bool(_sized(cls, {}, 1))


def _check_argument_names(name: str, cls: type, args: dict) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # it takes any keyword: leave the check to the transform
    known = [p for p, v in params.items() if p != "self"
             and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    for arg in args:
        if arg not in known:
            close = difflib.get_close_matches(str(arg), known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else \
                f"; it takes {', '.join(known)}"
            raise ValueError(f"{name}: unknown argument {arg!r}{hint}")


def default_train(spec: InputSpec) -> list:
    """The default training augmentation (before Normalize/ToTensorV2)."""
    steps = [
        A.RandomResizedCrop(size=(spec.size, spec.size), scale=TRAIN_SCALE, interpolation=interpolation(spec)),
        A.HorizontalFlip(p=0.5),
    ]
    if spec.channels == 3:
        steps.append(A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, p=0.5))
    return steps


def default_eval(spec: InputSpec) -> list:
    """Resize to floor(size / crop_pct) (the shorter side, or both with `squash`), then centre-crop."""
    side = spec.resize
    resize = (A.Resize(height=side, width=side, interpolation=interpolation(spec)) if spec.crop_mode == "squash"
              else A.SmallestMaxSize(max_size=side, interpolation=interpolation(spec)))
    return [resize, A.CenterCrop(height=spec.size, width=spec.size)]


def build_pipeline(*, train: bool, entries: list | None, spec: InputSpec, tensor: bool = True) -> A.Compose:
    """The train or eval pipeline: `entries` from the recipe, or the default when None; with
    `tensor` false, the default steps alone, which end in a uint8 image of the input size."""
    if entries is None:
        steps = default_train(spec) if train else default_eval(spec)
    else:
        steps = [build_transform(e, spec.size) for e in entries]
    if not tensor:
        return A.Compose(steps)
    has_tensor = any(isinstance(s, ToTensorV2) for s in steps)
    if not any(isinstance(s, A.Normalize) for s in steps):
        normalize = A.Normalize(mean=spec.mean, std=spec.std, max_pixel_value=255.0)
        at = next((i for i, s in enumerate(steps) if isinstance(s, ToTensorV2)), len(steps))
        steps.insert(at, normalize)
    if not has_tensor:
        steps.append(ToTensorV2())
    return A.Compose(steps)


def apply(pipeline: A.Compose, image: np.ndarray, channels: int) -> torch.Tensor:
    """Run `pipeline` on an HWC uint8 image; a CxHxW float32 tensor with `channels` channels."""
    out = pipeline(image=image)["image"]
    if not isinstance(out, torch.Tensor):
        out = torch.from_numpy(np.ascontiguousarray(out))
    if out.ndim == 2:  # a transform dropped the single channel axis
        out = out.unsqueeze(0)
    if out.shape[0] != channels:
        raise ValueError(f"the image pipeline gave {tuple(out.shape)}, expected {channels} "
                         "channels first; check the transforms in data.augment")
    return out.float()

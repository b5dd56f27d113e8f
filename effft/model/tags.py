"""The weights we know by name, and the preprocessing each was trained with.

A weight tag is `<model name>.<tag>` as on the Hugging Face hub under `timm/`. The numbers are
those the weights were published with; they differ between tags (the `ap` and `tf_..._lite`
weights expect mean = std = 0.5, for instance), which is why the data pipeline reads them from
the model instead of assuming ImageNet statistics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a set of weights."""

    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
        )

    def for_channels(self, in_chans: int) -> Preprocessing:
        """Mean and std for `in_chans` channels: one grey channel takes the average of the three."""
        if in_chans == len(self.mean):
            return self
        if in_chans == 1:
            return replace(self, mean=(sum(self.mean) / 3,), std=(sum(self.std) / 3,))
        reps = -(-in_chans // len(self.mean))
        return replace(self, mean=(self.mean * reps)[:in_chans], std=(self.std * reps)[:in_chans])


def _p(size: int, crop: float, mean=IMAGENET_MEAN, std=IMAGENET_STD, interp: str = "bicubic") -> Preprocessing:
    return Preprocessing(input_size=size, mean=mean, std=std, crop_pct=crop, interpolation=interp)


# model name -> {tag: preprocessing}; the first tag is the default for `pretrained=True`.
KNOWN_WEIGHTS: dict[str, dict[str, Preprocessing]] = {
    "efficientnet_b0": {"ra_in1k": _p(224, 0.875), "ra4_e3600_r224_in1k": _p(224, 0.9, HALF, HALF)},
    "efficientnet_b1": {"ft_in1k": _p(224, 0.875), "ra4_e3600_r240_in1k": _p(240, 0.9, HALF, HALF)},
    "efficientnet_b2": {"ra_in1k": _p(256, 0.875)},
    "efficientnet_b3": {"ra2_in1k": _p(288, 0.875)},
    "efficientnet_b4": {"ra2_in1k": _p(320, 0.875)},
    "efficientnet_b5": {"sw_in12k_ft_in1k": _p(448, 1.0)},
    "efficientnet_lite0": {"ra_in1k": _p(224, 0.875)},
}
# TensorFlow ports: (resolution, crop_pct, extra tags besides ns_jft_in1k, aa_in1k, ap_in1k)
_TF_B = {0: (224, 0.875, ("in1k",)), 1: (240, 0.882, ("in1k",)), 2: (260, 0.89, ("in1k",)),
         3: (300, 0.904, ("in1k",)), 4: (380, 0.922, ("in1k",)), 5: (456, 0.934, ("in1k", "ra_in1k")),
         6: (528, 0.942, ()), 7: (600, 0.949, ("ra_in1k",))}
for _i, (_size, _crop, _extra) in _TF_B.items():
    _tags = {"ns_jft_in1k": _p(_size, _crop), "aa_in1k": _p(_size, _crop), "ap_in1k": _p(_size, _crop, HALF, HALF)}
    _tags.update({t: _p(_size, _crop) for t in _extra})
    KNOWN_WEIGHTS[f"tf_efficientnet_b{_i}"] = _tags
_TF_LITE = {0: (224, 0.875, "bicubic"), 1: (240, 0.882, "bicubic"), 2: (260, 0.89, "bicubic"),
            3: (300, 0.904, "bilinear"), 4: (380, 0.92, "bilinear")}
for _i, (_size, _crop, _interp) in _TF_LITE.items():
    KNOWN_WEIGHTS[f"tf_efficientnet_lite{_i}"] = {"in1k": _p(_size, _crop, HALF, HALF, _interp)}


def default_tag(model_name: str) -> str | None:
    tags = KNOWN_WEIGHTS.get(model_name)
    return next(iter(tags)) if tags else None


def tag_preprocessing(model_name: str, tag: str) -> Preprocessing | None:
    return KNOWN_WEIGHTS.get(model_name, {}).get(tag)

"""What the network is fed: the `InputSpec` of a run, decided once and then only passed on.

It is resolved from two things only: what the weights were trained with (their pretrained
config: size, mean, std, crop, interpolation) and what the recipe says (`data.image_size`,
`model.in_chans`, `model.preprocessing`). The recipe wins where it speaks. The result goes
into every checkpoint, so `test`, `predict`, `explain` and `export` feed the network exactly
as training did, from the checkpoint alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CropMode = Literal["center", "squash"]


@dataclass(frozen=True)
class InputSpec:
    """Size, channels and pixel statistics of the network's input, and how eval images are cut.

    The eval resize is timm's: the shorter side is scaled to floor(size / crop_pct) and the
    centre `size` x `size` is cut (`crop_mode: center`); with `squash` the whole image is
    scaled to floor(size / crop_pct) on both sides first, ignoring its aspect ratio.
    """

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: CropMode = "center"

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"an InputSpec of {self.channels} channel(s) needs as many means and stds, "
                             f"got mean {self.mean} and std {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """The spec a checkpoint or JSON file holds (see `to_dict`)."""
        return cls(
            size=int(d["size"] if "size" in d else d["input_size"]),  # input_size: effft 0.1
            channels=int(d.get("channels", len(d["mean"]))),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            crop_mode=str(d.get("crop_mode", "center")),  # type: ignore[arg-type]
        )

    def for_channels(self, channels: int) -> InputSpec:
        """Mean and std for `channels` channels: one grey channel takes the average of the three
        (the pretrained stem is summed over its colour channels to match)."""
        if channels == self.channels:
            return self
        if channels == 1:
            mean, std = (sum(self.mean) / len(self.mean),), (sum(self.std) / len(self.std),)
        else:
            reps = -(-channels // len(self.mean))
            mean, std = (self.mean * reps)[:channels], (self.std * reps)[:channels]
        return replace(self, channels=channels, mean=mean, std=std)

    @property
    def resize(self) -> int:
        """The side images are scaled to before the centre crop: floor(size / crop_pct)."""
        return max(self.size, int(self.size / self.crop_pct))


def resolve(weights: InputSpec, *, image_size: int | None, channels: int,
            overrides: dict[str, Any] | None = None) -> InputSpec:
    """The run's input: the weights' spec (3 channels, their size), with the recipe's image size,
    channel count and `model.preprocessing` values put over it."""
    spec = replace(weights, **(overrides or {}))
    if image_size is not None:
        spec = replace(spec, size=image_size)
    return spec.for_channels(channels)

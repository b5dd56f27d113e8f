"""Grad-CAM heat maps, and how they are drawn over the image they explain.

Grad-CAM (Selvaraju et al., 2017): for class c, the activations A (K x h x w) of a late layer are
weighted by the spatial mean of d(logit_c)/dA per channel; the map is the ReLU of that weighted
sum, upsampled (bilinear) to the input size and divided by its maximum (0..1; all zeros where
nothing speaks for the class).

The layer is the output of `bn2`, i.e. `forward_features`: the head conv after the last block
stage, at the same (last) resolution. It is the tensor the classifier sees after global pooling,
so the weights are exactly the classifier's row for c (divided by h*w) and the map shows what the
decision was made from; the last block stage's output would pass through one more 1x1 conv and
activation before the decision. The score is the logit (before softmax/sigmoid), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

ALPHA = 0.4  # weight of the heat map over the image
COLORMAP = "jet"


def gradcam(model: torch.nn.Module, x: Tensor, class_index: Tensor, *, layer: torch.nn.Module | None = None
            ) -> tuple[Tensor, Tensor]:
    """(maps (N, H, W) in 0..1 at the input size, logits (N, C)) for the class of each image.

    `class_index` (N,) names the class explained for each image; `layer` is the module whose
    output is used (default: the model's `bn2`, see the module docstring).
    """
    layer = layer if layer is not None else model.bn2
    captured: list[Tensor] = []

    def capture(_module: torch.nn.Module, _inputs: Any, out: Tensor) -> Tensor:
        # the layer's output as a leaf of its own: its gradient is had whether or not the layers
        # below it train (a linear probe freezes them all)
        out = out.detach().requires_grad_(True)
        captured.append(out)
        return out

    handle = layer.register_forward_hook(capture)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(False)
            logits = model(x)
            act = captured[-1]
            scores = logits.gather(1, class_index.view(-1, 1).to(logits.device)).sum()
            # images are independent in eval mode, so one backward pass serves the whole batch
            (grads,) = torch.autograd.grad(scores, act)
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(dim=1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).clamp(0, 1).float(), logits.detach()


def display_image(pipeline: Any, tensor: Tensor) -> np.ndarray:
    """A pipeline tensor (C, H, W) back to an HxWx3 float image in 0..1, for showing only."""
    import albumentations as A

    norm = next((t for t in pipeline.transforms if isinstance(t, A.Normalize)), None)
    arr = tensor.detach().cpu().numpy().astype(np.float64)
    if norm is not None:
        scale = float(norm.max_pixel_value) / 255.0
        mean = np.broadcast_to(np.asarray(norm.mean, dtype=np.float64).reshape(-1), (arr.shape[0],))
        std = np.broadcast_to(np.asarray(norm.std, dtype=np.float64).reshape(-1), (arr.shape[0],))
        arr = (arr * std[:, None, None] + mean[:, None, None]) * scale
    img = arr[:3].transpose(1, 2, 0) if arr.shape[0] >= 3 else np.repeat(arr[:1].transpose(1, 2, 0), 3, axis=2)
    return np.clip(img, 0.0, 1.0)


def overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = ALPHA) -> np.ndarray:
    """The heat map in colour blended over an HxWx3 0..1 image (alpha: the map's weight)."""
    from matplotlib import colormaps

    heat = colormaps[COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * image + alpha * heat


def overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = ALPHA) -> np.ndarray:
    """The heat map in colour blended over an HxWx3 0..1 image (alpha: the map's weight)."""
    from matplotlib import colormaps

    heat = colormaps[COLORMAP](np.clip(cam, 0.0, 1.0))[..., :3]
    return (1.0 - alpha) * image + alpha * heat


@dataclass
class Explanation:
    """One image explained: the class, its probability, the map and the image it was made on."""

    path: Path
    class_index: int
    prob: float
    cam: np.ndarray  # (H, W) in 0..1, at the model's input size
    image: np.ndarray  # (H, W, 3) in 0..1: the eval-preprocessed image


def explain_indexed(model: torch.nn.Module, pipeline: Any, batch: Tensor, paths: list[Path], index: Tensor,
                    probs: Tensor) -> list[Explanation]:
    """One Explanation per image of `batch`, for the class `index` names for it."""
    cams, _ = gradcam(model, batch, index)
    cams, batch = cams.cpu(), batch.cpu()  # for the figures, wherever the model ran
    return [Explanation(path=p, class_index=int(c), prob=float(probs[i, int(c)]), cam=cams[i].numpy(),
                        image=display_image(pipeline, batch[i]))
            for i, (p, c) in enumerate(zip(paths, index.tolist()))]


def figure_cell(ax: Any, e: Explanation, caption: str, fontsize: int = 9) -> None:
    ax.imshow(overlay(e.image, e.cam))
    ax.set_title(caption, fontsize=fontsize)
    ax.set_axis_off()



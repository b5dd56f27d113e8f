"""Loading weights into the model: read, convert, fit, check every key and shape, then load.

A source is a hub id (`timm/efficientnet_b0.ra_in1k`, `hf-hub:...`, `hf_hub:...`, or the bare
`efficientnet_b0.ra_in1k`), a folder (`local-dir:...`, holding config.json and the weights), a
local weight file (.safetensors, .pth, .pt, .bin) or an effft checkpoint (.ckpt). Three key
layouts are recognised and converted to ours, which is timm's: timm's own, torchvision's and
efficientnet_pytorch's. The weights are then checked key by key and shape by shape against the
model before anything is loaded.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import WeightsError
from ...input import InputSpec
from ..efficientnet import EfficientNet
from . import hub
from .convert import StateDict, adapt_stem, set_bn_eps, to_timm_layout

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")  # checkpoints that hold weights inside


@dataclass
class _Weights:
    """A state dict as read, with what its source tells about it."""

    state: StateDict
    source: str  # human-readable, for model.weights_source and messages
    preprocessing: InputSpec | None = None
    made_for: str | None = None  # the model name the weights were published for, when known
    bn_eps: float | None = None


def load_weights(model: EfficientNet, source: str | os.PathLike) -> None:
    """Load weights from a hub id, a weight file or an effft checkpoint into `model`.

    timm, torchvision and efficientnet_pytorch layouts are converted; a classifier with another
    class count is re-initialised; a 3-channel stem is adapted to `model.in_chans`. Sets
    `model.preprocessing` (when the source tells it) and `model.weights_source`. Raises
    WeightsError when the weights cannot be had or do not fit.
    """
    weights = _fetch(source)
    state, layout_eps = to_timm_layout(weights.state, model)
    state = adapt_stem(state, model.in_chans)
    state, reset = _fit_classifier(state, model)
    _check_fits(state, model, weights.source)
    bn_eps = weights.bn_eps if weights.bn_eps is not None else layout_eps
    if bn_eps is not None and bn_eps != model.bn1.eps:
        log.info("BatchNorm eps set to %g, as the weights were trained with", bn_eps)
        set_bn_eps(model, bn_eps)
    full = model.state_dict()
    full.update(state)
    model.load_state_dict(full)
    if reset:
        model.reset_classifier(model.num_classes)
    if weights.made_for and weights.made_for != model.name:
        log.warning("the weights %s were published for %s, not %s", weights.source, weights.made_for, model.name)
    if weights.preprocessing is not None:
        model.preprocessing = weights.preprocessing
    model.weights_source = weights.source


# --- where the weights come from --------------------------------------------------------------


def _fetch(source: str | os.PathLike) -> _Weights:
    if isinstance(source, str) and hub.looks_like_hub_id(source):
        return _fetch_hub(source)
    if isinstance(source, str) and source.startswith(hub.LOCAL_DIR_PREFIX):
        source = source[len(hub.LOCAL_DIR_PREFIX):]
    path = Path(source).expanduser()
    weights = _weights_from_object(_read_file(path), str(path.resolve()))
    if path.is_dir() and weights.preprocessing is None:  # a folder as timm saves one: config.json beside
        config = hub.folder_config(path)
        weights.preprocessing = hub.input_from_cfg(config) if config else None
    return weights


def _fetch_hub(source: str) -> _Weights:
    repo = hub.repo_id(source)
    path = hub.download(repo, source)
    weights = _weights_from_object(_read_file(path), f"hf-hub:{repo}")
    owner, _, name_tag = repo.partition("/")
    name, _, tag = name_tag.partition(".")
    timm_own = owner == "timm"  # timm names its repositories <model>.<tag>
    weights.made_for = name if timm_own else None
    config = hub.repo_config(repo, path)
    weights.preprocessing = (hub.input_from_cfg(config) if config else None) or \
        (hub.pretrained_input(name, tag) if timm_own else None)
    if weights.preprocessing is None:
        log.info("no preprocessing is known for %s: keeping the model's default", repo)
    return weights


def _read_file(path: Path) -> object:
    if path.is_dir():
        path = next((path / f for f in hub.HUB_FILES if (path / f).is_file()), path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}. Give the path of a .safetensors, .pth, .pt, .bin "
                           f"or effft .ckpt file, or a hub id such as {hub.HUB_EXAMPLE}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # a class or function to import and call
            raise WeightsError(
                f"{path} holds Python objects that would run code when loaded, which effft refuses: save a "
                "plain state dict instead (torch.save(model.state_dict(), path) or a .safetensors file)"
            ) from None
        raise WeightsError(f"cannot read the weight file {path}: {hub.first_line(e)}; is it corrupt?") from None
    except Exception as e:  # any failure to parse the file is the file's fault, whatever its type
        raise WeightsError(f"cannot read the weight file {path}: {hub.first_line(e)}; is it corrupt or "
                           "truncated? Save it again, or give another file") from None


def _weights_from_object(obj: object, source: str) -> _Weights:
    """The weights inside what a file held: a state dict, or a checkpoint wrapping one."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a dict of weights: save model.state_dict()")
    meta = obj.get("effft") if isinstance(obj.get("effft"), Mapping) else {}
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{source} holds no weight tensors: give a state dict or an effft checkpoint")
    return _Weights(state=_strip_prefixes(state), source=source, **_read_meta(meta, source))


def _strip_prefixes(state: StateDict) -> StateDict:
    # Our LightningModule holds the network as `self.model`; its other members (ema., loss.) are not ours.
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _read_meta(meta: Mapping, source: str) -> dict:
    """What an effft checkpoint says about its weights (its `effft` entry)."""
    try:
        pre = meta.get("preprocessing")
        return {
            "preprocessing": InputSpec.from_dict(pre) if pre is not None else None,
            "made_for": meta.get("model_name"),
            "bn_eps": float(meta["bn_eps"]) if meta.get("bn_eps") is not None else None,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"the 'effft' entry of {source} is malformed ({e!r}): was the file edited?") from None


# --- fitting to the model ---------------------------------------------------------------------


def _fit_classifier(state: StateDict, model: EfficientNet) -> tuple[StateDict, bool]:
    """Leave out a classifier for another class count; True when the model's needs a fresh start."""
    head = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    given = {k: v for k, v in state.items() if k.startswith("classifier.")}
    if not isinstance(model.classifier, nn.Linear) and head and set(given) == set(head) \
            and all(v.shape == head[k].shape for k, v in given.items()):
        return state, False  # an embedding head, trained for this model: kept as it is
    weight = state.get("classifier.weight")
    ours = model.classifier.weight if isinstance(model.classifier, nn.Linear) else None
    if weight is not None and ours is not None and weight.shape == ours.shape:
        return state, False
    if weight is not None and ours is not None and weight.ndim == 2 and weight.shape[1] != ours.shape[1]:
        return state, False  # not a class-count matter: reported as a shape mismatch
    # the model's own (fresh) classifier stands in, so the key check below passes
    rest = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    rest.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    if weight is None and ours is None:
        return rest, False
    had = f"a {weight.shape[0]}-class classifier" if weight is not None else "no classifier"
    wants = f"its {model.num_classes}-class classifier is freshly initialised" if ours is not None else \
        "its embedding head is freshly initialised" if head else "it has none"
    log.info("the weights have %s; the model wants %d classes, so %s", had, model.num_classes, wants)
    return rest, ours is not None


def _check_fits(state: StateDict, model: EfficientNet, source: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(v.shape)} (model: {tuple(expected[k].shape)})"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("wrong shape", misshaped), ("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        raise WeightsError(
            f"the weights {source} do not fit {model.name}: " + "; ".join(problems)
            + f". Give weights made for {model.name} (timm, torchvision or efficientnet_pytorch layout)"
        )


def _listing(keys: list[str], shown: int = 10) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more

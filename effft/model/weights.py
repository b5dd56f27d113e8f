"""Where weights come from and how they are fitted to the model.

A source is a hub id (`timm/efficientnet_b0.ra_in1k`, `hf-hub:...`, or the bare
`efficientnet_b0.ra_in1k`), a local weight file (.safetensors, .pth, .pt, .bin) or an effft
checkpoint (.ckpt). Three key layouts are recognised and converted to ours, which is timm's:
timm's own, torchvision's and efficientnet_pytorch's. The weights are then checked key by key
and shape by shape against the model before anything is loaded.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from .efficientnet import EfficientNet
from .tags import Preprocessing, tag_preprocessing

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
HUB_EXAMPLE = "timm/efficientnet_b0.ra_in1k"
_HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w-]+\.[\w.-]+|[\w.-]+/[\w.-]+")
_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")  # checkpoints that hold weights inside
# torchvision trains efficientnet_b5..b7 with BatchNorm eps 1e-3 (b0..b4 with 1e-5); checked
# against torchvision.models.efficientnet.
_TORCHVISION_EPS_1E3 = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7"}
TF_EPS = 1e-3  # the TensorFlow reference's BatchNorm eps, kept by efficientnet_pytorch


@dataclass
class _Weights:
    """A state dict as read, with what its source tells about it."""

    state: StateDict
    source: str  # human-readable, for model.weights_source and messages
    preprocessing: Preprocessing | None = None
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
    state, layout_eps = _to_timm_layout(weights.state, model)
    state = _adapt_stem(state, model.in_chans)
    state, reset = _fit_classifier(state, model)
    _check_fits(state, model, weights.source)
    bn_eps = weights.bn_eps if weights.bn_eps is not None else layout_eps
    if bn_eps is not None and bn_eps != model.bn1.eps:
        log.info("BatchNorm eps set to %g, as the weights were trained with", bn_eps)
        _set_bn_eps(model, bn_eps)
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
    if isinstance(source, str) and _looks_like_hub_id(source):
        return _fetch_hub(source)
    path = Path(source).expanduser()
    return _weights_from_object(_read_file(path), str(path.resolve()))


def _looks_like_hub_id(source: str) -> bool:
    if source.startswith("hf-hub:"):
        return True
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES:
        return False
    return _HUB_ID.fullmatch(source) is not None


def _fetch_hub(source: str) -> _Weights:
    repo_id = source.removeprefix("hf-hub:")
    if "/" not in repo_id:
        repo_id = f"timm/{repo_id}"
    path = _download(repo_id, source)
    weights = _weights_from_object(_read_file(path), f"hf-hub:{repo_id}")
    owner, _, repo = repo_id.partition("/")
    name, _, tag = repo.partition(".")
    weights.made_for = name if owner == "timm" else None  # timm names its repos <model>.<tag>
    weights.preprocessing = tag_preprocessing(name, tag)
    if weights.preprocessing is None:
        log.info("no preprocessing is known for the tag of %s: keeping the model's default", repo_id)
    return weights


def _hub_settings() -> tuple[str, bool, str | None]:
    """(cache folder, offline, endpoint), read now: huggingface_hub reads the environment only
    when it is imported, and a caller may set HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT later."""
    from huggingface_hub import constants

    cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    flag = os.environ.get("HF_HUB_OFFLINE")
    offline = flag.strip().upper() in constants.ENV_VARS_TRUE_VALUES if flag is not None else constants.HF_HUB_OFFLINE
    return str(Path(cache_dir).expanduser()), offline, os.environ.get("HF_ENDPOINT") or None


def _host_resolves(endpoint: str | None) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(endpoint or constants.ENDPOINT).hostname
    if not host:
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _download(repo_id: str, source: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
    )

    cache_dir, offline, endpoint = _hub_settings()
    local_only, unreachable = offline, False
    if not offline and not _host_resolves(endpoint):
        # No name service (an offline machine): the cache is all there is. Asking the hub
        # would only add retries with back-off before the same answer.
        local_only = unreachable = True
    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, endpoint=endpoint,
                                        local_files_only=local_only))
        except LocalEntryNotFoundError:
            local_only = unreachable = True  # out of reach: look for the next file in the cache only
        except EntryNotFoundError:
            continue  # the repository has no such file: try the next
        except RepositoryNotFoundError:
            raise WeightsError(f"the hub has no repository '{repo_id}' (from '{source}'), or it is private: "
                               f"check the id, e.g. {HUB_EXAMPLE}") from None
        except HFValidationError as e:
            raise WeightsError(f"'{source}' is neither a weight file nor a valid hub id: {e}") from None
        except (HfHubHTTPError, OSError) as e:
            raise WeightsError(f"downloading '{source}' from the hub failed: {_first_line(e)}; "
                               "try again, or give a local weight file") from None
    if unreachable:
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the hub could not be reached"
        raise WeightsError(
            f"cannot get the weights '{source}': {why} and they are not in the Hugging Face cache folder "
            f"{cache_dir}. Give a local weight file instead (.safetensors, .pth or an effft .ckpt), or run "
            "without pretrained weights; to fill the cache, run once with internet access."
        )
    raise WeightsError(f"the hub repository '{repo_id}' has none of {', '.join(HUB_FILES)}: "
                       "give another hub id or a local weight file")


def _read_file(path: Path) -> object:
    if path.is_dir():
        path = next((path / f for f in HUB_FILES if (path / f).is_file()), path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}. Give the path of a .safetensors, .pth, .pt, .bin "
                           f"or effft .ckpt file, or a hub id such as {HUB_EXAMPLE}")
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
        raise WeightsError(f"cannot read the weight file {path}: {_first_line(e)}; is it corrupt?") from None
    except Exception as e:  # any failure to parse the file is the file's fault, whatever its type
        raise WeightsError(f"cannot read the weight file {path}: {_first_line(e)}; is it corrupt or "
                           "truncated? Save it again, or give another file") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
            "preprocessing": Preprocessing.from_dict(pre) if pre is not None else None,
            "made_for": meta.get("model_name"),
            "bn_eps": float(meta["bn_eps"]) if meta.get("bn_eps") is not None else None,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"the 'effft' entry of {source} is malformed ({e!r}): was the file edited?") from None


# --- layouts ----------------------------------------------------------------------------------


def _to_timm_layout(state: StateDict, model: EfficientNet) -> tuple[StateDict, float | None]:
    """The state in our layout, and the BatchNorm eps the weights were trained with where that
    can differ from the model's own."""
    if "features.0.0.weight" in state:
        log.info("converting torchvision weights to the model's layout")
        return from_torchvision(state), (1e-3 if model.name in _TORCHVISION_EPS_1E3 else None)
    if "_conv_stem.weight" in state:
        log.info("converting efficientnet_pytorch weights to the model's layout")
        if not model.variant.tf_port:
            log.info("these weights come from TensorFlow with 'SAME' padding: tf_%s matches them exactly", model.name)
        return from_efficientnet_pytorch(state, [len(stage) for stage in model.blocks]), TF_EPS
    return state, None


def _set_bn_eps(model: nn.Module, eps: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = eps


# torchvision's parts of a block, by index: with an expansion (MBConv) or without (first stage).
_TV_MBCONV = {"0": ("conv_pw", "bn1"), "1": ("conv_dw", "bn2"), "2": "se", "3": ("conv_pwl", "bn3")}
_TV_DS = {"0": ("conv_dw", "bn1"), "1": "se", "2": ("conv_pw", "bn2")}
_TV_SE = {"fc1": "conv_reduce", "fc2": "conv_expand"}
_TV_BLOCK = re.compile(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(\w+)\.(.+)")
_TV_CONV_BN = re.compile(r"features\.(\d+)\.([01])\.(.+)")


def from_torchvision(state: Mapping[str, torch.Tensor]) -> StateDict:
    """torchvision's EfficientNet keys renamed to ours; unknown keys are kept as they are."""
    out = {}
    for key, value in state.items():
        out[_torchvision_key(key, state)] = value
    return out


def _torchvision_key(key: str, state: Mapping[str, torch.Tensor]) -> str:
    if m := _TV_BLOCK.fullmatch(key):
        stage, block, part, sub, rest = m.groups()
        expands = f"features.{stage}.{block}.block.3.0.weight" in state
        role = (_TV_MBCONV if expands else _TV_DS).get(part)
        prefix = f"blocks.{int(stage) - 1}.{block}"
        if role == "se" and sub in _TV_SE:
            return f"{prefix}.se.{_TV_SE[sub]}.{rest}"
        if isinstance(role, tuple) and sub in ("0", "1"):
            return f"{prefix}.{role[int(sub)]}.{rest}"
        return key
    if m := _TV_CONV_BN.fullmatch(key):
        index, sub, rest = m.groups()
        conv, bn = ("conv_stem", "bn1") if index == "0" else ("conv_head", "bn2")
        return f"{conv if sub == '0' else bn}.{rest}"
    if key.startswith("classifier.1."):
        return "classifier." + key[len("classifier.1."):]
    return key


_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EP_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EP_MBCONV = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3", **_EP_SE}
_EP_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2", **_EP_SE}
_EP_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def from_efficientnet_pytorch(state: Mapping[str, torch.Tensor], stage_lengths: list[int]) -> StateDict:
    """efficientnet_pytorch's keys renamed to ours. Its blocks are numbered straight through the
    stages; `stage_lengths` (the model's blocks per stage) places them. Unknown keys are kept."""
    places = [(s, b) for s, length in enumerate(stage_lengths) for b in range(length)]
    out = {}
    for key, value in state.items():
        out[_efficientnet_pytorch_key(key, state, places)] = value
    return out


def _efficientnet_pytorch_key(key: str, state: Mapping[str, torch.Tensor], places: list[tuple[int, int]]) -> str:
    if m := _EP_BLOCK.fullmatch(key):
        index, module, param = m.groups()
        expands = f"_blocks.{index}._expand_conv.weight" in state
        name = (_EP_MBCONV if expands else _EP_DS).get(module)
        if name is None or int(index) >= len(places):
            return key  # reported as unexpected
        stage, block = places[int(index)]
        return f"blocks.{stage}.{block}.{name}.{param}"
    module, _, param = key.partition(".")
    return f"{_EP_TOP[module]}.{param}" if module in _EP_TOP else key


# --- fitting to the model ---------------------------------------------------------------------


def _adapt_stem(state: StateDict, in_chans: int) -> StateDict:
    """A 3-channel stem for `in_chans` inputs. One channel sums the kernels, so a grey image gives
    what the same image in RGB gave; more channels repeat them, rescaled to keep the output scale."""
    weight = state.get("conv_stem.weight")
    if in_chans == 3 or weight is None or weight.ndim != 4 or weight.shape[1] != 3:
        return state
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        adapted = weight.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    log.info("adapted the pretrained 3-channel stem to %d input channel(s)", in_chans)
    return {**state, "conv_stem.weight": adapted}


def _fit_classifier(state: StateDict, model: EfficientNet) -> tuple[StateDict, bool]:
    """Leave out a classifier for another class count; True when the model's needs a fresh start."""
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
    wants = f"its {model.num_classes}-class classifier is freshly initialised" if ours is not None else "it has none"
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

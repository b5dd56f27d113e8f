"""The architecture: same structure as timm's models, and the behaviours training relies on."""

import math

import pytest
import torch
from torch import nn

import effft
from effft.errors import UnknownModelError
from effft.model.blocks import DepthwiseSeparable, MBConv
from effft.model.registry import VARIANTS
from effft.model.layers import Conv2dSame, DropPath, SqueezeExcite, same_padding

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_keys_and_shapes_equal_timm(name):
    with torch.device("meta"):
        ours = effft.create_model(name).state_dict()
        ref = timm.create_model(name).state_dict()
    assert list(ours) == list(ref)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_list_models_covers_the_family():
    names = effft.list_models()
    expected = [f"{p}efficientnet_{k}{i}" for p in ("", "tf_") for k, n in (("b", 8), ("lite", 5)) for i in range(n)]
    assert sorted(names) == sorted(expected)


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownModelError) as err:
        effft.create_model("efficientnet_bo")
    assert "efficientnet_b0" in str(err.value) and "efficientnet_bo" in str(err.value)


# Widths of the reference models (stem, stage outputs, head): rounding to multiples of 8 that
# never falls more than 10% below the scaled width, as in the TensorFlow reference.
REFERENCE_WIDTHS = {
    "efficientnet_b0": (32, [16, 24, 40, 80, 112, 192, 320], 1280),
    "efficientnet_b3": (40, [24, 32, 48, 96, 136, 232, 384], 1536),
    "efficientnet_lite2": (32, [16, 24, 48, 88, 120, 208, 352], 1280),
}


@pytest.mark.parametrize("name", list(REFERENCE_WIDTHS))
def test_compound_scaling(name):
    v = VARIANTS[name]
    model = effft.create_model(name)
    stem, widths, head = REFERENCE_WIDTHS[name]
    base_repeats = [1, 2, 2, 3, 3, 4, 1]
    assert model.conv_stem.out_channels == stem and model.num_features == head
    for i, (stage, repeats, width) in enumerate(zip(model.blocks, base_repeats, widths)):
        fixed = v.lite and i in (0, len(base_repeats) - 1)
        assert len(stage) == (repeats if fixed else math.ceil(repeats * v.depth))
        last = stage[-1]
        assert (last.conv_pw if i == 0 else last.conv_pwl).out_channels == width


def test_blocks_se_width_residual_and_activation():
    model = effft.create_model("efficientnet_b2")
    for stage in model.blocks:
        for block in stage:
            in_ch = block.conv_dw.in_channels if isinstance(block, DepthwiseSeparable) else block.conv_pw.in_channels
            assert isinstance(block.se, SqueezeExcite)
            assert block.se.conv_reduce.out_channels == round(in_ch * 0.25)
            out_ch = block.bn2.num_features if isinstance(block, DepthwiseSeparable) else block.bn3.num_features
            stride = block.conv_dw.stride[0]
            assert block.has_skip == (stride == 1 and in_ch == out_ch)
            assert isinstance(block.bn1.act, nn.SiLU)
    lite = effft.create_model("efficientnet_lite0")
    assert lite.conv_stem.out_channels == 32 and lite.num_features == 1280
    assert all(isinstance(b.se, nn.Identity) and isinstance(b.bn1.act, nn.ReLU6) for s in lite.blocks for b in s)


def test_tf_port_uses_same_padding_and_tf_eps():
    model = effft.create_model("tf_efficientnet_b0").eval()
    assert isinstance(model.conv_stem, Conv2dSame)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.eps == 1e-5 for m in effft.create_model("efficientnet_b0").modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 67, 81))
    assert feats.shape[-2:] == (math.ceil(67 / 32), math.ceil(81 / 32))
    assert same_padding(67, 3, 2) == (1, 1) and same_padding(64, 3, 2) == (0, 1) and same_padding(65, 5, 2) == (2, 2)


def test_drop_path_rises_linearly_and_is_off_in_eval():
    torch.manual_seed(0)
    model = effft.create_model("efficientnet_b0", num_classes=4, drop_rate=0.0, drop_path_rate=0.5)
    blocks = [b for s in model.blocks for b in s]
    rates = [b.drop_path.p if isinstance(b.drop_path, DropPath) else None for b in blocks]
    n = len(blocks)
    for i, r in enumerate(rates):
        if r is not None:
            assert r == pytest.approx(0.5 * i / n)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # some residual branches dropped
    model_nodrop = effft.create_model("efficientnet_b0", num_classes=4, drop_rate=0.0, drop_path_rate=0.0).train()
    with torch.no_grad():
        assert torch.equal(model_nodrop(x), model_nodrop(x))


def test_defaults_follow_the_scaling_table():
    model = effft.create_model("efficientnet_b4")
    assert model.drop_rate == VARIANTS["efficientnet_b4"].dropout == 0.4
    assert model.preprocessing.size == 380


def test_backward_reaches_every_parameter():
    model = effft.create_model("efficientnet_b0", num_classes=3).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert any(p.grad.abs().sum() > 0 for p in model.conv_stem.parameters())


def test_head_reset_and_head_api():
    model = effft.create_model("efficientnet_b0").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.allclose(model.forward_head(feats), model.classifier(pooled))
    assert feats.shape == (2, 1280, 2, 2) and pooled.shape == (2, 1280)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 1280)


def test_in_chans_builds_a_matching_stem():
    model = effft.create_model("efficientnet_b0", in_chans=1, num_classes=2)
    assert model.conv_stem.weight.shape[1] == 1
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_lite0"])
def test_channels_last_gives_the_same_outputs_and_gradients(name):
    # the memory format fit uses by default (model.channels_last): the same numbers, faster
    torch.manual_seed(0)
    a = effft.create_model(name, num_classes=4).eval()
    b = effft.create_model(name, num_classes=4).eval()
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    assert b.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 48, 48)
    out_a, out_b = a(x), b(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    torch.testing.assert_close(b.blocks[1][0].conv_dw.weight.grad, a.blocks[1][0].conv_dw.weight.grad,
                               rtol=1e-3, atol=1e-5)

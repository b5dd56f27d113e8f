"""BatchNorm folded for inference: the same outputs, no BatchNorm left, the original untouched,
and never a model to train."""

from __future__ import annotations

import pytest
import torch

from effft.model.fuse import fuse_for_inference, is_fused
from effft.model.registry import create_model


def _with_statistics(name: str) -> torch.nn.Module:
    """A model whose BatchNorms do something: running statistics and affine terms away from 0/1."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model


@pytest.mark.parametrize("name, size", [("efficientnet_b0", 37), ("tf_efficientnet_b0", 41), ("efficientnet_lite0", 33)])
def test_folded_outputs_equal_the_eval_model(name, size):
    model = _with_statistics(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_for_inference(model)
    assert is_fused(fused) and not is_fused(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert want.abs().max() > 0.05  # outputs that say something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the model it was made from is as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_a_folded_model_is_never_trained(tmp_path):
    from effft.config.load import validate
    from effft.input import InputSpec
    from effft.train.module import EffftModule

    recipe = validate({"name": "x", "data": {"adapter": "folder", "root": str(tmp_path)}})
    fused = fuse_for_inference(create_model("efficientnet_b0", num_classes=2))
    with pytest.raises(ValueError, match="for inference only"):
        EffftModule(fused, recipe=recipe, spec=InputSpec(size=32), task="binary", classes=["a", "b"])
    assert not any(p.requires_grad for p in fused.parameters())

"""EMA weights: the decay planned from the run's length, and the average it gives."""

from __future__ import annotations

import pytest
import torch

from effft.train.averaging import ExponentialAverage, planned_decay


def test_the_planned_decay_spans_a_tenth_of_the_run():
    assert planned_decay(1000) == pytest.approx(0.99)  # 1 / (1 - decay) = 100 steps
    assert planned_decay(300) == pytest.approx(1 - 1 / 30)
    assert planned_decay(5) == 0.5  # never fewer than 2 steps


@pytest.mark.parametrize("steps, every", [(100, 1), (1000, 2)])
def test_auto_averages_as_an_ema_of_the_planned_span(steps, every):
    callback = ExponentialAverage(decay="auto")
    decay = callback.plan(steps)
    assert callback.update_every_n_steps == every
    assert decay == pytest.approx(planned_decay(steps) ** every)  # the same span from fewer updates
    assert callback.should_update(step_idx=every) and (every == 1 or not callback.should_update(step_idx=1))
    # the function the average is updated with, against the EMA written out here
    average, want = [torch.zeros(4), torch.zeros(2)], [torch.zeros(4), torch.zeros(2)]
    for step in range(1, 6):
        current = [torch.full((4,), float(step)), torch.full((2,), -float(step))]
        callback._kwargs["multi_avg_fn"](average, current, torch.tensor(step))
        want = [decay * w + (1 - decay) * c for w, c in zip(want, current)]
    for got, expected in zip(average, want):
        torch.testing.assert_close(got, expected)


def test_a_fixed_decay_is_used_as_given():
    callback = ExponentialAverage(decay=0.9)
    average = [torch.zeros(3)]
    callback._kwargs["multi_avg_fn"](average, [torch.ones(3)], torch.tensor(1))
    torch.testing.assert_close(average[0], torch.full((3,), 0.1))


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.LazyLinear(2))


def test_the_listed_average_equals_torchs_average_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from effft.train.averaging import ListedAverage

    torch.manual_seed(0)
    net = _net()
    net(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    theirs = AveragedModel(net, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    ours = ListedAverage(net, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):
        loss = net(torch.randn(4, 3, 8, 8)).square().mean()  # also moves the BatchNorm statistics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        theirs.update_parameters(net)
        ours.update_parameters(net)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 4
    want = theirs.module.state_dict()
    got = ours.module.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    # the average moved away from both the first and the last weights
    assert not torch.equal(got["0.weight"], net[0].weight.detach())
    assert ours._groups is not None and len(ours._groups) == 2  # float32 tensors, and the int64 counter

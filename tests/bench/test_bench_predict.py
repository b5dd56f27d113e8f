"""`effft bench predict`: predict end to end against the model's forward, at tiny sizes."""

from __future__ import annotations

import math

import pytest

from effft.cli import run


@pytest.mark.usefixtures("one_thread")
def test_bench_predict_prints_both_speeds_and_their_ratio(capsys):
    assert run(["bench", "predict", "--limit", "6", "--batch-size", "3", "--image-size", "32", "--rounds", "1",
                "--workers", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "forward img/s" in out and "predict img/s" in out and "ratio predict/forward" in out
    assert "6 JPEGs of 300-500 px" in out and "1 loader workers" in out
    for label in ("files -> CSV", "the whole command"):
        row = next(line for line in out.splitlines() if label in line)
        forward, predict, ratio = (float(cell) for cell in row.split("│")[2:5])
        assert all(math.isfinite(v) and v > 0 for v in (forward, predict, ratio))
        assert ratio == pytest.approx(predict / forward, rel=0.02)  # one round: the ratio of the two speeds

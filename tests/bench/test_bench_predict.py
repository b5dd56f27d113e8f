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


@pytest.mark.slow  # torch.compile's first call: about a minute of compiling on a 2-core CPU
@pytest.mark.usefixtures("one_thread")
def test_bench_predict_compile_adds_the_compiled_rows_and_their_gain(capsys):
    import re

    assert run(["bench", "predict", "--limit", "6", "--batch-size", "3", "--image-size", "32", "--rounds", "1",
                "--workers", "0", "--device", "cpu", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "compiled" in out.split("the whole command")[0]  # its row in the table, before the command's
    gain = re.search(r"compiled against eager, round by round: forward ([\d.]+)x, files -> CSV\s+([\d.]+)x", out)
    assert gain is not None and all(float(g) > 0 for g in gain.groups()), out

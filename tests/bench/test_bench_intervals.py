"""`effft bench intervals`: the vectorised bootstrap against a scikit-learn loop over resamples."""

from __future__ import annotations

import numpy as np
import pytest

from effft.bench.intervals import _data, reference_intervals
from effft.cli import run
from effft.evaluate.intervals import binary_intervals


def test_the_vectorised_intervals_agree_with_a_scikit_learn_loop():
    p1, y = _data(400, seed=2)
    ours = binary_intervals(p1, y, threshold=0.5, resamples=2000, seed=0)
    theirs = reference_intervals(p1, y, resamples=1000, seed=1)  # other draws: agreement within noise
    for name in ("auroc", "average_precision", "ece"):
        assert ours[name]["low"] == pytest.approx(theirs[name][0], abs=0.012), name
        assert ours[name]["high"] == pytest.approx(theirs[name][1], abs=0.012), name


def test_bench_intervals_prints_the_ratio(capsys):
    assert run(["bench", "intervals", "--predictions", "300", "--resamples", "40", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "scikit-learn loop s" in out and "speed ratio" in out and "AUROC interval" in out
    ratio = float([line for line in out.splitlines() if "AUROC, AP" in line][0].split("│")[-2])
    assert np.isfinite(ratio) and ratio > 0

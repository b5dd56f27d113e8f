"""`effft bench fit RECIPE`: a training epoch of a recipe against the bare steps of its batches."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml
from PIL import Image

from effft.bench.fit import _bench_recipe
from effft.cli import run
from effft.config.load import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_recipe(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    recipe = {"name": "f", "output_dir": str(tmp_path / "runs"), "model": {"pretrained": False},
              "data": {"adapter": "folder", "root": str(tmp_path / "data"), "image_size": 32, "batch_size": 4,
                       "num_workers": 0, "cache": "ram", "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
              "finetune": {"strategy": "freeze_then_unfreeze", "freeze_bottom": 2},
              "trainer": {"max_epochs": 30, "budget": "5m", "accelerator": "cpu"}}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "f.yaml"


def test_the_bench_runs_one_steady_epoch_of_the_recipe(small_recipe, tmp_path):
    bench = _bench_recipe(load_recipe(small_recipe, []), tmp_path / "out")
    assert bench.trainer["max_epochs"] == 1 and bench.trainer["limit_val_batches"] == 0
    assert "budget" not in bench.trainer  # one epoch, not planned
    # a later epoch's cost: nothing frozen by the strategy, the recipe's frozen bottom kept
    assert bench.finetune.strategy == "full" and bench.finetune.freeze_bottom == 2


def test_bench_fit_of_a_recipe_prints_the_overhead(small_recipe, capsys):
    assert run(["bench", "fit", str(small_recipe), "--rounds", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bare steps" in printed and "overhead" in printed
    row = re.findall(r"(\d+\.\d+)\s*│\s*(\d+\.\d+)\s*│\s*(\d+\.\d+)", printed)
    assert row, printed
    ours, bare, ratio = map(float, row[-1])
    assert ours > 0 and bare > 0 and 0.2 < ratio < 20

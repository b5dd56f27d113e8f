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
    # planned as the recipe's run (the EMA's span, the schedule), without a time budget
    assert bench.trainer["max_epochs"] == 30 and bench.trainer["limit_val_batches"] == 0
    assert "budget" not in bench.trainer
    # a later epoch's cost: nothing frozen by the strategy, the recipe's frozen bottom kept
    assert bench.finetune.strategy == "full" and bench.finetune.freeze_bottom == 2


def test_the_epoch_clock_times_the_first_epoch_and_ends_the_run_there():
    import lightning as L
    import torch

    from effft.bench.fit import _EpochClock

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=4)
    clock = _EpochClock()
    trainer = L.Trainer(max_epochs=30, callbacks=[clock], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), data)
    assert trainer.current_epoch == 1 and trainer.global_step == 2 and len(clock.seconds) == 1
    assert clock.seconds[0] > 0


def test_bench_fit_of_a_recipe_prints_the_overhead(small_recipe, capsys):
    assert run(["bench", "fit", str(small_recipe), "--rounds", "2", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bare steps" in printed and "overhead" in printed
    row = re.findall(r"(\d+\.\d+)\s*│\s*(\d+\.\d+)\s*│\s*(\d+\.\d+)", printed)
    assert row, printed
    ours, bare, ratio = map(float, row[-1])
    assert ours > 0 and bare > 0 and 0.2 < ratio < 20

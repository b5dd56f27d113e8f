"""What a fit prints is effft's and the user's business: no advertisement from Lightning, no
"Total FLOPs: 0" in the model summary, no note from matplotlib that it built its font cache."""

from __future__ import annotations

import logging

import pytest
from test_fit import make_folder, recipe

from effft.cli import run
from effft.config.load import load_recipe
from effft.runs.build import build, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_trainer_gives_no_litlogger_tip_and_the_summary_counts_flops(tmp_path, caplog):
    from lightning.pytorch.utilities.model_summary import ModelSummary

    path = recipe(tmp_path, "quiet", make_folder(tmp_path / "data", ["blue", "green", "red"], n=4))
    built = build(load_recipe(path), progress=False)
    with caplog.at_level(logging.INFO):
        make_trainer(built.recipe, tmp_path / "runs" / "quiet", task=built.data.task, classes=built.data.classes,
                     quiet=False)
    assert "GPU available" in caplog.text and "litlogger" not in caplog.text
    assert ModelSummary(built.module).total_flops > 0  # on one input-sized image


def test_matplotlib_font_cache_note_is_not_shown():
    assert run(["models"]) == 0  # any command sets up the logging
    assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.INFO)
    assert logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.WARNING)

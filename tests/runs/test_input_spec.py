"""The InputSpec is decided once, at fit, and read back from the checkpoint alone.

A run trained at 96 px from weights that say 224 px predicts, explains and exports at 96 px; a
grey run (in_chans: 1) does the same with the channel-adapted mean and std. The run directory
and the data are deleted first, so only the copied checkpoint can tell them what to do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from effft.cli import run as cli
from effft.data.decode import read_image
from effft.infer.explain import explain_paths
from effft.infer.loaded_run import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS_MEAN, WEIGHTS_STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def weights_folder(folder: Path) -> Path:
    """A folder as timm saves one (local-dir:): random B0 weights and a config.json that says 224 px."""
    import effft

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(effft.create_model("efficientnet_b0").state_dict(), folder / "model.safetensors")
    config = {"architecture": "efficientnet_b0", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 224, 224], "mean": WEIGHTS_MEAN, "std": WEIGHTS_STD,
                                 "crop_pct": 0.875, "interpolation": "bilinear", "crop_mode": "center"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def images(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("in_chans", [3, 1])
def test_a_96px_run_from_224px_weights_is_used_at_96px_from_its_checkpoint_alone(tmp_path, in_chans):
    weights = weights_folder(tmp_path / "weights")
    data = images(tmp_path / "data")
    recipe = {"name": "small", "output_dir": str(tmp_path / "runs"),
              "model": {"arch": "efficientnet_b0", "pretrained": f"local-dir:{weights}", "in_chans": in_chans},
              "data": {"adapter": "folder", "root": str(data), "image_size": 96, "batch_size": 4, "num_workers": 0,
                       "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
              "report": {"error_grid": 0}, "trainer": {"max_epochs": 1, "accelerator": "cpu"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert cli(["-q", "fit", str(tmp_path / "r.yaml")]) == 0
    ckpt = tmp_path / "alone.ckpt"
    shutil.copy(tmp_path / "runs" / "small" / "checkpoints" / "best.ckpt", ckpt)
    probe = tmp_path / "probe.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 80, 3), dtype=np.uint8)).save(probe)
    shutil.rmtree(tmp_path / "runs")
    shutil.rmtree(data)

    mean = WEIGHTS_MEAN if in_chans == 3 else (sum(WEIGHTS_MEAN) / 3,)
    std = WEIGHTS_STD if in_chans == 3 else (sum(WEIGHTS_STD) / 3,)
    run = load_run(ckpt)
    spec = run.spec
    assert (spec.size, spec.channels, spec.interpolation) == (96, in_chans, "bilinear")
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)

    # predict: the model sees the probe as a 96 px crop normalised with the weights' statistics
    shapes = []
    run.model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    image = read_image(probe, channels=in_chans).astype(np.float32) / 255.0  # 120 x 80
    side = int(96 / 0.875)  # shorter side 80 -> 109, longer 120 -> 164 (bilinear), centre 96
    import cv2

    resized = cv2.resize(image, (side, round(120 * side / 80)), interpolation=cv2.INTER_LINEAR)
    resized = resized.reshape(resized.shape[0], resized.shape[1], in_chans)
    top, left = (resized.shape[0] - 96) // 2, (side - 96) // 2
    crop = (resized[top:top + 96, left:left + 96] - np.array(mean, np.float32)) / np.array(std, np.float32)
    with torch.no_grad():
        want = run.logits(torch.from_numpy(crop.transpose(2, 0, 1)).unsqueeze(0).float()).softmax(-1)[0]
    out = tmp_path / "p.csv"
    assert cli(["-q", "predict", str(ckpt), str(probe), "--out", str(out)]) == 0
    header, row = (line.split(",") for line in out.read_text().splitlines())
    assert header[2] == "prob_b" and float(row[2]) == pytest.approx(float(want[1]), abs=2e-3)

    # explain: the map is made at 96 px
    shapes.clear()
    done, bad = explain_paths(run, [probe], progress=False)
    assert not bad and done[0].cam.shape == (96, 96) and shapes[-1] == (1, in_chans, 96, 96)

    # export: the file takes 96 px input, and its JSON says so with the channel-adapted statistics
    exported = tmp_path / "m.onnx"
    assert cli(["-q", "export", str(ckpt), "--format", "onnx", "--out", str(exported)]) == 0
    info = json.loads((tmp_path / "m.preprocessing.json").read_text())
    assert info["input_shape"] == ["batch", in_chans, 96, 96] and info["input_size"] == 96
    assert info["mean"] == pytest.approx(list(mean)) and info["std"] == pytest.approx(list(std))
    import onnx

    dims = onnx.load(str(exported)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [in_chans, 96, 96]

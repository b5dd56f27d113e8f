"""effft export --format timm: a folder timm builds with local-dir: and that gives effft's
calibrated logits; effft loads it back; the label names and preprocessing survive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from effft.cli import run as cli
from effft.model.registry import create_model
from effft.runs.layout import update_checkpoint_meta

from test_export import CLASSES, make_ckpt  # noqa: E402  (tests/infer is on the path)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, size, temperature", [("efficientnet_b0", 32, None), ("tf_efficientnet_b0", 40, 2.5),
                                                     ("efficientnet_lite0", 32, 0.5)])
def test_timm_builds_the_folder_and_gives_efffts_calibrated_logits(tmp_path: Path, name, size, temperature):
    model = make_ckpt(tmp_path / "run.ckpt", name=name, size=size)
    if temperature is not None:
        update_checkpoint_meta(tmp_path / "run.ckpt", temperature=temperature)
    out = tmp_path / "timm"
    assert cli(["-q", "export", str(tmp_path / "run.ckpt"), "--format", "timm", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert theirs.pretrained_cfg["label_names"] == CLASSES and theirs.num_classes == len(CLASSES)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = model(x) / (temperature or 1.0)
        got = theirs(x)
    assert (want.max(1).values - want.min(1).values).mean() > 0.1  # logits that tell inputs apart
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and back into effft, from the folder as timm reads it
    again = create_model(name, pretrained=str(out), num_classes=len(CLASSES)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and config["pretrained_cfg"]["input_size"] == [3, size, size]
    assert config["pretrained_cfg"]["crop_pct"] == 0.9 and config["pretrained_cfg"]["interpolation"] == "bilinear"
    assert set(load_file(out / "model.safetensors")) == set(model.state_dict())  # timm's names, nothing else
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and "upload_folder" in card and ", ".join(CLASSES) in card


def test_an_occupied_out_folder_is_refused(tmp_path: Path, capsys):
    make_ckpt(tmp_path / "run.ckpt")
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "mine.txt").write_text("keep me")
    assert cli(["export", str(tmp_path / "run.ckpt"), "--format", "timm", "--out", str(tmp_path / "timm")]) == 1
    err = capsys.readouterr().err
    assert "is not an empty folder" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "timm").iterdir()] == ["mine.txt"]


def test_the_default_folder_is_beside_the_checkpoint(tmp_path: Path):
    make_ckpt(tmp_path / "run.ckpt")
    assert cli(["-q", "export", str(tmp_path / "run.ckpt"), "--format", "timm"]) == 0
    assert (tmp_path / "run-timm" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run-timm")]  # no scratch left

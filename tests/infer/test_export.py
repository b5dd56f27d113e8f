"""effft export: ONNX and TorchScript agree with PyTorch at several batch sizes; the JSON is complete."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from effft.cli import run as cli
from effft.errors import EffftError
from effft.infer.export import export
from effft.model.registry import create_model
from effft.input import InputSpec

SIZE = 32
CLASSES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_ckpt(path: Path, *, name: str = "efficientnet_b0", size: int = SIZE, data: dict | None = None) -> torch.nn.Module:
    """A minimal effft checkpoint of a random model whose logits vary by order 1 between inputs."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(CLASSES)).eval()
    with torch.no_grad():  # a fresh model's features barely vary: scale the classifier up
        feats = model.forward_features(torch.randn(8, 3, size, size)).mean((2, 3))
        weight = 2 * torch.randn_like(model.classifier.weight) / (feats.std(0) * feats.shape[1] ** 0.5 + 1e-12)
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ feats.mean(0))
    pre = InputSpec(size=224, crop_pct=0.9, interpolation="bilinear")
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "effft": {"recipe": {"data": {"image_size": size, **(data or {})}}, "model_name": name, "in_chans": 3,
                          "bn_eps": model.bn1.eps, "preprocessing": pre.to_dict(), "classes": CLASSES,
                          "task": "binary" if len(CLASSES) == 2 else "multiclass", "threshold": 0.5}}, path)
    return model


def load_export(path: Path, fmt: str):
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    if fmt == "pt2":
        program = torch.export.load(str(path)).module()
        return lambda x: program(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still what loads the file
        module = torch.jit.load(str(path))
    return lambda x: module(x)


@pytest.mark.parametrize("fmt,name", [("onnx", "efficientnet_b0"), ("torchscript", "efficientnet_b0"),
                                      ("pt2", "efficientnet_b0"),
                                      ("onnx", "tf_efficientnet_b0")])
def test_export_matches_pytorch_at_batch_sizes_1_and_3(tmp_path: Path, fmt: str, name: str) -> None:
    size = 40 if name.startswith("tf_") else SIZE  # 40: an odd total "SAME" padding on the stem
    model = make_ckpt(tmp_path / "run.ckpt", name=name, size=size)
    out = tmp_path / "out" / f"model.{fmt}"
    result = export(tmp_path / "run.ckpt", fmt=fmt, out=out)
    assert result.path == out and set(result.max_abs_diff) == {1, 3}
    assert max(result.max_abs_diff.values()) <= 1e-4
    assert {p.name for p in out.parent.iterdir()} == {"model.preprocessing.json", f"model.{fmt}"}
    exported = load_export(out, fmt)
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            want = model(x)
        got = exported(x)
        assert got.shape == (batch, len(CLASSES))
        assert (want.max(1).values - want.min(1).values).mean() > 0.1  # logits that tell inputs apart
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_preprocessing_json_has_the_fields(tmp_path: Path) -> None:
    make_ckpt(tmp_path / "run.ckpt")
    assert cli(["-q", "export", str(tmp_path / "run.ckpt"), "--format", "torchscript"]) == 0
    assert (tmp_path / "run.pt").is_file()
    info = json.loads((tmp_path / "run.preprocessing.json").read_text())
    assert info["input_size"] == SIZE and info["input_shape"] == ["batch", 3, SIZE, SIZE]
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406]) and info["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert info["crop_pct"] == 0.9 and info["interpolation"] == "bilinear"
    assert info["classes"] == CLASSES and info["task"] == "multiclass" and info["output"] == "logits"
    assert "threshold" in info and info["activation"] == "softmax"
    assert "dicom_window" not in info and "face_crop" not in info


@pytest.mark.parametrize("data", [{"adapter": "dicom", "dicom": {"window_center": 40, "window_width": 400}},
                                  {"adapter": "face", "face": {"margin": 0.35}}], ids=["dicom", "face"])
def test_preprocessing_json_names_the_window_and_the_face_crop(tmp_path: Path, data: dict) -> None:
    make_ckpt(tmp_path / "run.ckpt", data=data)
    export(tmp_path / "run.ckpt", fmt="torchscript")
    info = json.loads((tmp_path / "run.preprocessing.json").read_text())
    if data["adapter"] == "dicom":
        assert info["dicom_window"] == {"center": 40, "width": 400} and "face_crop" not in info
    else:
        assert info["face_crop"]["margin"] == 0.35 and "dicom_window" not in info


def test_failed_check_writes_nothing(tmp_path: Path) -> None:
    make_ckpt(tmp_path / "run.ckpt")
    out = tmp_path / "out" / "model.pt"
    with pytest.raises(EffftError, match="nothing was written"):
        export(tmp_path / "run.ckpt", fmt="torchscript", out=out, tolerance=-1.0)
    assert list(out.parent.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_ckpt(tmp_path / "run.ckpt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(EffftError, match=r"pip install 'effft\[export\]'"):
        export(tmp_path / "run.ckpt", fmt="onnx", out=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_out_that_is_a_folder_is_refused(tmp_path: Path, capsys) -> None:
    make_ckpt(tmp_path / "run.ckpt")
    (tmp_path / "exports").mkdir()
    assert cli(["export", str(tmp_path / "run.ckpt"), "--format", "torchscript", "--out", str(tmp_path / "exports")]) == 1
    err = capsys.readouterr().err
    assert "is a folder" in err and str(tmp_path / "exports" / "run.pt") in err and "Traceback" not in err
    assert not list((tmp_path / "exports").iterdir())


def test_onnx_falls_back_to_the_older_exporter_saying_why(tmp_path: Path, monkeypatch, capsys) -> None:
    model = make_ckpt(tmp_path / "run.ckpt")
    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("unsupported operator in this test")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    result = export(tmp_path / "run.ckpt", fmt="onnx", out=tmp_path / "m.onnx")
    assert "current ONNX exporter failed (unsupported operator in this test)" in capsys.readouterr().out
    assert max(result.max_abs_diff.values()) <= 1e-4
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_export(tmp_path / "m.onnx", "onnx")(x), model(x), atol=1e-4, rtol=0)

"""`effft export --format timm`: a trained run as a folder timm and the Hugging Face hub read as
they are.

The folder holds `model.safetensors` (effft's module names are timm's, so the state dict is
timm's), `config.json` in timm's own layout (architecture, class count and names, input size,
mean, std, crop_pct, interpolation, the stem's channels and BatchNorm eps as model arguments) and
a README model card. The run's temperature is folded into the classifier (its weight and bias
divided by it), so the folder's logits are the calibrated ones `effft predict` gives.

    timm.create_model("local-dir:PATH", pretrained=True)       # timm
    effft.create_model(ARCH, pretrained="PATH", num_classes=N)  # effft
    huggingface_hub.upload_folder(repo_id="you/name", folder_path="PATH")  # the hub

The folder is written beside, checked (timm builds the model from it and must give effft's
logits within TOLERANCE), and only then moved into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..console import console
from ..errors import EffftError
from ..runs.layout import CHECKPOINTS, run_dir_of
from .loaded_run import LoadedRun, load_run

TOLERANCE = 1e-5
WEIGHTS = "model.safetensors"


def default_folder(run: LoadedRun, target: Path) -> Path:
    if target.is_dir():
        return target / "export" / "timm"
    if run.ckpt.parent.name == CHECKPOINTS:
        return run_dir_of(run.ckpt) / "export" / f"timm-{run.ckpt.stem}"
    return run.ckpt.with_name(f"{run.ckpt.stem}-timm")


def calibrated_state(run: LoadedRun) -> dict[str, torch.Tensor]:
    """The model's state dict with the temperature folded into the classifier."""
    state = {k: v.detach().clone().contiguous() for k, v in run.model.state_dict().items()}
    if run.temperature is not None:
        t = run.temperature.float().reshape(-1)
        scale = (1.0 / t)[:, None] if t.numel() > 1 else 1.0 / t
        state["classifier.weight"] = state["classifier.weight"] * scale
        state["classifier.bias"] = state["classifier.bias"] * scale.reshape(-1)
    return state


def timm_config(run: LoadedRun) -> dict[str, Any]:
    """config.json as timm writes it for the hub (`timm.models.push_to_hf_hub`'s layout)."""
    spec, model = run.spec, run.model
    return {
        "architecture": model.name,
        "num_classes": len(run.classes),
        "num_features": int(model.num_features),
        "label_names": list(run.classes),
        "model_args": {"in_chans": spec.channels, "bn_eps": float(model.bn1.eps)},
        "pretrained_cfg": {
            "input_size": [spec.channels, spec.size, spec.size],
            "interpolation": spec.interpolation,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "crop_pct": spec.crop_pct,
            "crop_mode": spec.crop_mode,
            "num_classes": len(run.classes),
            "first_conv": "conv_stem",
            "classifier": "classifier",
        },
        "effft": {"task": run.task, "threshold": run.threshold if run.task == "binary" else None,
                  "output": "calibrated logits" if run.temperature is not None else "logits",
                  "activation": "sigmoid" if run.task == "multilabel" else "softmax"},
    }


def _card(run: LoadedRun, config: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    spec = run.spec
    lines = [
        "---", "library_name: timm", "tags:", "- image-classification", "- timm", "- effft", "---", "",
        f"# {config['architecture']} fine-tuned with effft", "",
        f"Classes ({run.task}): {', '.join(run.classes)}.", "",
        f"Input: {spec.channels} channel(s), {spec.size} x {spec.size} px, mean {list(spec.mean)}, std "
        f"{list(spec.std)}, crop_pct {spec.crop_pct}, {spec.interpolation} interpolation.", "",
        "The logits are calibrated (the temperature fitted on the run's validation split is folded into the "
        "classifier)." if run.temperature is not None else "The logits are the network's own.", "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH", pretrained=True).eval()',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)",
        "```", "",
        "Publish this folder as it is: "
        '`huggingface_hub.upload_folder(repo_id="you/name", folder_path="PATH")`.',
    ]
    if run.task == "binary":
        lines += ["", f"Decision rule of the run: `{run.classes[1]}` when its probability is at least "
                      f"{run.threshold:.4g} (chosen on validation)."]
    if metrics and metrics.get("test"):
        lines += ["", "## Test figures of the run", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in metrics["test"].items()
                  if "/" not in k and isinstance(v, (int, float))]
    return "\n".join(lines) + "\n"


def _check_with_timm(folder: Path, run: LoadedRun) -> float:
    """The largest difference between timm's model built from `folder` and effft's calibrated logits."""
    import timm

    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as exc:  # whatever timm says, the folder is not one it reads: nothing is kept
        raise EffftError(f"timm cannot build {run.model.name} from the exported folder ({exc}); nothing was "
                         "written") from None
    x = torch.randn(3, run.in_chans, run.spec.size, run.spec.size, generator=torch.Generator().manual_seed(0))
    run.model.float().eval()
    with torch.no_grad():
        want = run.logits(x)  # the calibrated logits, as effft predict has them
        got = model(x)
    return float((got - want).abs().max())


def export_timm(target: Path, *, out: Path | None = None) -> Path:
    """Write the run at `target` as a timm folder (see the module docstring); returns the folder."""
    from safetensors.torch import save_file

    target = Path(target)
    run = load_run(target)
    run.refuse_embedding("effft export --format timm (a timm classifier folder)")
    folder = Path(out) if out is not None else default_folder(run, target)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise EffftError(f"--out {folder} exists and is not an empty folder: remove it or give another --out")
    metrics_file = run_dir_of(run.ckpt) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as scratch:
        tmp = Path(scratch) / "timm"
        tmp.mkdir()
        config = timm_config(run)
        save_file(calibrated_state(run), str(tmp / WEIGHTS))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_card(run, config, metrics), encoding="utf-8")
        diff = _check_with_timm(tmp, run)
        console.print(f"timm (local-dir) vs effft, batch size 3: max abs difference {diff:.2e}",
                      highlight=False, markup=False)
        if not diff <= TOLERANCE:
            raise EffftError(f"timm's model from the exported folder differs from effft's by {diff:.2e} "
                             f"(more than {TOLERANCE:g}); nothing was written")
        if folder.exists():
            folder.rmdir()
        shutil.move(str(tmp), str(folder))
    console.print(f"exported {run.ckpt} as a timm folder: {folder} "
                  f"(timm.create_model(\"local-dir:{folder}\", pretrained=True))", highlight=False, markup=False)
    return folder

"""Recipes through the command line: bad ones end in one message (key path, exit code 2, no
traceback, nothing written); `--set` overrides typed by the schema; `effft info`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from effft.cli import run
from effft.config.load import apply_overrides, load_recipe, validate


def make_folder(root: Path, n: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["blue", "green", "red"]):
        (root / name).mkdir(parents=True)
        for i in range(n):
            a = rng.integers(0, 100, (size, size, 3))
            a[..., 2 - c] += 150
            Image.fromarray(a.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def base(tmp_path) -> dict:
    make_folder(tmp_path / "data")
    return {
        "name": "r",
        "output_dir": str(tmp_path / "runs"),
        "model": {"arch": "efficientnet_b0", "pretrained": False},
        "data": {"adapter": "folder", "root": str(tmp_path / "data"), "image_size": 32, "batch_size": 4,
                 "num_workers": 0, "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "trainer": {"max_epochs": 1, "accelerator": "cpu"},
    }


def write(tmp_path: Path, recipe: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return path


def _set(d: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    d[last] = value
    return d


BAD = {
    "unknown key": (lambda r: _set(r, "data.frobnicate", 1), ["data.frobnicate", "unknown key"]),
    "misspelt section": (lambda r: _set(r, "optimiser", {"lr": 0.1}), ["optimiser", "did you mean optimizer"]),
    "misspelt key": (lambda r: _set(r, "data.batchsize", 8), ["data.batchsize", "did you mean data.batch_size"]),
    "wrong type": (lambda r: _set(r, "data.batch_size", "many"), ["data.batch_size", "'many'"]),
    "missing data root": (lambda r: _set(r, "data.root", "/nonexistent/images"), ["data.root", "/nonexistent/images"]),
    "unknown model": (lambda r: _set(r, "model.arch", "efficientnet_b9"), ["model.arch", "efficientnet_b9"]),
    "unknown augmentation": (lambda r: _set(r, "data.augment", {"train": [{"Frobnicate": {}}]}),
                             ["data.augment.train[0]", "Frobnicate"]),
    "bad augmentation argument": (
        lambda r: _set(r, "data.augment", {"train": [{"HorizontalFlip": {"p": 0.5}},
                                                     {"RandomResizedCrop": {"size": "big"}}]}),
        ["data.augment.train[1].RandomResizedCrop.size", "'big'"]),
    "negative learning rate": (lambda r: _set(r, "optimizer", {"lr": -0.001}), ["optimizer.lr", "greater than 0"]),
    "unknown trainer argument": (lambda r: _set(r, "trainer.max_epoch", 2),
                                 ["trainer.max_epoch", "did you mean max_epochs"]),
    "reserved trainer argument": (lambda r: _set(r, "trainer.logger", False), ["trainer.logger", "effft"]),
    "bad trainer value": (lambda r: _set(r, "trainer.accelerator", "abacus"), ["trainer", "abacus"]),
    "missing name": (lambda r: r.pop("name"), ["name", "missing"]),
    "bad run name": (lambda r: _set(r, "name", "../escape"), ["name", "../escape"]),
    "unknown monitor metric": (lambda r: _set(r, "monitor", {"metric": "val/acuracy"}),
                               ["monitor.metric", "val/accuracy"]),
    "threshold without target": (lambda r: _set(r, "metrics", {"threshold": {"method": "sensitivity"}}),
                                 ["metrics.threshold", "target"]),
    "bad preprocessing": (lambda r: _set(r, "model.preprocessing", {"std": [0.5, 0, 0.5]}),
                          ["model.preprocessing.std", "> 0"]),
}


def check_refused(code: int, err: str, expected: list[str], runs: Path) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, f"{text!r} not in: {err}"
    assert not runs.exists(), "a refused recipe wrote a run directory"


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_recipe_is_refused_with_the_key_path(kind, base, tmp_path, capsys):
    change, expected = BAD[kind]
    change(base)
    code = run(["fit", str(write(tmp_path, base))])
    check_refused(code, capsys.readouterr().err, expected, tmp_path / "runs")


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = write(tmp_path, "name: x\ndata:\n  adapter: folder\n  root: [unclosed\n")
    code = run(["fit", str(path)])
    check_refused(code, capsys.readouterr().err, [str(path), "not valid YAML", "line"], tmp_path / "runs")


def test_a_key_given_twice_is_refused_and_merge_keys_still_work(tmp_path, capsys):
    path = write(tmp_path, "name: x\ndata:\n  adapter: folder\n  root: a\ndata:\n  adapter: folder\n  root: b\n")
    code = run(["fit", str(path)])
    check_refused(code, capsys.readouterr().err, [str(path), "'data' is given twice", "line 2", "line 5"],
                  tmp_path / "runs")
    code = run(["fit", str(write(tmp_path, "name: x\n[a, b]: 1\n"))])  # a key that cannot be a key
    check_refused(code, capsys.readouterr().err, ["not valid YAML", "unhashable key"], tmp_path / "runs")
    from effft.config.load import read_yaml

    merged = write(tmp_path, "base: &b {adapter: folder, root: a}\ndata:\n  <<: *b\n  root: b\n")
    assert read_yaml(merged)["data"] == {"adapter": "folder", "root": "b"}


def test_a_recipe_that_is_not_a_mapping(tmp_path, capsys):
    code = run(["fit", str(write(tmp_path, "- just\n- a list\n"))])
    check_refused(code, capsys.readouterr().err, ["YAML mapping"], tmp_path / "runs")


def test_missing_recipe_file(tmp_path, capsys):
    code = run(["fit", str(tmp_path / "nope.yaml")])
    check_refused(code, capsys.readouterr().err, ["nope.yaml", "not found"], tmp_path / "runs")


@pytest.mark.parametrize("override, expected", [
    ("data.batch_size", ["data.batch_size", "key.path=value"]),
    ("name.sub=1", ["name is a value, not a section"]),
    ("=3", ["key.path=value"]),
    ("data.batch_size=-3", ["data.batch_size", "greater than 0"]),
    ("data.bogus=1", ["data.bogus", "unknown key"]),
])
def test_bad_set_is_refused(override, expected, base, tmp_path, capsys):
    code = run(["fit", str(write(tmp_path, base)), "--set", override])
    check_refused(code, capsys.readouterr().err, expected, tmp_path / "runs")


def test_resume_and_overwrite_together_are_refused(base, tmp_path, capsys):
    code = run(["fit", str(write(tmp_path, base)), "--resume", "--overwrite"])
    check_refused(code, capsys.readouterr().err, ["--resume", "--overwrite"], tmp_path / "runs")


def test_bad_recipe_through_a_subprocess(base, tmp_path):
    base["optimiser"] = base.pop("trainer")
    result = subprocess.run([sys.executable, "-m", "effft.cli", "fit", str(write(tmp_path, base))],
                            capture_output=True, text=True, timeout=300)
    check_refused(result.returncode, result.stderr, ["optimiser", "did you mean optimizer"], tmp_path / "runs")


def test_every_problem_is_listed_at_once(base, tmp_path, capsys):
    base["optimizer"] = {"lr": -1, "weight_decay": "x"}
    code = run(["fit", str(write(tmp_path, base))])
    err = capsys.readouterr().err
    assert code == 2 and "optimizer.lr" in err and "optimizer.weight_decay" in err


# ----------------------------------------------------------------------------- --set


@pytest.mark.parametrize("override, path, expected", [
    ("data.batch_size=4", ("data", "batch_size"), 4),
    ("optimizer.lr=1e-4", ("optimizer", "lr"), 1e-4),
    ("optimizer.lr=0.5", ("optimizer", "lr"), 0.5),
    ("model.pretrained=false", ("model", "pretrained"), False),
    ("model.pretrained=timm/efficientnet_b0.ra_in1k", ("model", "pretrained"), "timm/efficientnet_b0.ra_in1k"),
    ("name=2024", ("name",), "2024"),
    ("name=true", ("name",), "true"),
    ("seed=7", ("seed",), 7),
    ("finetune.strategy=linear_probe", ("finetune", "strategy"), "linear_probe"),
    ("finetune.milestones=[2, 4]", ("finetune", "milestones"), [2, 4]),
    ("trainer.max_epochs=3", ("trainer", "max_epochs"), 3),
    ("trainer.gradient_clip_val=1e-3", ("trainer", "gradient_clip_val"), 1e-3),
    ("ema.enabled=true", ("ema", "enabled"), True),
])
def test_set_is_typed_by_the_schema(override, path, expected, base, tmp_path):
    recipe = load_recipe(write(tmp_path, base), [override])
    value = recipe
    for part in path:
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_set_reaches_any_key_and_the_last_one_wins(base, tmp_path):
    recipe = load_recipe(write(tmp_path, base), ["data.split.train=0.6", "data.split.val=0.2", "data.split.test=0.2",
                                                 "optimizer.lr=0.1", "optimizer.lr=0.2"])
    assert (recipe.data.split.train, recipe.data.split.val, recipe.optimizer.lr) == (0.6, 0.2, 0.2)


def test_data_root_override_stays_a_path(base, tmp_path):
    recipe = load_recipe(write(tmp_path, base), [f"data.root={tmp_path / 'data'}"])
    assert recipe.data.root == tmp_path / "data"
    assert apply_overrides({"data": {"root": "x"}}, ["data.root=2024"]) == {"data": {"root": "2024"}}


def test_resolved_recipe_round_trips(base, tmp_path):
    recipe = load_recipe(write(tmp_path, base))
    again = validate(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again == recipe
    assert recipe.to_dict()["scheduler"]["name"] == "cosine"  # defaults are written out


def test_recipe_preprocessing_overrides_the_weights(base, tmp_path):
    from effft.runs.build import build_inputs, recipe_weights

    base["model"]["preprocessing"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    recipe = load_recipe(write(tmp_path, base))
    spec = build_inputs(recipe, weights=recipe_weights(recipe), progress=False).spec
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert spec.crop_pct == 0.875  # what was not given is kept
    recipe = load_recipe(write(tmp_path, base), ["model.in_chans=1"])
    spec = build_inputs(recipe, weights=recipe_weights(recipe), progress=False).spec
    assert spec.mean == (0.5,)


# ----------------------------------------------------------------------------- effft info


def test_info_prints_recipe_and_data_summary_and_writes_nothing(base, tmp_path, capsys):
    (tmp_path / "data" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    path = write(tmp_path, base)
    before = sorted(p for p in tmp_path.rglob("*"))
    code = run(["info", str(path), "--set", "data.batch_size=2"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "batch_size: 2" in out and "scheduler:" in out  # the resolved recipe
    for cls in ("blue", "green", "red"):
        assert cls in out
    assert "train (6)" in out and "val (3)" in out and "test (3)" in out
    assert "bad files: 1" in out and "broken.png" in out.replace("\n", "")  # long paths fold
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "runs").exists()


def test_info_refuses_a_bad_recipe(base, tmp_path, capsys):
    base["data"]["image_size"] = 3
    code = run(["info", str(write(tmp_path, base))])
    err = capsys.readouterr().err
    assert code == 2 and "data.image_size" in err and "Traceback" not in err


def test_custom_crop_that_disagrees_with_image_size_is_a_recipe_error(tmp_path, capsys):
    from effft.cli import run as cli_run

    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "sizes", "output_dir": str(tmp_path / "runs"), "model": {"pretrained": False},
        "data": {"adapter": "folder", "root": str(root), "image_size": 48,
                 "augment": {"train": [{"RandomResizedCrop": {"size": [32, 32]}}, {"HorizontalFlip": {}}]}}}))
    assert cli_run(["info", str(recipe_file)]) == 2
    err = capsys.readouterr().err
    assert "data.augment.train[0].RandomResizedCrop" in err and "48" in err
    assert not (tmp_path / "runs").exists()

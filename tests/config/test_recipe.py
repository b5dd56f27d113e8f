"""Recipes through the command line: bad ones end in one message (key path, exit code 2, no
traceback, nothing written); `--set` overrides typed by the schema; `effft info`."""

from __future__ import annotations

import os
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
    "negative seed": (lambda r: _set(r, "seed", -1), ["seed", "-1"]),
    "seed above 2^32 - 1": (lambda r: _set(r, "seed", 2**32), ["seed", "4294967296"]),
    "negative split seed": (lambda r: _set(r, "data.split", {"seed": -5}), ["data.split.seed", "-5"]),
    "infinite learning rate": (lambda r: _set(r, "optimizer", {"lr": float("inf")}), ["optimizer.lr", "finite"]),
    "empty pretrained": (lambda r: _set(r, "model.pretrained", ""), ["model.pretrained", "empty"]),
    "empty data root": (lambda r: _set(r, "data.root", ""), ["data.root", "empty"]),
    "empty output_dir": (lambda r: _set(r, "output_dir", " "), ["output_dir", "empty"]),
    "too many loader workers": (lambda r: _set(r, "data.num_workers", 100_000), ["data.num_workers", "64"]),
    "run name too long": (lambda r: _set(r, "name", "r" * 300), ["name", "128"]),
    "run directory inside the data": (lambda r: _set(r, "output_dir", r["data"]["root"]),
                                      ["data.root", "output_dir/name", "overlap"]),
    "data inside the run directory": (lambda r: (_set(r, "output_dir", str(Path(r["data"]["root"]).parent)),
                                                 _set(r, "name", "data")), ["data.root", "--overwrite would delete"]),
    "cache inside the data": (lambda r: (_set(r, "data.cache_dir", r["data"]["root"] + "/cache"),
                                         _set(r, "data.cache", "disk")), ["data.cache_dir", "inside data.root"]),
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


def _sized_recipe(tmp_path: Path, augment: dict) -> Path:
    """A recipe of 48 px inputs over a tiny folder, with the pipelines `augment`."""
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "sizes", "output_dir": str(tmp_path / "runs"), "model": {"pretrained": False},
        "data": {"adapter": "folder", "root": str(root), "image_size": 48, "augment": augment}}))
    return recipe_file


def test_custom_crop_that_disagrees_with_image_size_is_a_recipe_error(tmp_path, capsys):
    from effft.cli import run as cli_run

    crop = [{"RandomResizedCrop": {"size": [32, 32]}}, {"HorizontalFlip": {}}]
    recipe_file = _sized_recipe(tmp_path, {"train": crop})
    assert cli_run(["info", str(recipe_file)]) == 2
    err = capsys.readouterr().err
    assert "data.augment.train[0].RandomResizedCrop" in err and "48" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("train, ok", [
    ([{"RandomResizedCrop": {"scale": [0.7, 1.0]}}, {"HorizontalFlip": {}}], True),  # made at the input size
    ([{"HorizontalFlip": {}}], False),  # nothing makes one size: refused, naming the split
])
def test_a_crop_written_without_a_size_takes_the_image_size(tmp_path, capsys, train, ok):
    from effft.cli import run as cli_run

    recipe_file = _sized_recipe(tmp_path, {"train": train, "eval": [{"Resize": {}}]})
    assert cli_run(["info", str(recipe_file)]) == (0 if ok else 2)
    err = capsys.readouterr().err
    assert ok or ("data.augment.train" in err and "48x48" in err)


# ----------------------------------------------------------------------------- trainer values


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_epochs=lots", ["trainer.max_epochs", "whole number", "'lots'"]),
    ("trainer.max_epochs=2.5", ["trainer.max_epochs", "2.5"]),
    ("trainer.max_epochs=true", ["trainer.max_epochs", "True"]),
    ("trainer.max_epochs=0", ["trainer.max_epochs", "no checkpoint", "(got 0)"]),
    ("trainer.max_steps=0", ["trainer.max_steps", "no checkpoint"]),
    ("trainer.accumulate_grad_batches=0", ["trainer.accumulate_grad_batches", ">= 1", "(got 0)"]),
    ("trainer.log_every_n_steps=x", ["trainer.log_every_n_steps", "'x'"]),
    ("trainer.gradient_clip_val=-1", ["trainer.gradient_clip_val", ">= 0", "(got -1)"]),
    ("trainer.gradient_clip_val=.inf", ["trainer.gradient_clip_val", "inf"]),
    ("trainer.gradient_clip_algorithm=l2", ["trainer.gradient_clip_algorithm", "'norm'", "'l2'"]),
    ("trainer.val_check_interval=5.0", ["trainer.val_check_interval", "(0, 1]", "5.0"]),
    ("trainer.limit_train_batches=0", ["trainer.limit_train_batches", "no checkpoint"]),
    ("trainer.limit_test_batches=1.5", ["trainer.limit_test_batches", "1.5"]),
    ("trainer.fast_dev_run=true", ["trainer.fast_dev_run", "checkpoints", "max_epochs: 1"]),
    ("trainer.barebones=true", ["trainer.barebones", "checkpoints"]),
    ("trainer.check_val_every_n_epoch=2", ["trainer.check_val_every_n_epoch", "never validates", "max_epochs: 1"]),
    ("trainer.check_val_every_n_epoch=0", ["trainer.check_val_every_n_epoch", ">= 1"]),
    ("trainer.min_epochs=3", ["trainer.min_epochs", "max_epochs: 1"]),
    ("trainer.precision=17", ["trainer.precision", "bf16-mixed", "17"]),
    ("trainer.precision=64", ["trainer.precision", "64-bit"]),
    ("trainer.devices=0", ["trainer.devices", "-1 for all"]),
    ("trainer.num_nodes=0", ["trainer.num_nodes", ">= 1"]),
    ("trainer.deterministic=maybe", ["trainer.deterministic", "'warn'", "'maybe'"]),
    ("trainer.detect_anomaly=1", ["trainer.detect_anomaly", "true or false"]),
    ("trainer.benchmark=fast", ["trainer.benchmark", "true or false"]),
    ("trainer.max_time=12:00:00", ["trainer.max_time", "DD:HH:MM:SS"]),
    ("trainer.max_time={hourz: 1}", ["trainer.max_time", "{hours: 12}"]),
    ("trainer.strategy=fastest", ["trainer.strategy", "ddp", "'fastest'"]),
    ("trainer.profiler=loud", ["trainer.profiler", "simple"]),
    ("trainer.plugins=x", ["trainer.plugins", "set by effft"]),
    ("trainer.enable_model_summary=false", ["trainer.enable_model_summary", "set by effft", "--quiet"]),
    ("trainer.callbacks=[]", ["trainer.callbacks", "set by effft"]),
    ("trainer=5", ["trainer", "Lightning Trainer arguments", "(got 5)"]),
    ("trainer=[1, 2]", ["trainer", "Lightning Trainer arguments"]),
    ("trainer={max_epochs: 1, accumulate_grad_batches: 0}", ["trainer.accumulate_grad_batches", "(got 0)"]),
])
@pytest.mark.parametrize("command", ["fit", "info"])
def test_bad_trainer_value_is_refused_with_its_key(command, override, expected, base, tmp_path, capsys):
    code = run([command, str(write(tmp_path, base)), "--set", override])
    check_refused(code, capsys.readouterr().err, expected, tmp_path / "runs")


def test_every_bad_trainer_value_is_listed_at_once(base, tmp_path, capsys):
    base["trainer"].update(max_epochs="lots", log_every_n_steps=0, accelerator="abacus")
    code = run(["fit", str(write(tmp_path, base))])
    check_refused(code, capsys.readouterr().err, ["trainer.max_epochs", "trainer.log_every_n_steps",
                                                  "trainer.accelerator", "cpu"], tmp_path / "runs")


@pytest.mark.parametrize("override, key, expected", [
    ("trainer.max_time=00:12:00:00", "max_time", "00:12:00:00"),  # text, not YAML's base-60 number
    ("trainer.max_time={hours: 2}", "max_time", {"hours": 2}),
    ("trainer.val_check_interval=0.5", "val_check_interval", 0.5),
    ("trainer.val_check_interval=1e-1", "val_check_interval", 0.1),
    ("trainer.val_check_interval=2", "val_check_interval", 2),
    ("trainer.limit_val_batches=1.0", "limit_val_batches", 1.0),
    ("trainer.precision=bf16-mixed", "precision", "bf16-mixed"),
    ("trainer.precision=16", "precision", 16),
    ("trainer.devices=[0, 1]", "devices", [0, 1]),
    ("trainer.devices=auto", "devices", "auto"),
    ("trainer.max_epochs=-1", "max_epochs", -1),
    ("trainer.deterministic=warn", "deterministic", "warn"),
    ("trainer.strategy=ddp", "strategy", "ddp"),
    ("trainer={max_epochs: 3}", "max_epochs", 3),
])
def test_good_trainer_values_are_kept_as_lightning_reads_them(override, key, expected, base, tmp_path):
    value = load_recipe(write(tmp_path, base), [override]).trainer[key]
    assert value == expected and type(value) is type(expected)


# checks that need the data: made by `effft fit` and `effft info` before anything is written
@pytest.mark.parametrize("override, expected", [
    ("trainer.val_check_interval=5", ["trainer.val_check_interval", "2 training batches", "at most 2"]),
    ("trainer.limit_val_batches=0", ["trainer.limit_val_batches", "best checkpoint"]),
    ("trainer.limit_train_batches=0.1", ["trainer.limit_train_batches", "less than one batch"]),
    ("data.batch_size=1", ["data.batch_size", "BatchNorm", "data.image_size"]),
    ("data.augment.train=[{HorizontalFlip: {}}]", ["data.augment.train", "RandomResizedCrop", "32"]),
    ("monitor.metric=val/auroc_macro", ["monitor.metric", "val/accuracy"]),
    ("trainer.max_epochs=-1", ["scheduler.name", "no set length", "trainer.max_steps"]),
])
@pytest.mark.parametrize("command", ["fit", "info"])
def test_trainer_values_that_do_not_fit_the_data_are_refused(command, override, expected, base, tmp_path, capsys):
    code = run([command, str(write(tmp_path, base)), "--set", override])
    check_refused(code, capsys.readouterr().err, expected, tmp_path / "runs")


# ----------------------------------------------------------------------------- recipe files


def _laughs(levels: int) -> str:
    """Nested aliases: each level holds ten of the one before ("billion laughs")."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("content, expected", [
    (lambda base: yaml.safe_dump(base).encode("utf-16"), ["UTF-16", "save it as UTF-8"]),
    (lambda base: bytes(range(256)) * 8, ["not UTF-8 text"]),
    (lambda base: b"\x7fELF\x02\x01\x01\x00" * 64, ["NUL bytes"]),
    (lambda base: (yaml.safe_dump(base) + _laughs(6)).encode(), ["line", "aliases", "10,000"]),
    (lambda base: (yaml.safe_dump(base) + "loop: &loop [1, *loop]\n").encode(), ["line", "holds itself"]),
    (lambda base: ("name: " + "[" * 5000 + "]" * 5000 + "\n").encode(), ["nested too deep"]),
    (lambda base: b"#" * (2 << 20), ["more than 1 MB"]),
])
@pytest.mark.parametrize("command", ["fit", "info"])
def test_a_recipe_file_that_cannot_be_read_is_named(command, content, expected, base, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content(base))
    code = run([command, str(path)])
    check_refused(code, capsys.readouterr().err, [str(path), *expected], tmp_path / "runs")


def test_aliases_within_the_limit_still_work(tmp_path):
    from effft.config.load import read_yaml

    assert len(read_yaml(write(tmp_path, _laughs(2)))["l2"]) == 10


# ----------------------------------------------------------------------------- the image cache


def test_a_cache_dir_that_cannot_be_made_is_refused_before_anything_is_written(base, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    base["data"].update(cache="disk", cache_dir=str(tmp_path / "a-file" / "cache"))
    for command in ("fit", "info"):
        code = run([command, str(write(tmp_path, base))])
        check_refused(code, capsys.readouterr().err, ["data.cache_dir", str(tmp_path / "a-file")], tmp_path / "runs")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a POSIX user that permissions apply to")
def test_a_read_only_default_cache_folder_is_refused(base, tmp_path, capsys, monkeypatch):
    (tmp_path / "ro").mkdir(mode=0o555)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))
    base["data"]["cache"] = "disk"
    code = run(["fit", str(write(tmp_path, base))])
    check_refused(code, capsys.readouterr().err, ["data.cache_dir", "XDG_CACHE_HOME", "not writable"],
                  tmp_path / "runs")

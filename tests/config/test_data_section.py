"""`data:` recipe validation and the image pipelines."""

from __future__ import annotations

from dataclasses import replace

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from effft.config.schema import DataConfig, default_num_workers
from effft.data.sources import dicom, face, folder, table
from effft.data.transforms import apply, build_pipeline
from effft.input import HALF, InputSpec


def errors(data: dict) -> list[tuple[tuple, str]]:
    with pytest.raises(ValidationError) as e:
        DataConfig.model_validate(data)
    return [(err["loc"], err["msg"]) for err in e.value.errors()]


def test_defaults_and_adapter_section():
    cfg = DataConfig.model_validate({"adapter": "csv", "root": "labels.csv"})
    assert isinstance(cfg.csv, table.Options) and cfg.options is cfg.csv
    assert cfg.folder is None and cfg.batch_size == 32 and cfg.cache == "auto"
    assert cfg.on_bad_file == "skip" and cfg.split.stratify and cfg.augment.train is None
    assert cfg.model_dump(mode="json")["augment"] == {"train": "default", "eval": "default"}
    assert isinstance(DataConfig(adapter="dicom", root=".").dicom, dicom.Options)
    assert isinstance(DataConfig(adapter="face", root=".").face, face.Options)
    cfg = DataConfig.model_validate({"adapter": "folder", "root": ".",
                                     "folder": {"ready_split": False}})
    assert isinstance(cfg.folder, folder.Options) and not cfg.folder.ready_split


def test_section_of_another_adapter_is_an_error():
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "csv": {"label_column": "y"}})
    assert loc == ("csv",) and "adapter is 'folder'" in msg and "remove data.csv" in msg


def test_unknown_keys_and_bad_values():
    assert errors({"adapter": "folder", "root": ".", "batchsize": 3})[0][0] == ("batchsize",)
    assert errors({"adapter": "folder", "root": ".", "batch_size": 0})[0][0] == ("batch_size",)
    assert errors({"adapter": "excel", "root": "."})[0][0] == ("adapter",)
    assert errors({"adapter": "csv", "root": ".", "csv": {"imagecolumn": "x"}})[0][0] == (
        "csv", "imagecolumn")
    assert errors({"adapter": "folder", "root": ".", "cache": "gpu"})[0][0] == ("cache",)


def test_split_validation():
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "split": {"train": 0.5}})
    assert loc == ("split",) and "must be 1" in msg and "0.7" in msg
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "split": {"folds": 5}})
    assert "both folds" in msg
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "split": {"folds": 3, "fold": 3}})
    assert "0 .. 2" in msg
    cfg = DataConfig.model_validate({"adapter": "folder", "root": ".",
                                     "split": {"train": 0.7, "val": 0.15, "test": 0.15}})
    assert cfg.split.val == 0.15


def test_augment_unknown_name_suggests_close_match():
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "augment": {"train": [
        {"HorizontalFlip": {}}, "VerticalFlip", {"RandomResizeCrop": {"size": [32, 32]}}]}})
    assert loc == ("augment", "train", 2)
    assert "unknown transform 'RandomResizeCrop'" in msg and "RandomResizedCrop" in msg


def test_augment_bad_argument_names_transform_and_argument():
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "augment": {"eval": [
        {"RandomResizedCrop": {"size": [224, 224, 3]}}]}})
    assert loc == ("augment", "eval", 0)
    assert "RandomResizedCrop: bad argument 'size' = [224, 224, 3]" in msg
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "augment": {"train": [
        {"RandomResizedCrop": {"size": [32, 32], "scale": [0.5, 2.0]}}]}})
    assert "bad argument 'scale'" in msg
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "augment": {"train": [
        {"RandomResizedCrop": {"sise": [32, 32]}}]}})
    assert "unknown argument 'sise'" in msg and "did you mean size" in msg
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "augment": {"train": "defaults"}})
    assert loc == ("augment", "train") and 'expected "default"' in msg
    [(loc, msg)] = errors({"adapter": "folder", "root": ".", "augment": {"train": [
        {"HorizontalFlip": {}, "VerticalFlip": {}}]}})
    assert "{Name: {argument: value}}" in msg


def test_augment_list_accepted_and_kept():
    entries = [{"RandomResizedCrop": {"size": [32, 32], "scale": [0.5, 1.0]}}, "HorizontalFlip",
               {"OneOf": {"transforms": [{"Blur": {"blur_limit": 3}}, {"GaussNoise": None}]}}]
    cfg = DataConfig.model_validate({"adapter": "folder", "root": ".",
                                     "augment": {"train": entries}})
    assert cfg.augment.train[1] == {"HorizontalFlip": {}}
    assert cfg.augment.train[0] == entries[0]


def test_num_workers_default():
    n = default_num_workers()
    assert 0 <= n <= 8
    assert DataConfig(adapter="folder", root=".", num_workers=0).workers() == 0


# ---------------------------------------------------------------- pipelines

PRE = InputSpec(size=32, crop_pct=0.8, interpolation="bilinear")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_default_pipelines_shape(channels, train):
    pipe = build_pipeline(train=train, entries=None, spec=PRE.for_channels(channels))
    img = np.random.default_rng(0).integers(0, 256, (50, 70, channels), dtype=np.uint8)
    x = apply(pipe, img, channels)
    assert x.shape == (channels, 32, 32) and x.dtype == torch.float32
    names = [type(t).__name__ for t in pipe.transforms]
    assert names[-2:] == ["Normalize", "ToTensorV2"]
    assert ("ColorJitter" in names) == (train and channels == 3)


def test_eval_pipeline_matches_reference():
    """Eval = shorter side to floor(size / crop_pct), centre crop, normalise: done by hand."""
    pre = InputSpec(size=32, mean=HALF, std=HALF, crop_pct=0.8, interpolation="bicubic")
    img = np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    x = apply(build_pipeline(train=False, entries=None, spec=pre), img, 3)
    short = pre.resize
    assert short == 40
    resized = cv2.resize(img, (60, 40), interpolation=cv2.INTER_CUBIC)
    top, left = (40 - 32) // 2, (60 - 32) // 2
    crop = resized[top:top + 32, left:left + 32].astype(np.float32) / 255.0
    ref = torch.from_numpy(((crop - 0.5) / 0.5).transpose(2, 0, 1))
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)


def test_image_size_overrides_and_grey_normalisation():
    pipe = build_pipeline(train=False, entries=None, spec=replace(PRE, size=48).for_channels(1))
    img = np.full((100, 100, 1), 255, np.uint8)
    x = apply(pipe, img, 1)
    assert x.shape == (1, 48, 48)
    mean, std = PRE.for_channels(1).mean[0], PRE.for_channels(1).std[0]
    torch.testing.assert_close(x, torch.full_like(x, (1.0 - mean) / std))


def test_custom_list_gets_normalize_and_tensor():
    entries = [{"Resize": {"height": 24, "width": 24}}, {"HorizontalFlip": {"p": 1.0}}]
    pipe = build_pipeline(train=True, entries=entries, spec=PRE.for_channels(1))
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["Resize", "HorizontalFlip", "Normalize", "ToTensorV2"]
    img = np.random.default_rng(2).integers(0, 256, (30, 30, 1), dtype=np.uint8)
    assert apply(pipe, img, 1).shape == (1, 24, 24)
    # a list with its own Normalize keeps it, and gets ToTensorV2 only
    own = entries + [{"Normalize": {"mean": [0.5], "std": [0.5]}}]
    pipe = build_pipeline(train=True, entries=own, spec=PRE.for_channels(1))
    assert [type(t).__name__ for t in pipe.transforms][-2:] == ["Normalize", "ToTensorV2"]
    assert sum(isinstance(t, A.Normalize) for t in pipe.transforms) == 1


@pytest.mark.parametrize("size", [40, 64])
def test_sized_transforms_without_a_size_follow_the_input_size(size):
    # a list written once (the face recipes) follows data.image_size; a size given is kept
    entries = [{"RandomResizedCrop": {"scale": [0.7, 1.0]}}, {"OneOf": {"transforms": [{"CenterCrop": {}}]}}]
    config = DataConfig(adapter="folder", root=".", augment={"train": entries, "eval": ["Resize"]})
    spec = replace(PRE, size=size)
    img = np.random.default_rng(3).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    for train, listed in ((True, config.augment.train), (False, config.augment.eval)):
        pipe = build_pipeline(train=train, entries=listed, spec=spec)
        assert apply(pipe, img, 3).shape == (3, size, size)
    given = build_pipeline(train=False, entries=[{"Resize": {"height": 24, "width": 32}}], spec=spec)
    assert apply(given, img, 3).shape == (3, 24, 32)
    # the filled Resize is the plain resize of the whole image to the input size (OpenCV's, as albumentations)
    plain = build_pipeline(train=False, entries=[{"Resize": {}}], spec=spec, tensor=False)
    expected = cv2.resize(img, (size, size), interpolation=plain.transforms[0].interpolation)
    assert np.array_equal(plain(image=img)["image"], expected)


def test_unquoted_yaml_off_means_no_cache():
    import yaml

    raw = yaml.safe_load("adapter: folder\nroot: .\ncache: off\n")
    assert raw["cache"] is False  # what YAML 1.1 makes of it
    assert DataConfig.model_validate(raw).cache == "off"

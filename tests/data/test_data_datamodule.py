"""The DataModule end to end: batches, bad files, samplers, weights, run files, DDP shares."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from effft.data.cache import resize_short_side
from effft.config.schema import DataConfig
from effft.data.datamodule import EffftDataModule
from effft.data.dataset import load_data
from effft.data.splits import read_splits
from effft.data.decode import read_image
from effft.data.transforms import apply, build_pipeline
from effft.errors import EffftError
from effft.input import InputSpec

PRE = InputSpec(size=32, crop_pct=0.875)


def make_folder(root: Path, counts: dict[str, int], *, size=(48, 40), mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                root / cls / f"{i}.png")
    return root


def make_dm(cfg: DataConfig, *, in_chans: int = 3, seed: int = 0, splits_file: Path | None = None,
            run_dir: Path | None = None) -> EffftDataModule:
    """Load and split the data, write the run's files where asked, and make the DataModule."""
    data = load_data(cfg, channels=in_chans, seed=seed, splits_file=splits_file, progress=False)
    if run_dir is not None:
        data.write_run_files(run_dir)
    return EffftDataModule(data, PRE.for_channels(in_chans), seed=seed, progress=False)


def config(root: Path, **kw) -> DataConfig:
    base = {"adapter": "folder", "root": str(root), "batch_size": 4, "num_workers": 0}
    return DataConfig.model_validate({**base, **kw})


@pytest.mark.parametrize("in_chans", [3, 1])
def test_folder_batches(tmp_path, in_chans):
    root = make_folder(tmp_path / "d", {"cat": 10, "dog": 10, "eel": 10},
                       mode="RGB" if in_chans == 3 else "L")
    dm = make_dm(config(root), in_chans=in_chans)
    assert dm.data.classes == ["cat", "dog", "eel"] and dm.data.num_classes == 3 and dm.data.task == "multiclass"
    dm.setup("fit")
    for loader, split in ((dm.train_dataloader(), "train"), (dm.val_dataloader(), "val")):
        x, y, idx = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape == (min(4, len(dm.data.split_items(split))),
                                                        in_chans, 32, 32)
        assert y.dtype == torch.int64 and y.ndim == 1
        items = dm.data.split_items(split)
        assert [items[i].target for i in idx.tolist()] == y.tolist()
    assert abs(float(x.mean())) < 1.0  # normalised, not 0..255
    n = {s: len(dm.data.split_items(s)) for s in ("train", "val", "test")}
    assert sum(n.values()) == 30 and n["test"] == 3 and n["val"] == 3


def test_multilabel_csv_batches(tmp_path):
    make_folder(tmp_path / "img", {"x": 12})
    rows = ["image,A,B,C"] + [f"img/x/{i}.png,{i % 2},{int(i % 3 == 0)},{int(i < 4)}"
                              for i in range(12)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    cfg = DataConfig.model_validate({"adapter": "csv", "root": str(tmp_path / "t.csv"),
                                     "csv": {"label_columns": ["A", "B", "C"]},
                                     "batch_size": 5, "num_workers": 0})
    dm = make_dm(cfg)
    dm.setup()
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and y.dtype == torch.float32 and y.shape == (5, 3)
    train = dm.data.split_items("train")
    assert y.tolist() == [list(train[i].target) for i in idx.tolist()]
    targets = np.array([it.target for it in train])
    pos = targets.sum(0)
    expected = np.where(pos > 0, (len(train) - pos) / np.maximum(pos, 1), 1.0)
    torch.testing.assert_close(dm.data.pos_weight(), torch.tensor(expected, dtype=torch.float32))


def test_medmnist_breastmnist_batches(shared_data):
    cfg = DataConfig.model_validate({"adapter": "medmnist",
                                     "root": str(shared_data / "breastmnist.npz"),
                                     "batch_size": 8, "num_workers": 0})
    dm = make_dm(cfg, in_chans=1)
    dm.setup()
    assert dm.data.task == "binary" and dm.data.num_classes == 2
    assert {s: len(dm.data.split_items(s)) for s in ("train", "val", "test")} == {
        "train": 546, "val": 78, "test": 156}
    x, y, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 1, 32, 32) and y.dtype == torch.int64


def test_brain_mri_end_to_end(shared_data, tmp_path):
    dm = make_dm(config(shared_data / "brain_mri", split={"seed": 1}), in_chans=1, run_dir=tmp_path / "run")
    dm.setup()
    assert dm.data.bad == []
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 32, 32)
    summary = dm.data.summary()
    assert summary["counts"]["train"]["no"] + summary["counts"]["val"]["no"] + \
        summary["counts"]["test"]["no"] == 98
    assert summary["image_size"]["width"]["max"] > summary["image_size"]["width"]["min"]


def _add_bad_files(root: Path) -> dict[str, str]:
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "cat" / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "noise.jpg").write_bytes(b"this is not a jpeg" * 10)
    (root / "dog" / "readme.txt").write_text("not an image, ignored silently")
    return {"empty.png": "0 bytes", "trunc.png": "", "noise.jpg": ""}


def test_bad_files_skipped_listed_and_written(tmp_path, caplog):
    root = make_folder(tmp_path / "d", {"cat": 6, "dog": 6})
    expected = _add_bad_files(root)
    run = tmp_path / "run"
    dm = make_dm(config(root), run_dir=run)
    names = {Path(b.path).name: b.reason for b in dm.data.bad}
    assert set(names) == set(expected)
    assert "0 bytes" in names["empty.png"]
    assert all(Path(it.path).name not in expected for it in dm.data.items)
    assert len(dm.data.items) == 12
    assert "3 files could not be read" in caplog.text and "trunc.png" in caplog.text
    with open(run / "bad_files.csv") as f:
        rows = list(csv.DictReader(f))
    assert {Path(r["path"]).name for r in rows} == set(expected)
    assert (run / "splits.csv").is_file()
    assert json.loads((run / "classes.json").read_text()) == {"classes": ["cat", "dog"],
                                                              "task": "binary"}
    assert {Path(b["path"]).name for b in dm.data.summary()["bad_files"]} == set(expected)


def test_bad_files_error_lists_them(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 4, "dog": 4})
    _add_bad_files(root)
    with pytest.raises(EffftError) as e:
        make_dm(config(root, on_bad_file="error"))
    text = str(e.value)
    assert all(n in text for n in ("empty.png", "trunc.png", "noise.jpg"))
    assert "on_bad_file: skip" in text and "readme.txt" not in text


def test_csv_missing_file_follows_on_bad_file(tmp_path):
    make_folder(tmp_path / "img", {"x": 8})
    rows = ["image,label"] + [f"img/x/{i}.png,{'ab'[i % 2]}" for i in range(8)] + \
        ["img/x/missing.png,a"]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    base = {"adapter": "csv", "root": str(tmp_path / "t.csv"), "num_workers": 0}
    dm = make_dm(DataConfig.model_validate(base))
    assert [Path(b.path).name for b in dm.data.bad] == ["missing.png"]
    assert "line 10" in dm.data.bad[0].reason and len(dm.data.items) == 8
    with pytest.raises(EffftError, match=r"missing\.png: t\.csv line 10: file not found"):
        make_dm(DataConfig.model_validate({**base, "on_bad_file": "error"}))


def test_class_weights_from_train_split(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 30, "b": 10, "c": 5}, size=(8, 8))
    dm = make_dm(config(root))
    y = np.array([it.target for it in dm.data.split_items("train")])
    ref = compute_class_weight("balanced", classes=np.arange(3), y=y)
    torch.testing.assert_close(dm.data.class_weights(),
                               torch.tensor(ref / ref.mean(), dtype=torch.float32))
    assert dm.data.class_weights().mean().item() == pytest.approx(1.0)
    # binary: pos_weight is negatives / positives of class 1
    root2 = make_folder(tmp_path / "e", {"neg": 12, "pos": 4}, size=(8, 8))
    dm2 = make_dm(config(root2))
    t = [it.target for it in dm2.data.split_items("train")]
    assert dm2.data.pos_weight().tolist() == pytest.approx([t.count(0) / t.count(1)])


def test_balanced_sampler_draws_classes_evenly(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 40, "b": 8}, size=(8, 8))
    dm = make_dm(config(root, sampler="balanced"), seed=0)
    dm.setup()
    sampler = dm.train_sampler()
    train = dm.data.split_items("train")
    drawn = Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn.update(train[i].target for i, _seed in sampler)
    assert len(list(sampler)) == len(train)
    share = drawn[1] / sum(drawn.values())
    assert 0.4 < share < 0.6  # about half, where the data holds 1/6


def test_ddp_shares(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 15, "b": 16}, size=(8, 8))
    val_seen, train_seen = [], []
    for rank in range(2):
        dm = make_dm(config(root, sampler="none"))
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup()
        val_seen.append([i for _, _, idx in dm.val_dataloader() for i in idx.tolist()])
        train_seen.append([i for i, _ in dm.train_sampler()])
    n_val = len(dm.data.split_items("val"))
    assert sorted(val_seen[0] + val_seen[1]) == list(range(n_val))  # every item once, no padding
    assert not set(train_seen[0]) & set(train_seen[1]) or len(dm.data.split_items("train")) % 2
    # balanced under DDP: a wrapped sampler, a share per rank
    dm = make_dm(config(root, sampler="balanced"))
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    dm.setup()
    n_train = len(dm.data.split_items("train"))
    assert len(list(dm.train_sampler())) == (n_train + 1) // 2


def test_splits_file_reused(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 10, "b": 10}, size=(8, 8))
    dm = make_dm(config(root, split={"seed": 5}), run_dir=tmp_path / "run")
    again = make_dm(config(root, split={"seed": 99}), splits_file=tmp_path / "run" / "splits.csv")
    assert [(it.path, it.split) for it in again.data.items] == [(it.path, it.split) for it in dm.data.items]
    assert len(read_splits(tmp_path / "run" / "splits.csv")) == 20


def test_cache_in_datamodule(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 4, "b": 4}, size=(90, 60))
    own_train = {"train": [{"RandomResizedCrop": {"size": [32, 32]}}]}  # the per-image path, in loader processes
    dm = make_dm(config(root, cache="disk", cache_dir=str(tmp_path / "cache"), augment=own_train))
    dm.prepare_data()
    dm.setup()
    short = dm.cache_short_side()
    assert short == 36  # floor(32 / 0.875)
    ds = dm.dataset("val")
    for i, item in enumerate(ds.items):
        expected = resize_short_side(dm.data.source.read(item, 3), short)
        np.testing.assert_array_equal(ds.image(i), expected)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    x, _, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32)


def test_workers_give_batches_and_differ_in_augmentation(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 8, "b": 8}, size=(64, 64))
    dm = make_dm(config(root, num_workers=1, batch_size=16, cache="off"))  # the per-image path
    dm.setup()
    first = next(iter(dm.train_dataloader()))
    assert first[0].shape[1:] == (3, 32, 32)
    # the same item twice through the train pipeline gives two different crops
    ds = dm.dataset("train")
    assert not torch.equal(ds[0][0], ds[0][0])


def test_dicom_through_datamodule_keeps_patients_apart(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    for cls, name in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(6):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.PatientID = f"{cls}-patient{i // 2}"  # two images per patient
            ds.save_as(tmp_path / "d" / cls / f"{i}.dcm")
    cfg = DataConfig.model_validate({"adapter": "dicom", "root": str(tmp_path / "d"),
                                     "batch_size": 4, "num_workers": 0,
                                     "split": {"train": 0.5, "val": 0.25, "test": 0.25}})
    dm = make_dm(cfg, in_chans=1)
    dm.setup()
    assert dm.data.classes == ["ct", "mr"]
    split_of = {}
    for it in dm.data.items:
        assert split_of.setdefault(it.group, it.split) == it.split  # one split per patient
    assert len(split_of) == 6
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 32, 32) and y.dtype == torch.int64


def test_faces_through_datamodule(shared_data):
    cfg = DataConfig.model_validate({"adapter": "face", "root": str(shared_data / "att_faces"),
                                     "face": {"detect": False}, "batch_size": 8,
                                     "num_workers": 0})
    dm = make_dm(cfg, in_chans=1)
    dm.setup()
    assert dm.data.num_classes == 40 and dm.data.task == "multiclass"
    counts = dm.data.class_counts()
    assert all(counts["test"][c] == 1 for c in dm.data.classes)  # stratified: one face each
    x, _, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 1, 32, 32)


def test_lightning_trainer_drives_the_datamodule(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 32 * 32, 2)
            self.seen = {"val": []}

        def training_step(self, batch, _):
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(self.head(x.flatten(1)), y)

        def validation_step(self, batch, _):
            self.seen["val"] += batch[2].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    root = make_folder(tmp_path / "d", {"a": 8, "b": 8}, size=(40, 40))
    dm = make_dm(config(root, cache="disk", cache_dir=str(tmp_path / "cache")))
    model = Tiny()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert sorted(model.seen["val"]) == list(range(len(dm.data.split_items("val"))))
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_train_batches_depend_on_seed_and_epoch_only(tmp_path):
    """What resuming relies on: epoch e's batches are the same however the run got there."""
    root = make_folder(tmp_path / "d", {"a": 12, "b": 12}, size=(16, 16))

    def epoch_batches(dm, epoch):
        loader = dm.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(epoch)  # as Lightning does (fabric's _set_sampler_epoch)
        return [(x, idx) for x, _, idx in loader]

    first = make_dm(config(root, num_workers=0), seed=3)
    first.setup()
    seen = [epoch_batches(first, e) for e in range(3)]
    fresh = make_dm(config(root, num_workers=0), seed=3)
    fresh.setup()
    again = epoch_batches(fresh, 2)  # straight to epoch 2, as a resumed run does
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(seen[2], again))
    assert not torch.equal(torch.cat([i for _, i in seen[0]]), torch.cat([i for _, i in seen[1]]))


@pytest.mark.parametrize("items, batch_size, sizes", [
    (12, 11, [12]),  # a last batch of one image joins the one before
    (9, 4, [4, 5]),
    (8, 4, [4, 4]),
    (7, 4, [4, 3]),
    (1, 4, [1]),
    (3, 1, [1, 1, 1]),  # batches of one asked for: kept (`effft fit` refuses them at 32 px and less)
])
def test_train_batches_never_end_in_one_image(items, batch_size, sizes):
    from effft.data.samplers import EpochBatches, EpochSampler, batch_count

    sampler = EpochSampler(items, seed=5)
    batches = EpochBatches(sampler, batch_size)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        drawn = list(batches)
        assert [len(b) for b in drawn] == sizes == [len(b) for b in batches]  # the same again
        assert sorted(i for b in drawn for i, _ in b) == list(range(items))  # every item once
        assert len(batches) == batch_count(items, batch_size) == len(sizes)


def test_the_train_loader_merges_a_last_batch_of_one_image(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6}, size=(16, 16))
    dm = make_dm(config(root, num_workers=0, batch_size=4, split={"train": 0.75, "val": 0.25, "test": 0.0}), seed=1)
    n_train = len(dm.data.split_items("train"))
    assert n_train % 4 == 1, n_train  # the case: one image left over
    loader = dm.train_dataloader()
    assert [len(x) for x, _, _ in loader] == [4] * (n_train // 4 - 1) + [5] and len(loader) == n_train // 4


def test_the_epoch_set_after_the_train_iterator_is_made_decides_its_batches(tmp_path):
    """Lightning makes the train loader's iterator before it sets the sampler's epoch (on resume,
    to the epoch the run stopped at): the sampler must be read at the first batch, not before."""
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6}, size=(16, 16))
    dm = make_dm(config(root, num_workers=0, batch_size=4), seed=2)
    loader = dm.train_dataloader()
    early = iter(loader)
    loader.batch_sampler.sampler.set_epoch(3)
    late = [idx for _, _, idx in early]
    loader.batch_sampler.sampler.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(late, [idx for _, _, idx in loader]))
    loader.batch_sampler.sampler.set_epoch(0)
    assert not torch.equal(torch.cat(late), torch.cat([idx for _, _, idx in loader]))


def test_lean_batches_are_the_pipelines_images_made_whole(tmp_path):
    """Default augmentation and a cache: val and test are the eval pipeline's images of the files
    (as `predict` makes them); train batches are augmented in this process from the cache."""
    root = make_folder(tmp_path / "d", {"a": 10, "b": 10}, size=(90, 60))
    dm = make_dm(config(root, cache="ram", batch_size=4), seed=5)
    assert dm.lean
    dm.setup()
    loader = dm.val_dataloader()
    assert loader.num_workers == 0
    x, y, idx = next(iter(loader))
    items = dm.data.split_items("val")
    pipeline = build_pipeline(train=False, entries=None, spec=PRE)
    want = torch.stack([apply(pipeline, read_image(items[i].path, channels=3), 3) for i in idx.tolist()])
    torch.testing.assert_close(x, want, atol=1e-5, rtol=0)
    assert y.tolist() == [items[i].target for i in idx.tolist()]

    def epoch(dm, e):
        train = dm.train_dataloader()
        train.batch_sampler.sampler.set_epoch(e)
        return [b for b in train]

    first = epoch(dm, 1)
    assert first[0][0].shape == (4, 3, 32, 32) and sum(len(b[2]) for b in first) == len(dm.data.split_items("train"))
    # normalised crops of the images: within what the pixels 0..255 can give
    low, high = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225
    assert all(float(b[0].min()) >= low - 1e-4 and float(b[0].max()) <= high + 1e-4 for b in first)
    again = epoch(make_dm(config(root, cache="ram", batch_size=4), seed=5), 1)  # a fresh module, same epoch
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(first, again))
    assert not torch.equal(epoch(dm, 2)[0][0], first[0][0])


def test_lean_crop_box_draws_the_area_and_ratio_asked_for():
    from effft.data.batches import crop_box

    rng = np.random.default_rng(0)
    boxes = [crop_box(rng, 90, 120, (0.25, 1.0)) for _ in range(2000)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
    areas = np.array([h * w for _, _, h, w in boxes]) / (90 * 120)
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert areas.min() >= 0.24 and areas.max() <= 1.0 and 0.5 < np.median(areas) < 0.75
    assert ratios.min() >= 0.72 and ratios.max() <= 1.37  # 3/4..4/3, give or take the rounding to whole pixels

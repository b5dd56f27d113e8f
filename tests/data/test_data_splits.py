"""Splits: grouped (property test), stratified, seeded, k-fold, ready splits, splits.csv."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effft.config.schema import SplitConfig
from effft.data.sources._common import Item
from effft.data.splits import (apply_splits, assign_splits, read_splits, strata, write_splits)
from effft.errors import EffftError


def pool(labels: list[int], groups: list[str | None] | None = None) -> list[Item]:
    groups = groups or [None] * len(labels)
    return [Item(path=f"/data/{i}.png", target=y, group=g)
            for i, (y, g) in enumerate(zip(labels, groups))]


def by_split(items: list[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for it in items:
        out[it.split].append(it)
    return out


fractions = st.tuples(st.floats(0.05, 0.35), st.floats(0.0, 0.35)).map(
    lambda vt: SplitConfig(train=round(1 - vt[0] - vt[1], 6), val=round(vt[0], 6),
                           test=round(1 - round(1 - vt[0] - vt[1], 6) - round(vt[0], 6), 6)))


@st.composite
def grouped_pools(draw):
    n_groups = draw(st.integers(3, 30))
    sizes = draw(st.lists(st.integers(1, 6), min_size=n_groups, max_size=n_groups))
    n_classes = draw(st.integers(2, 4))
    labels, groups = [], []
    for g, size in enumerate(sizes):
        for _ in range(size):
            labels.append(draw(st.integers(0, n_classes - 1)))
            groups.append(f"patient{g}")
    return labels, groups


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=grouped_pools(), config=fractions, seed=st.integers(0, 2**16),
       stratify=st.booleans())
def test_grouped_split_never_shares_a_group(data, config, seed, stratify):
    labels, groups = data
    config = config.model_copy(update={"stratify": stratify})
    items = pool(labels, groups)
    out = assign_splits(items, config, seed=seed)
    assert [it.path for it in out] == [it.path for it in items]  # same items, same order
    assert all(it.split in ("train", "val", "test") for it in out)
    split_of_group: dict[str, set[str]] = {}
    for it in out:
        split_of_group.setdefault(it.group, set()).add(it.split)
    assert all(len(s) == 1 for s in split_of_group.values()), split_of_group
    parts = by_split(out)
    assert parts["train"] and parts["val"]
    assert bool(parts["test"]) == (config.test > 0)


@settings(max_examples=25, deadline=None)
@given(data=grouped_pools(), seed=st.integers(0, 1000), folds=st.integers(2, 4))
def test_grouped_folds_partition_the_pool(data, seed, folds):
    labels, groups = data
    items = pool(labels, groups)
    n_groups = len(set(groups))
    if n_groups < 3:
        return
    vals = []
    for k in range(folds):
        config = SplitConfig(test=0.2, val=0.1, train=0.7, folds=folds, fold=k)
        try:
            out = assign_splits(items, config, seed=seed)
        except EffftError as e:  # only when too few groups are left after the test split
            assert f"{folds} folds need at least {folds} groups" in str(e)
            return
        parts = by_split(out)
        vals.append({it.path for it in parts["val"]})
        test = {it.path for it in parts["test"]}
        # the test set is held out the same way whatever the fold
        if k == 0:
            test0 = test
        assert test == test0
        assert not ({it.group for it in parts["val"]} & {it.group for it in parts["train"]})
    non_test = {it.path for it in items} - test0
    assert set().union(*vals) == non_test
    assert sum(len(v) for v in vals) == len(non_test)  # disjoint


def test_stratified_keeps_class_proportions():
    labels = [0] * 300 + [1] * 90 + [2] * 30
    out = assign_splits(pool(labels), SplitConfig(train=0.7, val=0.15, test=0.15), seed=3)
    parts = by_split(out)
    assert abs(len(parts["test"]) - 63) <= 1 and abs(len(parts["val"]) - 63) <= 1
    for name, part in parts.items():
        counts = Counter(it.target for it in part)
        for c, total in ((0, 300), (1, 90), (2, 30)):
            assert abs(counts[c] / len(part) - total / 420) < 0.02, (name, counts)


def test_stratified_grouped_keeps_proportions_roughly():
    labels, groups = [], []
    for g in range(200):  # 200 patients, 2 images each, 20% positive patients
        labels += [int(g % 5 == 0)] * 2
        groups += [f"p{g}"] * 2
    out = assign_splits(pool(labels, groups), SplitConfig(train=0.6, val=0.2, test=0.2), seed=0)
    for part in by_split(out).values():
        share = sum(it.target for it in part) / len(part)
        assert 0.15 <= share <= 0.25


def test_seed_determinism():
    labels = [i % 3 for i in range(60)]
    a = assign_splits(pool(labels), SplitConfig(), seed=1)
    b = assign_splits(pool(labels), SplitConfig(), seed=1)
    c = assign_splits(pool(labels), SplitConfig(seed=2), seed=1)  # the recipe's seed wins
    assert [x.split for x in a] == [x.split for x in b]
    assert [x.split for x in a] != [x.split for x in c]


def test_kfold_partitions_non_test_pool():
    labels = [i % 2 for i in range(50)]
    vals, tests = [], set()
    for k in range(5):
        parts = by_split(assign_splits(pool(labels), SplitConfig(folds=5, fold=k), seed=0))
        vals.append({it.path for it in parts["val"]})
        tests = {it.path for it in parts["test"]}
        assert len(parts["val"]) == 9  # 45 non-test items, 5 folds
    assert set().union(*vals) == {f"/data/{i}.png" for i in range(50)} - tests
    assert sum(map(len, vals)) == 45


def test_unstratified_fallback_is_logged(caplog):
    caplog.set_level("INFO")
    labels = [0] * 20 + [1]  # one item of class 1 cannot be in two splits
    out = assign_splits(pool(labels), SplitConfig(), seed=0)
    assert len(out) == 21 and "not stratified" in caplog.text


def test_ready_split_kept_and_val_carved_from_train():
    items = [Item(path=f"{s}{i}", target=i % 2, split=s) for s in ("train", "test")
             for i in range(20)]
    out = assign_splits(items, SplitConfig(train=0.8, val=0.1, test=0.1), seed=0)
    parts = by_split(out)
    assert {it.path for it in parts["test"]} == {f"test{i}" for i in range(20)}
    assert len(parts["val"]) == 3 and len(parts["train"]) == 17  # ceil(20 / 9): 1/9 of train
    full = [Item(path=f"{s}{i}", target=0, split=s) for s in ("train", "val") for i in range(3)]
    assert assign_splits(full, SplitConfig(own_val=False), seed=0) == full


def test_a_ready_val_without_test_becomes_the_test_split_and_val_is_cut_from_train(caplog):
    items = [Item(path=f"{s}{i}", target=i % 2, split=s) for s in ("train", "val") for i in range(20)]
    out = by_split(assign_splits(items, SplitConfig(train=0.8, val=0.1, test=0.1), seed=0))
    assert {it.path for it in out["test"]} == {f"val{i}" for i in range(20)}  # what the data called val
    assert {it.path for it in out["val"]} | {it.path for it in out["train"]} == {f"train{i}" for i in range(20)}
    assert not {it.path for it in out["val"]} & {it.path for it in out["train"]}
    assert len(out["val"]) == 3 and {it.target for it in out["val"]} == {0, 1}  # stratified, 1/9 of train
    assert "their val split (20 images) is the test split" in caplog.text


def test_a_train_split_alone_is_cut_like_a_pool():
    items = [Item(path=f"t{i}", target=i % 2, split="train") for i in range(40)]
    out = by_split(assign_splits(items, SplitConfig(train=0.8, val=0.1, test=0.1), seed=0))
    assert (len(out["train"]), len(out["val"]), len(out["test"])) == (32, 4, 4)


def test_multilabel_strata_is_rarest_label():
    items = [Item(path=str(i), target=t) for i, t in enumerate(
        [(1, 0, 0), (1, 1, 0), (1, 1, 1), (0, 0, 0), (1, 0, 0)])]
    assert strata(items).tolist() == [0, 1, 2, -1, 0]
    many = [Item(path=str(i), target=(1, int(i % 10 == 0))) for i in range(100)]
    out = by_split(assign_splits(many, SplitConfig(train=0.6, val=0.2, test=0.2), seed=0))
    # 10 items with the rare label: 6 / 2 / 2, as 60 / 20 / 20 % of the items
    assert {k: sum(it.target[1] for it in part) for k, part in out.items()} == {
        "train": 6, "val": 2, "test": 2}


def test_too_few_items_or_groups():
    with pytest.raises(EffftError, match="at least two groups"):
        assign_splits(pool([0, 1, 0], ["a", "a", "a"]), SplitConfig(), seed=0)
    with pytest.raises(EffftError, match="a split needs two"):
        assign_splits(pool([0]), SplitConfig(), seed=0)


def test_splits_csv_round_trip(tmp_path, caplog):
    items = assign_splits(pool([0, 1] * 10, [f"g{i // 2}" for i in range(20)]), SplitConfig(),
                          seed=0)
    write_splits(tmp_path / "splits.csv", items, ["neg", "pos"])
    header = (tmp_path / "splits.csv").read_text().splitlines()[:2]
    assert header[0] == "path,frame,label,group,split"
    assert header[1].startswith("/data/0.png,,neg,g0,")
    table = read_splits(tmp_path / "splits.csv")
    fresh = [Item(path=it.path, target=it.target, group=it.group) for it in items]
    assert apply_splits(fresh, table) == items
    # a file gone and a file new since: both reported, the new one left out
    changed = fresh[1:] + [Item(path="/data/new.png", target=0)]
    out = apply_splits(changed, table, source="splits.csv")
    assert out == items[1:]
    assert "no longer in the data set" in caplog.text and "/data/0.png" in caplog.text
    assert "new since" in caplog.text and "/data/new.png" in caplog.text
    with pytest.raises(EffftError, match="none of the files"):
        apply_splits([Item(path="/elsewhere.png", target=0)], table)

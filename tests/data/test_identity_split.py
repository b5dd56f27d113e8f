"""`data.split.by: identity`: every photo of a person in one split (the default of task: embedding)."""

from __future__ import annotations

import pytest

from effft.config.load import validate
from effft.config.schema import SplitConfig
from effft.data.sources._common import Item
from effft.data.splits import assign_splits
from effft.errors import EffftError, RecipeError


def photos(people: int, each: int) -> list[Item]:
    return [Item(path=f"/p{p}/{i}.jpg", target=p) for p in range(people) for i in range(each)]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("people,fractions", [(40, (0.4, 0.1, 0.5)), (15, (0.6, 0.2, 0.2))])
def test_no_person_is_in_two_splits(seed, people, fractions):
    train, val, test = fractions
    items = assign_splits(photos(people, 5), SplitConfig(by="identity", train=train, val=val, test=test), seed=seed)
    splits: dict[int, set[str]] = {}
    for it in items:
        splits.setdefault(it.target, set()).add(it.split)
    assert all(len(s) == 1 for s in splits.values())
    by_split = {s: {p for p, ss in splits.items() if s in ss} for s in ("train", "val", "test")}
    assert all(by_split.values())
    assert [it.group for it in items] == [None] * len(items)  # the items come back as they were
    if people == 40:  # half the people for test, a fifth of the rest for val
        assert (len(by_split["train"]), len(by_split["val"]), len(by_split["test"])) == (16, 4, 20)


def test_the_same_seed_gives_the_same_people():
    config = SplitConfig(by="identity", train=0.4, val=0.1, test=0.5)
    assert assign_splits(photos(40, 3), config, seed=3) == assign_splits(photos(40, 3), config, seed=3)


def test_data_split_folders_that_share_a_person_are_refused():
    items = [Item(path="a", target=0, split="train"), Item(path="b", target=0, split="test"),
             Item(path="c", target=1, split="train")]
    with pytest.raises(EffftError, match="more than one split"):
        assign_splits(items, SplitConfig(by="identity"))


def recipe(**top) -> dict:
    return {"name": "r", "data": {"adapter": "face", "root": "faces"}, **top}


def test_embedding_splits_by_identity_unless_told():
    r = validate(recipe(task="embedding"), source="test")
    assert r.data.split.by == "identity" and r.model.head.type == "arcface" and r.model.head.dim == 512
    r = validate(recipe(model={"head": {"type": "cosface", "dim": 128}}), source="test")
    assert r.task == "embedding" and r.data.split.by == "identity"
    assert validate(recipe(), source="test").data.split.by == "item"


@pytest.mark.parametrize("raw,message", [
    (recipe(data={"adapter": "face", "root": "f", "split": {"by": "identity"}}), "split.by: identity"),
    (recipe(task="classification", model={"head": {"type": "arcface"}}), "model.head"),
    (recipe(loss={"margin": 0.3}), "loss.margin"),
    (recipe(task="embedding", loss={"margin": 95}), "less than 90"),
    (recipe(model={"head": {"type": "cosface"}}, loss={"margin": 1.5}), "less than 1"),
    (recipe(model={"head": {"type": "arcfase"}}), "arcface"),
    (recipe(report={"baselines": ["runs/x"]}), "report.baselines"),
])
def test_embedding_keys_are_checked(raw, message):
    with pytest.raises(RecipeError, match=message):
        validate(raw, source="test")

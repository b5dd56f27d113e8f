"""The data-dependent start of an embedding head (EmbeddingModule.start_head): the BatchNorm
only centres the training images' pooled features, the projection keeps their angles, and each
training person's class direction is the mean of their embeddings. Checked on a random-weight
B0 at 64 px against the same quantities computed directly (scikit-learn's cosine similarity)."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("pytorch_metric_learning", reason="pip install 'effft[face]'")

from effft.config.load import validate  # noqa: E402
from effft.input import InputSpec  # noqa: E402
from effft.model.registry import create_model  # noqa: E402
from effft.train.embedding import EmbeddingModule  # noqa: E402

PEOPLE = ["ann", "bob", "cat", "dan", "eve"]
TRAIN = [0, 2, 3]  # bob and eve are val/test people: the loss never knows them


def make_module(dim: int) -> EmbeddingModule:
    raw = {"name": "t", "task": "embedding", "data": {"adapter": "folder", "root": "."},
           "model": {"pretrained": False, "head": {"type": "arcface", "dim": dim}}}
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", embedding_dim=dim)
    return EmbeddingModule(model, recipe=validate(raw), spec=InputSpec(size=64), classes=PEOPLE, train_people=TRAIN)


def batches(n: int = 24) -> tuple[DataLoader, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 64, 64, generator=g)
    y = torch.tensor(TRAIN)[torch.arange(n) % len(TRAIN)]
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=8), x


def pooled(module: EmbeddingModule, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.model.forward_head(module.model.forward_features(x), pre_logits=True)


def test_start_centres_keeps_angles_and_imprints_the_people():
    module = make_module(dim=1280)  # B0's pooled length: the orthogonal map is a rotation
    loader, x = batches()
    module.model.train()
    module.model.blocks[0].eval()  # as a frozen stage is: its mode must survive the start
    module.start_head(loader)
    assert module.model.training and not module.model.blocks[0].training and module.model.blocks[1].training

    module.model.eval()
    f = pooled(module, x)
    centred = (f - f.mean(0)).numpy()
    with torch.no_grad():
        assert torch.allclose(module.model.classifier.bn(f), torch.as_tensor(centred), atol=1e-4)
        e = module.model(x)
    assert torch.allclose(torch.as_tensor(cosine_similarity(e.numpy())), torch.as_tensor(cosine_similarity(centred)),
                          atol=1e-4)
    y = torch.tensor(TRAIN)[torch.arange(len(x)) % len(TRAIN)]
    w = module.loss_fn.W.detach()  # (dim, people), in the order of the training people
    for k, person in enumerate(TRAIN):
        mean = e[y == person].mean(0)
        assert torch.allclose(w[:, k], mean / mean.norm(), atol=1e-5)


def test_start_lowers_the_first_loss():
    loader, x = batches()
    y = torch.tensor(TRAIN)[torch.arange(len(x)) % len(TRAIN)]
    people = torch.tensor([TRAIN.index(int(p)) for p in y])
    losses = []
    for start in (False, True):
        module = make_module(dim=64)
        if start:
            module.start_head(loader)
        module.model.eval()
        with torch.no_grad():
            losses.append(float(module.loss_fn(module.model(x), people)))
    assert losses[1] < losses[0], losses

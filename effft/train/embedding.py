"""The LightningModule of embedding runs (`task: embedding`): a margin loss over the training
people, validated on people it never trains on.

Everything else is the classifier's module (`module.py`): parameter groups by stage, the
schedules, freezing, EMA, DDP and resume. What differs:
  - training: the margin loss (`losses.py`) of the head's embedding and the person, counted among
    the training people only; its class directions are parameters too, trained with the head;
  - validation and test: each image's embedding (with `metrics.tta: flip`, the mean of the image's
    and its mirror's, normalised again) is gathered, and the split's verification and
    identification figures are computed at the end (`evaluate/verification.py`);
  - val decides the thresholds (verification, open set), which test and the gallery commands use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchmetrics import CatMetric

from ..evaluate.verification import choose_thresholds, evaluate
from ..input import InputSpec
from ..model.efficientnet import EfficientNet
from ..model.heads import pooled_embedding
from .divergence import check_outputs
from .losses import margin_loss, separation_loss
from .module import EffftModule

if TYPE_CHECKING:
    from ..config.schema import Recipe

SPLITS = ("val", "test")


def embed(model: nn.Module, x: torch.Tensor, *, head: str, flip: bool = False) -> torch.Tensor:
    """The L2-normalised embeddings of a batch: the head's output, or for a `softmax` head (a
    classifier) the pooled features; with `flip`, the mean of the image's and its mirror's."""
    def one(batch: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(model, batch) if head == "softmax" else model(batch)

    out = one(x)
    return nn.functional.normalize(out + one(x.flip(-1)), dim=1) if flip else out


class EmbeddingModule(EffftModule):
    """Trains `model`'s embedding head with the recipe's margin loss (see the module docstring).

    `train_people`: the class indices of the people in the train split, the only ones the loss
    knows (they are its class directions, in this order).
    """

    def __init__(self, model: EfficientNet, *, recipe: Recipe, spec: InputSpec, classes: list[str],
                 train_people: list[int], threshold: float | None = None,
                 operating: dict[str, float] | None = None, effft_meta: dict[str, Any] | None = None) -> None:
        super().__init__(model, recipe=recipe, spec=spec, task="embedding", classes=classes, threshold=threshold,
                         operating=operating, effft_meta=effft_meta)
        head = recipe.model.head
        assert head is not None  # the schema gives every embedding run a head
        self.head = head.type
        self.train_people = sorted(int(p) for p in train_people)
        # class index -> the loss's index of that person (-1: not a training person)
        # (a trained run tested on other people's data may have fewer classes than it trained on)
        self._person_index = torch.full((max(len(classes), max(self.train_people, default=-1) + 1),), -1,
                                        dtype=torch.long)
        self._person_index[self.train_people] = torch.arange(len(self.train_people))
        self.loss_fn = margin_loss(head.type, people=len(self.train_people), dim=head.dim,
                                   margin=recipe.loss.margin, scale=recipe.loss.scale)
        self.embeddings = nn.ModuleDict({s: CatMetric() for s in SPLITS})
        self.people = nn.ModuleDict({s: CatMetric() for s in SPLITS})
        if threshold is None:
            self.threshold = math.nan  # chosen on val

    # ------------------------------------------------------------------ the start

    start_from_data = False
    """Set by fit for a new run (not a resumed one): the head starts from the training images (below)."""

    def on_fit_start(self) -> None:
        if self.start_from_data and self.head != "softmax":
            started = self.start_head(self.trainer.datamodule.unaugmented_loader("train"))  # type: ignore[attr-defined]
            with torch.no_grad():
                for tensor in started:  # every process starts as the first did
                    tensor.copy_(self.trainer.strategy.broadcast(tensor, src=0))
            self.start_from_data = False

    @torch.no_grad()
    def start_head(self, batches: Any) -> list[torch.Tensor]:
        """Start the head where the pretrained features already are, so training refines them
        rather than first undoing a random start (measured on faces: recipes/face_embedding_b0.yaml):
          - the BatchNorm only centres: its statistics are those of the training images' pooled
            features, its scale their deviation (standardising every feature to one variance
            weighs the many faint ImageNet features as much as the strong ones, which separated
            unseen people worse than the plain features did);
          - the projection is orthogonal, which keeps the angles between centred features as far
            as its `dim` allows;
          - each training person's class direction is the mean of their embeddings (the initial
            loss is then that of the features, not of random directions).
        Returns the tensors it set (fit sends the first process's to the others)."""
        head = self.model.classifier
        modes = {m: m.training for m in self.model.modules()}  # frozen stages stay in eval mode after
        self.model.eval()
        features, people = [], []
        for x, y, _ in batches:
            x = x.to(self.device)
            features.append(self.model.forward_head(self.model.forward_features(x), pre_logits=True).float())
            people.append(self._person_index.to(y.device)[y].to(self.device))
        f, p = torch.cat(features), torch.cat(people)
        mean, var = f.mean(0), f.var(0, unbiased=False)
        bn = head.bn
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.zero_()
        nn.init.orthogonal_(head.fc.weight)
        e = head(f)
        directions = torch.stack([e[p == i].mean(0) for i in range(len(self.train_people))])
        self.loss_fn.W.copy_(nn.functional.normalize(directions, dim=1).T)  # type: ignore[union-attr]
        for m, training in modes.items():
            m.training = training
        return [bn.running_mean, bn.running_var, bn.weight, bn.bias, head.fc.weight,
                self.loss_fn.W]  # type: ignore[union-attr]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return embed(self.model, x, head=self.head, flip=self.recipe.metrics.tta == "flip")

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        people = self._person_index.to(y.device)[y]
        loss = self.loss_fn(self(x), people)  # type: ignore[misc]
        self._log_train_loss(loss, len(x))
        return loss

    def _eval_step(self, split: str, batch: Any) -> None:
        x, y, index = batch
        e = self.embed(x)
        self.embeddings[split].update(e.float())
        self.people[split].update(y.to(torch.float64))
        self.indices[split].update(torch.as_tensor(index, device=e.device, dtype=torch.float64))

    def _gathered(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not len(self.indices[split].value):
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
        # reshape: CatMetric gives the values of a split of one image without their first dimension
        e = self.embeddings[split].compute().float()
        y = self.people[split].compute().long().reshape(-1)
        return e.reshape(len(y), -1), y, self.indices[split].compute().long().reshape(-1)

    def _end_epoch(self, split: str) -> None:
        e, y, order = self._gathered(split)
        for m in (self.embeddings[split], self.people[split], self.indices[split]):
            m.reset()
        check_outputs(self, e, split)
        seed = self.recipe.seed
        if split == "val" and not self.trainer.sanity_checking and len(y):
            self.operating = choose_thresholds(e.cpu().numpy(), y.cpu().numpy(), seed=seed)
            self.threshold = self.operating["verification"]
        results: dict[str, float] = {}
        if len(y) and len(torch.unique(y)) > 1:
            results = evaluate(e.cpu().numpy(), y.cpu().numpy(), thresholds=self.operating, seed=seed,
                               resamples=0).figures
            results["loss"] = separation_loss(e, y)
        if split == "val":
            results["threshold"] = float(self.threshold)
        self._log_figures(split, results)
        self.results[split] = results
        self.predictions[split] = {"embeddings": e.cpu(), "targets": y.cpu(), "index": order.cpu()}

    def calibrate(self) -> None:
        """Nothing to calibrate: embeddings give similarities, not probabilities."""

    def choose_operating_points(self) -> None:
        """The thresholds were chosen at the last validation (`_end_epoch`)."""

    # ------------------------------------------------------------------ optimisation

    def param_groups(self) -> list[dict[str, Any]]:
        """The model's groups, and the margin loss's class directions at the head's rate."""
        groups = super().param_groups()
        own = [p for p in self.loss_fn.parameters()]  # type: ignore[union-attr]
        if own:
            groups.append({"params": own, "lr": self.lr, "weight_decay": self.recipe.optimizer.weight_decay,
                           "name": "margin_loss"})
        return groups

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        head = self.recipe.model.head
        checkpoint["effft"]["embedding"] = {
            "head": self.head, "dim": int(head.dim) if head is not None and self.head != "softmax" else None,
            "train_people": list(self.train_people)}
        checkpoint["effft"]["operating_thresholds"] = {k: float(v) for k, v in self.operating.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        operating = (checkpoint.get("effft") or {}).get("operating_thresholds")
        if operating:
            self.operating = {k: float(v) for k, v in operating.items()}


"""The LightningModule: loss, metrics, parameter groups, optimiser and schedule."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import CatMetric, MeanMetric

from ..errors import EffftError
from ..evaluate.metrics import MetricSet, choose_threshold
from ..input import InputSpec
from ..model.efficientnet import EfficientNet
from ..model.fuse import is_fused
from .divergence import check_outputs

if TYPE_CHECKING:
    from ..config.schema import Recipe

log = logging.getLogger(__name__)


class EffftModule(L.LightningModule):
    """Fine-tunes `model` as the recipe says; evaluation metrics per split with torchmetrics."""

    def __init__(
        self,
        model: EfficientNet,
        *,
        recipe: Recipe,
        spec: InputSpec,
        task: str,
        classes: list[str],
        class_weights: torch.Tensor | None = None,
        pos_weight: torch.Tensor | None = None,
        threshold: float | None = None,
        temperature: torch.Tensor | None = None,
        operating: dict[str, float] | None = None,
        effft_meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if is_fused(model):  # no BatchNorm left to train
            raise ValueError("a model with its BatchNorm folded (fuse_for_inference) is for inference only; "
                             "train the model it was made from")
        self.model = model
        self.recipe = recipe
        self.spec = spec
        # one input-sized image: Lightning's model summary counts the FLOPs on it (it shows 0 without)
        self.example_input_array = torch.zeros(1, spec.channels, spec.size, spec.size)
        self.task = task
        self.classes = list(classes)
        self.lr = recipe.optimizer.lr  # the learning-rate finder sets this
        self.effft_meta = effft_meta or {}
        self.loss_fn: nn.Module | None = None  # an embedding run's: made by train/embedding.py
        self.metrics = nn.ModuleDict()
        if task == "multilabel":
            self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight if recipe.loss.pos_weight else None)
        elif task != "embedding":
            self.loss_fn = nn.CrossEntropyLoss(
                weight=class_weights if recipe.loss.class_weights else None,
                label_smoothing=recipe.loss.label_smoothing)
        if task != "embedding":
            n = len(classes)
            self.metrics.update({s: MetricSet(task=task, num_classes=n, classes=classes) for s in ("val", "test")})
        # NaN losses are kept (not dropped with a warning): non-finite val outputs end the fit (train/divergence.py)
        self.losses = nn.ModuleDict({s: MeanMetric(nan_strategy="disable") for s in ("val", "test")})
        self.indices = nn.ModuleDict({s: CatMetric() for s in ("val", "test")})
        # chosen on the validation set (binary tasks), applied to test; kept in checkpoints (not a
        # buffer: weight averaging would average it with the weights)
        self.threshold = float(recipe.metrics.threshold.value if threshold is None else threshold)
        # fitted on the validation split once training is done (`calibrate`), applied to what follows
        self.temperature = temperature
        # binary: the thresholds of the operating-points table, chosen on val after training
        self.operating = dict(operating or {})
        self.results: dict[str, dict[str, float]] = {}
        self._onecycle_plan: dict[str, Any] | None = None  # OneCycleLR's arguments, kept for a resume
        self.predictions: dict[str, dict[str, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    # ------------------------------------------------------------------ steps

    def on_train_start(self) -> None:
        # A resumed run may be planned longer than the stopped one (--set trainer.max_epochs=...):
        # the restored optimiser holds the old plan's rate, so take the current plan's at once.
        # OneCycleLR keeps its plan in its state: when the restored plan is not the current one, a
        # scheduler of the current plan takes over at the restored step (rate and momentum).
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * fn(sched.last_epoch)
            elif isinstance(sched, torch.optim.lr_scheduler.OneCycleLR) and self._onecycle_plan is not None:
                plan = self._onecycle_plan
                if sched.total_steps == plan["total_steps"]:
                    continue
                if sched.last_epoch > plan["total_steps"]:
                    raise EffftError(f"the run has already taken {sched.last_epoch} steps, more than the "
                                     f"{plan['total_steps']} its onecycle schedule now plans: raise trainer.max_epochs")
                config.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                    sched.optimizer, **plan, last_epoch=sched.last_epoch - 1)

    def on_train_epoch_start(self) -> None:
        # Randomness of an epoch (dropout, drop path) depends on the seed and the epoch only, so
        # a run resumed at an epoch boundary continues exactly as an uninterrupted one.
        torch.manual_seed(self.recipe.seed * 1000 + self.current_epoch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = self.loss_fn(self(x), y)
        self._log_train_loss(loss, len(x))
        return loss

    def _log_train_loss(self, loss: torch.Tensor, images: int) -> None:
        # sync_dist: under DDP the epoch's loss is the mean over every rank's batches, not rank 0's
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=images, sync_dist=True)

    def _log_figures(self, split: str, results: dict[str, float]) -> None:
        # figures of the gathered predictions, the same on every rank: sync_dist keeps them so
        # (and tells Lightning they are whole-split figures, which it would otherwise warn of)
        self.log_dict({f"{split}/{k}": v for k, v in results.items()}, prog_bar=False, sync_dist=True)

    def _eval_step(self, split: str, batch: Any) -> None:
        x, y, index = batch
        logits = self(x)
        if self.recipe.metrics.tta == "flip":
            logits = (logits + self(x.flip(-1))) / 2
        # the model's own cross-entropy, without the training targets' smoothing, which would make a
        # smoothed run's val/loss higher at the same predictions (checkpoints, early stops and
        # `effft tune` compare it across runs)
        loss = self.loss_fn(logits, y) if self.task == "multilabel" else \
            F.cross_entropy(logits, y, weight=self.loss_fn.weight)
        self.losses[split].update(loss, weight=len(x))
        self.metrics[split].update(logits, y)
        self.indices[split].update(torch.as_tensor(index, device=logits.device, dtype=torch.float64))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _threshold_from_val(self) -> float:
        cfg = self.recipe.metrics.threshold
        if self.task != "binary" or cfg.method == "fixed":
            return cfg.value
        return self._threshold_of(self.metrics["val"].probabilities(self.temperature), self.metrics["val"].targets())

    def _threshold_of(self, probs: torch.Tensor, targets: torch.Tensor) -> float:
        cfg = self.recipe.metrics.threshold
        if targets.numel() == 0 or targets.min() == targets.max():
            return self.threshold  # one class only: nothing to choose from
        return choose_threshold(probs[:, 1], targets, method=cfg.method, target_sensitivity=cfg.target)

    def _figures(self, metric_set: MetricSet) -> dict[str, float]:
        """A split's figures at the current threshold and temperature, with the ECE and NLL the
        probabilities had before the temperature where there is one."""
        threshold = self.threshold if self.task == "binary" else None
        results = metric_set.compute(threshold=threshold, temperature=self.temperature)
        if self.temperature is not None:
            raw = metric_set.compute(threshold=threshold)
            results.update({f"{k}_uncalibrated": raw[k] for k in ("ece", "nll") if k in raw})
            t = self.temperature.reshape(-1).tolist()
            results.update({"temperature": t[0]} if self.task != "multilabel" else
                           {f"temperature/{c}": v for c, v in zip(self.classes, t)})
        return results

    def _end_epoch(self, split: str) -> None:
        metric_set = self.metrics[split]
        check_outputs(self, metric_set.logits(), split)
        if split == "val" and not self.trainer.sanity_checking:
            self.threshold = self._threshold_from_val()
        results = self._figures(metric_set)
        results["loss"] = float(self.losses[split].compute())
        self._log_figures(split, results)
        self.results[split] = results
        # reshape: CatMetric gives the index of a split of one image as a 0-d tensor
        order = self.indices[split].compute().long().reshape(-1) if len(self.indices[split].value) \
            else torch.empty(0, dtype=torch.long)
        self.predictions[split] = {"probs": metric_set.probabilities(self.temperature).cpu(),
                                   "logits": metric_set.logits().cpu(), "targets": metric_set.targets().cpu(),
                                   "index": order.cpu()}
        for m in (metric_set, self.losses[split], self.indices[split]):
            m.reset()

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def calibrate(self) -> None:
        """Fit the temperature on the last validation's logits (`effft.train.calibration`), choose
        the threshold again on the calibrated probabilities, and recompute the val figures with
        both. What follows (test, the checkpoint's entry, predict, export) uses them."""
        from ..train.calibration import fit_temperature

        val = self.predictions.get("val")
        if val is None or len(val["targets"]) == 0:
            return
        self.temperature = fit_temperature(val["logits"], val["targets"], task=self.task)
        # val["logits"] are every rank's already: under DDP a gathering set would repeat them per rank
        metric_set = MetricSet(task=self.task, num_classes=len(self.classes), classes=self.classes, gather=False)
        metric_set.update(val["logits"], val["targets"])
        if self.task == "binary" and self.recipe.metrics.threshold.method != "fixed":
            self.threshold = self._threshold_of(metric_set.probabilities(self.temperature), metric_set.targets())
        loss = self.results.get("val", {}).get("loss")
        self.results["val"] = {**self._figures(metric_set), **({"loss": loss} if loss is not None else {})}
        self.predictions["val"] = {**val, "probs": metric_set.probabilities(self.temperature)}
        if self.trainer.is_global_zero:  # the logs hold the val figures as metrics.json gives them
            for logger in self.loggers:
                logger.log_metrics({f"val/{k}": v for k, v in self.results["val"].items()}, step=self.global_step)

    def choose_operating_points(self) -> None:
        """Binary: the thresholds of the operating-points table (`evaluate/operating_points.py`),
        chosen on the last validation's calibrated probabilities."""
        from ..evaluate.operating_points import operating_thresholds

        val = self.predictions.get("val")
        if self.task != "binary" or val is None or len(val["targets"]) == 0:
            return
        self.operating = operating_thresholds(val["probs"][:, 1], val["targets"], chosen=self.threshold,
                                              method=self.recipe.metrics.threshold.method)

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    # ------------------------------------------------------------------ optimisation

    def param_groups(self) -> list[dict[str, Any]]:
        """One group per stage (and per decay/no-decay), learning rates scaled by depth."""
        stages = self.model.stages()
        ft = self.recipe.finetune
        groups = []
        for i, stage in enumerate(stages):
            top = len(stages) - 1 - i  # 0 for the classifier
            if ft.layer_decay is not None:
                scale = ft.layer_decay**top
            else:
                scale = 1.0 if top == 0 else ft.backbone_lr_scale
            decay = [p for p in stage.parameters() if p.ndim > 1]
            no_decay = [p for p in stage.parameters() if p.ndim <= 1]  # BatchNorm and biases
            for params, wd in ((decay, self.recipe.optimizer.weight_decay), (no_decay, 0.0)):
                if params:
                    groups.append({"params": params, "lr": self.lr * scale, "weight_decay": wd,
                                   "name": f"stage{i}{'' if wd else '_no_decay'}"})
        return groups

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The recipe's optimiser over `param_groups()` (the schedule aside)."""
        opt_cfg = self.recipe.optimizer
        if opt_cfg.name == "adamw":
            return torch.optim.AdamW(self.param_groups(), lr=self.lr, foreach=True)
        return torch.optim.SGD(self.param_groups(), lr=self.lr, momentum=opt_cfg.momentum,
                               nesterov=opt_cfg.nesterov, foreach=True)

    def configure_optimizers(self) -> Any:
        sched = self.recipe.scheduler
        optimizer = self.make_optimizer()
        groups = optimizer.param_groups
        if sched.name == "none":
            return optimizer
        if sched.name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched.step_size, gamma=sched.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if sched.name == "onecycle":
            pct = min(0.5, max(0.05, sched.warmup_epochs / max(1, self.trainer.max_epochs or 1)))
            # both phases need more than one step's length, or OneCycleLR divides by zero
            pct = max(pct, min(0.9, 1.5 / total))
            self._onecycle_plan = {"max_lr": [g["lr"] for g in groups], "total_steps": total, "pct_start": pct}
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, **self._onecycle_plan)
        else:
            steps_per_epoch = total / max(1, self.trainer.max_epochs or 1)
            warmup = int(sched.warmup_epochs * steps_per_epoch)
            floor = sched.min_lr_ratio

            def cosine(step: int) -> float:
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `effft test`, `predict`, `explain` and `export` need to rebuild the run from this
        # file alone: above all the InputSpec, how images were fed to the network.
        checkpoint["effft"] = {
            "preprocessing": self.model.preprocessing.to_dict(),  # what the weights were trained with
            **self.effft_meta,
            "recipe": self.recipe.to_dict(),
            "classes": self.classes,
            "task": self.task,
            "model_name": self.model.name,
            "in_chans": self.model.in_chans,
            "bn_eps": self.model.bn1.eps,  # not in the state dict; converted weights may change it
            "input": self.spec.to_dict(),
            "threshold": float(self.threshold),
            "temperature": None if self.temperature is None else self.temperature.tolist(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("effft") or {}
        if "threshold" in meta:
            self.threshold = float(meta["threshold"])
        if meta.get("temperature") is not None:
            self.temperature = torch.tensor(meta["temperature"], dtype=torch.float32)

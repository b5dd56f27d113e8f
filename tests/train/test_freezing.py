"""Fine-tuning strategies, BatchNorm freezing, parameter groups, optimisers and schedules.

The strategies are checked on the schedule function, on a model directly, and through short
Lightning runs on random tensors (32 px, a few batches), where what changed is compared with
what the strategy says may change.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from effft.model.registry import create_model
from effft.config.load import validate
from effft.config.schema import FinetuneConfig
from effft.input import InputSpec
from effft.train.freezing import Freezing, trainable_stages
from effft.train.module import EffftModule

CLASSES = ["a", "b", "c"]
N_STAGES = 10  # stem, seven block stages, head convolution, classifier


def make_module(**sections) -> EffftModule:
    raw = {"name": "t", "data": {"adapter": "folder", "root": "."}, "model": {"pretrained": False}}
    raw.update(sections)
    recipe = validate(raw)
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", num_classes=len(CLASSES))
    return EffftModule(model, recipe=recipe, spec=InputSpec(size=32), task="multiclass", classes=CLASSES)


def loader(n: int = 16, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % len(CLASSES)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch)


def trainer(epochs: int, *callbacks: Callback, **kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs)


def stage_trainable(module: EffftModule) -> list[bool]:
    """Per stage: are all its parameters trainable (asserting none is half frozen)."""
    out = []
    for stage in module.model.stages():
        flags = {p.requires_grad for p in stage.parameters()}
        assert len(flags) == 1, "a stage is partly frozen"
        out.append(flags.pop())
    return out


def batchnorms(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


# ----------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("cfg, expected", [
    (FinetuneConfig(strategy="full"), [10, 10, 10, 10, 10]),
    (FinetuneConfig(strategy="linear_probe"), [1, 1, 1, 1, 1]),
    (FinetuneConfig(strategy="freeze_then_unfreeze", unfreeze_epoch=2), [1, 1, 10, 10, 10]),
    (FinetuneConfig(strategy="gradual", milestones=[1, 3]), [1, 2, 2, 3, 3]),
    (FinetuneConfig(strategy="gradual", milestones=list(range(1, 20))), [1, 2, 3, 4, 5]),
])
def test_trainable_stages_by_epoch(cfg, expected):
    assert [trainable_stages(cfg, e, N_STAGES) for e in range(5)] == expected


def test_gradual_never_exceeds_the_stages():
    cfg = FinetuneConfig(strategy="gradual", milestones=list(range(1, 30)))
    assert trainable_stages(cfg, 25, N_STAGES) == N_STAGES


@pytest.mark.parametrize("strategy, epoch, top", [
    ("linear_probe", 0, 1), ("linear_probe", 5, 1),
    ("freeze_then_unfreeze", 0, 1), ("freeze_then_unfreeze", 1, 10),
    ("gradual", 0, 1), ("gradual", 1, 2), ("gradual", 2, 3), ("full", 0, 10),
])
def test_schedule_on_a_model_freezes_from_the_bottom(strategy, epoch, top):
    module = make_module(finetune={"strategy": strategy, "unfreeze_epoch": 1, "milestones": [1, 2]})
    module.train()
    schedule = Freezing(module.recipe.finetune)
    schedule.apply(module, 0)
    schedule.apply(module, epoch)
    assert stage_trainable(module) == [False] * (N_STAGES - top) + [True] * top
    assert module.model.classifier.weight.requires_grad
    frozen_bn = [m for s in module.model.stages()[: N_STAGES - top] for m in batchnorms(s)]
    live_bn = [m for s in module.model.stages()[N_STAGES - top:] for m in batchnorms(s)]
    assert all(not m.training and not m.weight.requires_grad for m in frozen_bn)
    assert all(m.training and m.track_running_stats for m in live_bn)  # unfrozen ones train again


def test_train_bn_keeps_frozen_batchnorm_weights_frozen_but_in_training_mode():
    module = make_module(finetune={"strategy": "linear_probe", "train_bn": True})
    module.train()
    Freezing(module.recipe.finetune).apply(module, 0)
    backbone_bn = batchnorms(module.model.blocks)
    assert backbone_bn and all(m.training and m.track_running_stats for m in backbone_bn)
    assert [n for n, p in module.model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


# ----------------------------------------------------------------------------- through training


class Snapshot(Callback):
    """State of the model at the start and end of each training epoch, and the optimiser's groups."""

    def __init__(self) -> None:
        self.start: list[dict[str, torch.Tensor]] = []
        self.end: list[dict[str, torch.Tensor]] = []
        self.trainable: list[list[bool]] = []
        self.groups: list[list[tuple[str, tuple[int, ...]]]] = []

    @staticmethod
    def _state(pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        self.start.append(self._state(pl_module))
        self.groups.append([(g["name"], tuple(id(p) for p in g["params"])) for g in trainer.optimizers[0].param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:  # what the strategy set for this epoch, after the first step
            self.trainable.append(stage_trainable(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.end.append(self._state(pl_module))


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def fit(module: EffftModule, epochs: int, *callbacks: Callback) -> Snapshot:
    snap = Snapshot()
    trainer(epochs, Freezing(module.recipe.finetune), snap, *callbacks).fit(
        module, train_dataloaders=loader(), val_dataloaders=loader(8, seed=1))
    return snap


def test_linear_probe_trains_the_classifier_only_and_holds_batchnorm_statistics():
    module = make_module(finetune={"strategy": "linear_probe"})
    snap = fit(module, 1)
    before, after = snap.start[0], snap.end[0]
    assert changed(before, after, "classifier.")
    for prefix in ("conv_stem.", "bn1.", "blocks.", "conv_head.", "bn2."):
        assert not changed(before, after, prefix), f"{prefix} changed under linear_probe"
    assert torch.equal(before["blocks.3.0.bn1.running_mean"], after["blocks.3.0.bn1.running_mean"])


def test_linear_probe_with_train_bn_updates_batchnorm_statistics_only():
    module = make_module(finetune={"strategy": "linear_probe", "train_bn": True})
    snap = fit(module, 1)
    before, after = snap.start[0], snap.end[0]
    for key in ("bn1.running_mean", "blocks.3.0.bn1.running_mean", "bn2.running_var"):
        assert not torch.equal(before[key], after[key]), key
    for key in ("bn1.weight", "blocks.3.0.bn1.bias", "blocks.3.0.conv_pw.weight", "conv_stem.weight"):
        assert torch.equal(before[key], after[key]), key


def test_freeze_then_unfreeze_trains_the_head_first_then_everything():
    module = make_module(finetune={"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1})
    snap = fit(module, 2)
    assert snap.trainable == [[False] * 9 + [True], [True] * 10]
    assert not changed(snap.start[0], snap.end[0], "blocks.")
    assert not changed(snap.start[0], snap.end[0], "bn1.running_mean")
    assert changed(snap.start[1], snap.end[1], "blocks.")
    assert changed(snap.start[1], snap.end[1], "conv_stem.")
    assert changed(snap.start[1], snap.end[1], "bn1.running_mean")  # unfrozen BatchNorm learns its statistics


def test_freeze_bottom_keeps_the_lowest_stages_frozen_whatever_the_strategy():
    module = make_module(finetune={"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1, "freeze_bottom": 3})
    snap = fit(module, 2)
    assert snap.trainable == [[False] * 9 + [True], [False] * 3 + [True] * 7]
    before, after = snap.start[1], snap.end[1]
    for prefix in ("conv_stem.", "bn1.", "blocks.0.", "blocks.1."):
        assert not changed(before, after, prefix), f"{prefix} changed, but is below freeze_bottom"
    assert changed(before, after, "blocks.2.") and changed(before, after, "classifier.")
    assert torch.equal(before["blocks.1.0.bn1.running_mean"], after["blocks.1.0.bn1.running_mean"])
    assert not torch.equal(before["blocks.2.0.bn1.running_mean"], after["blocks.2.0.bn1.running_mean"])


def test_a_frozen_bottom_is_left_out_of_the_backward_pass():
    # nothing below the lowest trainable stage needs a gradient: autograd's graph starts above it
    module = make_module(finetune={"freeze_bottom": 3})
    module.train()
    Freezing(module.recipe.finetune).apply(module, 0)
    needs_grad: dict[str, bool] = {}
    for name, m in module.model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out, name=name: needs_grad.__setitem__(name, out.requires_grad))
    module(torch.randn(2, 3, 32, 32)).sum().backward()
    low = [n for n in needs_grad if n.startswith(("conv_stem", "blocks.0.", "blocks.1."))]
    assert low and not any(needs_grad[n] for n in low)
    assert all(needs_grad[n] for n in needs_grad if n.startswith("blocks.2."))
    assert all(p.grad is None for p in module.model.blocks[1].parameters())


def test_gradual_unfreezes_one_more_stage_at_each_milestone():
    module = make_module(finetune={"strategy": "gradual", "milestones": [1, 2]})
    snap = fit(module, 3)
    assert [sum(t) for t in snap.trainable] == [1, 2, 3]
    assert [t[-3:] for t in snap.trainable] == [[False, False, True], [False, True, True], [True, True, True]]
    assert not changed(snap.start[1], snap.end[1], "blocks.6.")
    assert changed(snap.start[1], snap.end[1], "conv_head.")
    assert changed(snap.start[2], snap.end[2], "blocks.6.")
    assert not changed(snap.start[2], snap.end[2], "blocks.5.")


def test_param_groups_do_not_change_when_stages_unfreeze():
    module = make_module(finetune={"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1})
    snap = fit(module, 2)
    assert snap.groups[0] == snap.groups[1]
    every = [i for _, ids in snap.groups[0] for i in ids]
    assert sorted(every) == sorted(id(p) for p in module.model.parameters())  # each parameter once


def test_resume_after_unfreezing_restores_groups_and_optimizer_state(tmp_path):
    cfg = {"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1}
    module = make_module(finetune=cfg, scheduler={"name": "none"})
    fit(module, 2, ModelCheckpoint(dirpath=tmp_path, save_last=True))
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    saved = ckpt["optimizer_states"][0]

    class Restored(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if hasattr(self, "groups"):
                return
            opt = trainer.optimizers[0]
            self.groups = [g["name"] for g in opt.param_groups]
            self.lrs = [g["lr"] for g in opt.param_groups]
            self.state_keys = {i: sorted(s) for i, s in enumerate(opt.state_dict()["state"].values())}
            self.trainable = stage_trainable(pl_module)

    resumed, probe = make_module(finetune=cfg, scheduler={"name": "none"}), Restored()
    trainer(3, Freezing(resumed.recipe.finetune), probe).fit(
        resumed, train_dataloaders=loader(), val_dataloaders=loader(8, seed=1), ckpt_path=tmp_path / "last.ckpt",
        weights_only=True)
    assert probe.groups == [g["name"] for g in saved["param_groups"]]
    assert probe.lrs == [g["lr"] for g in saved["param_groups"]]
    assert probe.state_keys == {i: sorted(s) for i, s in enumerate(saved["state"].values())}
    assert len(saved["state"]) == sum(1 for _ in module.model.parameters())  # everything was trained
    assert probe.trainable == [True] * 10


# ----------------------------------------------------------------------------- learning rates


def groups_by_stage(module: EffftModule) -> dict[str, dict]:
    return {g["name"]: g for g in module.param_groups()}


def test_layer_decay_scales_each_stage_from_the_top():
    module = make_module(optimizer={"lr": 0.1}, finetune={"layer_decay": 0.5})
    groups = groups_by_stage(module)
    for i in range(N_STAGES):
        top = N_STAGES - 1 - i
        assert groups[f"stage{i}"]["lr"] == pytest.approx(0.1 * 0.5**top)
        assert groups[f"stage{i}_no_decay"]["lr"] == pytest.approx(0.1 * 0.5**top)


def test_backbone_lr_scale_applies_to_all_but_the_classifier():
    module = make_module(optimizer={"lr": 0.1}, finetune={"backbone_lr_scale": 0.2})
    groups = groups_by_stage(module)
    assert groups["stage9"]["lr"] == pytest.approx(0.1)
    assert [g["lr"] for n, g in groups.items() if not n.startswith("stage9")] == pytest.approx([0.02] * 18)
    classifier = {id(p) for p in module.model.classifier.parameters()}
    assert {id(p) for p in groups["stage9"]["params"] + groups["stage9_no_decay"]["params"]} == classifier


def test_no_weight_decay_on_batchnorm_and_bias():
    module = make_module(optimizer={"weight_decay": 0.05})
    no_decay = {id(p) for g in module.param_groups() if g["weight_decay"] == 0 for p in g["params"]}
    decay = {id(p) for g in module.param_groups() if g["weight_decay"] == 0.05 for p in g["params"]}
    for name, p in module.model.named_parameters():
        is_bn = isinstance(module.model.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm2d)
        expected = no_decay if is_bn or name.endswith(".bias") else decay
        assert id(p) in expected, name
    assert not decay & no_decay
    assert len(decay) + len(no_decay) == sum(1 for _ in module.model.parameters())


class LrLog(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])  # the classifier's


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizers_train(optimizer):
    module = make_module(optimizer={"name": optimizer, "lr": 0.01}, scheduler={"name": "none"})
    snap = fit(module, 1)
    assert changed(snap.start[0], snap.end[0], "blocks.")
    opt = module.trainer.optimizers[0]
    assert type(opt).__name__.lower() == optimizer
    assert "val" in module.results and "accuracy" in module.results["val"]


@pytest.mark.parametrize("scheduler", [
    {"name": "cosine", "warmup_epochs": 1, "min_lr_ratio": 0.1},
    {"name": "onecycle", "warmup_epochs": 1},
    {"name": "step", "step_size": 1, "gamma": 0.5},
])
def test_schedulers_shape_the_learning_rate(scheduler):
    module = make_module(optimizer={"lr": 0.01}, scheduler=scheduler)
    lrs = LrLog()
    fit(module, 2, lrs)
    assert len(lrs.lrs) == 4  # 2 epochs of 2 batches
    if scheduler["name"] == "step":
        assert lrs.lrs == pytest.approx([0.01, 0.01, 0.005, 0.005])
    elif scheduler["name"] == "cosine":  # warm-up over the first epoch, then down towards 0.1 * lr
        assert lrs.lrs[0] < lrs.lrs[1] <= 0.01
        assert lrs.lrs[2] > lrs.lrs[3] >= 0.001
    else:  # one cycle: up to the peak, then down far below the start
        assert lrs.lrs[0] < max(lrs.lrs) <= 0.01 + 1e-12
        assert lrs.lrs[-1] < lrs.lrs[0]


@pytest.mark.parametrize("sched", [{"name": "cosine", "min_lr_ratio": 0.01}, {"name": "onecycle", "warmup_epochs": 1}],
                         ids=["cosine", "onecycle"])
def test_a_resumed_longer_run_follows_the_longer_schedule_at_once(tmp_path, sched):
    """Stopped after 1 of 1 planned epochs, resumed with 2 planned: every step of epoch 1 has
    the rate an uninterrupted 2-epoch run has there, not the 1-epoch plan's final rate."""
    whole, lrs = make_module(optimizer={"lr": 0.01}, scheduler=sched), LrLog()
    fit(whole, 2, lrs)
    fit(make_module(optimizer={"lr": 0.01}, scheduler=sched), 1, ModelCheckpoint(dirpath=tmp_path, save_last=True))
    resumed, resumed_lrs = make_module(optimizer={"lr": 0.01}, scheduler=sched), LrLog()
    trainer(2, Freezing(resumed.recipe.finetune), resumed_lrs).fit(
        resumed, train_dataloaders=loader(), val_dataloaders=loader(8, seed=1), ckpt_path=tmp_path / "last.ckpt",
        weights_only=True)
    assert resumed_lrs.lrs == pytest.approx(lrs.lrs[2:])
    assert lrs.lrs[2] > 0.01 * 0.011  # not the 1-epoch plan's floor
    if sched["name"] == "onecycle":  # the cycled momentum (AdamW's beta1) follows the new plan too
        assert resumed.trainer.optimizers[0].param_groups[0]["betas"] == whole.trainer.optimizers[0].param_groups[0]["betas"]



def test_val_loss_is_the_cross_entropy_without_the_training_smoothing():
    module = make_module(loss={"label_smoothing": 0.3}).eval()
    x, y, index = next(iter(loader(n=12, batch=12)))
    logits = torch.randn(len(y), len(CLASSES), generator=torch.Generator().manual_seed(1)) * 3
    module.forward = lambda _: logits  # confident logits, where smoothing tells
    with torch.no_grad():
        module._eval_step("val", (x, y, index))
    plain = nn.functional.cross_entropy(logits, y)
    assert float(module.losses["val"].compute()) == pytest.approx(float(plain), rel=1e-5)
    # training keeps the smoothing: its loss of the same logits differs
    assert float(module.loss_fn(logits, y)) != pytest.approx(float(plain), rel=1e-3)

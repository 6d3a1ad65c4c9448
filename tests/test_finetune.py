"""Which parameters move under each strategy, with a real optimizer step through Lightning."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferlab.errors import UserError
from transferlab.finetune import build_strategy
from transferlab.models import build_classifier
from transferlab.module import TransferModule
from transferlab.optim import apply_lr_mult, param_groups

MODEL = {
    "name": "resnet18",
    "pretrained": False,
    "weights": "hub",
    "weights_file": None,
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "kwargs": {},
    "head": {"type": "linear", "hidden_dim": 16, "dropout": 0.0},
}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict, keys) -> set[str]:
    return {k for k in keys if not torch.equal(before[k], after[k])}


def fit(finetune: dict, lr: float = 1e-2, steps: int = 3):
    torch.manual_seed(0)
    network = build_classifier(MODEL, num_classes=3)
    strategy = build_strategy(finetune)
    module = TransferModule(
        network,
        num_classes=3,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05),
        backbone_lr_mult=strategy.backbone_lr_mult,
    )
    data = TensorDataset(torch.randn(24, 3, 32, 32) * 2 + 1, torch.randint(0, 3, (24,)))
    before = snapshot(network)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[strategy],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return network, before, snapshot(network), trainer.optimizers[0]


def split_keys(network: nn.Module):
    state = network.state_dict()
    backbone = [k for k in state if k.startswith("backbone.")]
    stats = [k for k in backbone if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in backbone if k not in stats and not k.endswith("num_batches_tracked")]
    head = [k for k in state if k.startswith("head.")]
    return weights, stats, head


def test_linear_probe_moves_only_the_head():
    network, before, after, optimizer = fit({"strategy": "linear_probe", "bn": "train"})
    weights, stats, head = split_keys(network)
    assert changed(before, after, head) == set(head)
    assert not changed(before, after, weights)
    assert not changed(before, after, stats)  # frozen BN keeps its statistics even if bn=train
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in network.backbone.parameters())
    assert all(len(optimizer.state[p]) > 0 for p in network.head.parameters())


def test_full_with_bn_eval_trains_weights_but_keeps_bn_statistics():
    network, before, after, _ = fit({"strategy": "full", "bn": "eval", "backbone_lr_mult": 0.5})
    weights, stats, head = split_keys(network)
    assert changed(before, after, head) == set(head)
    assert changed(before, after, weights) == set(weights)
    assert not changed(before, after, stats)


def test_full_with_bn_train_updates_bn_statistics():
    network, before, after, _ = fit({"strategy": "full", "bn": "train", "backbone_lr_mult": 1.0})
    _, stats, _ = split_keys(network)
    assert changed(before, after, stats) == set(stats)


def test_backbone_learns_at_its_multiplier():
    _, _, _, optimizer = fit({"strategy": "full", "bn": "eval", "backbone_lr_mult": 0.1}, lr=0.02)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(0.02)
    assert lrs["backbone"] == pytest.approx(0.002)
    assert lrs["backbone_no_decay"] == pytest.approx(0.002)
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["head"] == 0.05 and decay["head_no_decay"] == 0.0


def test_param_groups_skip_frozen_parameters():
    layer = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    layer[0].weight.requires_grad_(False)
    groups = param_groups({"m": (layer, 0.5)})
    params = [p for g in groups for p in g["params"]]
    assert len(params) == 3 and all(p.requires_grad for p in params)
    optimizer = torch.optim.SGD(groups, lr=1.0)
    apply_lr_mult(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5]
    assert optimizer.param_groups[0]["name"] == "m_no_decay"


@pytest.mark.parametrize(
    "cfg", [{"strategy": "nope"}, {"strategy": "full", "bn": "x"}, {"strategy": "full", "y": 1}]
)
def test_bad_strategy_config_is_a_user_error(cfg):
    with pytest.raises(UserError):
        build_strategy(cfg)

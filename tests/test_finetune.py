"""What moves under each strategy, checked with real optimizer steps through Lightning."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from transferlab.errors import UserError
from transferlab.finetune import build_strategy
from transferlab.finetune.stages import backbone_stages
from transferlab.models import build_classifier
from transferlab.module import TransferModule
from transferlab.optim import apply_lr_mult, cosine_with_warmup, param_groups

# A CNN with BatchNorm and a ViT (LayerNorm), both at random init and tiny inputs.
CNN = "resnet18"
VIT = "vit_tiny_patch16_224"


def model_cfg(name: str) -> dict:
    kwargs = {"img_size": 32} if name == VIT else {}
    return {"name": name, "pretrained": False, "kwargs": kwargs}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def moved(before: dict, after: dict, keys) -> set[str]:
    return {k for k in keys if not torch.equal(before[k], after[k])}


class Recorder(pl.Callback):
    """Which backbone stages train, and each group's lr, at every epoch start."""

    def __init__(self) -> None:
        self.trainable: list[int] = []
        self.lrs: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        stages = backbone_stages(pl_module.network.backbone)
        named = dict(pl_module.network.backbone.named_parameters())
        self.trainable.append(sum(named[stage[0]].requires_grad for stage in stages))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            groups = trainer.optimizers[0].param_groups
            self.lrs.append({g["name"]: g["lr"] for g in groups})


def make_module(name: str, finetune: dict, lr: float = 1e-2, scheduler=None):
    torch.manual_seed(0)
    network = build_classifier(model_cfg(name), num_classes=3)
    strategy = build_strategy(finetune)
    module = TransferModule(
        network,
        num_classes=3,
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05),
        scheduler=scheduler,
        finetune=strategy,
    )
    return network, strategy, module


def trainer_for(strategy, epochs: int = 1, steps: int = -1, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        max_steps=steps,
        callbacks=[strategy, *kwargs.pop("callbacks", [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        **kwargs,
    )


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=generator) * 2 + 1
    labels = torch.randint(0, 3, (16,), generator=generator)
    data = [{"image": image, "label": label} for image, label in zip(images, labels, strict=True)]
    return DataLoader(data, batch_size=8)


def fit(name: str, finetune: dict, steps: int = 2):
    network, strategy, module = make_module(name, finetune)
    before = snapshot(network)
    trainer = trainer_for(strategy, steps=steps, enable_checkpointing=False)
    trainer.fit(module, loader())
    return network, strategy, before, snapshot(network), trainer.optimizers[0]


def keys_by_stage(network: nn.Module, stages: list[list[str]]):
    """Per stage: its parameter keys, and its BatchNorm running-statistics keys."""
    state = network.backbone.state_dict()
    params, stats = [], []
    for names in stages:
        modules = {n.rsplit(".", 1)[0] for n in names}
        params.append([f"backbone.{n}" for n in names])
        stats.append(
            [
                f"backbone.{k}"
                for k in state
                if k.rsplit(".", 1)[0] in modules and k.endswith(("running_mean", "running_var"))
            ]
        )
    return params, stats


def head_keys(network: nn.Module) -> list[str]:
    return [f"head.{k}" for k in network.head.state_dict()]


@pytest.mark.parametrize("name", [CNN, VIT])
@pytest.mark.parametrize(
    ("finetune", "frozen_stages"),
    [
        ({"strategy": "linear_probe"}, "all"),
        ({"strategy": "full", "bn": "frozen"}, 0),
        ({"strategy": "partial", "freeze_stages": 2, "bn": "frozen"}, 2),
        ({"strategy": "gradual", "unfreeze_every": 1}, "all"),  # epoch 0: head only
        ({"strategy": "lp_ft", "probe_epochs": 1}, "all"),  # epoch 0: probe
    ],
)
def test_exactly_the_trainable_parameters_move(name, finetune, frozen_stages):
    network, strategy, before, after, optimizer = fit(name, finetune)
    stages = strategy.stages
    frozen = len(stages) if frozen_stages == "all" else frozen_stages
    params, stats = keys_by_stage(network, stages)
    assert moved(before, after, head_keys(network)) == set(head_keys(network))
    for i in range(len(stages)):
        if i < frozen:
            assert not moved(before, after, params[i] + stats[i]), f"frozen stage {i} moved"
        else:
            assert moved(before, after, params[i]), f"trainable stage {i} did not move"
            if stats[i]:
                assert moved(before, after, stats[i]) == set(stats[i])  # bn=frozen trains them
    # Frozen parameters get no optimizer state (hence no weight decay either).
    named = dict(network.backbone.named_parameters())
    for i, names in enumerate(stages):
        has_state = [len(optimizer.state[named[n]]) > 0 for n in names]
        assert all(has_state) if i >= frozen else not any(has_state), f"stage {i}"


def test_bn_eval_trains_weights_but_keeps_statistics():
    network, strategy, before, after, _ = fit(CNN, {"strategy": "full", "bn": "eval"})
    params, stats = keys_by_stage(network, strategy.stages)
    all_params = [k for stage in params for k in stage]
    all_stats = [k for stage in stats for k in stage]
    assert moved(before, after, all_params) == set(all_params)
    assert not moved(before, after, all_stats)


def test_bn_train_lets_even_frozen_layers_drift():
    """PyTorch's default, kept as an explicit choice: frozen BN statistics still update."""
    network, strategy, before, after, _ = fit(CNN, {"strategy": "partial", "bn": "train"})
    _, stats = keys_by_stage(network, strategy.stages)
    assert moved(before, after, stats[1])
    network, strategy, before, after, _ = fit(CNN, {"strategy": "partial", "bn": "frozen"})
    _, stats = keys_by_stage(network, strategy.stages)
    assert not moved(before, after, stats[0] + stats[1])


@pytest.mark.parametrize("name", [CNN, VIT])
def test_group_learning_rates_follow_backbone_mult_and_layer_decay(name):
    finetune = {"strategy": "full", "backbone_lr_mult": 0.5, "layer_decay": 0.7}
    _network, strategy, *_, optimizer = fit(name, finetune, steps=1)
    top = len(strategy.stages) - 1
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(1e-2)
    for i in range(top + 1):
        expected = 1e-2 * 0.5 * 0.7 ** (top - i)
        assert lrs[f"backbone.{i}"] == pytest.approx(expected), i
    assert len({round(v, 12) for k, v in lrs.items() if k.startswith("backbone.")}) == top + 1
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["head"] == 0.05 and decay["head_no_decay"] == 0.0


@pytest.mark.parametrize("name", [CNN, VIT])
def test_stages_cover_every_parameter_once(name):
    backbone = build_classifier(model_cfg(name), num_classes=3).backbone
    stages = backbone_stages(backbone)
    names = [n for stage in stages for n in stage]
    assert sorted(names) == sorted(n for n, _ in backbone.named_parameters())
    assert len(stages) == (5 if name == CNN else 13)


def test_gradual_unfreezes_one_stage_per_milestone():
    recorder = Recorder()
    _network, strategy, module = make_module(CNN, {"strategy": "gradual", "milestones": [1, 3]})
    trainer_for(strategy, epochs=5, callbacks=[recorder], enable_checkpointing=False).fit(
        module, loader()
    )
    assert recorder.trainable == [0, 1, 1, 2, 2]


def test_gradual_every_k_epochs_up_to_max_stages():
    recorder = Recorder()
    finetune = {"strategy": "gradual", "unfreeze_every": 2, "max_stages": 2}
    _network, strategy, module = make_module(CNN, finetune)
    trainer_for(strategy, epochs=7, callbacks=[recorder], enable_checkpointing=False).fit(
        module, loader()
    )
    assert recorder.trainable == [0, 0, 1, 1, 2, 2, 2]


def test_lp_ft_switches_and_the_schedule_restarts():
    recorder = Recorder()
    _network, strategy, module = make_module(
        CNN,
        {"strategy": "lp_ft", "probe_epochs": 2, "backbone_lr_mult": 0.1},
        scheduler=functools.partial(cosine_with_warmup, warmup_epochs=1),
    )
    trainer_for(strategy, epochs=4, callbacks=[recorder], enable_checkpointing=False).fit(
        module, loader()
    )
    assert recorder.trainable == [0, 0, 5, 5]
    head = [lrs["head"] for lrs in recorder.lrs]
    # Warm-up (2 steps per epoch, 1 epoch) at the start of each phase: step 0 of each is half.
    assert head[0] == pytest.approx(head[2]) == pytest.approx(0.5e-2)
    assert recorder.lrs[2]["backbone.0"] == pytest.approx(0.5e-3)


def test_resume_mid_schedule_continues_the_same_phase(tmp_path):
    finetune = {"strategy": "gradual", "milestones": [1, 2, 3]}
    _network, strategy, module = make_module(CNN, finetune)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer_for(strategy, epochs=2, callbacks=[checkpoint]).fit(module, loader())
    saved = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)  # our own file
    assert saved["callbacks"]["Gradual"]["trainable_stages"] == 1

    class Restored(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.state = {
                k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
                for k, v in trainer.optimizers[0].state_dict()["state"].items()
            }

    recorder, restored = Recorder(), Restored()
    _, strategy2, module2 = make_module(CNN, finetune)
    trainer = trainer_for(
        strategy2, epochs=4, callbacks=[recorder, restored], enable_checkpointing=False
    )
    trainer.fit(module2, loader(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert recorder.trainable == [2, 3]  # epochs 2 and 3: the phase follows the epoch
    expected = saved["optimizer_states"][0]["state"]
    assert expected and restored.state.keys() == expected.keys()
    for key, tensors in expected.items():
        for name, value in tensors.items():
            assert torch.equal(restored.state[key][name], value)


def test_param_groups_include_frozen_parameters_without_state():
    layer = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    layer[0].weight.requires_grad_(False)
    groups = param_groups({"m": (layer, 0.5)})
    assert [g["name"] for g in groups] == ["m", "m_no_decay"]
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    apply_lr_mult(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5]
    layer(torch.randn(4, 2)).sum().backward()
    optimizer.step()
    assert len(optimizer.state[layer[0].weight]) == 0
    assert len(optimizer.state[layer[0].bias]) > 0


@pytest.mark.parametrize(
    "cfg",
    [
        {"strategy": "nope"},
        {"strategy": "full", "bn": "x"},
        {"strategy": "full", "y": 1},
        {"strategy": "full", "layer_decay": 0},
        {"strategy": "gradual", "milestones": [3, 1]},
        {"strategy": "lp_ft", "probe_epochs": 0},
    ],
)
def test_bad_strategy_config_is_a_user_error(cfg):
    with pytest.raises(UserError):
        build_strategy(cfg)


def test_partial_deeper_than_the_backbone_is_a_user_error():
    _network, strategy, module = make_module(CNN, {"strategy": "partial", "freeze_stages": 9})
    with pytest.raises(UserError, match="only 5 stages"):
        trainer_for(strategy, steps=1, enable_checkpointing=False).fit(module, loader())

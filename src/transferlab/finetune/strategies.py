"""Fine-tuning strategies as Lightning callbacks (``finetune=<name>``).

A strategy decides, for every epoch, how many of the backbone's top stages train (the head
always trains), and the learning rate of each stage. Every parameter is in the optimizer
from the start, in one group per stage, so unfreezing needs no optimizer surgery: newly
trainable groups simply start receiving gradients and follow the schedule, and a resumed
run gets its phase back from the epoch number. Frozen parameters have no gradient, so the
optimizer gives them no state and no weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from torch import nn

from transferlab.errors import UserError
from transferlab.finetune.stages import backbone_stages
from transferlab.optim import param_groups

BN_POLICIES = ("frozen", "eval", "train")
PROBE_SOLVERS = ("optimizer", "lbfgs")
ALL = math.inf


def set_requires_grad(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def is_frozen(module: nn.Module) -> bool:
    """A module is frozen when it has parameters of its own and none of them train."""
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def apply_bn_policy(network: nn.Module, policy: str) -> None:
    """Put ``network``'s (a backbone's) BatchNorm layers in eval mode as ``policy`` says.

    Only pretrained statistics are worth keeping: strategies apply this to the backbone,
    so BatchNorm in a new head or decoder always learns its statistics.

    ``frozen``: the layers whose parameters are frozen; ``eval``: all of them (their affine
    parameters still train); ``train``: none (PyTorch's default: even frozen layers update
    their statistics).
    """
    if policy == "train":
        return
    for layer in network.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and (
            policy == "eval" or is_frozen(layer)
        ):
            layer.eval()


class FinetuneStrategy(pl.Callback):
    """Base strategy: every stage trains from the start (``full``).

    The options have no defaults here: ``conf/finetune/<name>.yaml`` is their one source,
    and :func:`build_strategy` fills in what a caller leaves out from there.
    """

    name = "full"

    def __init__(
        self,
        *,
        backbone_lr_mult: float,
        layer_decay: float,
        bn: str,
        feature_cache: bool,
        probe_solver: str,
        probe_C: float,
    ) -> None:
        if bn not in BN_POLICIES:
            raise UserError(f"finetune.bn={bn!r} is not one of {', '.join(BN_POLICIES)}")
        if backbone_lr_mult < 0:
            raise UserError(f"finetune.backbone_lr_mult={backbone_lr_mult} must be >= 0")
        if not 0 < layer_decay <= 1:
            raise UserError(f"finetune.layer_decay={layer_decay} must be in (0, 1]")
        if probe_solver not in PROBE_SOLVERS:
            raise UserError(
                f"finetune.probe_solver={probe_solver!r} is not one of {', '.join(PROBE_SOLVERS)}"
            )
        if probe_C <= 0:
            raise UserError(f"finetune.probe_C={probe_C} must be > 0")
        self.probe_solver = probe_solver
        self.probe_C = float(probe_C)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.layer_decay = float(layer_decay)
        self.bn = bn
        self.feature_cache = bool(feature_cache)
        self.stages: list[list[str]] = []
        self._trainable: int | None = None
        self._logged: int | None = None
        self._head_solved = False

    # What trains when -------------------------------------------------------------------
    def trainable_stages(self, epoch: int, num_stages: int) -> int:
        """How many of the top backbone stages train during ``epoch``."""
        return num_stages

    def frozen_epochs(self) -> float:
        """Epochs, from the start, during which the whole backbone is frozen."""
        return 0

    def restart_epochs(self) -> list[int]:
        """Epochs at which the learning-rate schedule starts again (a new phase)."""
        return []

    def trainable_set_changes(self, num_stages: int, max_epochs: int) -> bool:
        """Whether the set of training parameters changes during a run of ``max_epochs``
        (stages unfreeze)."""
        counts = {self.trainable_stages(epoch, num_stages) for epoch in range(max_epochs)}
        return len(counts) > 1

    # Learning rates ---------------------------------------------------------------------
    def stage_lr_mults(self, num_stages: int) -> list[float]:
        """Stage i (0 = stem) learns at ``backbone_lr_mult * layer_decay ** (top - i)``."""
        top = num_stages - 1
        return [self.backbone_lr_mult * self.layer_decay ** (top - i) for i in range(num_stages)]

    def param_groups(self, network: nn.Module) -> list[dict]:
        """The head at lr x1, then one group per backbone stage at its multiplier."""
        stages = self.stages or backbone_stages(network.backbone)
        named = dict(network.backbone.named_parameters())
        modules: dict[str, tuple[Any, float]] = {"head": (network.head, 1.0)}
        for i, (names, mult) in enumerate(
            zip(stages, self.stage_lr_mults(len(stages)), strict=True)
        ):
            modules[f"backbone.{i}"] = ([(n, named[n]) for n in names], mult)
        return param_groups(modules)

    # Lightning hooks --------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        backbone = pl_module.network.backbone
        self.stages = backbone_stages(backbone)
        if trainer.world_size > 1 and self.trainable_set_changes(
            len(self.stages), int(trainer.max_epochs or 1)
        ):
            # DDP, which wraps the network after this hook, all-reduces only the parameters
            # that train then: all of them, until the first epoch starts.
            return
        self.apply(pl_module, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(pl_module, trainer.current_epoch)
        network = pl_module.network
        network.train()  # undo eval() of stages frozen in an earlier phase
        if self._trainable == 0:
            network.backbone.eval()  # frozen entirely: no dropout, no statistics updates
        apply_bn_policy(network.backbone, self.bn)  # the new head's BatchNorm always learns
        if self._trainable != self._logged and trainer.logger is not None:
            self._logged = self._trainable
            total = sum(p.numel() for p in network.parameters())
            trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
            trainer.logger.log_metrics(
                {
                    "params/total": total,
                    "params/trainable": trainable,
                    "finetune/trainable_stages": self._trainable,
                },
                step=trainer.global_step,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``probe_solver=lbfgs``, start the head at the converged logistic regression."""
        if self.probe_solver != "lbfgs" or trainer.current_epoch > 0 or self.frozen_epochs() == 0:
            return
        from transferlab.finetune.probe import fit_logistic_regression, linear_layer

        features = getattr(trainer.datamodule, "features", None)
        layer = linear_layer(pl_module.network.head)
        if features is None or layer is None:
            print(
                "probe_solver=lbfgs needs the feature cache and a linear head: the head "
                "trains with the optimizer instead.",
                flush=True,
            )
            return
        train = features("train")
        loss = fit_logistic_regression(layer, train.features, train.labels, C=self.probe_C)
        if trainer.world_size > 1:
            # Lightning's DDP cannot skip a step in which nothing trains.
            print(
                f"Linear head fitted by L-BFGS on {len(train)} cached features (loss "
                f"{loss:.4f}); under DDP it trains on from there while the backbone is frozen.",
                flush=True,
            )
            return
        self._head_solved = True
        self._trainable = None  # re-apply: the solved head now stays fixed while frozen
        self.apply(pl_module, trainer.current_epoch)
        print(
            f"Linear head fitted by L-BFGS on {len(train)} cached features (loss {loss:.4f}); "
            "it stays fixed while the backbone is frozen.",
            flush=True,
        )

    def apply(self, pl_module: pl.LightningModule, epoch: int) -> bool:
        """Set ``requires_grad`` for ``epoch``; True when the trainable set changed."""
        count = min(len(self.stages), self.trainable_stages(epoch, len(self.stages)))
        if count == self._trainable:
            return False
        named = dict(pl_module.network.backbone.named_parameters())
        first_trainable = len(self.stages) - count
        for i, names in enumerate(self.stages):
            for name in names:
                named[name].requires_grad_(i >= first_trainable)
        head_trains = count > 0 or not self._head_solved
        set_requires_grad(pl_module.network.head, head_trains)
        self._trainable = count
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable_stages": self._trainable,
            "head_solved": self._head_solved,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("name") not in (None, self.name):
            raise UserError(
                f"the checkpoint was trained with finetune={state_dict['name']}, "
                f"not {self.name}: resume with the same strategy"
            )
        # The phase was logged before the checkpoint: a resumed run does not log it again.
        self._logged = state_dict.get("trainable_stages")
        self._head_solved = bool(state_dict.get("head_solved", False))


class Full(FinetuneStrategy):
    """Everything trains; the backbone at ``lr * backbone_lr_mult``."""

    name = "full"


class LinearProbe(FinetuneStrategy):
    """The backbone is frozen, BatchNorm statistics and dropout included; the head trains."""

    name = "linear_probe"

    def trainable_stages(self, epoch: int, num_stages: int) -> int:
        return 0

    def frozen_epochs(self) -> float:
        return ALL


class Partial(FinetuneStrategy):
    """The first ``freeze_stages`` stages stay frozen; the rest trains."""

    name = "partial"

    def __init__(self, *, freeze_stages: int, **options: Any) -> None:
        super().__init__(**options)
        if freeze_stages < 0:
            raise UserError(f"finetune.freeze_stages={freeze_stages} must be >= 0")
        self.freeze_stages = int(freeze_stages)

    def trainable_stages(self, epoch: int, num_stages: int) -> int:
        if self.freeze_stages > num_stages:
            raise UserError(
                f"finetune.freeze_stages={self.freeze_stages}, but this backbone has only "
                f"{num_stages} stages"
            )
        return num_stages - self.freeze_stages


class Gradual(FinetuneStrategy):
    """Head first, then one more stage from the top at each milestone (ULMFiT style).

    Milestones are ``milestones`` (epochs) if given, else every ``unfreeze_every`` epochs;
    at most ``max_stages`` stages end up trainable (all when null).
    """

    name = "gradual"

    def __init__(
        self,
        *,
        unfreeze_every: int,
        milestones: Sequence[int] | None,
        max_stages: int | None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if milestones is not None and sorted(milestones) != list(milestones):
            raise UserError(f"finetune.milestones={list(milestones)} must be increasing")
        if unfreeze_every < 1:
            raise UserError(f"finetune.unfreeze_every={unfreeze_every} must be >= 1")
        self.unfreeze_every = int(unfreeze_every)
        self.milestones = [int(m) for m in milestones] if milestones is not None else None
        self.max_stages = max_stages

    def trainable_stages(self, epoch: int, num_stages: int) -> int:
        if self.milestones is not None:
            count = sum(epoch >= m for m in self.milestones)
        else:
            count = epoch // self.unfreeze_every
        cap = num_stages if self.max_stages is None else min(self.max_stages, num_stages)
        return min(count, cap)

    def frozen_epochs(self) -> float:
        if self.milestones is not None:
            return self.milestones[0] if self.milestones else ALL
        return self.unfreeze_every


class LinearProbeThenFinetune(FinetuneStrategy):
    """LP-FT (Kumar et al., 2022): a linear probe for ``probe_epochs``, then everything
    trains, the backbone at the lower ``lr * backbone_lr_mult``; the schedule restarts."""

    name = "lp_ft"

    def __init__(self, *, probe_epochs: int, **options: Any) -> None:
        super().__init__(**options)
        if probe_epochs < 1:
            raise UserError(f"finetune.probe_epochs={probe_epochs} must be >= 1")
        self.probe_epochs = int(probe_epochs)

    def trainable_stages(self, epoch: int, num_stages: int) -> int:
        return 0 if epoch < self.probe_epochs else num_stages

    def frozen_epochs(self) -> float:
        return self.probe_epochs

    def restart_epochs(self) -> list[int]:
        return [self.probe_epochs]


STRATEGIES: dict[str, type[FinetuneStrategy]] = {
    s.name: s for s in (Full, LinearProbe, Partial, Gradual, LinearProbeThenFinetune)
}


def strategy_defaults(name: str) -> dict[str, Any]:
    """The options ``conf/finetune/<name>.yaml`` sets, its ``defaults`` list merged first."""
    from transferlab.configs import option_values

    return option_values("finetune", name)


def build_strategy(cfg: Mapping[str, Any]) -> FinetuneStrategy:
    """The strategy named by ``cfg['strategy']``, built from the rest of ``cfg``.

    Options ``cfg`` leaves out take the values of the strategy's config file, so a strategy
    built in Python is the one ``finetune=<name>`` gives.
    """
    name = cfg.get("strategy")
    if name not in STRATEGIES:
        raise UserError(
            f"unknown finetune strategy {name!r}: choose one of {', '.join(STRATEGIES)}"
        )
    options = {**strategy_defaults(name), **cfg}
    options.pop("strategy")
    try:
        return STRATEGIES[name](**options)
    except TypeError as err:
        raise UserError(f"finetune={name}: {err}") from None

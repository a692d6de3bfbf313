"""Fine-tuning controls of the trainer: learning-rate multipliers by parameter name, a frozen backbone
(always or for the first epochs) and frozen BatchNorm statistics.

Everything here is a function of the model, the `TrainConfig` and the epoch, so a resumed run
rebuilds the same parameter groups and freezes the same parts at the same epochs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from m2det.engine.train_config import TrainConfig


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def lr_mult_of(name: str, lr_mults: dict[str, float]) -> float:
    """The multiplier of parameter `name`: that of the longest prefix (whole name parts) it starts with."""
    best = max((p for p in lr_mults if _matches(name, p)), key=len, default=None)
    return 1.0 if best is None else float(lr_mults[best])


def parameter_groups(model: nn.Module, lr_mults: dict[str, float]) -> list[dict[str, Any]]:
    """Optimiser parameter groups, one per multiplier (the full rate first), each with its `lr_mult`.

    A prefix that names no parameter is an error (a typo would otherwise silently train at full rate).
    """
    named = list(model.named_parameters())
    unknown = [p for p in lr_mults if not any(_matches(name, p) for name, _ in named)]
    if unknown:
        tops = sorted({name.split(".")[0] for name, _ in named})
        raise ValueError(
            f"train.lr_mults: {unknown} match no parameter of the model; prefixes are module paths "
            f"such as {', '.join(tops)}, head.conf, mlfpn.tums.0"
        )
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in named:
        groups.setdefault(lr_mult_of(name, lr_mults), []).append(param)
    order = sorted(groups, key=lambda m: (m != 1.0, -m))
    return [{"params": groups[m], "lr_mult": m} for m in order]


def backbone_frozen(config: TrainConfig, epoch: int) -> bool:
    """Whether the backbone is frozen during (0-based) `epoch`."""
    n = config.freeze_backbone_epochs
    return n == -1 or epoch < n


def set_backbone_trainable(model: nn.Module, trainable: bool) -> bool:
    """Turn the backbone's gradients on or off; True when anything changed."""
    changed = False
    for param in model.backbone.parameters():
        if param.requires_grad != trainable:
            param.requires_grad_(trainable)
            changed = True
    return changed


def _batchnorms_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def prepare_epoch(model: nn.Module, config: TrainConfig, epoch: int) -> bool:
    """Training mode for `epoch` with the configured parts frozen; True when the set of parameters
    that take gradients changed (a DDP wrapper must then be rebuilt).

    A frozen backbone takes no gradient and runs in eval mode (its BatchNorm statistics stay);
    `freeze_backbone_bn` keeps only the backbone's statistics; `freeze_bn` every BatchNorm's.
    """
    changed = False
    frozen = backbone_frozen(config, epoch)
    if config.freeze_backbone_epochs:
        changed = set_backbone_trainable(model, not frozen)
    model.train()
    if config.freeze_bn:
        _batchnorms_eval(model)
    if frozen:
        model.backbone.eval()
    elif config.freeze_backbone_bn:
        _batchnorms_eval(model.backbone)
    return changed

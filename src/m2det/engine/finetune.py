"""Fine-tuning controls of the trainer: learning-rate multipliers by parameter name, a frozen backbone
(always or for the first epochs) and frozen BatchNorm statistics.

Everything here is a function of the model, the `TrainConfig` and the epoch, so a resumed run
rebuilds the same parameter groups and freezes the same parts at the same epochs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from m2det.engine.train_config import TrainConfig
from m2det.errors import ConfigError

if TYPE_CHECKING:  # for annotations only
    from m2det.models.m2det import M2Det


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def lr_mult_of(name: str, lr_mults: dict[str, float]) -> float:
    """The multiplier of parameter `name`: that of the longest prefix (whole name parts) it starts with."""
    best = max((p for p in lr_mults if _matches(name, p)), key=len, default=None)
    return 1.0 if best is None else float(lr_mults[best])


NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that weight decay should spare: biases and normalisation layers' scales.

    Decaying a BatchNorm scale or a bias towards zero does not regularise the function (BatchNorm
    undoes any scale of the layer before it) and only fights the fit; detectors commonly exempt them.
    """
    names = {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names.update(f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters())
    return names


def parameter_groups(
    model: nn.Module, lr_mults: dict[str, float], no_decay_norm_bias: bool = False
) -> list[dict[str, Any]]:
    """Optimiser parameter groups, one per (multiplier, decay) pair (the full rate first), each with
    its `lr_mult`; with `no_decay_norm_bias`, the parameters of `no_decay_names` go to groups of
    `weight_decay` 0 (placed after the decayed group of the same multiplier).

    A prefix that names no parameter is an error (a typo would otherwise silently train at full rate).
    """
    named = list(model.named_parameters())
    unknown = [p for p in lr_mults if not any(_matches(name, p) for name, _ in named)]
    if unknown:
        tops = sorted({name.split(".")[0] for name, _ in named})
        raise ConfigError(
            f"train.lr_mults: {unknown} match no parameter of the model; prefixes are module paths "
            f"such as {', '.join(tops)}, head.conf, mlfpn.tums.0"
        )
    spared = no_decay_names(model) if no_decay_norm_bias else set()
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in named:
        groups.setdefault((lr_mult_of(name, lr_mults), name in spared), []).append(param)
    order = sorted(groups, key=lambda key: (key[0] != 1.0, -key[0], key[1]))
    return [
        {"params": groups[key], "lr_mult": key[0], **({"weight_decay": 0.0} if key[1] else {})}
        for key in order
    ]


def backbone_frozen(config: TrainConfig, epoch: int) -> bool:
    """Whether the backbone is frozen during (0-based) `epoch`."""
    n = config.freeze_backbone_epochs
    return n == -1 or epoch < n


def set_backbone_trainable(model: M2Det, trainable: bool) -> bool:
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


def prepare_epoch(model: M2Det, config: TrainConfig, epoch: int) -> bool:
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

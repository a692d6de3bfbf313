"""Training configuration: one small dataclass, its named presets, and reading it from YAML.

The same YAML file can hold the model (`model:`, see `m2det.config`) and the training settings
(`train:`), each either complete or `preset: NAME` plus overrides.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from m2det.config import dataclass_from_dict, read_yaml_mapping, replace_fields
from m2det.device import default_workers
from m2det.engine.schedule import LRSchedule

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, batching, precision, evaluation and checkpoint cadence.

    `batch_size` is the global batch (all processes together), so a schedule means the same on
    one GPU or eight. The defaults are the paper's: SGD momentum 0.9, weight decay 5e-4, batch 32,
    5 warm-up epochs, lr 2e-3, x0.1 at epochs 90 and 120, 150 epochs.
    """

    epochs: int = 150
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = "sgd"  # sgd (the paper's) | adamw
    momentum: float = 0.9  # SGD momentum; AdamW uses its default betas
    weight_decay: float = 5e-4
    warmup_epochs: float = 5.0
    warmup_start_lr: float = 1e-6
    policy: str = "step"  # step | cosine
    milestones: list[float] = field(default_factory=lambda: [90, 120])
    gamma: float = 0.1
    step_lrs: Optional[list[float]] = None  # explicit rate after each milestone (official configs)
    min_lr: float = 0.0  # floor of the cosine policy
    augment: bool = True  # the official SSD augmentation; False: resize only
    augment_settings: dict[str, Any] = field(default_factory=dict)  # m2det.data AugmentSettings overrides
    workers: int = field(default_factory=default_workers)  # min(4, usable cores - 1)
    amp: bool = True  # mixed precision; only takes effect on CUDA
    clip_grad: Optional[float] = None  # max global gradient norm, None = off
    eval_every: int = 10  # validate every N epochs (and after the last); 0 = only after the last
    save_every: int = 0  # also keep epoch_N.safetensors every N epochs; 0 = off
    best_metric: str = "AP"  # a COCO stat name (AP is AP@[.5:.95], AP50, ...) or VOC_AP / VOC_AP07
    seed: int = 0
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    freeze_bn: bool = False  # keep BatchNorm in eval mode: running statistics, no batch statistics
    # Fine-tuning (see docs/train.md): the backbone frozen (no gradient, BatchNorm in eval mode) for
    # the first N epochs, -1 for the whole run; only the backbone's BatchNorm statistics frozen; and
    # learning-rate multipliers by parameter-name prefix (the longest matching prefix wins), e.g.
    # {backbone: 0.1}. All three are part of the run's settings, so `--resume` repeats them.
    freeze_backbone_epochs: int = 0
    freeze_backbone_bn: bool = False
    lr_mults: dict[str, float] = field(default_factory=dict)
    loss_limit: float = 1e4  # a loss above this (or NaN/inf) stops the run
    log_every: int = 10  # TensorBoard scalars every N steps

    def validate(self) -> TrainConfig:
        """Raise a ValueError naming the field when a value cannot work."""
        positive = ("epochs", "batch_size", "lr", "loss_limit", "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("workers", "eval_every", "save_every", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.freeze_backbone_epochs, bool) or self.freeze_backbone_epochs < -1:
            raise ValueError(
                "train.freeze_backbone_epochs must be a number of epochs (0: never, -1: the whole run), "
                f"got {self.freeze_backbone_epochs!r}"
            )
        if not isinstance(self.lr_mults, dict) or not all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in self.lr_mults.items()
        ):
            raise ValueError(
                "train.lr_mults must map parameter-name prefixes to multipliers >= 0, e.g. "
                f"{{backbone: 0.1}}, got {self.lr_mults!r}"
            )
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"train.clip_grad must be > 0 or null, got {self.clip_grad}")
        from m2det.engine.evaluate import STAT_NAMES, VOC_NAMES

        if self.best_metric not in (*STAT_NAMES, *VOC_NAMES):
            raise ValueError(
                f"train.best_metric must be one of {(*STAT_NAMES, *VOC_NAMES)}, got {self.best_metric!r}"
            )
        try:
            self.schedule()
        except ValueError as exc:
            raise ValueError(f"train.{exc}") from None
        return self

    def schedule(self) -> LRSchedule:
        return LRSchedule(
            lr=self.lr,
            epochs=self.epochs,
            warmup_epochs=self.warmup_epochs,
            warmup_start_lr=self.warmup_start_lr,
            policy=self.policy,
            milestones=list(self.milestones),
            gamma=self.gamma,
            step_lrs=None if self.step_lrs is None else list(self.step_lrs),
            min_lr=self.min_lr,
        )

    def build_optimizer(self, parameters: Any) -> Any:
        """The optimiser over `parameters`, at `lr` (the scheduler rescales it every step)."""
        import torch

        if self.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def train_transform(self, input_size: int) -> Any:
        """The training transform to the square input (`m2det.data.build_train_transform`)."""
        from m2det.data.transforms import AugmentSettings, build_eval_transform, build_train_transform

        if not self.augment:
            return build_eval_transform(input_size)
        try:
            settings = dataclass_from_dict(AugmentSettings, self.augment_settings, "train.augment_settings")
        except (TypeError, KeyError) as exc:
            raise ValueError(str(exc)) from None
        return build_train_transform(input_size, settings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from a mapping; `preset: NAME` starts from that preset."""
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            return get_train_config(preset, **data)
        return dataclass_from_dict(cls, data, "train").validate()

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> TrainConfig:
        """The `train:` section of a YAML file (the paper's defaults when the file has none)."""
        return cls.from_mapping(read_yaml_mapping(path), path)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: Union[str, Path]) -> TrainConfig:
        """The `train:` section of a config file's content; errors name `where`."""
        try:
            return cls.from_dict(data.get("train") or {})
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{where}: {exc}") from None


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The paper: warm-up 5 epochs, 2e-3, x0.1 at 90 and 120, stop at 150, batch 32.
    "paper": {},
    # The official configs: warm-up to 4e-3, then 2e-3 / 4e-4 / 4e-5 / 4e-6 from epochs 90 / 110 /
    # 130 / 150, end at 160 (16 images per GPU, the paper's 32 in total on two).
    "official": {
        "epochs": 160,
        "lr": 4e-3,
        "milestones": [90, 110, 130, 150],
        "step_lrs": [2e-3, 4e-4, 4e-5, 4e-6],
    },
    # Starting from a trained detector (`m2det train --weights`) on a small data set: a short cosine
    # run with AdamW after a one-epoch warm-up, the backbone at a tenth of the rate, its BatchNorm
    # statistics kept (small batches estimate them badly). See docs/train.md.
    "finetune": {
        "epochs": 30,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.05,
        "warmup_epochs": 1.0,
        "warmup_start_lr": 1e-5,
        "policy": "cosine",
        "milestones": [],
        "clip_grad": 10.0,
        "eval_every": 5,
        "freeze_backbone_bn": True,
        "lr_mults": {"backbone": 0.1},
    },
}


def get_train_config(name: str = "paper", **overrides: Any) -> TrainConfig:
    """A training preset with field overrides, validated."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; available: {', '.join(TRAIN_PRESETS)}")
    preset = copy.deepcopy(TRAIN_PRESETS[name])  # the instance must not share the preset's lists
    return dataclass_from_dict(TrainConfig, {**preset, **overrides}, "train").validate()


def with_train_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """A validated copy of `config` with fields replaced (e.g. from `--set train.epochs=10`); see
    `m2det.config.replace_fields` for dotted keys."""
    return replace_fields(config, overrides, "train").validate()

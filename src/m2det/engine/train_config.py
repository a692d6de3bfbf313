"""Training configuration: one small dataclass, its named presets, and reading it from YAML.

The same YAML file can hold the model (`model:`, see `m2det.config`) and the training settings
(`train:`), each either complete or `preset: NAME` plus overrides.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from m2det.config import dataclass_from_dict, read_yaml_mapping, replace_fields
from m2det.device import default_workers
from m2det.engine.schedule import LRSchedule
from m2det.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
MATCHERS = ("iou", "atss")


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, batching, precision, evaluation and checkpoint cadence.

    `batch_size` is the global batch (all processes together), so a schedule means the same on
    one GPU or eight. The defaults are the paper's: SGD momentum 0.9, weight decay 5e-4, batch 32,
    5 warm-up epochs, lr 2e-3, x0.1 at epochs 90 and 120, 150 epochs, every addition off. They
    stay so (a resumed run's stored settings lack the fields added after it, which must mean
    "off"); the recipe `m2det train` starts from is `DEFAULT_PRESET`.
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
    # Also write TensorBoard scalars (needs `pip install 'm2det[tensorboard]'`); results.csv and
    # loss_curve.png hold the epoch figures either way.
    tensorboard: bool = False
    # Training recipe options beyond the paper (all off by default; see docs/train.md and the
    # `modern` preset).
    no_decay_norm_bias: bool = False  # no weight decay on biases and normalisation layers
    patience: int = 0  # early stopping: end after N epochs without a better best_metric; 0 = off
    ema: bool = False  # validate and save an exponential moving average of the weights
    ema_decay: float = 0.9999  # its decay d, ramped as d * (1 - exp(-updates / ema_tau))
    ema_tau: float = 2000.0  # in optimiser steps
    # A wall-clock budget for the whole run (`m2det train --time MINUTES`): the schedule of `epochs`
    # epochs (warm-up, decay) is stretched or squeezed onto it and the run ends when it is spent,
    # however many epochs that is. None: the run lasts `epochs` epochs.
    time_limit_min: Optional[float] = None
    # The loss (see m2det.boxes.loss): label smoothing of the classification cross-entropy, the box
    # loss (smooth_l1, the paper's, on encoded offsets, or giou / diou / ciou on decoded boxes) and
    # its weight, and the matcher (iou: the paper's 0.5-IoU rule; atss: adaptive thresholds from
    # the atss_topk anchor locations nearest each box on every pyramid level).
    label_smoothing: float = 0.0
    box_loss: str = "smooth_l1"
    box_loss_weight: float = 1.0
    matcher: str = "iou"
    atss_topk: int = 9
    # Mixing samples (m2det.data.transforms.MosaicMixup), after the SSD augmentation of each: the
    # probability of a 4-image mosaic and of a mixup with a second sample; both off for the last
    # close_mosaic epochs (with a time budget: the last close_mosaic / epochs of it).
    mosaic: float = 0.0
    mixup: float = 0.0
    close_mosaic: int = 0
    # Multi-scale training: each step's input size drawn from these (multiples of 32; the anchors
    # follow the size); empty: always the model's input size.
    multiscale_sizes: list[int] = field(default_factory=list)

    def validate(self) -> TrainConfig:
        """Raise a ValueError naming the field when a value cannot work."""
        positive = ("epochs", "batch_size", "lr", "loss_limit", "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        for name in ("workers", "eval_every", "save_every", "weight_decay", "momentum", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.freeze_backbone_epochs, bool) or self.freeze_backbone_epochs < -1:
            raise ConfigError(
                "train.freeze_backbone_epochs must be a number of epochs (0: never, -1: the whole run), "
                f"got {self.freeze_backbone_epochs!r}"
            )
        if not isinstance(self.lr_mults, dict) or not all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in self.lr_mults.items()
        ):
            raise ConfigError(
                "train.lr_mults must map parameter-name prefixes to multipliers >= 0, e.g. "
                f"{{backbone: 0.1}}, got {self.lr_mults!r}"
            )
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in (0, 1), got {self.ema_decay}")
        if not self.ema_tau > 0:
            raise ConfigError(f"train.ema_tau must be > 0 (optimiser steps), got {self.ema_tau}")
        if self.time_limit_min is not None and not self.time_limit_min > 0:
            raise ConfigError(f"train.time_limit_min must be > 0 minutes or null, got {self.time_limit_min}")
        self._validate_loss()
        self._validate_mixing()
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"train.clip_grad must be > 0 or null, got {self.clip_grad}")
        from m2det.engine.evaluate import STAT_NAMES, VOC_NAMES

        if self.best_metric not in (*STAT_NAMES, *VOC_NAMES):
            raise ConfigError(
                f"train.best_metric must be one of {(*STAT_NAMES, *VOC_NAMES)}, got {self.best_metric!r}"
            )
        try:
            self.schedule()
        except ValueError as exc:
            raise ConfigError(f"train.{exc}") from None
        return self

    def _validate_loss(self) -> None:
        from m2det.boxes.loss import BOX_LOSSES

        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.box_loss not in BOX_LOSSES:
            raise ConfigError(f"train.box_loss must be one of {BOX_LOSSES}, got {self.box_loss!r}")
        if not self.box_loss_weight > 0:
            raise ConfigError(f"train.box_loss_weight must be > 0, got {self.box_loss_weight}")
        if self.matcher not in MATCHERS:
            raise ConfigError(f"train.matcher must be one of {MATCHERS}, got {self.matcher!r}")
        if not _whole(self.atss_topk) or self.atss_topk < 1:
            raise ConfigError(f"train.atss_topk must be a whole number >= 1, got {self.atss_topk!r}")

    def _validate_mixing(self) -> None:
        for name in ("mosaic", "mixup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not _whole(self.close_mosaic) or self.close_mosaic < 0:
            raise ConfigError(
                f"train.close_mosaic must be a number of epochs >= 0, got {self.close_mosaic!r}"
            )
        sizes = self.multiscale_sizes
        if not isinstance(sizes, list) or not all(_whole(v) and v >= 32 and v % 32 == 0 for v in sizes):
            raise ConfigError(
                f"train.multiscale_sizes must be a list of input sizes that are multiples of 32, e.g. "
                f"[256, 320, 384], got {sizes!r}"
            )

    def wrap_train_set(self, dataset: Any) -> Any:
        """The training data as the trainer feeds it: mixed by `MosaicMixup` when `mosaic` or `mixup`
        is on, else `dataset` itself."""
        if not (self.mosaic or self.mixup):
            return dataset
        from m2det.data.transforms import MosaicMixup

        return MosaicMixup(dataset, self.mosaic, self.mixup, self.augmentation().min_box_fraction)

    def build_loss(self, model: Any) -> Any:
        """The multibox loss of these settings for `model` (an M2Det: its box coder and anchors per
        location); with the defaults, the paper's."""
        from m2det.boxes.loss import MultiBoxLoss
        from m2det.boxes.matcher import AnchorMatcher, ATSSMatcher

        if self.matcher == "atss":
            matcher: Any = ATSSMatcher(self.atss_topk * model.config.anchors.num_anchors_per_location)
        else:
            matcher = AnchorMatcher(0.5)
        return MultiBoxLoss(
            model.box_coder,
            label_smoothing=self.label_smoothing,
            box_loss=self.box_loss,
            box_loss_weight=self.box_loss_weight,
            matcher=matcher,
        )

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
        from m2det.data.transforms import build_eval_transform, build_train_transform

        if not self.augment:
            return build_eval_transform(input_size)
        return build_train_transform(input_size, self.augmentation())

    def augmentation(self) -> Any:
        """`augment_settings` as an `m2det.data.AugmentSettings` (the official ones where not given)."""
        from m2det.data.transforms import AugmentSettings

        return dataclass_from_dict(AugmentSettings, self.augment_settings, "train.augment_settings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from a mapping; `preset: NAME` starts from that preset."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"train: expected a mapping of training settings, got {data!r}")
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
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _whole(value: Any) -> bool:
    """An int that is not a bool (YAML's `true` would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The paper's recipe, spelled out so that it stays the paper's whatever the field defaults become:
# SGD momentum 0.9, weight decay 5e-4 on everything, batch 32, 5 warm-up epochs from 1e-6 to 2e-3,
# x0.1 at epochs 90 and 120, 150 epochs, the SSD augmentation, smooth-L1 box loss, the 0.5-IoU
# matcher, no weight averaging. Every preset starts from it.
PAPER_RECIPE: dict[str, Any] = {
    "epochs": 150,
    "batch_size": 32,
    "lr": 2e-3,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 5.0,
    "warmup_start_lr": 1e-6,
    "policy": "step",
    "milestones": [90, 120],
    "gamma": 0.1,
    "step_lrs": None,
    "min_lr": 0.0,
    "augment": True,
    "augment_settings": {},
    "clip_grad": None,
    "no_decay_norm_bias": False,
    "ema": False,
    "label_smoothing": 0.0,
    "box_loss": "smooth_l1",
    "box_loss_weight": 1.0,
    "matcher": "iou",
    "mosaic": 0.0,
    "mixup": 0.0,
    "multiscale_sizes": [],
}

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
    # From scratch, the network still the paper's: the paper's losses and matcher with AdamW at 2e-3
    # (weight decay 0.05), batch 8, a warm-up from lr/10 over the first twelfth of the schedule, a
    # cosine to 0 and gradients clipped at 10. It learns the most of the recipes measured in the same
    # CPU budget on BCCD (benchmarks/recipes_bccd.py; docs/train.md), so it is `DEFAULT_PRESET`. With
    # `--time`, the 120 epochs are stretched onto the budget: only the warm-up's share (1/12) counts.
    "adamw_cosine": {
        "epochs": 120,
        "batch_size": 8,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "warmup_epochs": 10.0,
        "warmup_start_lr": 2e-4,
        "policy": "cosine",
        "milestones": [],
        "min_lr": 0.0,
        "clip_grad": 10.0,
    },
    # From scratch on a small data set, the network still the paper's: what current one-stage
    # detectors train with (AdamW without decay on norms and biases, a cosine after a short warm-up,
    # gradient clipping, an EMA of the weights). See docs/train.md.
    "modern": {
        "epochs": 100,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 0.05,
        "no_decay_norm_bias": True,
        "warmup_epochs": 3.0,
        "warmup_start_lr": 1e-5,
        "policy": "cosine",
        "milestones": [],
        "min_lr": 2e-5,
        "clip_grad": 10.0,
        "ema": True,
        "label_smoothing": 0.05,
        "box_loss": "giou",
        "box_loss_weight": 2.0,
        "matcher": "atss",
        "atss_topk": 9,
        "mosaic": 1.0,
        "close_mosaic": 10,
    },
}

# What `m2det train` starts from without --config or --weights; the recipe benchmark decides it
# (`paper` reproduces the paper and stays one `--set train.preset=paper` away).
DEFAULT_PRESET = "adamw_cosine"


def get_train_config(name: str = DEFAULT_PRESET, **overrides: Any) -> TrainConfig:
    """A training preset (the paper's recipe plus the preset's changes) with field overrides (dotted
    keys too, see `m2det.config.replace_fields`), validated."""
    if not isinstance(name, str) or name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {name!r}; available: {', '.join(TRAIN_PRESETS)}")
    # the instance must not share the presets' lists
    preset = dataclass_from_dict(TrainConfig, copy.deepcopy({**PAPER_RECIPE, **TRAIN_PRESETS[name]}), "train")
    return with_train_overrides(preset, **overrides)


def with_train_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """A validated copy of `config` with fields replaced (e.g. from `--set train.epochs=10`); see
    `m2det.config.replace_fields` for dotted keys."""
    return replace_fields(config, overrides, "train").validate()


def build_train_config(
    section: Mapping[str, Any],
    overrides: Mapping[str, Any],
    default_preset: str = DEFAULT_PRESET,
    where: Union[str, Path] = "train",
) -> TrainConfig:
    """The training settings of a config file's `train:` section and `--set` overrides, in this
    order: the preset that `overrides` name (`preset`), else the section's `preset:`, else
    `default_preset`; the section's other fields (errors name `where`); then the other overrides.
    A `train:` section thus changes the recipe a command starts from, as ultralytics' cfg does."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: train: expected a mapping of training settings, got {section!r}")
    fields, rest = dict(section), dict(overrides)
    preset = rest.pop("preset", None) or fields.pop("preset", None) or default_preset
    fields.pop("preset", None)
    config = TrainConfig.from_mapping({"train": {"preset": preset, **fields}}, where)
    return with_train_overrides(config, **rest)

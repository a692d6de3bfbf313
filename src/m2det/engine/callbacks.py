"""Trainer callbacks: hooks into the training loop for logging, early stopping, weight averaging, ...

A callback subclasses `Callback` and overrides the hooks it needs (the others do nothing). Each hook
receives the `TrainingRun` (`m2det.engine.train`): a callback reads its attributes (`model`,
`optimizer`, `config`, `epoch`, `step`, `metrics`, `position`, ...) and acts through it
(`run.request_stop(reason)` ends the run after the current epoch, `run.eval_model` is the model that
is validated and saved). Hooks run in this order, on every process:

    on_train_start
    per epoch: on_epoch_start, on_step_end after every optimiser step,
               on_validation_end (when the epoch was validated), on_epoch_end (before its checkpoint)
    on_train_end (after a run that ended without an error)

A callback with state returns it from `state_dict` (tensors and plain values only); it is saved in
every checkpoint and handed back to `load_state_dict` on `--resume`, before `on_train_start`, so
that a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Generic, Optional, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from m2det.engine.train import TrainingRun
    from m2det.models.m2det import M2Det

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


class Callback:
    """Base class: every hook does nothing."""

    def on_train_start(self, run: TrainingRun) -> None:
        """After the model, optimiser and data are built (and restored on resume), before the first epoch."""

    def on_epoch_start(self, run: TrainingRun) -> None:
        """Before the epoch's first step (the data loader's workers start after it)."""

    def on_step_end(self, run: TrainingRun, losses: dict[str, float]) -> None:
        """After an optimiser step; `losses` holds `loss`, `loss_box`, `loss_cls` averaged over processes."""

    def on_validation_end(self, run: TrainingRun, metrics: dict[str, float]) -> None:
        """After a validation (`metrics` as in `run.metrics`; every process gets rank 0's)."""

    def on_epoch_end(self, run: TrainingRun) -> None:
        """After the epoch (and its validation), before its checkpoint is written."""

    def on_train_end(self, run: TrainingRun) -> None:
        """After the last epoch of a run that ended without an error."""

    def state_dict(self) -> dict[str, Any]:
        """What `--resume` needs to continue exactly (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned."""


class EarlyStopping(Callback):
    """End the run when `best_metric` has not improved for `patience` epochs (checked at validations).

    Stateless: the run's checkpoint holds the best epoch, so a resumed run decides the same way.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 epoch, got {patience}")
        self.patience = int(patience)

    def on_validation_end(self, run: TrainingRun, metrics: dict[str, float]) -> None:
        if run.best_epoch is not None and run.epoch - run.best_epoch >= self.patience:
            since = run.epoch - run.best_epoch
            run.request_stop(
                f"early stopping: {run.config.best_metric} has not improved for {since} epochs (best "
                f"{run.best_metric:.4f} at epoch {run.best_epoch}, train.patience={self.patience})"
            )


class ModelEMA(Generic[_ModuleT]):
    """An exponential moving average of a model's parameters, as ultralytics' `ModelEMA`.

    After the n-th update, `ema = d * ema + (1 - d) * model` with `d = decay * (1 - exp(-n / tau))`:
    the ramp keeps the average from clinging to the random initial weights early in a run. Buffers
    (BatchNorm running statistics) are copied from the model, not averaged.
    """

    def __init__(self, model: _ModuleT, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if tau <= 0:
            raise ValueError(f"EMA tau must be > 0 updates, got {tau}")
        self.module: _ModuleT = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.tau, self.updates = float(decay), float(tau), int(updates)

    def decay_at(self, updates: int) -> float:
        """The weight `d` of the average at the `updates`-th update."""
        return self.decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in the model's current parameters; copy its buffers."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        for ema_param, param in zip(self.module.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), weight)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


class EMA(Callback):
    """Train with `ModelEMA`: updated after every step; the average is what is validated and saved.

    The run's model files (`last`, `best`, `epoch_N`) hold the average; the checkpoint's state also
    holds the raw training weights (see `TrainingRun`) and this callback the update count, so that
    `--resume` continues exactly.
    """

    def __init__(self, decay: float = 0.9999, tau: float = 2000.0) -> None:
        self.decay, self.tau = decay, tau
        self.updates = 0
        self.ema: Optional[ModelEMA[M2Det]] = None

    def on_train_start(self, run: TrainingRun) -> None:
        self.ema = ModelEMA(run.model, self.decay, self.tau, self.updates)
        if run.restored_eval_weights is not None:  # resumed: the average was the saved model
            self.ema.module.load_state_dict(run.restored_eval_weights)
        run.eval_model = self.ema.module

    def on_step_end(self, run: TrainingRun, losses: dict[str, float]) -> None:
        assert self.ema is not None
        self.ema.update(run.model)
        self.updates = self.ema.updates

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])


class CloseMosaic(Callback):
    """Turn the mixing of samples (mosaic, mixup) off for the last `epochs` epochs of the schedule, as
    ultralytics' `close_mosaic`: the last epochs see images as evaluation will. Decided at each
    epoch's start from the schedule position, so a resumed run decides the same way."""

    def __init__(self, epochs: int) -> None:
        self.epochs = int(epochs)

    def on_epoch_start(self, run: TrainingRun) -> None:
        train_set: Any = run.train_set  # any data set with an `enabled` switch (`MosaicMixup`)
        mixing = getattr(train_set, "enabled", None)
        if mixing is not None:
            train_set.enabled = run.position < run.config.epochs - self.epochs

"""The training loop: SGD (or AdamW) with warm-up and decay, AMP on CUDA, DDP, logs, validation, checkpoints.

A run folder holds `last.safetensors` + its `last_state_*.pt` (written after every epoch, together
they resume the run exactly; see `m2det.engine.checkpoint_state`), `best.safetensors` (best
validation metric), optional `epoch_N.safetensors`, `results.csv` (one row per epoch),
`loss_curve.png` and, with `tensorboard` (an optional extra), `tensorboard/`. Under DDP only rank 0 writes. A NaN or exploding loss stops
the run before the bad step is applied, and a failed write (a full disk) leaves the previous
checkpoint, so the checkpoint of the last finished epoch stays the last good one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from m2det.classes import class_mismatch
from m2det.config import ModelConfig
from m2det.device import usable_cores
from m2det.engine import distributed
from m2det.engine.callbacks import EMA, Callback, CloseMosaic, EarlyStopping
from m2det.engine.checkpoint_state import (
    LAST_MODEL,
    capture_rng_state,
    load_checkpoint,
    named_state,
    remove_stale_files,
    restore_rng_state,
    save_checkpoint,
)
from m2det.engine.finetune import parameter_groups, prepare_epoch
from m2det.engine.plots import plot_loss_curve
from m2det.engine.schedule import TimeBudget, build_scheduler
from m2det.engine.train_config import TrainConfig
from m2det.errors import ConfigError, M2DetError
from m2det.io.atomic import atomic_path
from m2det.io.checkpoint import load_weights, save_model
from m2det.progress import progress_bar

if TYPE_CHECKING:  # for annotations only
    from m2det.models.m2det import M2Det

PathLike = Union[str, Path]

logger = logging.getLogger("m2det.train")

BEST_MODEL = "best.safetensors"
RESULTS_CSV = "results.csv"
TENSORBOARD_DIR = "tensorboard"
CONFIG_FILE = "config.yaml"
LOSS_CURVE = "loss_curve.png"
REPORTED_METRICS = ("AP", "AP50", "AP75")
LOSS_TERMS = ("loss", "loss_box", "loss_cls")
CSV_FIELDS = (
    "epoch",
    "step",
    "lr",
    *LOSS_TERMS,
    "images_per_s",
    "seconds",
    *REPORTED_METRICS,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exceeded `train.loss_limit`; the run stopped before applying the step."""


@dataclass
class TrainResult:
    """What a `Trainer.fit` call did: where, how far, how well, how fast."""

    run_dir: Path
    epoch: int  # epochs completed in total
    step: int
    finished: bool  # all `config.epochs` done, or ended by a callback (`stop_reason`)
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    seconds: float = 0.0  # wall time of this call
    images_per_second: float = 0.0  # training throughput of this call (validation excluded)
    stop_reason: Optional[str] = None  # why the run ended before `config.epochs` (early stopping, ...)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_threads(workers: int) -> int:
    """Compute threads for CPU training: one per core not taken by a data worker (at least one).

    More threads than free cores make PyTorch's CPU kernels wait on each other; on a shared
    two-core machine that slows training down several times instead of speeding it up.
    """
    return max(1, usable_cores() - workers)


def resolve_resume(path: PathLike) -> Path:
    """The run folder of `--resume PATH` (the folder or a file in it), checked to hold a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: no such run folder")
    run_dir = path if path.is_dir() else path.parent
    if named_state(run_dir) is None:
        raise FileNotFoundError(
            f"--resume {path}: {run_dir} holds no checkpoint ({LAST_MODEL} not found; a run writes it "
            f"when its first epoch ends)"
        )
    return run_dir


class Trainer:
    """Trains an M2Det on a detection data set (see `m2det.data`), alone or as one DDP process.

    `train_set` yields training samples already transformed to the model's square input
    (`m2det.data.build_train_transform`); `val_set` yields images of any size with targets in
    their original pixels and provides `coco_gt()` (it is scored by `m2det.engine.evaluate`).
    `callbacks` (`m2det.engine.callbacks`) run after those the config asks for (e.g. early
    stopping); `clock` is the time source of time limits (tests pass a fake one).

    `progress` shows a progress bar; the per-epoch lines are log records of `m2det.train` (INFO),
    shown where logging is configured (`m2det.progress.show_logs` for a terminal). The caller's
    `model.config` is not changed: the data's class names go into the run's files only.
    """

    def __init__(
        self,
        model: M2Det,
        config: TrainConfig,
        train_set: Dataset,
        val_set: Optional[Dataset] = None,
        *,
        run_dir: PathLike,
        device: str = "auto",
        progress: bool = True,
        callbacks: Sequence[Callback] = (),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.config = config.validate()
        self.train_set = train_set
        self.val_set = val_set
        self.run_dir = Path(run_dir)
        self.device_name = device
        self.progress = progress
        self.callbacks = list(callbacks)
        self.clock = clock
        # what the model files and config.yaml record as the model's config (see `_with_data_classes`)
        self.model_config = self._with_data_classes()

    def _with_data_classes(self) -> ModelConfig:
        """The model's config as the run's files record it: with the training data's class names
        when the model has none. A copy: the caller's `model.config` stays as it was given."""
        config = self.model.config
        names = getattr(self.train_set, "class_names", None)
        if names is None:
            return config
        own = config.class_names if config.class_names is not None else config.num_classes - 1
        problem = class_mismatch(own, names, "the model", "the training data")
        if problem:
            raise M2DetError(f"{problem}: build the model with num_classes={len(names) + 1} and those names")
        if config.class_names is None:
            return dataclasses.replace(config, class_names=list(names))
        return config

    # ----- the whole run -----
    def fit(
        self, resume: bool = False, stop_at_epoch: Optional[int] = None, time_limit_s: Optional[float] = None
    ) -> TrainResult:
        """Train to `config.epochs` (continuing from the run folder's last checkpoint if `resume`).

        `stop_at_epoch` and `time_limit_s` end this call early, after a finished epoch and its
        checkpoint, leaving a run that `resume=True` continues as if it had never stopped.
        """
        joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        info, device = distributed.setup(self.device_name)
        try:
            return TrainingRun(self, info, device).run(resume, stop_at_epoch, time_limit_s)
        finally:
            if joined_here:
                distributed.cleanup()


def tensorboard_writer_class() -> Any:
    """TensorBoard's `SummaryWriter`, or an error saying how to install it (an optional extra: its
    dependencies weigh ~50 MB and results.csv holds the epoch figures without it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module needs the tensorboard package
        raise ConfigError(
            "train.tensorboard=true needs TensorBoard: pip install 'm2det[tensorboard]' "
            "(or leave it off: results.csv and loss_curve.png hold the epoch figures)"
        ) from None
    return SummaryWriter


class TrainingRun:
    """One `fit` call's state: the wrapped model, optimiser, scheduler, loader, writers and counters.

    Callbacks (`m2det.engine.callbacks`) receive it. What they may read: `config`, `model` (the
    module being trained, unwrapped), `eval_model` (what is validated and saved: `model` unless a
    callback such as EMA replaces it; `model` takes its weights when the `fit` call returns),
    `optimizer`, `scheduler`, `train_set` (as fed to the loader), `epoch` (epochs finished), `step`
    (optimiser steps taken), `steps_per_epoch`, `position` (the schedule's fractional epoch),
    `metrics` (the last validation), `best_metric`, `best_epoch`, `run_dir`, `info` (rank, world
    size), `device`, `restored_eval_weights`. What they may do: `request_stop`, set `eval_model`.
    """

    def __init__(self, trainer: Trainer, info: distributed.DistInfo, device: torch.device) -> None:
        self.trainer = trainer
        self.info = info
        self.device = device
        self.config = trainer.config
        self.model = trainer.model
        self.eval_model: M2Det = trainer.model  # the model validated and saved (an EMA's average)
        self.train_set = trainer.train_set
        self.run_dir = trainer.run_dir
        self.clock = trainer.clock
        self.epoch = 0
        self.step = 0
        self.best_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.metrics: dict[str, float] = {}
        self.validated_at = -1
        self.saved_epoch = 0  # the epoch of the run folder's checkpoint (0: none of this run)
        self.stop_reason: Optional[str] = None  # set by `request_stop`; saved, so a resume stays stopped
        # the weights of `eval_model` read from the checkpoint when it was not `model` (EMA): the
        # callback that replaces `eval_model` loads them
        self.restored_eval_weights: Optional[dict[str, Tensor]] = None
        self.callbacks: list[Callback] = []
        self.budget: Optional[TimeBudget] = None  # `config.time_limit_min`, see `_build`
        self.spent = 0.0  # the fraction of the budget spent, as all processes agree (see `_train_step`)
        self.writer: Any = None  # TensorBoard's, when asked for
        self.logs_open = False
        self.bar: Any = None

    @property
    def position(self) -> float:
        """Where the run is on its schedule, in (fractional) epochs; with a time budget, the epoch
        of the `config.epochs`-epoch schedule that the time spent corresponds to."""
        if self.budget is not None:
            return self.config.epochs * self.spent
        return self.step / self.steps_per_epoch

    @property
    def done(self) -> bool:
        """All epochs trained (or the time budget spent), or stopped for good by a callback."""
        if self.stop_reason is not None:
            return True
        if self.budget is not None:
            return self.spent >= 1.0
        return self.epoch >= self.config.epochs

    def request_stop(self, reason: str) -> None:
        """End the run after the current epoch (validated and saved) for `reason`; a resume keeps it ended."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def _callback(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def _build_callbacks(self, state: Optional[dict[str, Any]]) -> None:
        """The config's callbacks, then the trainer's; on resume each gets its saved state back."""
        config = self.config
        callbacks: list[Callback] = []
        if config.ema:
            callbacks.append(EMA(config.ema_decay, config.ema_tau))
        if config.patience:
            callbacks.append(EarlyStopping(config.patience))
        if config.close_mosaic:
            callbacks.append(CloseMosaic(config.close_mosaic))
        self.callbacks = callbacks + self.trainer.callbacks
        saved = state.get("callbacks", {}) if state is not None else {}
        for key, callback in self._callback_keys():
            if key in saved:
                callback.load_state_dict(saved[key])

    def _callback_keys(self) -> list[tuple[str, Callback]]:
        """A stable name per callback for the checkpoint: its class name and its place in the list."""
        return [(f"{i}:{type(c).__name__}", c) for i, c in enumerate(self.callbacks)]

    # ----- setup -----
    def _restore(self) -> dict[str, Any]:
        """Read the run folder's last checkpoint: weights now, the rest returned for later."""
        checkpoint = load_checkpoint(self.run_dir)
        state = checkpoint.state
        stored = TrainConfig.from_dict(state["train_config"])
        if stored != self.config and self.info.is_main:
            self._print(f"resuming with the run's own training settings from {checkpoint.state_path}")
        self.config = stored
        load_weights(self.model, checkpoint.model_path)
        if "train_model" in state:  # the model file holds another model's weights (EMA): keep those
            self.restored_eval_weights = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(state["train_model"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.saved_epoch = self.epoch
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.metrics = dict(state["metrics"])
        self.stop_reason = state.get("stop_reason")
        return state

    def _build(self, state: Optional[dict[str, Any]]) -> None:
        config, info = self.config, self.info
        if config.batch_size % info.world_size:
            raise ConfigError(
                f"train.batch_size={config.batch_size} (the global batch) must be divisible by the "
                f"number of processes ({info.world_size})"
            )
        self.model.to(self.device)
        if config.sync_bn and info.is_distributed:
            if self.device.type != "cuda":
                raise ConfigError("train.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.eval_model = self.model
        self.model.loss_fn = config.build_loss(self.model)  # the training settings own the loss
        for size in config.multiscale_sizes:
            try:
                self.model.anchors(size)
            except ValueError as exc:
                raise ConfigError(f"train.multiscale_sizes: {exc}") from None
        self._wrap()
        self.loader = self._loader()
        self.steps_per_epoch = len(self.loader)
        self.optimizer = config.build_optimizer(
            parameter_groups(self.model, config.lr_mults, config.no_decay_norm_bias)
        )
        if config.time_limit_min is not None:
            spent_before = float(state.get("elapsed_s") or 0.0) if state is not None else 0.0
            self.budget = TimeBudget(config.time_limit_min * 60.0, self.clock, spent_before)
            self.spent = self.budget.fraction(spent_before)
        self.scheduler = build_scheduler(
            self.optimizer,
            config.schedule(),
            self.steps_per_epoch,
            (lambda: self.spent) if self.budget is not None else None,
        )
        self.use_amp = config.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp)
        if state is None:
            seed_everything(config.seed + info.rank)
            return
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise M2DetError(
                f"{self.run_dir}: the run had {state['steps_per_epoch']} steps per epoch, this one has "
                f"{self.steps_per_epoch}; resume with the same data and train.batch_size"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) != info.world_size and info.is_main:
            self._print(f"the run had {len(rng)} processes, now {info.world_size}: data order will differ")
        restore_rng_state(rng[info.rank % len(rng)])

    def _wrap(self) -> None:
        """The network the steps run: the model, or its DDP wrapper (rebuilt when the parameters that
        take gradients change, e.g. when a frozen backbone is released)."""
        self.network: nn.Module = self.model
        if self.info.is_distributed:
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _loader(self) -> DataLoader:
        from m2det.data import build_loader

        config, info = self.config, self.info
        per_process = config.batch_size // info.world_size
        self.train_set = config.wrap_train_set(self.trainer.train_set)
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            self.train_set,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=False,
        )
        # Seeded again every epoch (see `_epoch`), so worker augmentation depends on (seed, epoch, rank) only.
        self.generator = torch.Generator()
        loader = build_loader(
            self.train_set,
            per_process,
            shuffle=False,  # the sampler shuffles
            sampler=self.sampler,
            num_workers=config.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            generator=self.generator,
        )
        if len(loader) == 0:
            size = len(self.trainer.train_set) if isinstance(self.trainer.train_set, Sized) else "?"
            raise M2DetError(
                f"the training data has {size} images, fewer than one batch per process "
                f"(train.batch_size={config.batch_size} over {info.world_size} process(es))"
            )
        return loader

    def _open_logs(self, resumed: bool) -> None:
        if not self.info.is_main:
            return
        # before any file is written, so that a missing extra stops the run with nothing to clean up
        SummaryWriter = tensorboard_writer_class() if self.config.tensorboard else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_files(self.run_dir)
        if removed:
            self._print(f"removed {len(removed)} file(s) an interrupted run left in {self.run_dir}")
        config_text = yaml.safe_dump(
            {"model": json.loads(self.trainer.model_config.to_json()), "train": self.config.to_dict()},
            sort_keys=False,
        )
        with atomic_path(self.run_dir / CONFIG_FILE) as tmp:
            tmp.write_text(config_text)
        rows = [r for r in self._read_csv() if int(r["epoch"]) <= self.epoch] if resumed else []
        self._write_csv(rows)
        self.logs_open = True
        if SummaryWriter is not None:
            self.writer = SummaryWriter(
                str(self.run_dir / TENSORBOARD_DIR), purge_step=self.step if resumed else None
            )

    # ----- the loop -----
    def run(self, resume: bool, stop_at_epoch: Optional[int], time_limit_s: Optional[float]) -> TrainResult:
        start = self.clock()
        state = self._restore() if resume else None
        self._build(state)
        self._build_callbacks(state)
        self._open_logs(resumed=resume)
        config = self.config
        train_seconds, train_images = 0.0, 0
        failed = True
        try:
            self._open_bar()
            self._callback("on_train_start")
            while not self.done:
                epoch_start = self.clock()
                self._callback("on_epoch_start")
                means, images = self._epoch()
                seconds = self.clock() - epoch_start
                train_seconds += seconds
                train_images += images
                self.epoch += 1
                pause = self._should_stop(start, stop_at_epoch, time_limit_s)
                if self.done or pause or (config.eval_every and self.epoch % config.eval_every == 0):
                    self._validate()
                self._callback("on_epoch_end")
                # a callback's decision counts as rank 0's, so all processes stop together
                self.stop_reason = distributed.broadcast_object(self.stop_reason)
                if self.done and self.validated_at != self.epoch:
                    self._validate()  # stopped by on_epoch_end: the final model is validated too
                self._end_epoch(means, images / max(seconds, 1e-9), seconds)
                if pause:
                    break
            if self.eval_model is not self.model:
                # the caller's model ends as the files do: with the weights validated and saved (EMA)
                self.model.load_state_dict(self.eval_model.state_dict())
            failed = False
        finally:
            self._close(failed)
        if self.done:
            self._callback("on_train_end")
        if self.done and self.info.is_main:
            ended = f"{self.stop_reason}; " if self.stop_reason else ""
            self._print(
                f"done: {ended}{self.epoch} epochs in {self.clock() - start:.0f} s; run folder {self.run_dir}"
            )
        return TrainResult(
            run_dir=self.run_dir,
            epoch=self.epoch,
            step=self.step,
            finished=self.done,
            metrics=dict(self.metrics),
            best_metric=self.best_metric,
            best_epoch=self.best_epoch,
            seconds=self.clock() - start,
            images_per_second=train_images / train_seconds if train_seconds else 0.0,
            stop_reason=self.stop_reason,
        )

    def _epoch(self) -> tuple[dict[str, float], int]:
        """One pass over the training data; returns the mean loss terms and the images seen (all processes)."""
        config = self.config
        if prepare_epoch(self.model, config, self.epoch) and self.info.is_distributed:
            self._wrap()
        self.sampler.set_epoch(self.epoch)
        self.generator.manual_seed(config.seed * 1_000_003 + self.epoch * 1_009 + self.info.rank)
        totals = torch.zeros(3, dtype=torch.float64)
        steps, tick, rate = 0, time.perf_counter(), 0.0
        if self.bar is not None:
            self.bar.set_description(self._epoch_label(self.epoch + 1), refresh=False)
        for images, targets in self.loader:
            values = self._train_step(images, targets)
            totals += values.double()
            steps += 1
            self.step += 1
            now = time.perf_counter()
            step_rate = config.batch_size / max(now - tick, 1e-9)
            rate = step_rate if steps == 1 else 0.9 * rate + 0.1 * step_rate
            tick = now
            losses = dict(zip(LOSS_TERMS, values.tolist()))
            self._callback("on_step_end", losses)
            self._log_step(losses, rate)
            if self.budget is not None and self.spent >= 1.0:
                break  # the budget ends the run here, mid-epoch if need be
        means = dict(zip(LOSS_TERMS, (totals / max(steps, 1)).tolist()))
        return means, steps * config.batch_size

    def _train_step(self, images: Tensor, targets: list[dict[str, Any]]) -> Tensor:
        """Forward, check the loss, backward, step. Returns [loss, loss_box, loss_cls] averaged over
        processes, on the CPU."""
        config = self.config
        images = images.to(self.device, non_blocking=True)
        targets = [
            {
                "boxes": torch.as_tensor(t["boxes"]).as_subclass(Tensor).to(self.device),
                "labels": torch.as_tensor(t["labels"]).to(self.device),
            }
            for t in targets
        ]
        with torch.autocast(self.device.type, enabled=self.use_amp):
            losses = self.network(list(images), targets, input_size=self._step_input_size())
        loss = losses["loss_box"] + losses["loss_cls"]
        # one copy to the CPU, which the loss check needs anyway; the epoch totals and the log reuse
        # it. The time spent rides along, so that all processes agree on the budget's schedule.
        elapsed = self.budget.elapsed() if self.budget is not None else 0.0
        values = distributed.all_reduce_mean(
            torch.stack([loss, losses["loss_box"], losses["loss_cls"], loss.new_tensor(elapsed)])
            .detach()
            .float()
        ).cpu()
        self._check_loss(float(values[0]))
        if self.budget is not None:
            self.spent = self.budget.fraction(float(values[3]))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return values[:3]

    def _step_input_size(self) -> Optional[int]:
        """This step's input size: one of `multiscale_sizes`, drawn from (seed, step) alone so that
        every process and a resumed run draw the same; None (the model's own) without them."""
        sizes = self.config.multiscale_sizes
        if not sizes:
            return None
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        return sizes[int(torch.randint(len(sizes), (), generator=generator))]

    def _check_loss(self, value: float) -> None:
        limit = self.config.loss_limit
        if math.isfinite(value) and value <= limit:
            return
        reason = "not finite" if not math.isfinite(value) else f"above train.loss_limit={limit:g}"
        last = self.run_dir / LAST_MODEL
        if self.epoch > 0 and last.is_file():
            kept = f"The last good checkpoint is {last} (epoch {self.epoch}); it is intact."
        else:
            kept = "No checkpoint had been written yet."
        raise TrainingDiverged(
            f"training stopped: the loss is {value:g} ({reason}) at epoch {self.epoch + 1}, step "
            f"{self.step + 1}; the step was not applied. {kept} Try a lower train.lr, a longer "
            f"train.warmup_epochs or train.clip_grad, or check the data."
        )

    def _should_stop(self, start: float, stop_at_epoch: Optional[int], time_limit_s: Optional[float]) -> bool:
        """Whether this `fit` call pauses here (`stop_at_epoch`, `time_limit_s`), leaving a resumable run."""
        if self.done:
            return False
        stop = (stop_at_epoch is not None and self.epoch >= stop_at_epoch) or (
            time_limit_s is not None and self.clock() - start >= time_limit_s
        )
        return bool(distributed.broadcast_object(stop))  # rank 0's clock decides for all

    def _validate(self) -> None:
        if self.trainer.val_set is None:
            return
        from m2det.engine.evaluate import evaluate

        # every process runs its shard of the images; rank 0 scores them all, every process gets the metrics
        result = evaluate(
            self.eval_model,
            self.trainer.val_set,
            batch_size=max(1, self.config.batch_size // self.info.world_size),
            progress=False,
            workers=self.config.workers,
        )
        self.metrics = {k: float(v) for k, v in result.metrics.items()}
        self.validated_at = self.epoch
        value = self.metrics.get(self.config.best_metric, math.nan)
        if math.isfinite(value) and (self.best_metric is None or value > self.best_metric):
            self.best_metric, self.best_epoch = value, self.epoch  # saved in `_save`
        self._callback("on_validation_end", dict(self.metrics))

    def _extra(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "metrics": self.metrics}

    def _end_epoch(self, means: dict[str, float], images_per_s: float, seconds: float) -> None:
        """Save, log and report a finished epoch (files from rank 0 only)."""
        rng = distributed.all_gather_objects(capture_rng_state())
        if not self.info.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        evaluated = self.metrics if self.validated_at == self.epoch else {}
        row = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": f"{lr:.6g}",
            **{k: f"{v:.6f}" for k, v in means.items()},
            "images_per_s": f"{images_per_s:.2f}",
            "seconds": f"{seconds:.2f}",
            **{k: (f"{evaluated[k]:.6f}" if k in evaluated else "") for k in REPORTED_METRICS},
        }
        try:
            self._save(rng, row)
        except OSError as exc:
            raise self._save_failed(exc) from exc
        if self.writer is not None:
            self.writer.add_scalar("train/images_per_s", images_per_s, self.step)
            for key in REPORTED_METRICS:
                if key in evaluated:
                    self.writer.add_scalar(f"val/{key}", evaluated[key], self.step)
            self.writer.flush()
        text = (
            f"{self._epoch_label(self.epoch)}  loss {means['loss']:.4f} (box {means['loss_box']:.4f}, "
            f"cls {means['loss_cls']:.4f})  lr {lr:.2e}  {images_per_s:.1f} img/s  {seconds:.0f} s"
        )
        if evaluated:
            text += "  val " + " ".join(f"{k} {evaluated[k]:.4f}" for k in REPORTED_METRICS if k in evaluated)
        self._print(text)

    def _save(self, rng: list[Any], row: dict[str, Any]) -> None:
        """Write the epoch's files, the checkpoint last: a kill before it leaves a run that resumes
        from the previous checkpoint and redoes this epoch, replacing the rest (rows past the
        checkpoint are dropped on resume)."""
        config, model_config = self.config, self.trainer.model_config
        extra = self._extra()
        self._write_csv([*self._read_csv(), row])
        if self.best_epoch == self.epoch:
            save_model(self.eval_model, self.run_dir / BEST_MODEL, extra=extra, config=model_config)
        if config.save_every and self.epoch % config.save_every == 0:
            save_model(
                self.eval_model,
                self.run_dir / f"epoch_{self.epoch:03d}.safetensors",
                extra=extra,
                config=model_config,
            )
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "metrics": self.metrics,
            "world_size": self.info.world_size,
            "train_config": config.to_dict(),
            "stop_reason": self.stop_reason,
            "elapsed_s": self.budget.elapsed() if self.budget is not None else None,
            "callbacks": {key: c.state_dict() for key, c in self._callback_keys()},
        }
        if self.eval_model is not self.model:  # the model file holds eval_model: keep the trained one here
            state["train_model"] = self.model.state_dict()
        save_checkpoint(self.run_dir, self.eval_model, state, extra, config=model_config)
        self.saved_epoch = self.epoch

    def _save_failed(self, exc: OSError) -> OSError:
        """`exc` (a full disk, ...) as one line naming the file and the checkpoint that is left."""
        if self.saved_epoch:
            kept = (
                f"the checkpoint of epoch {self.saved_epoch} in {self.run_dir} is intact; "
                f"`m2det train --resume {self.run_dir}` continues from it"
            )
        else:
            kept = "no checkpoint had been written yet"
        message = (
            f"{exc.filename or self.run_dir}: {exc.strerror or exc} while saving epoch {self.epoch}; {kept}"
        )
        return OSError(exc.errno, message) if exc.errno is not None else OSError(message)

    # ----- output -----
    def _open_bar(self) -> None:
        if not (self.info.is_main and self.trainer.progress):
            return
        total = None if self.budget is not None else self.config.epochs * self.steps_per_epoch
        self.bar = progress_bar(total=total, initial=self.step, unit="step", desc="train")

    def _epoch_label(self, epoch: int) -> str:
        """`epoch N/E`, or with a time budget `epoch N (P% of M min)`."""
        if self.budget is None:
            return f"epoch {epoch}/{self.config.epochs}"
        return f"epoch {epoch} ({self.spent:.0%} of {self.config.time_limit_min:g} min)"

    def _log_step(self, losses: dict[str, float], rate: float) -> None:
        if not self.info.is_main:
            return
        loss, box, cls = (losses[k] for k in LOSS_TERMS)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.writer is not None and self.step % self.config.log_every == 0:
            for name, value in (("loss", loss), ("loss_box", box), ("loss_cls", cls), ("lr", lr)):
                self.writer.add_scalar(f"train/{name}", value, self.step)
        if self.bar is not None:
            # no redraw of its own: update() redraws at the bar's pace (sparse in a log file)
            self.bar.set_postfix(
                loss=f"{loss:.3f}",
                box=f"{box:.3f}",
                cls=f"{cls:.3f}",
                lr=f"{lr:.2e}",
                img_s=f"{rate:.1f}",
                refresh=False,
            )
            self.bar.update(1)

    def _print(self, text: str) -> None:
        """Log `text` (INFO, `m2det.train`): a handler shows it (`m2det.progress.show_logs`, which the
        command line installs), above the progress bar."""
        logger.info(text)

    def _read_csv(self) -> list[dict[str, str]]:
        path = self.run_dir / RESULTS_CSV
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        with atomic_path(self.run_dir / RESULTS_CSV) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def _close(self, failed: bool = False) -> None:
        """Close the bar and the logs and plot the loss curve; after a failure (a full disk), a
        failed plot does not replace the error that ended the run."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.logs_open:
            self.logs_open = False
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if (self.run_dir / RESULTS_CSV).is_file():
                try:
                    plot_loss_curve(self.run_dir / RESULTS_CSV, self.run_dir / LOSS_CURVE)
                except OSError:
                    if not failed:
                        raise

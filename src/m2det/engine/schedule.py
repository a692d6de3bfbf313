"""Learning-rate schedules: linear warm-up, then step decay (the paper's, the official configs') or cosine.

The rate is a function of the fractional epoch, so it changes every iteration as in the official
code, and a resumed run recomputes it from the step count alone.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from m2det.errors import ConfigError

POLICIES = ("step", "cosine")


@dataclass
class LRSchedule:
    """Linear warm-up from `warmup_start_lr` to `lr` over `warmup_epochs`, then `policy`.

    * `step`: the rate after the k-th milestone is `step_lrs[k-1]` when given (the official
      configs list them), else `lr * gamma**k` (the paper).
    * `cosine`: from `lr` at the end of the warm-up down to `min_lr` at `epochs`.
    """

    lr: float
    epochs: int
    warmup_epochs: float = 5.0
    warmup_start_lr: float = 1e-6
    policy: str = "step"
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    step_lrs: Optional[list[float]] = None
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"schedule: unknown policy {self.policy!r}; expected one of {POLICIES}")
        if self.lr <= 0:
            raise ConfigError(f"schedule: lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise ConfigError(f"schedule: epochs must be >= 1, got {self.epochs}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"schedule: warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"schedule: milestones must be increasing, got {self.milestones}")
        if self.step_lrs is not None and len(self.step_lrs) != len(self.milestones):
            raise ConfigError(
                f"schedule: step_lrs needs one rate per milestone ({len(self.milestones)}), "
                f"got {len(self.step_lrs)}"
            )

    def lr_at(self, epoch: float) -> float:
        """The learning rate at a (fractional) epoch: 0.5 is halfway through the first epoch."""
        if epoch < self.warmup_epochs:
            return self.warmup_start_lr + (self.lr - self.warmup_start_lr) * epoch / self.warmup_epochs
        if self.policy == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-12)
            progress = min((epoch - self.warmup_epochs) / span, 1.0)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        passed = bisect.bisect_right(self.milestones, epoch)
        if passed == 0:
            return self.lr
        if self.step_lrs is not None:
            return self.step_lrs[passed - 1]
        return self.lr * self.gamma**passed


def build_scheduler(
    optimizer: Optimizer,
    schedule: LRSchedule,
    steps_per_epoch: int,
    budget_spent: Optional[Callable[[], float]] = None,
) -> LambdaLR:
    """A per-iteration scheduler for `optimizer`; each group runs at `schedule` times its `lr_mult` (1 if unset).

    The rate follows the iteration count, or with `budget_spent` (the fraction of a time budget
    spent, 0 to 1) the time: the whole schedule of `schedule.epochs` epochs, warm-up and decay,
    is then stretched or squeezed onto the budget. Its state dict holds plain numbers only (the
    rate is recomputed from `last_epoch`, the iteration count, or from the budget), so it
    round-trips through a `weights_only` checkpoint.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    for group in optimizer.param_groups:
        group["lr"] = schedule.lr * group.get("lr_mult", 1.0)

    def factor(step: int) -> float:
        epoch = step / steps_per_epoch if budget_spent is None else schedule.epochs * budget_spent()
        return schedule.lr_at(epoch) / schedule.lr

    return LambdaLR(optimizer, factor)


class TimeBudget:
    """A run's wall-clock budget in seconds, counted over all its `fit` calls.

    `spent_before` is what earlier calls used (saved in the checkpoint), so a resumed run goes on
    with what is left; `clock` is the time source (a fake one in tests).
    """

    def __init__(
        self, seconds: float, clock: Callable[[], float] = time.perf_counter, spent_before: float = 0.0
    ) -> None:
        if not seconds > 0:
            raise ValueError(f"a time budget must be > 0 seconds, got {seconds}")
        self.seconds = float(seconds)
        self.clock = clock
        self.spent_before = float(spent_before)
        self.started = clock()

    def elapsed(self) -> float:
        """Seconds used so far, this call and the earlier ones."""
        return self.spent_before + self.clock() - self.started

    def fraction(self, elapsed: float) -> float:
        """`elapsed` seconds as a fraction of the budget, at most 1."""
        return min(max(elapsed, 0.0) / self.seconds, 1.0)

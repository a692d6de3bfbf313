"""`Trainer.fit(time_limit_s=...)`: the call pauses after the epoch that reaches the limit, with a
checkpoint that `resume=True` continues from. A fake clock makes the test exact and fast."""

from __future__ import annotations

import pytest

from m2det.engine.callbacks import Callback
from m2det.engine.checkpoint_state import load_checkpoint
from m2det.engine.train import Trainer
from m2det.engine.train_config import TrainConfig
from train_helpers import ToyBoxes, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCH_SECONDS = 100.0


class FakeClock(Callback):
    """The trainer's clock; each epoch takes EPOCH_SECONDS of it, whatever the real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def on_epoch_start(self, run) -> None:
        self.now += EPOCH_SECONDS


def _trainer(tmp_path, clock: FakeClock) -> Trainer:
    config = TrainConfig(epochs=4, batch_size=4, lr=0.02, warmup_epochs=1, milestones=[3], workers=0,
                         eval_every=0).validate()  # fmt: skip
    return Trainer(tiny_model(), config, ToyBoxes(4), run_dir=tmp_path / "run", device="cpu", progress=False,
                   callbacks=[clock], clock=clock)  # fmt: skip


def test_time_limit_pauses_after_the_epoch_that_reaches_it_and_resumes(tmp_path):
    clock = FakeClock()
    result = _trainer(tmp_path, clock).fit(time_limit_s=1.5 * EPOCH_SECONDS)
    # epoch 1 ends at 100 s (< 150 s: go on), epoch 2 at 200 s (>= 150 s: pause)
    assert (result.epoch, result.finished) == (2, False)
    assert result.seconds == pytest.approx(2 * EPOCH_SECONDS)
    assert load_checkpoint(tmp_path / "run").state["epoch"] == 2

    result = _trainer(tmp_path, clock).fit(resume=True, time_limit_s=10 * EPOCH_SECONDS)
    assert (result.epoch, result.finished) == (4, True)  # a limit not reached: the run finishes


def test_a_time_limit_below_one_epoch_still_trains_one(tmp_path):
    result = _trainer(tmp_path, FakeClock()).fit(time_limit_s=1.0)
    assert (result.epoch, result.finished) == (1, False)

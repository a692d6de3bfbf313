"""The trainer: schedules, exact resume, stopping on a bad loss, atomic checkpoints, `m2det train`."""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from m2det.engine.checkpoint_state import LAST_MODEL, LEGACY_STATE, load_checkpoint
from m2det.engine.schedule import LRSchedule, build_scheduler
from m2det.engine.train import Trainer, TrainingDiverged
from m2det.engine.train_config import TrainConfig, get_train_config
from m2det.io.atomic import atomic_path, is_temporary
from m2det.io.checkpoint import load_weights, read_config, read_metadata
from train_helpers import ToyBoxes, tiny_cli_data, tiny_model, weights

pytestmark = pytest.mark.usefixtures("one_thread")


# ----- schedules -----
@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, 1e-6),  # warm-up starts at the official 1e-6
        (2.5, 1e-6 + (2e-3 - 1e-6) * 0.5),  # halfway through the 5 warm-up epochs
        (5.0, 2e-3),
        (89.9, 2e-3),
        (90.0, 2e-4),  # x0.1 at 90
        (119.0, 2e-4),
        (120.0, 2e-5),  # x0.1 at 120
        (149.9, 2e-5),
    ],
)
def test_paper_schedule(epoch, expected):
    config = get_train_config("paper")
    assert (config.epochs, config.batch_size, config.momentum, config.weight_decay) == (150, 32, 0.9, 5e-4)
    assert config.schedule().lr_at(epoch) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (1.0, 1e-6 + (4e-3 - 1e-6) / 5),
        (5.0, 4e-3),
        (60.0, 4e-3),
        (90.0, 2e-3),
        (109.0, 2e-3),
        (110.0, 4e-4),
        (130.0, 4e-5),
        (150.0, 4e-6),
        (159.9, 4e-6),
    ],
)
def test_official_schedule(epoch, expected):
    config = get_train_config("official")
    assert config.epochs == 160
    assert config.schedule().lr_at(epoch) == pytest.approx(expected, rel=1e-9)


def test_cosine_schedule_and_per_iteration_scheduler():
    schedule = LRSchedule(
        lr=0.1, epochs=12, warmup_epochs=2, warmup_start_lr=0.0, policy="cosine", min_lr=0.01
    )
    assert schedule.lr_at(1.0) == pytest.approx(0.05)
    assert schedule.lr_at(7.0) == pytest.approx(0.01 + 0.5 * 0.09)  # halfway through the cosine
    assert schedule.lr_at(12.0) == pytest.approx(0.01)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=123.0)
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch=4)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([schedule.lr_at(i / 4) for i in range(12)])
    assert seen[4] == pytest.approx(0.05)  # epoch 1.0: halfway through the 2 warm-up epochs


def test_train_config_from_yaml_preset_and_errors(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  preset: m2det_tiny\ntrain:\n  preset: official\n  batch_size: 16\n")
    config = TrainConfig.from_yaml(path)
    assert (config.lr, config.batch_size, config.milestones, config.epochs) == (
        4e-3,
        16,
        [90, 110, 130, 150],
        160,
    )
    path.write_text("train:\n  bacth_size: 16\n")
    with pytest.raises(ValueError, match=r"cfg.yaml.*bacth_size"):
        TrainConfig.from_yaml(path)
    path.write_text("train:\n  milestones: [90, 110]\n  step_lrs: [1e-3]\n")
    with pytest.raises(ValueError, match="step_lrs"):
        TrainConfig.from_yaml(path)


# ----- the loop -----
def _config(**overrides) -> TrainConfig:
    base = dict(
        epochs=3, batch_size=4, lr=0.02, warmup_epochs=1, milestones=[2], workers=0, eval_every=0, log_every=1
    )
    return TrainConfig(**{**base, **overrides}).validate()


def test_resume_continues_exactly(tmp_path):
    data = ToyBoxes(count=8, flip=True)  # random flips: the RNG state must be restored too
    config = _config()
    whole = tiny_model()
    Trainer(whole, config, data, run_dir=tmp_path / "whole", device="cpu", progress=False).fit()

    first = tiny_model()
    result = Trainer(first, config, data, run_dir=tmp_path / "split", device="cpu", progress=False).fit(
        stop_at_epoch=1
    )
    assert (result.epoch, result.step, result.finished) == (1, 2, False)
    assert load_checkpoint(tmp_path / "split").state["epoch"] == 1

    resumed = tiny_model(seed=123)  # different initial weights: everything must come from the run folder
    result = Trainer(resumed, config, data, run_dir=tmp_path / "split", device="cpu", progress=False).fit(
        resume=True
    )
    assert (result.epoch, result.step, result.finished) == (3, 6, True)
    expected, got = weights(whole), weights(resumed)
    assert expected.keys() == got.keys()
    changed = [k for k in expected if not torch.equal(expected[k], weights(tiny_model())[k])]
    assert changed, "training did not change the weights"
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    rows = (tmp_path / "split" / "results.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2", "3"]
    assert rows == (tmp_path / "whole" / "results.csv").read_text().splitlines()[:1] + rows[1:]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    model = tiny_model()
    calls, before_bad_step = [0], {}

    def snapshot(module, inputs):
        calls[0] += 1
        if calls[0] == 3:  # the first step of epoch 2 (two steps per epoch), before its forward
            before_bad_step.update(weights(model))

    def poison(module, inputs, output):
        return tuple(o * float("nan") for o in output) if calls[0] == 3 else output

    model.register_forward_pre_hook(snapshot)
    model.head.register_forward_hook(poison)
    trainer = Trainer(model, _config(), ToyBoxes(8), run_dir=tmp_path / "run", device="cpu", progress=False)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "not finite" in message and "epoch 2, step 3" in message
    assert str(tmp_path / "run" / LAST_MODEL) in message and "(epoch 1)" in message
    # the bad step was not applied (its forward did move the BatchNorm running statistics) ...
    assert all(torch.equal(before_bad_step[k], p) for k, p in model.named_parameters())
    # ... and the checkpoint holds exactly the weights and statistics after epoch 1
    assert json.loads(read_metadata(tmp_path / "run" / LAST_MODEL)["extra"])["epoch"] == 1
    reloaded = tiny_model(seed=5)
    load_weights(reloaded, tmp_path / "run" / LAST_MODEL)
    assert all(torch.equal(before_bad_step[k], v) for k, v in weights(reloaded).items())
    assert load_checkpoint(tmp_path / "run").state["epoch"] == 1


def test_exploding_loss_stops_before_any_checkpoint(tmp_path):
    trainer = Trainer(
        tiny_model(),
        _config(loss_limit=1e-3),
        ToyBoxes(8),
        run_dir=tmp_path / "run",
        device="cpu",
        progress=False,
    )
    with pytest.raises(
        TrainingDiverged, match=r"above train.loss_limit=0.001.*No checkpoint had been written"
    ):
        trainer.fit()
    assert not (tmp_path / "run" / LAST_MODEL).exists()


def test_run_folder_contents_and_loss_curve(tmp_path):
    model = tiny_model()
    result = Trainer(
        model,
        _config(epochs=2, save_every=1),
        ToyBoxes(8),
        run_dir=tmp_path / "run",
        device="cpu",
        progress=False,
    ).fit()
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {LAST_MODEL, load_checkpoint(tmp_path / "run").state_path.name} <= names
    assert {"epoch_001.safetensors", "epoch_002.safetensors"} <= names
    assert {"results.csv", "config.yaml", "loss_curve.png"} <= names
    assert "tensorboard" not in names  # an optional extra, off unless asked for
    assert result.images_per_second > 0 and math.isfinite(result.images_per_second)
    # the run's files name the data's classes; the caller's model config is left as it was given
    assert read_config(tmp_path / "run" / LAST_MODEL).class_names == ToyBoxes.class_names
    assert read_config(tmp_path / "run" / "epoch_002.safetensors").class_names == ToyBoxes.class_names
    assert model.config.class_names is None


def test_the_trainer_logs_its_lines(tmp_path, caplog):
    """The per-epoch and final lines are log records of m2det.train, with or without a progress bar."""
    caplog.set_level(logging.INFO, logger="m2det")
    Trainer(
        tiny_model(), _config(epochs=2), ToyBoxes(8), run_dir=tmp_path / "run", device="cpu", progress=False
    ).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "m2det.train"]
    assert [line.split("  ")[0] for line in lines[:2]] == ["epoch 1/2", "epoch 2/2"]
    assert lines[-1].startswith("done: 2 epochs in ")


def test_tensorboard_when_asked_for(tmp_path):
    pytest.importorskip("tensorboard")
    Trainer(tiny_model(), _config(epochs=1, tensorboard=True), ToyBoxes(4), run_dir=tmp_path / "run",
            device="cpu", progress=False).fit()  # fmt: skip
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tensorboard").iterdir())


def test_tensorboard_asked_for_but_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    trainer = Trainer(tiny_model(), _config(epochs=1, tensorboard=True), ToyBoxes(4), run_dir=tmp_path / "run",
                      device="cpu", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"pip install 'm2det\[tensorboard\]'"):
        trainer.fit()
    assert not (tmp_path / "run" / "results.csv").exists()  # stopped before writing anything


def test_progress_bar_in_a_log_file_stays_sparse(tmp_path, monkeypatch):
    # stderr redirected to a file: the bar must not redraw at every step (loss and lr change each step)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    config = _config(epochs=2, batch_size=2)
    Trainer(tiny_model(), config, ToyBoxes(16), run_dir=tmp_path / "run", device="cpu", progress=True).fit()
    steps = 2 * 16 // 2
    assert "epoch 2/2" in log.getvalue()  # the bar was drawn, with the state of the last step
    # opening, closing and the per-epoch lines redraw it a few times, independent of the step count
    assert log.getvalue().count("\r") < steps


# ----- checkpoints: kills, a full disk, leftovers, old run folders -----
CSV_COMPARED = ("epoch", "step", "lr", "loss", "loss_box", "loss_cls")  # all but the timings


def _fit(run, resume: bool, stop_at_epoch: Optional[int] = None, seed: int = 0):
    """A tiny three-epoch run with random flips (so the RNG state matters) in `run`."""
    model = tiny_model(seed=seed)
    data = ToyBoxes(count=8, flip=True)
    result = Trainer(model, _config(save_every=1), data, run_dir=run, device="cpu", progress=False).fit(
        resume=resume, stop_at_epoch=stop_at_epoch
    )
    return model, result


def _rows(run) -> list[tuple[str, ...]]:
    with open(run / "results.csv", newline="") as f:
        return [tuple(r[k] for k in CSV_COMPARED) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory) -> tuple[Any, Any, Path]:
    """(weights, results rows) of an uninterrupted run, and a run folder stopped after epoch 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as in every test here: results are bit-exact for one thread count
    try:
        root = tmp_path_factory.mktemp("three_epochs")
        model, _ = _fit(root / "whole", resume=False)
        _fit(root / "epoch1", resume=False, stop_at_epoch=1)
    finally:
        torch.set_num_threads(previous)
    return weights(model), _rows(root / "whole"), root / "epoch1"


def _copy_epoch1(three_epochs, tmp_path) -> Path:
    return Path(shutil.copytree(three_epochs[2], tmp_path / "run"))


def _assert_resumes_exactly(run, three_epochs, context: str = "") -> None:
    """`fit(resume=True)` ends the run with the weights and rows of the uninterrupted one, leaving
    no temporaries and only the state file of the last checkpoint."""
    expected, rows, _ = three_epochs
    model, result = _fit(run, resume=True, seed=123)  # other initial weights: all comes from the folder
    assert (result.epoch, result.step, result.finished) == (3, 6, True), context
    got = weights(model)
    assert all(torch.equal(expected[k], got[k]) for k in expected), f"weights differ {context}"
    assert _rows(run) == rows, context
    assert not [p.name for p in run.iterdir() if is_temporary(p)], context
    states = sorted(p.name for p in run.glob("last_state*"))
    assert states == [load_checkpoint(run).state_path.name], context
    assert {f"epoch_00{i}.safetensors" for i in (1, 2, 3)} <= {p.name for p in run.iterdir()}, context


class Killed(BaseException):
    """A simulated kill (not an Exception, so no `except Exception` handles it)."""


_MUTATIONS = ("replace", "rename", "unlink", "remove", "rmdir")


@contextmanager
def _kill_at(monkeypatch, folder: Path, k: Optional[int]) -> Iterator[list[str]]:
    """Count the renames and deletions in `folder`; the `k`-th (from 0) and every later one raise
    `Killed` without being done, so the folder's names end as a killed process leaves them.

    (Files appear under their names only by these calls: a kill while a temporary is written
    leaves what a kill before the next one does, plus the temporary.)
    """
    ops: list[str] = []
    real = {name: getattr(os, name) for name in _MUTATIONS}

    def patched(name):
        def op(path, *args, **kwargs):
            inside = Path(os.path.abspath(path)).is_relative_to(folder)
            if inside:
                ops.append(f"{name} {Path(path).name}" + (f" -> {Path(args[0]).name}" if args else ""))
                if k is not None and len(ops) > k:
                    raise Killed(ops[-1])
            return real[name](path, *args, **kwargs)

        return op

    for name in _MUTATIONS:
        monkeypatch.setattr(os, name, patched(name))
    try:
        yield ops
    finally:
        for name in _MUTATIONS:
            monkeypatch.setattr(os, name, real[name])


def test_a_kill_at_any_step_of_saving_leaves_a_run_that_resumes_exactly(tmp_path, monkeypatch, three_epochs):
    # epoch 2 of a resumed run, killed before each rename/deletion in its folder in turn: at its
    # start, while saving epoch 2 (results row, snapshot, state, model, old state) and at its end
    with _kill_at(monkeypatch, tmp_path.resolve(), None) as ops:
        _fit(_copy_epoch1(three_epochs, tmp_path), resume=True, stop_at_epoch=2)
    all_ops = list(ops)
    commit = [i for i, op in enumerate(all_ops) if op.endswith(f"-> {LAST_MODEL}")]
    assert len(commit) == 1 and any("last_state_002_" in op for op in all_ops[: commit[0]]), all_ops
    assert any(op.startswith("unlink last_state_001_") for op in all_ops[commit[0] :]), all_ops
    for k in range(len(all_ops)):
        run = tmp_path / f"kill{k}"
        shutil.copytree(three_epochs[2], run)
        with _kill_at(monkeypatch, run.resolve(), k), pytest.raises(Killed):
            _fit(run, resume=True, stop_at_epoch=2)
        _assert_resumes_exactly(run, three_epochs, f"after a kill before {all_ops[k]!r}")


@pytest.mark.parametrize("failing", ["last_state_", LAST_MODEL])
def test_a_full_disk_while_saving_keeps_the_finished_epoch(tmp_path, monkeypatch, three_epochs, failing):
    run = _copy_epoch1(three_epochs, tmp_path)
    write_bytes = Path.write_bytes

    def full_disk(self, data):
        if self.name.startswith(f".{failing}"):  # the temporary of the failing file
            write_bytes(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError) as info:
        _fit(run, resume=True)
    monkeypatch.undo()
    assert sorted(p.name for p in run.glob("last_state*")) == [load_checkpoint(run).state_path.name]
    assert not [p.name for p in run.iterdir() if is_temporary(p)]
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in message
    assert f"{run / failing}" in message and "No space left on device while saving epoch 2" in message
    assert f"the checkpoint of epoch 1 in {run} is intact" in message
    assert load_checkpoint(run).state["epoch"] == 1
    _assert_resumes_exactly(run, three_epochs)  # also: the half-written state file is gone


def test_atomic_path_names_the_file_of_an_unnamed_write_error(tmp_path):
    target = tmp_path / "results.csv"
    target.write_text("old")
    with pytest.raises(OSError) as info, atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"] and target.read_text() == "old"
    with pytest.raises(FileNotFoundError) as info, atomic_path(target):
        (tmp_path / "elsewhere" / "input.txt").read_text()
    assert info.value.filename == str(tmp_path / "elsewhere" / "input.txt")  # other files stay named


def test_a_run_removes_what_a_killed_run_left_and_nothing_else(tmp_path, three_epochs):
    run = _copy_epoch1(three_epochs, tmp_path)
    ours = [".last.safetensors.ab12cd_4.tmp", ".results.csv.z9y8x7w6.tmp", "last_state_002_0123abcd.pt"]
    others = ["notes.tmp", ".hidden.tmp", "keep.ab12cd34.tmp", ".x.ab12cd3.tmp", "last_state_002.pt.bak"]
    for name in ours + others:
        (run / name).write_bytes(b"left over")
    (run / "subfolder").mkdir()
    (run / "subfolder" / ".x.ab12cd34.tmp").write_bytes(b"another folder")
    (run / ".folder.ab12cd34.tmp").mkdir()
    _fit(run, resume=True, stop_at_epoch=2)
    names = {p.name for p in run.iterdir()}
    assert not names & set(ours) and set(others) | {".folder.ab12cd34.tmp"} <= names
    assert (run / "subfolder" / ".x.ab12cd34.tmp").is_file()


def test_a_run_folder_from_before_state_files_were_named_still_resumes(tmp_path, three_epochs):
    from safetensors.torch import load_file, save_file

    run = _copy_epoch1(three_epochs, tmp_path)
    load_checkpoint(run).state_path.rename(run / LEGACY_STATE)

    def rewrite_extra(**changes):
        metadata = read_metadata(run / LAST_MODEL)
        extra = {k: v for k, v in json.loads(metadata["extra"]).items() if k != "state"}
        metadata["extra"] = json.dumps({**extra, **changes})
        save_file(load_file(run / LAST_MODEL), run / LAST_MODEL, metadata=metadata)

    rewrite_extra(epoch=2)  # the old failure: the model of one epoch beside the state of another
    with pytest.raises(ValueError, match=r"last.safetensors is from epoch 2 but last_state.pt from epoch 1"):
        load_checkpoint(run)
    rewrite_extra(epoch=1)
    assert load_checkpoint(run).state_path == run / LEGACY_STATE
    _assert_resumes_exactly(run, three_epochs)  # and its first checkpoint replaces last_state.pt


# ----- the command line -----
def test_train_cli_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app
    from m2det.io.checkpoint import read_config

    data, config = tiny_cli_data(tmp_path, "train:\n  preset: paper\n  batch_size: 4\n  workers: 0\n")
    args = ["train", "--data", str(data.train.annotations), "--val-data", str(data.val.annotations)]
    args += ["--config", str(config), "--set", "train.epochs=1", "--set", "lr=1e-2", "--device", "cpu"]
    args += ["--project", str(tmp_path / "runs"), "--quiet", "--set", "train.tensorboard=true"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "exp1"
    assert f"run folder: {run}" in result.output
    names = {p.name for p in run.iterdir()}
    assert {"last.safetensors", "best.safetensors", "results.csv", "config.yaml", "args.yaml"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (
        len(rows) == 1 and rows[0]["epoch"] == "1" and rows[0]["AP50"] != ""
    )  # validated after the last epoch
    saved = read_config(run / "best.safetensors")
    assert (saved.num_classes, saved.class_names, saved.input_size) == (3, ["circle", "square"], 64)
    assert load_checkpoint(run).state["train_config"]["lr"] == 0.01

    bad = CliRunner().invoke(app, [*args[:5], "--set", "train.bacth_size=2", "--quiet"])
    assert bad.exit_code == 2 and "bacth_size" in bad.output
    # a start that fails once the folder exists (no full batch in 8 images) leaves no folder either
    too_big = CliRunner().invoke(app, [*args, "--set", "train.batch_size=16"])
    assert too_big.exit_code == 2 and "fewer than one batch" in too_big.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp1"]
    # --resume takes a file in the run folder too (this run is finished: nothing left to train)
    again = CliRunner().invoke(app, ["train", "--resume", str(run / "last.safetensors"), "--quiet"])
    assert again.exit_code == 0 and f"run folder: {run}" in again.output, again.output


def test_train_cli_leaves_no_run_folder_when_the_data_is_wrong(tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app

    (tmp_path / "data").mkdir()
    runs = tmp_path / "runs"
    args = ["train", "--data", str(tmp_path / "data"), "--project", str(runs), "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "not a data set m2det can read" in result.output
    assert not runs.exists() or not any(runs.iterdir())


def test_train_cli_resume_names_a_missing_folder_or_one_without_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app

    missing = tmp_path / "runs" / "exp7"
    result = CliRunner().invoke(app, ["train", "--resume", str(missing)])
    assert result.exit_code == 2 and f"--resume {missing}: no such run folder" in result.output
    assert "last_state" not in result.output
    started = tmp_path / "runs" / "exp8"  # a run killed during its first epoch
    (started / "tensorboard").mkdir(parents=True)
    (started / "config.yaml").write_text("model: {}\n")
    result = CliRunner().invoke(app, ["train", "--resume", str(started)])
    assert result.exit_code == 2, result.output
    assert f"--resume {started}: {started} holds no checkpoint (last.safetensors not found" in result.output


def test_train_cli_names_a_broken_config_file(tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app

    config = tmp_path / "broken.yaml"
    config.write_text("model: [unclosed\n")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--config", str(config), "--quiet"])
    assert result.exit_code == 2 and "broken.yaml: not valid YAML" in result.output
    missing = CliRunner().invoke(
        app, ["train", "--data", str(tmp_path), "--config", str(tmp_path / "no.yaml")]
    )
    assert missing.exit_code == 2 and "config file not found" in missing.output


def test_train_cli_resume_continues_and_the_command_line_wins_over_the_stored_data_options(
    tmp_path, monkeypatch
):
    """`m2det train --resume`: a run paused after epoch 1 of 2 continues to its end; a data option
    given again replaces the stored one (and is stored for the next resume), one not given is the
    run's own; the run's settings cannot change."""
    import yaml
    from typer.testing import CliRunner

    from m2det.cli import train as train_cli
    from m2det.cli.main import app

    data, config = tiny_cli_data(tmp_path, "train:\n  preset: paper\n  batch_size: 4\n  workers: 0\n")
    args = ["train", "--data", str(data.train.annotations), "--val-data", str(data.val.annotations)]
    args += ["--config", str(config), "--set", "train.epochs=2", "--train-split", "mine"]
    args += ["--project", str(tmp_path / "runs"), "--device", "cpu", "--quiet"]
    fit = Trainer.fit
    with monkeypatch.context() as patch:  # the first call pauses after epoch 1, as an interruption would
        patch.setattr(Trainer, "fit", lambda self, resume=False: fit(self, resume, stop_at_epoch=1))
        first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "exp1"
    assert load_checkpoint(run).state["epoch"] == 1
    stored = yaml.safe_load((run / "args.yaml").read_text())
    assert (stored["train_split"], stored["val_split"]) == ("mine", "val")

    moved = tmp_path / "moved.json"  # the training data given again, from another place
    shutil.copy(data.train.annotations, moved)
    shutil.copytree(data.train.annotations.parent / "images", tmp_path / "images")
    seen = []
    build = train_cli.build_datasets
    monkeypatch.setattr(train_cli, "build_datasets", lambda a, m, t: seen.append(dict(a)) or build(a, m, t))
    resumed = CliRunner().invoke(
        app, ["train", "--resume", str(run), "--data", str(moved), "--val-split", "v2"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert seen[0]["data"] == str(moved.resolve())  # given: the command line wins
    assert seen[0]["val_data"] == stored["val_data"] and seen[0]["train_split"] == "mine"  # not given: stored
    assert seen[0]["val_split"] == "v2"
    assert yaml.safe_load((run / "args.yaml").read_text()) == seen[0]  # stored for the next resume
    assert load_checkpoint(run).state["epoch"] == 2
    with open(run / "results.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]

    changed = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=3"])
    assert changed.exit_code == 2 and "--resume continues a run with its own settings" in changed.output

"""`m2det demo`, shrunk to a few images and one epoch: the run folder holds what it promises, and
two runs with one seed give the same model. (The full demo's time and mAP: benchmarks/demo.py.)"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from m2det.cli.main import app

SMALL = ["num_train=8", "num_val=4", "num_pictures=2", "train.epochs=1", "train.batch_size=4", "threads=1"]


def _run(project):
    args = ["demo", "--project", str(project), "--quiet"]
    for item in SMALL:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def test_demo_writes_its_run_folder_and_repeats_under_its_seed(tmp_path):
    result = _run(tmp_path / "a")
    assert result.exit_code == 0, result.output
    run = tmp_path / "a" / "exp1"
    assert "mAP@0.5" in result.output and f"run folder: {run}" in result.output
    expected = [
        "last.safetensors",
        "results.csv",
        "loss_curve.png",
        "demo.json",
        "eval/metrics.json",
        "eval/per_class.csv",
        "eval/pr_curve.png",
        "pictures/000.png",
        "pictures/001.png",
        "data/train/annotations.json",
    ]
    assert [name for name in expected if not (run / name).is_file()] == []
    assert not (run / "pictures" / "002.png").exists()
    assert not (run / "tensorboard").exists()  # an optional extra, off unless asked for
    summary = json.loads((run / "demo.json").read_text())
    assert 0.0 <= summary["metrics"]["AP50"] <= 1.0 and summary["seconds"] > 0
    assert summary["settings"]["num_train"] == 8

    again = _run(tmp_path / "b")
    assert again.exit_code == 0, again.output
    # tensors and results equal (not the bytes: safetensors writes its metadata in no fixed order)
    first, second = (
        load_file(str(root / "exp1" / "last.safetensors")) for root in (tmp_path / "a", tmp_path / "b")
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "b" / "exp1" / "demo.json").read_text())["metrics"] == summary["metrics"]


def test_demo_rejects_an_unknown_setting(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--project", str(tmp_path), "--set", "epochs=3"])
    assert result.exit_code == 2
    assert "epochs" in result.output and "train.FIELD" in result.output


def test_demo_shows_its_steps_and_epochs_unless_quiet(tmp_path):
    """The demo's steps and the trainer's epoch lines are log records the command shows as lines."""
    args = ["demo", "--project", str(tmp_path)]
    for item in SMALL:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "generating 8 + 4 shapes images in " + str(tmp_path / "exp1" / "data") in lines
    # (the progress bar, on stderr, shares the output here)
    assert "epoch 1/1  loss " in result.output and "done: 1 epochs in " in result.output
    quiet = _run(tmp_path / "quiet")
    assert quiet.exit_code == 0 and "generating" not in quiet.output and "epoch 1/1" not in quiet.output

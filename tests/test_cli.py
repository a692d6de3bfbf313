"""The command line answers, lists the presets, and reports errors of the file system in one line."""

from __future__ import annotations

import errno
import json
import os

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from m2det.cli.common import user_errors
from m2det.cli.main import app
from m2det.data import DatasetError
from m2det.errors import ConfigError, M2DetError


def test_help_lists_commands():
    """Every registered command is in the top-level help, each on a line of its own (its name first)."""
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    first_words = {
        line.strip(" │|").split(" ")[0] for line in result.output.splitlines() if line.strip(" │|")
    }
    registered = [command.name for command in app.registered_commands]
    assert len(registered) >= 10
    assert [name for name in registered if name not in first_words] == []


COMMANDS = [
    "models",
    "convert",
    "convert-backbone",
    "browse-data",
    "eval",
    "detect",
    "explain",
    "serve",
    "train",
    "ablate",
    "demo",
    "bench",
    "export",
]
ARGUMENTS = {
    "convert": "SOURCE OUTPUT",
    "convert-backbone": "SOURCE OUTPUT",
    "browse-data": "DATA",
    "detect": "SOURCE",
    "explain": "IMAGE",
    "export": "OUTPUT",
}


def test_every_command_is_listed():
    assert sorted(command.name for command in app.registered_commands) == sorted(COMMANDS)


@pytest.mark.parametrize("name", [None, *COMMANDS], ids=lambda name: name or "m2det")
def test_help_has_no_placeholders_for_flags_or_braces_around_arguments(name):
    result = CliRunner().invoke(app, [*([name] if name else []), "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output  # flags (--help, --flip/--no-flip) take no value
    usage = next(line for line in result.output.splitlines() if "Usage:" in line).rstrip()
    if name is None:
        assert usage.endswith(" [OPTIONS] COMMAND [ARGS]...")
    else:
        assert usage.endswith(f" {name} [OPTIONS]" + (f" {ARGUMENTS[name]}" if name in ARGUMENTS else ""))
    if name == "detect":
        assert any("--flip" in line and "--no-flip" in line for line in result.output.splitlines())
        assert "<float range>" in result.output  # an option that takes a value still shows its type


def test_a_missing_argument_is_named_as_in_the_usage():
    result = CliRunner().invoke(app, ["detect"])
    assert result.exit_code == 2 and "Missing argument 'SOURCE'" in result.output


def test_models_lists_presets_with_size_and_cost():
    result = CliRunner().invoke(app, ["models"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if "m2det" in line and "│" in line}
    assert set(lines) >= {
        "m2det320_vgg16",
        "m2det512_vgg16",
        "m2det800_vgg16",
        "m2det_tiny",
        "m2det512_resnet101",
    }
    assert "132.63" in lines["m2det320_vgg16"] and "148.6" in lines["m2det320_vgg16"]
    assert "12,810" in lines["m2det320_vgg16"] and "80,208" in lines["m2det800_vgg16"]


def test_bad_override_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(
        app, ["convert", "x.pth", str(tmp_path / "o"), "--preset", "m2det320_vgg16", "--set", "oops"]
    )
    # the override is refused before the (missing) file is looked at: the error is about `oops`,
    # not a file-not-found that would also name x.pth
    assert result.exit_code == 2
    assert "--set expects KEY=VALUE" in result.output and "'oops'" in result.output
    assert "not found" not in result.output


# ----- errors of the file system: one line naming the path, exit code 2 -----
def error_lines(result):
    return [line for line in result.output.splitlines() if "error" in line.lower()]


def run_raising(exc: BaseException) -> tuple[int, str]:
    @user_errors
    def command() -> None:
        raise exc

    runner_app = typer.Typer()
    runner_app.command()(command)
    result = CliRunner().invoke(runner_app, [])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/detections.json"), "out/detections.json: No space left on device"),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/etc/model.safetensors"), "/etc/model.safetensors: Permission denied"),
        (OSError(errno.EXDEV, os.strerror(errno.EXDEV), "a.tmp", None, "b/a"), "a.tmp -> b/a: Invalid cross-device link"),
        (FileNotFoundError("weights file not found: m.safetensors"), "weights file not found: m.safetensors"),
        (ConfigError("m.yaml: mlfpn.x: unknown key"), "m.yaml: mlfpn.x: unknown key"),
        (M2DetError("--sizes expects integers"), "--sizes expects integers"),
        (DatasetError("data.yaml: 'names' is empty"), "data.yaml: 'names' is empty"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_naming_the_path(exc, expected):
    code, output = run_raising(exc)
    assert code == 2 and output == f"error: {expected}\n"


@pytest.mark.parametrize(
    "exc", [RuntimeError("a bug"), KeyError("x"), ValueError("a bug"), TypeError("a bug"), BrokenPipeError()]
)
def test_other_errors_still_show_a_traceback(exc):
    """Only our own user errors and the file system's are one line: a KeyError from a bug is not
    `error: 'x'` but the exception itself, with its traceback."""
    code, output = run_raising(exc)
    assert code == 1 and "error:" not in output


def test_a_bug_deep_in_training_keeps_its_traceback(tmp_path, monkeypatch):
    """A KeyError raised inside the training loop reaches the caller as itself (exit 1), while a user
    mistake on the same command line is still one line with exit code 2."""
    from m2det.engine import train as train_module
    from train_helpers import tiny_cli_data

    data, config = tiny_cli_data(tmp_path, "train:\n  preset: paper\n  batch_size: 4\n  workers: 0\n")
    args = ["train", "--data", str(data.train.annotations), "--val-data", str(data.val.annotations)]
    args += ["--config", str(config), "--set", "train.epochs=1", "--device", "cpu", "--quiet"]
    args += ["--project", str(tmp_path / "runs")]

    def broken(self, *args, **kwargs):
        raise KeyError("x")

    monkeypatch.setattr(train_module.TrainingRun, "_train_step", broken)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    assert "error: 'x'" not in result.output and "error: x" not in result.output

    mistake = CliRunner().invoke(app, [*args, "--set", "train.epochz=1"])
    assert mistake.exit_code == 2
    assert mistake.output.startswith("error: train.epochz: unknown key")


@pytest.fixture
def tiny_coco(tmp_path):
    """One blank image with one box, as a COCO json beside its images folder."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.png")
    path = tmp_path / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
                "annotations": [
                    {
                        "id": 1,
                        "image_id": 1,
                        "category_id": 1,
                        "bbox": [8, 8, 30, 20],
                        "area": 600,
                        "iscrowd": 0,
                    }
                ],
                "categories": [{"id": 1, "name": "box"}],
            }
        )
    )
    return path


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "taken.txt"
    path.write_text("a file, not a folder")
    return path


def test_eval_out_that_is_a_file(tiny_coco, a_file, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [8, 8, 30, 20], "score": 0.9}]))
    result = CliRunner().invoke(
        app, ["eval", "--data", str(tiny_coco), "--detections", str(results), "--out", str(a_file)]
    )
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {a_file}: File exists (a file, where a folder is needed)"]


def test_browse_data_out_under_a_file(tiny_coco, a_file):
    out = a_file / "samples"
    result = CliRunner().invoke(app, ["browse-data", str(tiny_coco), "--num", "1", "--out", str(out)])
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {out}: Not a directory ({a_file} is a file, not a folder)"]


def test_train_project_that_is_a_file(a_file, tiny_coco):
    # valid data, so that the run folder is what fails (it is made once the inputs are checked)
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(tiny_coco), "--model", "m2det_tiny", "--project", str(a_file), "--quiet"],
    )
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {a_file}: File exists (a file, where a folder is needed)"]

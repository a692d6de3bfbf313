"""The command line answers and lists the presets."""

from __future__ import annotations

from typer.testing import CliRunner

from m2det.cli.main import app


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "convert"):
        assert command in result.output


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
    assert result.exit_code == 2
    assert "x.pth" in result.output or "KEY=VALUE" in result.output

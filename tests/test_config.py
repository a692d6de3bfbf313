"""Configuration: presets, overrides, YAML round-trips, clear errors."""

from __future__ import annotations

import pytest

from m2det.config import ModelConfig, get_config, list_presets

EXPECTED = {
    "m2det320_vgg16", "m2det512_vgg16", "m2det704_vgg16", "m2det800_vgg16",
    "m2det320_resnet101", "m2det512_resnet101", "m2det_tiny",
}  # fmt: skip


def test_presets_are_listed():
    assert set(list_presets()) >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_round_trip(tmp_path, name):
    config = get_config(name, num_classes=4, class_names=["a", "b", "c"])
    path = tmp_path / "c.yaml"
    config.save_yaml(path)
    assert ModelConfig.from_yaml(path) == config


def test_yaml_preset_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: m2det512_vgg16\nnum_classes: 21\nmlfpn:\n  sfam: true\n")
    config = ModelConfig.from_yaml(path)
    assert config.input_size == 512 and config.num_classes == 21 and config.mlfpn.sfam
    assert config.mlfpn.planes == 256  # untouched fields keep the preset's value


def test_dotted_overrides():
    assert get_config("m2det_tiny", **{"mlfpn.planes": 128}).mlfpn.planes == 128


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: m2det320_vgg16\nmlfpn:\n  plains: 12\n")
    with pytest.raises(ValueError, match=r"c.yaml.*plains"):
        ModelConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"c.yaml: empty config file"),
        ("- a\n- b\n", r"c.yaml: expected a mapping at the top level, got list"),
        ("preset: [unclosed\n", r"c.yaml: not valid YAML"),
    ],
)
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")


def test_invalid_values_are_named():
    with pytest.raises(ValueError, match="planes"):
        get_config("m2det320_vgg16", mlfpn={"planes": 7})
    with pytest.raises(ValueError, match="size_pattern"):
        get_config("m2det320_vgg16", mlfpn={"num_scales": 5})
    with pytest.raises(ValueError, match="unknown preset 'ssd300'; known presets: m2det320_vgg16, "):
        get_config("ssd300")
    with pytest.raises(ValueError, match="class_names"):
        get_config("m2det_tiny", num_classes=3, class_names=["a"])


@pytest.mark.parametrize(
    ("name", "guess"),
    [
        ("m2det320_vgg", "m2det320_vgg16"),
        ("m2det_tinny", "m2det_tiny"),
        ("M2Det512_VGG16", "m2det512_vgg16"),
        ("resnet101", "m2det320_resnet101 or m2det512_resnet101"),
    ],
)
def test_unknown_preset_suggests_the_close_ones(name, guess):
    known = ", ".join(list_presets())
    with pytest.raises(ValueError) as info:
        get_config(name)
    assert str(info.value) == f"unknown preset {name!r}; did you mean {guess}? known presets: {known}"


def test_unknown_preset_on_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app

    args = ["train", "--model", "m2det_tinny", "--data", str(tmp_path / "data"), "--project", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "unknown preset 'm2det_tinny'; did you mean m2det_tiny?" in result.output


def test_categories_put_background_first():
    config = get_config("m2det_tiny", num_classes=3, class_names=["cat", "dog"])
    assert config.categories == ["__background__", "cat", "dog"]

"""Configuration: presets, overrides, YAML round-trips, clear errors."""

from __future__ import annotations

import pytest

from m2det.config import ModelConfig, get_config, list_presets
from m2det.errors import ConfigError

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


# ----- --set values, type checks and unknown keys -----
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-3", 0.001),
        ("4e-3", 0.004),
        (".5", 0.5),
        ("1E3", 1000.0),
        ("-2e-4", -0.0002),
        ("+3e2", 300.0),
        ("5.", 5.0),
        ("2.5e-3", 0.0025),
        ("12", 12),
        ("true", True),
        ("false", False),
        ("[90, 110]", [90, 110]),
        ("[1e-3, 2E-4]", [0.001, 0.0002]),
        ("{backbone: 0.1}", {"backbone": 0.1}),
        ("", None),
        ("adamw", "adamw"),
        ("1e", "1e"),
        ("e3", "e3"),
        ("1.5.2", "1.5.2"),
    ],
)
def test_set_values_read_as_a_person_writes_them(text, value):
    from m2det.cli.common import parse_overrides

    parsed = parse_overrides([f"train.x={text}"])["train.x"]
    assert parsed == value and type(parsed) is type(value)


def test_set_value_that_is_not_yaml_names_the_key():
    from m2det.cli.common import parse_overrides

    with pytest.raises(ValueError, match=r"--set train.milestones: cannot read the value '\[90,'"):
        parse_overrides(["train.milestones=[90,"])


def test_config_file_reads_exponent_numbers(tmp_path):
    from m2det.engine.train_config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  lr: 1e-3\n  warmup_start_lr: 1E-6\n  step_lrs: [2e-4, 2e-5]\n  milestones: [5, 8]\n"
    )
    config = TrainConfig.from_yaml(path)
    assert (config.lr, config.warmup_start_lr, config.step_lrs) == (0.001, 1e-6, [2e-4, 2e-5])


def _configs(*pairs: str):
    from m2det.cli.common import parse_overrides
    from m2det.cli.train import load_configs, split_overrides

    model_overrides, train_overrides = split_overrides(parse_overrides(list(pairs)))
    return load_configs(None, "m2det_tiny", model_overrides, train_overrides)


def test_set_reaches_both_configs():
    model, train = _configs(
        "train.lr=1e-3",
        "warmup_start_lr=1e-5",  # a bare training field
        "train.milestones=[90, 110]",
        "train.epochs=1.2e2",  # a whole number written as a float is an integer field's value
        "train.augment_settings.max_expand=2",  # a key inside a mapping field
        "model.mlfpn.planes=32",
        "mlfpn.num_levels=3",  # a bare model key
    )
    assert (train.lr, train.warmup_start_lr, train.milestones) == (0.001, 1e-5, [90, 110])
    assert train.epochs == 120 and type(train.epochs) is int
    assert train.augment_settings == {"max_expand": 2}
    assert (model.mlfpn.planes, model.mlfpn.num_levels) == (32, 3)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("train.lr=fast", "train.lr: expected a number, got 'fast' (a string)"),
        ("train.epochs=1.5", "train.epochs: expected an integer, got 1.5 (a number)"),
        ("train.amp=1", "train.amp: expected true or false, got 1 (an integer)"),
        ("train.milestones=[a, 2]", "train.milestones: expected a list of numbers, got ['a', 2] (a list)"),
        ("train.clip_grad=high", "train.clip_grad: expected a number or null, got 'high' (a string)"),
        (
            "train.lr_mults={backbone: x}",
            "train.lr_mults: expected a mapping of numbers, got {'backbone': 'x'}",
        ),
        ("model.anchors.variances=[0.1]", "model.anchors.variances: expected a list of 2 numbers, got [0.1]"),
        ("model.input_size=big", "model.input_size: expected an integer, got 'big' (a string)"),
        ("train.augment_settings.max_expand=x", "train.augment_settings.max_expand: expected a number"),
    ],
)
def test_set_value_of_the_wrong_type_names_key_value_and_type(pair, message):
    with pytest.raises(ValueError) as info:
        _, train = _configs(pair)
        train.train_transform(64)  # the augment settings are read when the transform is built
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("pair", "start", "valid"),
    [
        ("train.lrr=1e-3", "train.lrr: unknown key; did you mean train.lr? valid keys: train.epochs, ", "train.lr_mults"),
        ("train.bacth_size=2", "train.bacth_size: unknown key; did you mean train.batch_size? ", "train.seed"),
        ("lrr=1e-3", "lrr: unknown key; did you mean train.lr? valid keys: train.epochs, ", "model.mlfpn"),
        ("model.mlfpn.plains=3", "model.mlfpn.plains: unknown key; did you mean model.mlfpn.planes? ", "model.mlfpn.sfam"),
        ("model.mlfpm.planes=3", "model.mlfpm: unknown key; did you mean model.mlfpn? ", "model.anchors"),
        ("model.inputsize=3", "model.inputsize: unknown key; did you mean model.input_size? ", "model.name"),
    ],
)  # fmt: skip
def test_unknown_set_key_suggests_and_lists_the_valid_ones(pair, start, valid):
    with pytest.raises(ValueError) as info:
        _configs(pair)
    assert str(info.value).startswith(start) and valid in str(info.value)


def test_unknown_key_in_a_config_file_is_named_with_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: m2det320_vgg16\nmlfpn:\n  plains: 12\n")
    with pytest.raises(
        ValueError, match=r"c.yaml: model.mlfpn.plains: unknown key; did you mean model.mlfpn.planes\?"
    ):
        ModelConfig.from_yaml(path)


def test_set_errors_on_the_command_line_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app

    args = ["train", "--data", str(tmp_path / "data"), "--project", str(tmp_path), "--preset", "m2det_tiny"]
    unknown = CliRunner().invoke(app, [*args, "--set", "train.lrr=1e-3"])
    assert unknown.exit_code == 2 and "did you mean train.lr?" in unknown.output
    wrong = CliRunner().invoke(app, [*args, "--set", "train.lr=1e-3x"])
    assert wrong.exit_code == 2
    assert wrong.output.startswith("error: train.lr: expected a number, got '1e-3x' (a string)")
    assert "Traceback" not in wrong.output and not list(tmp_path.iterdir())
    # the help's own example is a number: the run gets as far as the data
    example = CliRunner().invoke(app, [*args, "--set", "train.lr=1e-3", "--set", "lr=4e-3"])
    assert example.exit_code == 2 and example.output.startswith(f"error: {tmp_path / 'data'}: not found")


def test_demo_settings_are_type_checked():
    from m2det.engine.demo import DemoSettings

    settings = DemoSettings().with_overrides({"train.lr": 1e-3, "threads": 1, "shapes.clutter": 0})
    assert (settings.train["lr"], settings.threads, settings.shapes["clutter"]) == (1e-3, 1, 0)
    with pytest.raises(ValueError, match=r"^threads: expected an integer, got 'two' \(a string\)$"):
        DemoSettings().with_overrides({"threads": "two"})


# ----- defaults that fit the machine -----
@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 1), (3, 2), (5, 4), (64, 4)])
def test_default_workers_leave_a_core_to_training(monkeypatch, cores, workers):
    import os

    from m2det.device import default_workers, usable_cores
    from m2det.engine.train import cpu_threads
    from m2det.engine.train_config import TrainConfig, get_train_config

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert usable_cores() == cores and default_workers() == workers <= cores
    assert TrainConfig().workers == get_train_config("paper").workers == workers
    assert cpu_threads(workers) == max(1, cores - workers)  # compute threads on the cores left
    assert get_train_config("paper", workers=7).workers == 7  # a chosen number is kept


@pytest.mark.parametrize(("cores", "processes", "workers"), [(2, 2, 0), (8, 2, 3), (16, 2, 4), (3, 2, 0)])
def test_default_workers_share_the_cores_between_processes(monkeypatch, cores, processes, workers):
    import os

    from m2det.device import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert default_workers(processes=processes) == workers  # per process: its share less one core


def test_usable_cores_is_the_affinity_mask_not_the_machine(monkeypatch):
    import os

    from m2det.device import usable_cores

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3}, raising=False)
    assert usable_cores() == 2  # e.g. `taskset -c 2,3` or a container's cpuset on a 64-core machine
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: every core
    assert usable_cores() == 64


def test_training_settings_are_merged_in_one_place():
    """`build_train_config` (what `m2det train` uses): the preset of --set, else of the file's
    train: section, else the default; then the section's fields; then the other overrides, dotted
    keys too (which a preset's keyword overrides take as well)."""
    from m2det.engine.train_config import build_train_config, get_train_config

    section = {"preset": "official", "epochs": 7, "lr_mults": {"backbone": 0.1}}
    overrides = {"lr_mults.head": 0.5, "batch_size": 4}
    config = build_train_config(section, overrides, "finetune")
    assert (config.lr, config.epochs, config.batch_size) == (4e-3, 7, 4)  # official's lr, the file, --set
    assert config.lr_mults == {"backbone": 0.1, "head": 0.5}
    assert overrides == {"lr_mults.head": 0.5, "batch_size": 4}  # the caller's mapping is left alone
    assert build_train_config({"epochs": 7}, {"preset": "paper"}).lr == 2e-3  # --set's preset wins
    assert build_train_config({"epochs": 7}, {}, "finetune").optimizer == "adamw"  # the default recipe
    dotted = get_train_config("paper", **{"augment_settings.max_expand": 2.0})
    assert dotted.augment_settings == {"max_expand": 2.0}
    with pytest.raises(ConfigError, match="cfg.yaml: train.epochz: unknown key"):
        build_train_config({"epochz": 1}, {}, where="cfg.yaml")

"""Starting from a trained detector: what is copied, mapped by class name and re-initialised; refusals;
the fine-tuning controls of the trainer (frozen backbone, frozen BatchNorm, learning-rate multipliers)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import m2det
from conftest import random_official_state_dict
from m2det.classes import COCO_CLASSES
from m2det.cli.main import app
from m2det.engine.finetune import parameter_groups
from m2det.engine.schedule import build_scheduler
from m2det.engine.train import LAST_MODEL, Trainer
from m2det.engine.train_config import TrainConfig, get_train_config
from m2det.io.checkpoint import load_weights, read_config, save_model
from m2det.io.torchfile import shared_state_groups
from m2det.io.transfer import transfer_weights
from train_helpers import ToyBoxes, tiny_model, weights

pytestmark = pytest.mark.usefixtures("one_thread")

ANCHORS = 6
CONF = [f"head.conf.{i}.{p}" for i in range(3) for p in ("weight", "bias")]


@pytest.fixture
def source(tmp_path):
    """A saved 3-class tiny detector whose every tensor differs from a fresh model's."""
    model = tiny_model(num_classes=4, seed=1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) + 0.5)
    model.config.class_names = ["cat", "dog", "car"]
    path = save_model(model, tmp_path / "source.safetensors")
    return path, weights(model)


def _target(class_names, seed=2):
    model = tiny_model(num_classes=len(class_names) + 1, seed=seed)
    model.config.class_names = list(class_names)
    return model, weights(model)


def _rows(tensor, num_classes, label):
    """The conf rows of class `label`: output channels a * C + label for every anchor a."""
    return tensor[[a * num_classes + label for a in range(ANCHORS)]]


def test_same_classes_copy_every_tensor(source):
    path, old = source
    model, _ = _target(["cat", "dog", "car"])
    report = transfer_weights(model, path)
    assert all(torch.equal(value, old[name]) for name, value in model.state_dict().items())
    assert report.mapped == [] and report.reinitialized == [] and report.new_classes == []
    assert set(CONF) <= set(report.loaded) and len(report.loaded) == len(shared_state_groups(model))


def test_other_classes_keep_the_background_rows_and_reinitialise_the_rest(source):
    path, old = source
    model, init = _target(["x", "y"])
    report = transfer_weights(model, path)
    new = model.state_dict()
    for name, value in new.items():
        if name in CONF:
            assert torch.equal(_rows(value, 3, 0), _rows(old[name], 4, 0)), name  # background
            for label in (1, 2):
                assert torch.equal(_rows(value, 3, label), _rows(init[name], 3, label)), name
        else:
            assert torch.equal(value, old[name]), name
    assert sorted(report.mapped) == sorted(CONF) and report.new_classes == ["x", "y"]
    assert report.class_map == {} and set(CONF).isdisjoint(report.loaded)
    assert len(report.loaded) == len(shared_state_groups(model)) - len(CONF)
    text = "\n".join(report.lines())
    assert "re-initialised: the rows of 2 new classes in head.conf.0-2 (x, y)" in text


def test_overlapping_class_names_copy_their_rows(source):
    path, old = source  # checkpoint: cat 1, dog 2, car 3
    model, init = _target(["Car", "bird", "cat"])  # model: Car 1, bird 2, cat 3
    report = transfer_weights(model, path)
    new = model.state_dict()
    for name in CONF:
        for new_label, old_label in ((0, 0), (1, 3), (3, 1)):
            assert torch.equal(_rows(new[name], 4, new_label), _rows(old[name], 4, old_label)), name
        assert torch.equal(_rows(new[name], 4, 2), _rows(init[name], 4, 2)), name  # bird: new
    # the same rows, spelled out for one anchor and one weight: channel a * C + c
    a = 4
    assert torch.equal(new["head.conf.1.weight"][a * 4 + 1], old["head.conf.1.weight"][a * 4 + 3])
    assert report.class_map == {"Car": "car", "cat": "cat"} and report.new_classes == ["bird"]
    assert "mapped by class name: 6 tensors of head.conf.0-2, the rows of background, Car, cat" in str(report)


def test_class_map_pairs_names_spelled_differently(source):
    path, old = source
    model, _ = _target(["kitten", "car"])
    report = transfer_weights(model, path, class_map={"kitten": "cat"})
    assert report.class_map == {"kitten": "cat", "car": "car"} and report.new_classes == []
    assert torch.equal(_rows(model.head.conf[0].bias, 3, 1), _rows(old["head.conf.0.bias"], 4, 1))
    with pytest.raises(ValueError, match="does not have"):
        transfer_weights(model, path, class_map={"kitten": "lion"})


def test_build_model_with_weights_and_another_input_size(source):
    path, old = source
    model = m2det.build_model(weights=path, class_names=["dog"], input_size=96)
    assert (model.config.input_size, model.config.num_classes, model.config.class_names) == (96, 2, ["dog"])
    assert model.transfer_report.class_map == {"dog": "dog"}
    assert torch.equal(model.head.loc[1].weight, old["head.loc.1.weight"])
    model.eval()
    with torch.inference_mode():
        loc, logits = model.forward_raw(torch.randn(1, 3, 96, 96))
    assert loc.shape[1] == logits.shape[1] == model.anchors(96).shape[0] and logits.shape[2] == 2


def test_official_resnet101_checkpoint_drops_exactly_the_unused_classifier():
    from m2det.io.transfer import read_checkpoint

    state = random_official_state_dict("resnet101", seed=5)
    checkpoint = read_checkpoint(state, preset="m2det320_resnet101")
    assert len(checkpoint.state) == len(state) - 2  # base.fc.weight, base.fc.bias
    assert not any(key.startswith(("backbone.fc.", "<official>")) for key in checkpoint.state)
    assert torch.equal(
        checkpoint.state["backbone.layer4.2.conv3.weight"], state["base.layer4.2.conv3.weight"]
    )


def test_official_81_classes_onto_3_classes_at_another_size():
    state = random_official_state_dict("vgg16", seed=4)  # the layout of m2det512_vgg.pth (any size)
    names = ["car", "platelet", "person"]
    model = m2det.build_model("m2det512_vgg16", weights=state, class_names=names, input_size=320)
    config = model.config
    assert (config.input_size, config.num_classes, config.backbone.name) == (320, 4, "vgg16")
    assert model.anchors().shape[0] == 12_810  # the 320 layout: 6 anchors per location as at 512
    report = model.transfer_report
    assert report.class_map == {"car": "car", "person": "person"} and report.new_classes == ["platelet"]
    car, person = COCO_CLASSES.index("car") + 1, COCO_CLASSES.index("person") + 1
    for i in range(6):
        for p in ("weight", "bias"):
            ours, theirs = getattr(model.head.conf[i], p), state[f"conf.{i}.{p}"]
            for new_label, old_label in ((0, 0), (1, car), (3, person)):
                assert torch.equal(_rows(ours, 4, new_label), _rows(theirs, 81, old_label))
    assert torch.equal(model.backbone.features[31].weight, state["base.31.weight"])
    assert torch.equal(model.mlfpn.tums[4].lateral[2].conv.weight, state["unet5.latlayer.2.conv.weight"])
    assert torch.equal(model.head.loc[5].bias, state["loc.5.bias"])
    assert len(report.mapped) == 12 and report.reinitialized == []


def _meta_state(preset, **overrides):
    with torch.device("meta"):
        return m2det.build_model(preset, **overrides).state_dict()


@pytest.mark.parametrize(
    ("source_preset", "overrides", "why"),
    [
        ("m2det320_resnet101", {}, "backbone: checkpoint resnet101, model vgg16"),
        ("m2det320_vgg16", {"mlfpn.num_levels": 4}, "MLFPN levels (TUMs): checkpoint 4, model 8"),
        ("m2det320_vgg16", {"mlfpn.sfam": True}, "SFAM: checkpoint on, model off"),
    ],
)
def test_another_architecture_is_refused_with_the_reason(source_preset, overrides, why):
    # shapes alone decide, so both models live on the meta device: nothing is allocated or copied
    state = _meta_state(source_preset, **overrides)
    with torch.device("meta"):
        model = m2det.build_model("m2det320_vgg16", num_classes=4)
    with pytest.raises(ValueError, match="nothing was loaded") as info:
        transfer_weights(model, state, where="other.safetensors")
    assert why in str(info.value) and "other.safetensors" in str(info.value)


def test_refusal_loads_nothing(source):
    path, _ = source
    model = m2det.build_model(tiny_model(num_classes=4).config, **{"mlfpn.num_levels": 3})
    before = weights(model)
    with pytest.raises(ValueError, match=r"MLFPN levels \(TUMs\): checkpoint 2, model 3"):
        transfer_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_official_without_preset_needs_one():
    state = {"base.0.weight": torch.zeros(64, 3, 3, 3), "conf.0.weight": torch.zeros(6 * 81, 8, 3, 3)}
    with pytest.raises(ValueError, match="give the preset it was trained as"):
        m2det.build_model(weights=state, class_names=["a"])


# ----- the trainer's fine-tuning controls -----
def _config(**overrides) -> TrainConfig:
    base = dict(
        epochs=2,
        batch_size=4,
        lr=0.02,
        warmup_epochs=0.5,
        milestones=[],
        workers=0,
        eval_every=0,
        log_every=1,
    )
    return TrainConfig(**{**base, **overrides}).validate()


def test_lr_mults_make_parameter_groups_the_schedule_scales():
    model = tiny_model()
    groups = parameter_groups(model, {"backbone": 0.1, "head": 0.5, "head.conf": 2.0})
    assert [g["lr_mult"] for g in groups] == [1.0, 2.0, 0.5, 0.1]
    ids = {m: {id(p) for p in g["params"]} for m, g in zip([1.0, 2.0, 0.5, 0.1], groups)}
    assert ids[0.1] == {id(p) for p in model.backbone.parameters()}
    assert ids[2.0] == {id(p) for p in model.head.conf.parameters()}
    assert ids[0.5] == {id(p) for p in model.head.loc.parameters()}
    config = _config(lr_mults={"backbone": 0.1, "head": 0.5, "head.conf": 2.0})
    optimizer = config.build_optimizer(groups)
    scheduler = build_scheduler(optimizer, config.schedule(), steps_per_epoch=2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    rates = [g["lr"] for g in optimizer.param_groups]
    assert rates == pytest.approx([0.02 * m for m in (1.0, 2.0, 0.5, 0.1)])
    with pytest.raises(ValueError, match="backbon"):
        parameter_groups(model, {"backbon": 0.1})
    with pytest.raises(ValueError, match="lr_mults"):
        _config(lr_mults={"backbone": -1})
    with pytest.raises(ValueError, match="freeze_backbone_epochs"):
        _config(freeze_backbone_epochs=True)


def test_backbone_frozen_for_the_first_epoch_and_resume_is_exact(tmp_path):
    config = _config(freeze_backbone_epochs=1, lr_mults={"backbone": 0.5, "mlfpn": 0.1})
    data = ToyBoxes(8, flip=True)
    whole = tiny_model()
    init = weights(whole)
    Trainer(whole, config, data, run_dir=tmp_path / "whole", device="cpu", progress=False).fit()

    first = tiny_model()
    Trainer(first, config, data, run_dir=tmp_path / "split", device="cpu", progress=False).fit(
        stop_at_epoch=1
    )
    after_one = weights(first)
    backbone = [k for k in init if k.startswith("backbone.")]
    assert all(torch.equal(after_one[k], init[k]) for k in backbone)  # weights and BN statistics
    assert not torch.equal(after_one["mlfpn.ffm1.reduce.conv.weight"], init["mlfpn.ffm1.reduce.conv.weight"])
    resumed = tiny_model(seed=9)
    Trainer(resumed, config, data, run_dir=tmp_path / "split", device="cpu", progress=False).fit(resume=True)
    final = weights(whole)
    assert not torch.equal(final["backbone.stem.0.weight"], init["backbone.stem.0.weight"])  # released
    assert all(torch.equal(final[k], v) for k, v in weights(resumed).items())


@pytest.mark.parametrize("setting", [{"freeze_backbone_bn": True}, {"freeze_backbone_epochs": -1}])
def test_frozen_backbone_statistics(tmp_path, setting):
    model = tiny_model()
    init = weights(model)
    Trainer(
        model, _config(epochs=1, **setting), ToyBoxes(8), run_dir=tmp_path, device="cpu", progress=False
    ).fit()
    after = weights(model)
    stats = [k for k in init if k.startswith("backbone.") and "running_" in k]
    assert stats and all(torch.equal(after[k], init[k]) for k in stats)
    assert not torch.equal(after["mlfpn.norm.running_mean"], init["mlfpn.norm.running_mean"])
    moved = not torch.equal(after["backbone.stem.0.weight"], init["backbone.stem.0.weight"])
    assert moved == (setting.get("freeze_backbone_epochs", 0) != -1)


# ----- the command line -----
def test_train_cli_starts_from_a_checkpoint(tmp_path, source):
    from m2det.data.synthetic import ShapesConfig, generate_shapes_dataset
    from m2det.engine.checkpoint_state import load_checkpoint

    path, old = source
    shapes = ShapesConfig(width=64, height=64, classes=("circle", "square"), size_range=(0.3, 0.6), clutter=0)
    data = generate_shapes_dataset(tmp_path / "shapes", num_train=8, num_val=4, config=shapes)
    args = ["train", "--data", str(data.train.annotations), "--val-data", str(data.val.annotations)]
    args += ["--weights", str(path), "--device", "cpu", "--project", str(tmp_path / "runs"), "--quiet"]
    settings = ["--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.workers=0"]
    result = CliRunner().invoke(app, [*args, *settings, "--set", "train.freeze_backbone_epochs=1"])
    assert result.exit_code == 0, result.output
    assert f"initialised from {path}:" in result.output
    assert "re-initialised: the rows of 2 new classes in head.conf.0-2 (circle, square)" in result.output
    run = tmp_path / "runs" / "exp1"
    assert json.loads((run / "transfer.json").read_text())["new_classes"] == ["circle", "square"]
    saved = read_config(run / LAST_MODEL)
    assert (saved.num_classes, saved.class_names, saved.mlfpn.num_levels) == (3, ["circle", "square"], 2)
    trained = load_checkpoint(run).state["train_config"]
    preset = get_train_config("finetune")
    assert (trained["optimizer"], trained["lr_mults"], trained["freeze_backbone_bn"]) == (
        preset.optimizer,
        preset.lr_mults,
        True,
    )
    model = tiny_model(num_classes=3)
    load_weights(model, run / LAST_MODEL)
    assert torch.equal(model.backbone.stem[0].weight, old["backbone.stem.0.weight"])  # frozen epoch

    both = CliRunner().invoke(app, ["train", "--resume", str(run), "--weights", str(path)])
    assert both.exit_code == 2 and "cannot be combined" in both.output
    official = tmp_path / "official.pth"
    torch.save(
        {"base.0.weight": torch.zeros(64, 3, 3, 3), "conf.0.weight": torch.zeros(6 * 81, 8, 3, 3)}, official
    )
    bare = CliRunner().invoke(app, [*args[:5], "--weights", str(official), "--quiet"])
    assert bare.exit_code == 2 and "--preset" in bare.output

"""Official checkpoints: strict loading, every tensor computing where it should, clear errors."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch
from typer.testing import CliRunner

import m2det
from conftest import random_official_state_dict
from m2det.cli.main import app
from m2det.io.official import authors_key, official_key, official_layout
from m2det.models.loading import build_official_model, load_model
from official_reference import official_forward


def meta_model(preset: str, **overrides):
    """A model without memory or init time: enough for key and shape checks that fail before loading."""
    with torch.device("meta"):
        return m2det.build_model(preset, **overrides)


@pytest.fixture(scope="module")
def official_320():
    return random_official_state_dict("vgg16", seed=1)


@pytest.fixture(scope="module")
def loaded_320(official_320):
    model = m2det.build_model("m2det320_vgg16").eval()
    report = m2det.load_official(model, official_320)
    assert report.missing == [] and report.unexpected == []
    return model


@pytest.mark.parametrize(
    ("preset", "size"),
    [
        ("m2det320_vgg16", 887),
        ("m2det512_vgg16", 887),
        ("m2det320_resnet101", 1483),
        ("m2det512_resnet101", 1483),
    ],
)
def test_packaged_layout_is_the_model_in_official_names(preset, size):
    model = meta_model(preset)
    backbone = model.config.backbone.name
    layout = official_layout(backbone)
    assert len(layout) == size
    # every key and shape of the authors' layout has its place in the model, the ResNet classifier aside
    unused = {"base.fc.weight": (1000, 2048), "base.fc.bias": (1000,)} if backbone == "resnet101" else {}
    assert {k: layout.pop(k) for k in unused} == unused
    named = {authors_key(k, backbone): tuple(v.shape) for k, v in model.state_dict().items()}
    assert named == layout
    assert all(official_key(authors_key(k, backbone), backbone) == k for k in model.state_dict())


def test_official_layout_names_the_backbones_it_has():
    assert official_layout("vgg16")["base.33.weight"] == (1024, 1024, 1, 1)
    assert official_layout("resnet101")["base.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    with pytest.raises(ValueError, match="no official layout for backbone 'tiny'.*vgg16, resnet101"):
        official_layout("tiny")


def test_outputs_equal_independent_official_forward(loaded_320, official_320):
    x = torch.randn(2, 3, 320, 320) * 50
    with torch.inference_mode():
        loc, logits = loaded_320.forward_raw(x)
        ref_loc, ref_logits = official_forward(official_320, x)
    scale = ref_logits.abs().max()
    assert torch.allclose(loc, ref_loc, atol=1e-4 * ref_loc.abs().max(), rtol=1e-4)
    assert torch.allclose(logits, ref_logits, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize(
    "key", ["unet5.latlayer.2.conv.weight", "unet8.smooth.0.bn.running_mean", "conf.3.bias", "base.19.weight"]
)
def test_perturbing_one_official_tensor_changes_the_matching_output(official_320, key):
    # perturb in the official dict, load, and compare with the reference fed the same perturbed dict
    state = {k: v.clone() for k, v in official_320.items()}
    state[key] += torch.randn_like(state[key].float()).to(state[key].dtype) * 0.5 + 0.1
    model = m2det.build_model("m2det320_vgg16").eval()
    m2det.load_official(model, state)
    x = torch.randn(1, 3, 320, 320) * 50
    with torch.inference_mode():
        loc, logits = model.forward_raw(x)
        ref_loc, ref_logits = official_forward(state, x)
        base_loc, base_logits = official_forward(official_320, x)
    assert not torch.allclose(logits, base_logits)  # the tensor matters...
    assert torch.allclose(
        logits, ref_logits, atol=1e-4 * ref_logits.abs().max(), rtol=1e-4
    )  # ...where it should
    assert torch.allclose(loc, ref_loc, atol=1e-4 * ref_loc.abs().max(), rtol=1e-4)


def test_sfam_checkpoint_loads_and_matches(official_320):
    state = dict(official_320)
    gen = torch.Generator().manual_seed(3)
    fc1_w, fc1_b = torch.randn(128, 2048, 1, 1, generator=gen) * 0.02, torch.randn(128, generator=gen) * 0.1
    fc2_w, fc2_b = torch.randn(2048, 128, 1, 1, generator=gen) * 0.1, torch.randn(2048, generator=gen) * 0.1
    for i in range(6):
        state.update({
            f"sfam_module.fc1.{i}.weight": fc1_w, f"sfam_module.fc1.{i}.bias": fc1_b,
            f"sfam_module.fc2.{i}.weight": fc2_w, f"sfam_module.fc2.{i}.bias": fc2_b,
        })  # fmt: skip
    model = m2det.build_model("m2det320_vgg16", mlfpn={"sfam": True}).eval()
    m2det.load_official(model, state)
    x = torch.randn(1, 3, 320, 320) * 50
    with torch.inference_mode():
        _, logits = model.forward_raw(x)
        _, ref_logits = official_forward(state, x, sfam=True)
    assert torch.allclose(logits, ref_logits, atol=1e-4 * ref_logits.abs().max(), rtol=1e-4)


def test_512_layout_loads_strictly():
    model = m2det.build_model("m2det512_vgg16")
    state = random_official_state_dict("vgg16", seed=2)
    report = m2det.load_official(model, state)
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert torch.equal(model.mlfpn.tums[7].smooth[4].conv.weight, state["unet8.smooth.4.conv.weight"])


@pytest.fixture(scope="module")
def official_resnet():
    return random_official_state_dict("resnet101", seed=4)


def test_resnet101_layout_loads_strictly_without_its_classifier(official_resnet):
    assert len(official_resnet) == 1483 and "base.fc.weight" in official_resnet
    model = m2det.build_model("m2det320_resnet101")
    report = m2det.load_official(model, official_resnet)
    assert report.missing == [] and report.unexpected == []
    assert report.ignored == ["base.fc.bias", "base.fc.weight"]
    own = model.state_dict()
    for key, value in official_resnet.items():
        if key not in report.ignored:
            assert torch.equal(own[official_key(key, "resnet101")], value), key


def test_only_the_resnet_classifier_is_ignored(official_resnet, official_320):
    resnet = meta_model("m2det320_resnet101")
    for stray in ("base.fc2.weight", "fc.weight", "base.layer4.2.fc.weight", "extra.bias"):
        with pytest.raises(
            ValueError, match=rf"not in the official layout of this model: {re.escape(stray)}"
        ):
            m2det.load_official(resnet, {**official_resnet, stray: torch.zeros(1)})
    # VGG16 has no classifier in the authors' layout: the same keys are strays there
    with pytest.raises(
        ValueError, match=r"not in the official layout of this model: base\.fc\.bias, base\.fc\.weight"
    ):
        m2det.load_official(
            meta_model("m2det320_vgg16"),
            {**official_320, **{k: official_resnet[k] for k in ("base.fc.weight", "base.fc.bias")}},
        )


def test_another_backbone_names_the_presets_that_fit(official_resnet, official_320):
    with pytest.raises(ValueError) as info:
        m2det.load_official(meta_model("m2det320_resnet101"), official_320)
    message = str(info.value)
    assert message.startswith(
        "state dict: does not fit m2det320_resnet101 (its base.* keys are the authors' vgg16"
    )
    assert "m2det320_vgg16, m2det512_vgg16, m2det704_vgg16, m2det800_vgg16" in message
    assert "missing from the checkpoint: base.bn1.bias" in message  # in the authors' names
    with pytest.raises(
        ValueError,
        match="authors' resnet101 backbone, not vgg16: use a resnet101 preset: m2det320_resnet101, m2det512_resnet101",
    ):
        m2det.load_official(meta_model("m2det512_vgg16"), official_resnet)


def test_wrong_num_classes_lists_the_heads(official_320):
    model = m2det.build_model("m2det320_vgg16", num_classes=21)
    with pytest.raises(ValueError) as info:
        m2det.load_official(model, official_320)
    message = str(info.value)
    assert "(the conf heads differ: pass num_classes matching the checkpoint)" in message
    assert "conf.0.weight: checkpoint (486, 2048, 3, 3) vs model (126, 2048, 3, 3)" in message


def test_missing_and_unexpected_keys_are_listed(official_320):
    state = dict(official_320)
    del state["unet3.toplayer.0.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    model = m2det.build_model("m2det320_vgg16")
    with pytest.raises(ValueError) as info:
        m2det.load_official(model, state)
    # both in the checkpoint's own names, so they can be found in it
    assert "missing from the checkpoint: unet3.toplayer.0.conv.weight;" in str(info.value)
    assert "not in the official layout of this model: extra.weight" in str(info.value)


def test_differing_shared_copies_are_refused_then_loadable_unshared(official_320):
    state = dict(official_320)
    state["leach.4.conv.weight"] = state["leach.4.conv.weight"] + 1
    with pytest.raises(ValueError, match="shared_leach=False"):
        m2det.load_official(m2det.build_model("m2det320_vgg16"), state)
    unshared = m2det.build_model("m2det320_vgg16", mlfpn={"shared_leach": False}).eval()
    m2det.load_official(unshared, state)
    assert torch.equal(unshared.mlfpn.leach[4].conv.weight, state["leach.4.conv.weight"])
    assert torch.equal(unshared.mlfpn.leach[3].conv.weight, state["leach.3.conv.weight"])


def test_pth_loads_weights_only(tmp_path, official_320):
    path = tmp_path / "official.pth"
    torch.save(official_320, path)
    model = m2det.build_model("m2det320_vgg16")
    m2det.load_official(model, path)
    assert torch.equal(model.head.conf[2].bias, official_320["conf.2.bias"])


def test_build_official_model_names_what_is_wrong(tmp_path):
    # the preset is checked before a (large) file is read: this one does not even exist
    with pytest.raises(
        ValueError, match="unknown preset 'm2det320_resnet'; did you mean m2det320_resnet101?"
    ):
        build_official_model(tmp_path / "m2det.pth", "m2det320_resnet")
    backbone_only = tmp_path / "vgg16_reducedfc.pth"
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, backbone_only)
    message = (
        f"{backbone_only}: not an official M2Det checkpoint: it has no conf.0.weight (the first class head)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build_official_model(backbone_only, "m2det320_vgg16")


def test_build_official_model_loads_a_resnet101_checkpoint(official_resnet):
    # what `m2det convert` and `--weights X.pth --preset ...` run
    model = build_official_model(official_resnet, "m2det320_resnet101")
    assert model.config.num_classes == 81 and model.config.class_names[0] == "person"
    assert torch.equal(model.backbone.conv1.weight, official_resnet["base.conv1.weight"])


def test_convert_cli_writes_a_loadable_model(tmp_path):
    # a thin variant keeps the files small; the mapping is the same for every variant
    small = m2det.build_model("m2det320_vgg16", num_classes=4, mlfpn={"num_levels": 2, "planes": 64}).eval()
    official = {authors_key(k, "vgg16"): v.clone() + 0.01 for k, v in small.state_dict().items()}
    src = tmp_path / "official.pth"
    torch.save(official, src)
    out = tmp_path / "converted.safetensors"
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(src),
            str(out),
            "--preset",
            "m2det320_vgg16",
            "--set",
            "mlfpn.num_levels=2",
            "--set",
            "mlfpn.planes=64",
        ],
    )
    assert result.exit_code == 0, result.output
    # written atomically, yet with the permissions a plain open() gives (safetensors alone makes 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    model = load_model(out).eval()
    assert model.config.num_classes == 4 and model.config.mlfpn.num_levels == 2
    x = torch.randn(1, 3, 320, 320)
    reference = m2det.build_model(model.config).eval()
    m2det.load_official(reference, official)
    with torch.inference_mode():
        assert torch.equal(model.forward_raw(x)[1], reference.forward_raw(x)[1])


def test_convert_cli_reports_bad_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(
        app, ["convert", str(bad), str(tmp_path / "o.safetensors"), "--preset", "m2det320_vgg16"]
    )
    assert result.exit_code == 2
    assert f"error: {bad}: not a PyTorch file" in " ".join(result.output.split())


def test_resnet101_official_values_land_in_the_right_parameters(official_resnet):
    """The mapping checked by value, with our names written out by hand (not through `official_key`):
    a renaming bug that is consistent in both directions would pass a round trip, not this."""
    model = m2det.build_model("m2det320_resnet101")
    m2det.load_official(model, official_resnet)
    ours = {
        "base.conv1.weight": model.backbone.conv1.weight,
        "base.bn1.running_mean": model.backbone.bn1.running_mean,
        "base.layer1.0.downsample.0.weight": model.backbone.layer1[0].downsample[0].weight,
        "base.layer3.22.conv2.weight": model.backbone.layer3[22].conv2.weight,
        "base.layer4.2.bn3.running_var": model.backbone.layer4[2].bn3.running_var,
        "reduce.conv.weight": model.mlfpn.ffm1.reduce.conv.weight,
        "up_reduce.bn.bias": model.mlfpn.ffm1.up_reduce.bn.bias,
        "leach.0.conv.weight": model.mlfpn.leach[0].conv.weight,
        "unet1.layers.0.conv.weight": model.mlfpn.tums[0].encoder[0].conv.weight,
        "unet1.latlayer.0.conv.weight": model.mlfpn.tums[0].lateral[0].conv.weight,
        "unet1.smooth.0.conv.weight": model.mlfpn.tums[0].smooth[0].conv.weight,
        "unet8.toplayer.0.conv.weight": model.mlfpn.tums[7].top.conv.weight,
        "Norm.weight": model.mlfpn.norm.weight,
        "loc.0.weight": model.head.loc[0].weight,
        "conf.5.bias": model.head.conf[5].bias,
    }
    for key, parameter in ours.items():
        assert torch.equal(parameter.detach(), official_resnet[key]), key
    # distinct random tensors, so an equality above cannot hold by accident between two keys
    assert not torch.equal(
        official_resnet["unet1.smooth.0.conv.weight"], official_resnet["unet2.smooth.0.conv.weight"]
    )

"""The network: parameter counts, forward shapes of every preset and every Table 3 variant."""

from __future__ import annotations

import pytest
import torch

import m2det
from m2det.config import get_config, list_presets
from m2det.models.complexity import count_params, measure


def meta_model(name: str, **overrides):
    with torch.device("meta"):
        return m2det.build_model(name, **overrides)


def test_official_parameter_counts():
    assert count_params(meta_model("m2det320_vgg16", num_classes=81)) == 132_633_140
    assert count_params(meta_model("m2det320_vgg16", num_classes=81, mlfpn={"sfam": True})) == 133_159_604
    # the count does not depend on the input size
    assert count_params(meta_model("m2det512_vgg16")) == 132_633_140


def test_shared_modules_are_one_module():
    model = meta_model("m2det320_vgg16", mlfpn={"sfam": True})
    assert all(leach is model.mlfpn.leach[0] for leach in model.mlfpn.leach)
    assert all(fc is model.mlfpn.sfam.fc1[0] for fc in model.mlfpn.sfam.fc1)
    unshared = meta_model("m2det320_vgg16", mlfpn={"shared_leach": False})
    assert count_params(unshared) == 132_633_140 + 7 * (768 * 128 + 2 * 128)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_forward_shapes(name):
    """Shapes only, on the meta device: every layer's shape rule runs, no arithmetic (the values are
    checked against the official forward pass in test_official.py)."""
    config = get_config(name, num_classes=5)
    model = meta_model(config).eval()
    anchors = m2det.anchors(config)
    size = config.input_size
    with torch.inference_mode():
        loc, logits = model.forward_raw(torch.empty(2, 3, size, size, device="meta"))
    assert loc.shape == (2, anchors.shape[0], 4)
    assert logits.shape == (2, anchors.shape[0], 5)


def test_a_preset_forward_is_finite():
    """The values of one small preset for real, as the meta-device test computes none."""
    model = m2det.build_model("m2det_tiny", num_classes=5).eval()
    size = model.config.input_size
    with torch.inference_mode():
        loc, logits = model.forward_raw(torch.randn(1, 3, size, size))
    assert torch.isfinite(loc).all() and torch.isfinite(logits).all()


TABLE3 = [
    (2, 256),
    (2, 512),
    (4, 128),
    (4, 256),
    (4, 512),
    (8, 128),
    (8, 256),
    (8, 512),
    (16, 128),
    (16, 256),
]


@pytest.mark.parametrize(("levels", "planes"), TABLE3)
def test_table3_variants_build_and_run(levels, planes):
    overrides = {"mlfpn": {"num_levels": levels, "planes": planes, "sfam": True}, "num_classes": 3}
    # the full VGG16 at 320 on the meta device: the real shapes, no compute
    model = meta_model("m2det320_vgg16", **overrides)
    loc, logits = model.forward_raw(torch.empty(2, 3, 320, 320, device="meta"))
    assert loc.shape == (2, 12_810, 4) and logits.shape == (2, 12_810, 3)
    assert model.mlfpn.out_channels == levels * planes
    assert model.mlfpn.norm.num_features == levels * planes
    # and real arithmetic on the same MLFPN behind the light backbone
    real = m2det.build_model("m2det_tiny", **overrides).eval()
    with torch.inference_mode():
        loc, logits = real.forward_raw(torch.randn(1, 3, 320, 320))
    assert loc.shape == (1, 12_810, 4) and torch.isfinite(logits).all()


def test_gflops_match_reference_table():
    # the authors' module measured with FlopCounterMode (the figures of the README's preset table)
    assert measure(get_config("m2det320_vgg16")).gflops == pytest.approx(148.6, abs=0.05)
    assert measure(get_config("m2det512_vgg16")).gflops == pytest.approx(380.2, abs=0.05)
    assert measure(get_config("m2det800_vgg16")).gflops == pytest.approx(929.6, abs=0.05)


def test_resnet101_features():
    model = meta_model("m2det320_resnet101")
    shallow, deep = model.backbone(torch.empty(1, 3, 320, 320, device="meta"))
    assert shallow.shape == (1, 512, 40, 40) and deep.shape == (1, 2048, 20, 20)
    assert model.mlfpn.ffm1.up_reduce.conv.in_channels == 2048


def test_train_mode_forward_and_backward_tiny():
    model = m2det.build_model("m2det_tiny", num_classes=3).train()
    loc, logits = model.forward_raw(torch.randn(2, 3, 320, 320))
    (loc.square().mean() + logits.square().mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_odd_input_size_runs():
    # the official code fails when the stride-16 map doubles past the stride-8 map; ours follows the shape
    model = m2det.build_model("m2det_tiny", num_classes=3).eval()
    with torch.inference_mode():
        loc, _ = model.forward_raw(torch.randn(1, 3, 344, 344))
    assert loc.shape[1] == m2det.anchors(model.config, 344).shape[0]


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        m2det.anchors("m2det320_vgg16", 128)

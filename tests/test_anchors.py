"""Anchors equal the official prior boxes exactly; the box coder inverts itself and matches SSD."""

from __future__ import annotations

import pytest
import torch

import m2det
from m2det.boxes.coder import BoxCoder
from m2det.config import AnchorConfig, get_config
from official_reference import official_priors

OFFICIAL = {
    320: ([8, 16, 32, 64, 107, 320], [0.08, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], 12_810),
    512: ([8, 16, 32, 64, 128, 256], [0.06, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], 32_760),
    704: ([8, 16, 32, 64, 117, 176], [0.04, 0.11, 0.23, 0.39, 0.58, 0.80, 1.05], None),
    800: ([8, 16, 32, 62, 115, 160], [0.04, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], 80_208),
}


@pytest.mark.parametrize("size", sorted(OFFICIAL))
def test_anchors_equal_official_bit_for_bit(size):
    steps, pattern, count = OFFICIAL[size]
    ours = m2det.anchors(f"m2det{size}_vgg16")
    reference = official_priors(size, steps, pattern)
    if count is not None:
        assert ours.shape == (count, 4)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference)


def test_resnet_presets_share_the_vgg_anchors():
    assert torch.equal(m2det.anchors("m2det320_resnet101"), m2det.anchors("m2det320_vgg16"))


def test_first_location_layout():
    a = m2det.anchors("m2det320_vgg16")
    s = 25.6 / 320
    assert a[0].tolist() == pytest.approx([4 / 320, 4 / 320, s, s])
    assert a[1, 2].item() == pytest.approx((s * 48 / 320) ** 0.5)
    assert a[2, 2].item() / a[2, 3].item() == pytest.approx(2.0, rel=1e-5)  # ratio 2 first
    assert a[6, 0].item() == pytest.approx(12 / 320)  # then the next column (row-major)


def test_any_size_and_scale_layout():
    config = get_config(
        "m2det_tiny",
        anchors=AnchorConfig(size_pattern=[0.1, 0.2, 0.4, 0.6, 0.8, 1.0], steps=None),
        mlfpn={"num_scales": 5},
    )
    model = m2det.build_model(config).eval()
    for size in (256, 384):
        anchors = m2det.anchors(config, size)
        with torch.inference_mode():
            loc, _ = model.forward_raw(torch.randn(1, 3, size, size))
        assert loc.shape[1] == anchors.shape[0]
        assert anchors.min() >= 0 and anchors.max() <= 1


def test_box_coder_round_trip_and_formula():
    coder = BoxCoder((0.1, 0.2))
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    boxes = torch.tensor([[0.35, 0.25, 0.7, 0.8], [0.2, 0.5, 0.45, 0.72]])
    deltas = coder.encode(boxes, anchors)
    # SSD: ((gx - ax) / (0.1 aw), (gy - ay) / (0.1 ah), log(gw / aw) / 0.2, log(gh / ah) / 0.2)
    expected0 = torch.tensor(
        [
            (0.525 - 0.5) / 0.02,
            (0.525 - 0.5) / 0.04,
            torch.log(torch.tensor(0.35 / 0.2)) / 0.2,
            torch.log(torch.tensor(0.55 / 0.4)) / 0.2,
        ]
    )
    assert torch.allclose(deltas[0], expected0, atol=1e-5)
    assert torch.allclose(coder.decode(deltas, anchors), boxes, atol=1e-6)


def test_box_coder_batched_broadcast():
    coder = BoxCoder()
    anchors = m2det.anchors("m2det_tiny")
    deltas = torch.randn(3, anchors.shape[0], 4) * 0.5
    boxes = coder.decode(deltas, anchors)
    assert boxes.shape == (3, anchors.shape[0], 4)
    assert torch.allclose(coder.encode(boxes, anchors), deltas, atol=1e-4)


def test_other_sizes_derive_steps_so_centres_stay_on_cells():
    # the official steps belong to the preset's own size; at 288 the pyramid is 36, 18, 9, 5, 3, 1
    anchors = m2det.anchors("m2det320_vgg16", 288)
    sizes = [36, 18, 9, 5, 3, 1]
    assert anchors.shape[0] == sum(f * f for f in sizes) * 6
    last = anchors[-6:]
    assert torch.allclose(last[:, :2], torch.full((6, 2), 0.5))  # the 1x1 map is centred
    start = sum(f * f for f in sizes[:4]) * 6
    third_scale_first_cell = anchors[start, :2]
    assert torch.allclose(third_scale_first_cell, torch.tensor([0.5 / 3, 0.5 / 3]))
    model = m2det.build_model("m2det_tiny")
    assert torch.equal(model.anchors(288), m2det.anchors(model.config, 288))
    assert torch.equal(model.anchors(), m2det.anchors("m2det_tiny"))

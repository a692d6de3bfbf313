"""The fast inference path: BatchNorm folding and `optimize_for_inference` keep the outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import m2det
from m2det.deploy import AffineInputConv2d, OptimizedNetwork, fold_batchnorms, optimize_for_inference
from m2det.deploy.fuse import count_batchnorms
from m2det.deploy.prepack import PackedConv2d, count_packed
from m2det.inference import DetectionPipeline, Network

THIN_VGG = {"mlfpn": {"planes": 16, "num_levels": 2, "shallow_out": 16, "deep_out": 32}}


def with_trained_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as training would."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def batch_of_images(model: m2det.M2Det, n: int, size: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return model.normalize(torch.rand(n, 3, size, size, generator=g))


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= rtol * scale, float((actual - expected).abs().max() / scale)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("m2det_tiny", {"num_classes": 4}),
        (
            "m2det_tiny",
            {"num_classes": 4, "mlfpn": {"shared_leach": False, "sfam": True, "sfam_reduction": 4}},
        ),
        # the full VGG16 backbone behind a thin MLFPN: batch 1 keeps it quick
        ("m2det320_vgg16", {"num_classes": 3, "mlfpn": {**THIN_VGG["mlfpn"], "sfam": True}}),
    ],
)
def test_folding_keeps_forward_raw(name, overrides):
    model = with_trained_statistics(m2det.build_model(name, **overrides))
    x = batch_of_images(model, 2 if name == "m2det_tiny" else 1)
    with torch.no_grad():
        expected = model.forward_raw(x)
    before = count_batchnorms(model)
    folded = optimize_for_inference(model, channels_last=False)
    assert count_batchnorms(folded) == 0
    assert count_batchnorms(model) == before  # the original is untouched
    for actual, reference in zip(folded.forward_raw(x), expected):
        assert_close_relative(actual, reference)


def test_optimized_network_is_an_eval_network_with_channels_last_weights():
    model = with_trained_statistics(m2det.build_model("m2det_tiny", num_classes=4))
    fast = optimize_for_inference(model)
    assert isinstance(fast, OptimizedNetwork) and isinstance(fast, Network)
    assert fast.config is fast.model.config and fast.fixed_input_size is None
    assert not any(m.training for m in fast.modules()) and not any(p.requires_grad for p in fast.parameters())
    assert fast.options.channels_last
    assert isinstance(fast.model.backbone.stem[0], PackedConv2d)  # weights in oneDNN's own layout
    conv = optimize_for_inference(model, prepack=False).model.backbone.stem[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = batch_of_images(model, 3, seed=1)
    with torch.no_grad():
        expected = model.forward_raw(x)
    for actual, reference in zip(fast.forward_raw(x), expected):
        assert actual.dtype == torch.float32
        assert_close_relative(actual, reference)


def test_shared_leach_stays_one_module_after_folding():
    model = with_trained_statistics(m2det.build_model("m2det_tiny", num_classes=4))
    fast = optimize_for_inference(model, prepack=False)
    leach = fast.model.mlfpn.leach
    assert all(level is leach[0] for level in leach)
    assert isinstance(leach[0].bn, nn.Identity) and leach[0].conv.bias is not None
    # the folded conv differs from the original's (it carries the BatchNorm)
    assert not torch.equal(leach[0].conv.weight, model.mlfpn.leach[0].conv.weight)


def test_the_pipeline_around_the_fast_network_gives_the_same_detections():
    model = with_trained_statistics(m2det.build_model("m2det_tiny", num_classes=4))
    fast = optimize_for_inference(model)
    images = [
        torch.randint(0, 256, (3, 240, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ]
    with torch.no_grad():
        expected = model(images)[0]
    actual = DetectionPipeline(fast)(images)[0]
    assert len(actual["scores"]) == len(expected["scores"]) > 0
    torch.testing.assert_close(actual["boxes"], expected["boxes"], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(actual["scores"], expected["scores"], rtol=1e-3, atol=1e-5)
    assert torch.equal(actual["labels"], expected["labels"])


@pytest.mark.parametrize(("stride", "padding", "kernel"), [(1, 1, 3), (2, 1, 3), (1, 2, 5), (1, 0, 1)])
def test_affine_input_conv_equals_conv_of_batchnorm_at_the_borders(stride, padding, kernel):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride=stride, padding=padding)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    x = torch.randn(2, 6, 9, 11, generator=g)
    # the reference: BatchNorm in eval, then the conv with zero padding of the normalised input
    normalised = F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-5)
    expected = conv(normalised)
    scale = weight / torch.sqrt(var + 1e-5)
    folded = AffineInputConv2d(conv, scale, bias - mean * scale)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_resnet_backbone_bottlenecks_fold():
    from m2det.models.backbones import ResNet101

    backbone = with_trained_statistics(ResNet101())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone(x)
        assert fold_batchnorms(backbone) == count_batchnorms(ResNet101()) == 104
        actual = backbone(x)
    assert count_batchnorms(backbone) == 0
    for a, e in zip(actual, expected):
        assert_close_relative(a, e)


def test_bad_use_is_refused_with_a_clear_error():
    model = m2det.build_model("m2det_tiny", num_classes=4)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(model.train())
    with pytest.raises(ValueError, match="precision"):
        optimize_for_inference(model.eval(), precision="int4")
    with pytest.raises(ValueError, match="cuda_graphs"):
        optimize_for_inference(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="already optimised"):
        optimize_for_inference(optimize_for_inference(model))
    from m2det.deploy.export import DetectionGraph

    with pytest.raises(ValueError, match="original PyTorch M2Det"):  # export folds the original itself
        DetectionGraph(optimize_for_inference(model))


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "relu", "channels_last"),
    [(1, 1, 1, True, True), (2, 1, 1, False, True), (1, 6, 6, True, False), (1, 0, 1, False, False)],
)
def test_packed_conv_equals_the_conv_it_replaces(stride, padding, dilation, relu, channels_last):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 24, 3 if padding else 1, stride=stride, padding=padding, dilation=dilation).eval()
    x = torch.randn(3, 16, 19, 23, generator=g)
    expected = conv(x).relu() if relu else conv(x)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    # packed for another batch and size than it then runs at: still the same result
    packed = PackedConv2d(conv, relu=relu, input_shape=[1, 16, 40, 40])
    with torch.inference_mode():
        actual = packed(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-5)


def test_prepacking_fuses_the_relu_after_each_conv_and_keeps_shared_modules_shared():
    model = with_trained_statistics(m2det.build_model("m2det_tiny", num_classes=4))
    fast = optimize_for_inference(model)
    assert fast.options.prepack
    assert not any(type(m) is nn.Conv2d for m in fast.modules())
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in fast.modules())  # each one fused into its conv
    assert sum(m.relu for m in fast.modules() if isinstance(m, PackedConv2d)) == relus
    leach = fast.model.mlfpn.leach
    assert all(level is leach[0] for level in leach) and isinstance(leach[0].conv, PackedConv2d)
    assert not optimize_for_inference(model, prepack=False).options.prepack


def test_prepacked_official_layout_model_equals_eager():
    from conftest import random_official_state_dict
    from m2det.models.loading import build_official_model

    torch.manual_seed(0)
    state = random_official_state_dict("vgg16", seed=3, num_classes=3)
    model = build_official_model(state, "m2det320_vgg16", num_classes=3).eval()
    x = batch_of_images(model, 1)
    with torch.no_grad():
        expected = model.forward_raw(x)
    fast = optimize_for_inference(model)
    assert count_packed(fast) == 2 * 6 + 15 + 8 * (5 + 1 + 5 + 5) + 3  # head, VGG, TUMs, FFMv1 + leach
    for actual, reference in zip(fast.forward_raw(x), expected):
        assert_close_relative(actual, reference)

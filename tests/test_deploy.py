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
from m2det.deploy.winograd import FastestConv2d, WinogradConv2d, count_winograd, winograd_eligible
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


@torch.no_grad()
def _conv_in_float64(conv: nn.Conv2d, x: torch.Tensor, relu: bool) -> torch.Tensor:
    """The exact answer a float32 conv approximates: the same conv computed in float64."""
    bias = None if conv.bias is None else conv.bias.double()
    y = F.conv2d(x.double(), conv.weight.double(), bias, padding=conv.padding)
    return y.relu() if relu else y


@pytest.mark.parametrize(
    ("tile", "padding", "size", "relu", "bias", "batch"),
    [(2, 1, (20, 20), False, True, 1), (4, 1, (20, 20), True, True, 1), (4, 1, (19, 23), False, False, 3),
     (2, 0, (13, 10), True, True, 2), (4, 2, (7, 5), False, True, 1), (4, 1, (1, 1), False, True, 1)],
)  # fmt: skip
def test_winograd_conv_is_as_accurate_as_float32(tile, padding, size, relu, bias, batch):
    g = torch.Generator().manual_seed(tile + padding)
    conv = nn.Conv2d(32, 48, 3, padding=padding, bias=bias).eval()
    x = torch.randn(batch, 32, *size, generator=g)
    winograd = WinogradConv2d(conv, tile=tile, relu=relu)
    with torch.inference_mode():
        actual, direct = winograd(x), conv(x)
    expected = _conv_in_float64(conv, x, relu)
    assert actual.shape == expected.shape and actual.dtype == torch.float32 and actual.is_contiguous()
    scale = expected.abs().max()
    # F(2x2) rounds like the direct conv; F(4x4)'s larger transform entries cost about 10x that
    direct_error = float(((direct.relu() if relu else direct) - expected).abs().max() / scale)
    assert float((actual - expected).abs().max() / scale) <= (4 if tile == 2 else 40) * max(
        direct_error, 2e-7
    )


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_in_bands_of_tile_rows_equals_one_pass(tile):
    g = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(32, 48, 3, padding=1).eval()
    x = torch.randn(3, 32, 19, 23, generator=g)
    one_pass, banded = WinogradConv2d(conv, tile=tile), WinogradConv2d(conv, tile=tile)
    one_pass.BAND_BYTES = 1 << 40
    banded.BAND_BYTES = 0  # bands as small as the kernel allows: here 2 tile rows (tile 4) or 1
    kernel_bytes = banded.kernel.numel() * 4
    tiles_x, tiles_y = -(-23 // tile), -(-19 // tile)
    assert kernel_bytes // (3 * 32 * tiles_x * (tile + 2) ** 2 * 4) < tiles_y  # more than one band
    with torch.inference_mode():
        torch.testing.assert_close(banded(x), one_pass(x), rtol=1e-6, atol=1e-6)
        assert_close_relative(banded(x), _conv_in_float64(conv, x, False).float(), rtol=5e-5)


def test_winograd_refuses_what_it_cannot_compute():
    for conv in (
        nn.Conv2d(8, 8, 3, stride=2),
        nn.Conv2d(8, 8, 3, dilation=2),
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 3, groups=2),
    ):
        assert not winograd_eligible(conv)
        with pytest.raises(ValueError, match="3x3 stride-1"):
            WinogradConv2d(conv)
    with pytest.raises(ValueError, match="tile"):
        WinogradConv2d(nn.Conv2d(8, 8, 3), tile=3)


def test_fastest_conv_times_each_new_shape_and_every_choice_computes_the_conv():
    conv = nn.Conv2d(16, 24, 3, padding=1).eval()
    fastest = FastestConv2d(conv, relu=True, input_shape=[1, 16, 12, 12])
    g = torch.Generator().manual_seed(1)
    x, other = torch.randn(1, 16, 12, 12, generator=g), torch.randn(2, 16, 9, 14, generator=g)
    with torch.inference_mode():
        first = fastest(x)
        assert set(fastest.choices) == {tuple(x.shape)}  # timed on first sight
        assert fastest.choices[tuple(x.shape)] in {"direct", "winograd2", "winograd4"}
        fastest(other)
        assert set(fastest.choices) == {tuple(x.shape), tuple(other.shape)}
        for name in ("direct", "winograd2", "winograd4"):  # whatever it picks, the same conv
            fastest.choices[tuple(other.shape)] = name
            assert_close_relative(fastest(other), _conv_in_float64(conv, other, relu=True).float(), rtol=1e-5)
    assert_close_relative(first, _conv_in_float64(conv, x, relu=True).float(), rtol=1e-5)


def test_winograd_precision_runs_the_model_as_fp32_does():
    model = with_trained_statistics(m2det.build_model("m2det_tiny", num_classes=4)).eval()
    x = batch_of_images(model, 2)
    with torch.no_grad():
        expected = model.forward_raw(x)
    fast = optimize_for_inference(model, precision="winograd")
    assert fast.options.precision == "winograd" and not fast.options.channels_last
    assert not fast.options.weights_converted
    tuned, eligible = count_winograd(fast)
    assert eligible > 0 and 0 <= tuned <= eligible
    # the scale-0 heads absorb the MLFPN's BatchNorm around a Winograd-capable conv
    assert isinstance(fast.model.head.conf[0], AffineInputConv2d)
    assert isinstance(fast.model.head.conf[0].conv, FastestConv2d)
    for module in fast.modules():  # every path each conv could take gives the model's outputs
        if isinstance(module, FastestConv2d):
            for shape in module.choices:
                module.choices[shape] = "winograd4"
    for actual, reference in zip(fast.forward_raw(x), expected):
        assert_close_relative(actual, reference)
    for conflicting in ({"channels_last": True}, {"prepack": False}, {"compile": True}):
        with pytest.raises(ValueError, match="winograd"):
            optimize_for_inference(model, precision="winograd", **conflicting)
    with pytest.raises(ValueError, match="on meta"):
        optimize_for_inference(
            m2det.build_model("m2det_tiny", num_classes=4).to("meta"), precision="winograd"
        )

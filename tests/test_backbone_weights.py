"""ImageNet backbones as the paper used them: torchvision's VGG16 reduced to SSD's conv6/conv7, the
official vgg16_reducedfc.pth, ResNet-101 loaded strictly; `m2det convert-backbone`."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet50, resnet101, vgg16, vgg16_bn
from typer.testing import CliRunner

from m2det.cli.main import app
from m2det.io.torchfile import load_state_dict_file
from m2det.models.backbones import ResNet101, VGG16Reduced, load_backbone_state, load_backbone_weights


def fake_torchvision_state(factory, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values under torchvision's key names and shapes (read from the model on the meta device)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in factory().state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=gen)
        for k, s in shapes.items()
    }


@pytest.fixture(scope="module")
def torchvision_vgg16():
    return fake_torchvision_state(vgg16, seed=1)


@pytest.fixture(scope="module")
def torchvision_vgg16_file(tmp_path_factory, torchvision_vgg16):
    path = tmp_path_factory.mktemp("imagenet") / "vgg16.pth"
    torch.save(torchvision_vgg16, path)
    return path


@pytest.fixture(scope="module")
def vgg_backbone():
    return VGG16Reduced()  # every test loads all of its tensors, strictly


def expected_conv6_conv7(state):
    """SSD's reduction computed element by element: conv6[o, c, y, x] = fc6[4 o, c*49 + 7*(3 y) + 3 x];
    conv7[o, i] = fc7[4 o, 4 i]; biases fc6/fc7 at 4 o."""
    fc6, fc7 = state["classifier.0.weight"], state["classifier.3.weight"]
    o = torch.arange(1024).view(-1, 1, 1, 1)
    c = torch.arange(512).view(1, -1, 1, 1)
    y = torch.arange(3).view(1, 1, -1, 1)
    x = torch.arange(3).view(1, 1, 1, -1)
    conv6 = fc6[(4 * o).expand(-1, 512, 3, 3), (c * 49 + 7 * (3 * y) + 3 * x).expand(1024, -1, -1, -1)]
    i = torch.arange(1024)
    conv7 = fc7[(4 * i).view(-1, 1), (4 * i).view(1, -1)].view(1024, 1024, 1, 1)
    return {
        "features.31.weight": conv6,
        "features.31.bias": state["classifier.0.bias"][4 * i],
        "features.33.weight": conv7,
        "features.33.bias": state["classifier.3.bias"][4 * i],
    }


def test_torchvision_vgg16_becomes_the_reduced_vgg16(torchvision_vgg16, vgg_backbone):
    notes = load_backbone_state(vgg_backbone, torchvision_vgg16)
    assert any("fc6 -> conv6" in n for n in notes) and any("classifier.6" in n for n in notes)
    loaded = vgg_backbone.state_dict()
    for key, value in expected_conv6_conv7(torchvision_vgg16).items():
        assert torch.equal(loaded[key], value), key
    for index in (0, 2, 5, 10, 17, 28):  # the conv stack is taken as it is
        assert torch.equal(loaded[f"features.{index}.weight"], torchvision_vgg16[f"features.{index}.weight"])


def test_convert_backbone_writes_files_that_load(
    tmp_path, torchvision_vgg16, torchvision_vgg16_file, vgg_backbone
):
    expected = expected_conv6_conv7(torchvision_vgg16)
    for name in ("vgg16_reducedfc.safetensors", "vgg16_reducedfc.pth"):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["convert-backbone", str(torchvision_vgg16_file), str(out)])
        assert result.exit_code == 0, result.output
        assert "fc6 -> conv6" in result.output and f"wrote {out} (vgg16" in result.output
        written = load_state_dict_file(out)
        # the .pth is in the official vgg16_reducedfc.pth layout (`31.weight`), the .safetensors in ours
        key = "31.weight" if out.suffix == ".pth" else "features.31.weight"
        assert torch.equal(written[key], expected["features.31.weight"])
        with torch.no_grad():
            vgg_backbone.features[33].bias.zero_()
        assert load_backbone_weights(vgg_backbone, out) == []  # already reduced: taken as it is
        assert torch.equal(vgg_backbone.features[33].bias, expected["features.33.bias"])


def test_vgg16_without_fc_or_with_batchnorm_is_refused(torchvision_vgg16, vgg_backbone):
    convs = {k: v for k, v in torchvision_vgg16.items() if k.startswith("features.")}
    with pytest.raises(
        ValueError, match=r"convs: .*not in the file: features\.31\.bias, features\.31\.weight"
    ):
        load_backbone_state(vgg_backbone, convs, "convs")
    with torch.device("meta"):
        batchnorm = vgg16_bn().state_dict()
    with pytest.raises(ValueError, match="vgg16_bn"):
        load_backbone_state(vgg_backbone, batchnorm)


@pytest.fixture(scope="module")
def resnet_backbone():
    return ResNet101()


def test_resnet101_loads_strictly_without_its_classifier(tmp_path, resnet_backbone):
    state = fake_torchvision_state(resnet101, seed=2)
    torch.save(state, tmp_path / "r101.pth")
    notes = load_backbone_weights(resnet_backbone, tmp_path / "r101.pth")
    assert notes == ["dropped the ImageNet classifier fc.bias, fc.weight"]
    assert torch.equal(resnet_backbone.layer3[22].conv2.weight, state["layer3.22.conv2.weight"])
    assert torch.equal(resnet_backbone.bn1.running_var, state["bn1.running_var"])

    extra = {**state, "layer5.0.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"1 tensors of the file have no place: layer5\.0\.weight"):
        load_backbone_weights(resnet_backbone, tmp_path / "extra.pth")
    short = {k: v for k, v in state.items() if k != "layer2.1.bn2.running_mean"}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(
        ValueError, match=r"1 tensors of the backbone are not in the file: layer2\.1\.bn2\.running_mean"
    ):
        load_backbone_weights(resnet_backbone, tmp_path / "short.pth")


def test_resnet50_into_resnet101_lists_what_would_stay_random(tmp_path, resnet_backbone):
    torch.save(fake_torchvision_state(resnet50, seed=3), tmp_path / "r50.pth")
    with pytest.raises(ValueError) as info:
        load_backbone_weights(resnet_backbone, tmp_path / "r50.pth")
    message = str(info.value)
    assert "306 tensors of the backbone are not in the file" in message
    assert "layer3.10.bn1.bias" in message and "ResNet-101 (not ResNet-50" in message

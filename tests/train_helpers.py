"""Small data sets and models shared by the training tests (kept tiny so each run takes seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision import tv_tensors

from m2det.config import get_config
from m2det.models import build_model

SIZE = 64
# m2det_tiny's overrides for a 64-pixel input with 3 scales and narrow layers
TINY_OVERRIDES: dict[str, Any] = {
    "mlfpn.num_scales": 3,
    "mlfpn.planes": 32,
    "mlfpn.shallow_out": 32,
    "mlfpn.deep_out": 64,
    "backbone.width": 16,
    "anchors.steps": None,
    "anchors.size_pattern": [0.2, 0.4, 0.7, 1.0],
}


def tiny_model(
    num_classes: int = 3, seed: int = 0, class_names: Optional[list[str]] = None, **overrides: Any
) -> torch.nn.Module:
    """m2det_tiny shrunk to a 64-pixel input with 3 scales and narrow layers; `overrides` (dotted
    keys, e.g. ``**{"mlfpn.sfam": True}``) change it further."""
    torch.manual_seed(seed)
    return build_model(
        get_config(
            "m2det_tiny",
            num_classes=num_classes,
            class_names=class_names,
            input_size=SIZE,
            **{**TINY_OVERRIDES, **overrides},
        )
    )


class ToyBoxes(torch.utils.data.Dataset):
    """Square images with one filled rectangle per class colour, already at the model's input size.

    `same_layout=True` gives every image the same boxes (only the pixels differ), so that every
    batch has the same number of matched anchors; `flip=True` flips half the samples at random,
    drawing from torch's global generator as the real augmentation does.
    """

    class_names = ["red", "green"]
    num_classes = 3

    def __init__(self, count: int = 8, same_layout: bool = False, flip: bool = False, seed: int = 0) -> None:
        self.count, self.same_layout, self.flip, self.seed = count, same_layout, flip, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        gen = torch.Generator().manual_seed(self.seed * 1000 + (0 if self.same_layout else index))
        noise = torch.Generator().manual_seed(self.seed * 1000 + index)
        image = (torch.rand(3, SIZE, SIZE, generator=noise) * 60).to(torch.uint8)
        boxes, labels = [], []
        for label in (1, 2):
            w, h = (torch.randint(14, 34, (2,), generator=gen)).tolist()
            x, y = (
                torch.randint(0, SIZE - w, (1,), generator=gen).item(),
                torch.randint(0, SIZE - h, (1,), generator=gen).item(),
            )
            image[label - 1, y : y + h, x : x + w] = 220
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        box_tensor = torch.tensor(boxes, dtype=torch.float32)
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
            box_tensor = torch.stack(
                [SIZE - box_tensor[:, 2], box_tensor[:, 1], SIZE - box_tensor[:, 0], box_tensor[:, 3]], 1
            )
        target = {
            "boxes": tv_tensors.BoundingBoxes(box_tensor, format="XYXY", canvas_size=(SIZE, SIZE)),
            "labels": torch.tensor(labels),
            "image_id": index,
            "orig_size": torch.tensor([SIZE, SIZE]),
        }
        return tv_tensors.Image(image), target


def trained_like(class_names: list[str], seed: int = 0) -> torch.nn.Module:
    """m2det_tiny (320 px) with BatchNorm statistics that are not the identity, as after training:
    what folding, export and the other runtimes must reproduce."""
    torch.manual_seed(seed)
    model = build_model("m2det_tiny", num_classes=len(class_names) + 1, class_names=list(class_names))
    return with_trained_batchnorm_statistics(model, seed)


def with_trained_batchnorm_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` in eval mode with BatchNorm running statistics that are not the identity (drawn under
    `seed`), as training leaves them: what folding and the other runtimes must reproduce."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=g) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
    return model.eval()


def weights(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_cli_data(tmp_path: Path, train_section: str) -> tuple[Any, Path]:
    """A generated shapes data set (8 training, 4 validation images of 64 pixels, two classes) and
    a config file for `m2det train`: the tiny model of `tiny_model` and `train_section` (YAML lines)."""
    from m2det.data.synthetic import ShapesConfig, generate_shapes_dataset

    shapes = ShapesConfig(width=64, height=64, classes=("circle", "square"), size_range=(0.3, 0.6), clutter=0)
    data = generate_shapes_dataset(tmp_path / "shapes", num_train=8, num_val=4, config=shapes)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n  preset: m2det_tiny\n  input_size: 64\n  backbone: {width: 16}\n"
        "  mlfpn: {num_scales: 3, planes: 32, shallow_out: 32, deep_out: 64}\n"
        "  anchors: {steps: null, size_pattern: [0.2, 0.4, 0.7, 1.0]}\n" + train_section
    )
    return data, config

"""Calibration images for post-training INT8 quantisation, shared by every quantiser (ONNX Runtime's,
NNCF's for OpenVINO): a seeded sample of a data set's images, prepared exactly as evaluation
prepares them (the eval transform, then the model's normalisation).

Its own module, free of any runtime's imports, so that each quantiser adapts it to its own API.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from m2det.config import ModelConfig
from m2det.errors import M2DetError


class CalibrationImages:
    """`num_images` images drawn without replacement (seeded) from `dataset`, one batch `[1, 3, S, S]`
    (float32 numpy, the graph's input convention) per image.

    `dataset` should carry the eval transform (a square uint8 image of the graph's input size);
    `normalize` maps RGB in [0, 1] to the graph's input convention
    (`m2det.models.transform.normalize` with the model's means).
    """

    def __init__(
        self, dataset: Any, normalize: Callable[[torch.Tensor], torch.Tensor], num_images: int, seed: int = 0
    ):
        if num_images < 1:
            raise M2DetError(f"the number of calibration images must be >= 1, got {num_images}")
        count = min(num_images, len(dataset))
        self.dataset = dataset
        self.normalize = normalize
        self.indices = sorted(random.Random(seed).sample(range(len(dataset)), count))

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self) -> Iterator[np.ndarray]:
        """The prepared images, in index order, one `[1, 3, S, S]` array each."""
        for index in self.indices:
            image, _ = self.dataset[index]
            rgb = torch.as_tensor(image).as_subclass(torch.Tensor).float()[None] / 255.0
            yield self.normalize(rgb).numpy()


def dataset_calibration_images(
    config: ModelConfig, input_size: int, source: Union[str, Path], split: str, num_images: int, seed: int = 0
) -> CalibrationImages:
    """Calibration images from `m2det.data.build_dataset(source, split)` with the eval transform at
    `input_size`, normalised with `config`'s pixel means."""
    from m2det.data import build_dataset, build_eval_transform
    from m2det.models.transform import normalize, pixel_means_tensor

    dataset = build_dataset(source, split, transforms=build_eval_transform(input_size))
    means = pixel_means_tensor(config.pixel_means)
    return CalibrationImages(dataset, partial(normalize, pixel_means=means), num_images, seed)


@dataclass
class QuantizationReport:
    """What a quantiser (`quantize_onnx`, `quantize_openvino`) did: ops now running on int8 inputs by
    type, ops left in float, the calibration; `path`: the file written (None: a model in memory)."""

    path: Optional[Path]
    quantized_ops: dict[str, int]
    float_ops: dict[str, int]
    calibration_images: int
    calibration_source: str
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        quantized = ", ".join(f"{op} x{n}" for op, n in sorted(self.quantized_ops.items()))
        floating = ", ".join(f"{op} x{n}" for op, n in sorted(self.float_ops.items()))
        return (
            f"int8 ops: {quantized or 'none'}\nfloat ops: {floating or 'none'}\n"
            f"calibrated on {self.calibration_images} images of {self.calibration_source} in {self.seconds:.0f} s"
        )


def report_dict(report: QuantizationReport) -> dict[str, Any]:
    data = asdict(report)
    data["path"] = str(report.path) if report.path is not None else None
    return data

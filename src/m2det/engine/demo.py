"""The built-in demo: generate shapes, train `m2det_tiny` on the CPU, evaluate, draw (`m2det demo`).

Everything is sized to finish in minutes on two CPU cores and to repeat exactly under its seed:
small images of a few large, plain shapes, a short cosine schedule, and evaluation on held-out
images the training never sees. Its steps are logged (`m2det.demo`, INFO) as the trainer's are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from m2det.errors import ConfigError

logger = logging.getLogger("m2det.demo")


# The budget: about 13,000 training images at 128 pixels fit in five minutes on one core. Large,
# plain shapes on simple backgrounds; AdamW and a cosine schedule converge within it from scratch,
# where SGD at the paper's settings would need far longer. Crop and zoom-out are off: they slow
# convergence more than they help on a data set that is already varied; flips and the
# photometric distortion stay.
def _shapes() -> dict[str, Any]:
    return {
        "width": 128,
        "height": 128,
        "classes": ["circle", "square", "triangle"],
        "objects_per_image": [1, 4],
        "size_range": [0.18, 0.55],
        "occlusion": 0.0,
        "clutter": 1,
        "backgrounds": ["flat", "gradient", "noise"],
    }


def _model() -> dict[str, Any]:
    # m2det_tiny at the images' own size: 4 scales (16, 8, 4, 2) with anchors sized to its objects
    return {
        "input_size": 128,
        "mlfpn.num_scales": 4,
        "anchors.steps": None,
        "anchors.size_pattern": [0.15, 0.3, 0.5, 0.7, 0.92],
    }


def _train() -> dict[str, Any]:
    return {
        "epochs": 20,
        "batch_size": 16,
        "optimizer": "adamw",
        "lr": 4e-3,
        "weight_decay": 0.05,
        "warmup_epochs": 1,
        "warmup_start_lr": 4e-4,
        "policy": "cosine",
        "milestones": [],
        "workers": 1,
        "eval_every": 0,
        "augment_settings": {"crop_min_ious": [None], "expand_probability": 0.0},
    }


@dataclass
class DemoSettings:
    """What the demo generates, trains and draws; `--set KEY=VALUE` changes any of it.

    `shapes` are `m2det.data.synthetic.ShapesConfig` fields, `model` overrides of the `m2det_tiny`
    preset, `train` `TrainConfig` fields.
    """

    num_train: int = 640
    num_val: int = 160
    num_pictures: int = 12
    score_threshold: float = 0.5  # detections drawn in the pictures (all of them are scored)
    threads: int = 0  # torch intra-op threads; 0: one per core left after the data workers
    seed: int = 0
    shapes: dict[str, Any] = field(default_factory=_shapes)
    model: dict[str, Any] = field(default_factory=_model)
    train: dict[str, Any] = field(default_factory=_train)

    def with_overrides(self, overrides: dict[str, Any]) -> DemoSettings:
        """`num_train=8`, `train.epochs=1`, `shapes.clutter=0`, ... applied to a copy, type-checked
        (see `m2det.config.replace_fields`)."""
        from m2det.config import replace_fields

        sections = ("shapes", "model", "train")
        top = [f.name for f in fields(self) if f.name not in sections]
        for key in overrides:
            section, _, leaf = key.partition(".")
            if not (leaf and section in sections) and key not in top:
                raise ConfigError(
                    f"--set {key}: unknown demo setting; use one of {', '.join(top)} "
                    "or shapes.FIELD, model.FIELD, train.FIELD"
                )
        return replace_fields(self, overrides, "")


@dataclass
class DemoResult:
    """What a demo run produced: its folder, the held-out metrics, its wall time and its files by role."""

    run_dir: Path
    metrics: dict[str, float]
    seconds: float
    files: dict[str, Path]


def run_demo(
    run_dir: Path, settings: Optional[DemoSettings] = None, device: str = "cpu", progress: bool = True
) -> DemoResult:
    """Generate the data, train, evaluate on the held-out images, draw pictures; all under `run_dir`.

    `progress` shows the training's progress bar; the steps are logged (`m2det.demo`, `m2det.train`).
    """
    import torch

    from m2det.engine.train import cpu_threads

    settings = settings or DemoSettings()
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads or cpu_threads(int(settings.train.get("workers", 0))))
    try:
        return _run_demo(run_dir, settings, device, progress)
    finally:
        torch.set_num_threads(previous)


def _run_demo(run_dir: Path, settings: DemoSettings, device: str, progress: bool) -> DemoResult:
    from m2det.config import dataclass_from_dict, get_config
    from m2det.data import build_dataset
    from m2det.data.synthetic import ShapesConfig, generate_shapes_dataset
    from m2det.engine.evaluate import evaluate
    from m2det.engine.train import Trainer, seed_everything
    from m2det.engine.train_config import TrainConfig
    from m2det.io.jsonfile import write_json
    from m2det.models import build_model

    start = time.perf_counter()
    shapes = dataclass_from_dict(ShapesConfig, {**settings.shapes, "seed": settings.seed}, "shapes")
    logger.info(f"generating {settings.num_train} + {settings.num_val} shapes images in {run_dir / 'data'}")
    data = generate_shapes_dataset(run_dir / "data", settings.num_train, settings.num_val, shapes)

    train_config = TrainConfig.from_dict({**settings.train, "seed": settings.seed})
    model_config = get_config(
        "m2det_tiny",
        **settings.model,
        num_classes=len(data.class_names) + 1,
        class_names=list(data.class_names),
    )
    train_set = build_dataset(
        data.train.annotations, transforms=train_config.train_transform(model_config.input_size)
    )
    val_set = build_dataset(data.val.annotations, keep_ignored=True)
    seed_everything(settings.seed)
    model = build_model(model_config)
    logger.info(
        f"training {model_config.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"input {model_config.input_size}) for {train_config.epochs} epochs on {device}"
    )
    Trainer(model, train_config, train_set, None, run_dir=run_dir, device=device, progress=progress).fit()

    logger.info(f"evaluating on {len(val_set)} held-out images")
    evaluation = evaluate(model, val_set, progress=False, batch_size=16)
    files = evaluation.save(run_dir / "eval")
    pictures = draw_pictures(
        model, val_set, run_dir / "pictures", settings.num_pictures, settings.score_threshold
    )
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in evaluation.metrics.items()}
    write_json(
        run_dir / "demo.json",
        {"metrics": metrics, "seconds": seconds, "device": device, "settings": asdict(settings)},
    )
    files = {
        "model": run_dir / "last.safetensors",
        "metrics": files["metrics.json"],
        "per_class": files["per_class.csv"],
        "pr_curve": files["pr_curve.png"],
        "loss_curve": run_dir / "loss_curve.png",
        "results": run_dir / "results.csv",
        "pictures": pictures,
        "summary": run_dir / "demo.json",
    }
    return DemoResult(run_dir, metrics, seconds, files)


def draw_pictures(
    model: Any, dataset: Any, out_dir: Path, count: int, threshold: float, min_side: int = 384
) -> Path:
    """Side-by-side pictures of the first `count` images: ground truth (left), detections (right).

    Small images are enlarged by a whole factor to at least `min_side` so that the labels stay legible.
    """
    import math

    import torch
    import torch.nn.functional as F

    from m2det.io.image import write_png
    from m2det.visualize import draw_detections

    names = list(dataset.class_names)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for index in range(min(count, len(dataset))):
            image, target = dataset[index]
            image = image.as_subclass(torch.Tensor)
            found = model([image])[0]
            keep = found["scores"] >= threshold
            scale = max(1, math.ceil(min_side / min(image.shape[-2:])))
            large = F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
            truth_boxes = torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor) * scale
            truth = draw_detections(large, truth_boxes, target["labels"], class_names=names)
            detected = draw_detections(
                large,
                found["boxes"][keep] * scale,
                found["labels"][keep],
                found["scores"][keep],
                class_names=names,
            )
            gap = torch.full((3, large.shape[1], 8), 255, dtype=torch.uint8)
            write_png(out_dir / f"{index:03d}.png", torch.cat([truth, gap, detected], dim=2))
    return out_dir

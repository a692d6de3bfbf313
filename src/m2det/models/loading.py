"""Models rebuilt from files: our model files (`m2det.io.checkpoint`) and the authors' checkpoints
(`m2det.io.official`).

Here rather than in `m2det.io` so that io stays a layer of file formats below the network: it
reads and writes tensors, and this module is where they meet `build_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from m2det.classes import COCO_CLASSES
from m2det.config import get_config
from m2det.io.checkpoint import load_weights, read_config
from m2det.io.official import load_official, official_num_classes, read_official_state
from m2det.models.m2det import M2Det, build_model


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu", **overrides: Any) -> M2Det:
    """Rebuild the model saved at `path` and load its weights (strict)."""
    config = read_config(path)
    config.backbone.weights = None  # the file holds the trained backbone
    model = build_model(config, **overrides)
    load_weights(model, path)
    return model.to(device)


def build_official_model(source: Union[str, Path, dict[str, Tensor]], preset: str, **overrides: Any) -> M2Det:
    """An M2Det of `preset` with the class count and SFAM the official checkpoint implies, loaded.

    A COCO checkpoint (81 classes) gets the COCO class names. `overrides` go to `get_config`
    (e.g. ``mlfpn.num_levels=4`` for a checkpoint of a Table 3 variant).
    """
    base = get_config(preset, **overrides)  # a wrong preset fails before a large file is read
    state, where = read_official_state(source)
    num_classes = overrides.get("num_classes") or official_num_classes(
        state, base.anchors.num_anchors_per_location, where
    )
    settings: dict[str, Any] = {
        **overrides,
        "num_classes": num_classes,
        "mlfpn.sfam": overrides.get("mlfpn.sfam", any(k.startswith("sfam_module.") for k in state)),
    }
    if num_classes == len(COCO_CLASSES) + 1 and "class_names" not in overrides:
        settings["class_names"] = list(COCO_CLASSES)
    config = get_config(preset, **settings)
    config.backbone.weights = None  # the checkpoint holds the backbone
    model = build_model(config)
    load_official(model, state, where=where)
    return model

"""The official M2Det checkpoint layout (VDIGPKU/M2Det) and its mapping onto our modules.

Official keys (see shared reference): `base.*`, `reduce`, `up_reduce`, `leach.i`, `unetK.{layers,
toplayer,latlayer,smooth}`, `sfam_module.fc{1,2}.i`, `Norm`, `loc.i`, `conf.i`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from m2det.io.torchfile import as_state_dict, load_state_dict_file, shared_state_groups

_RULES: list[tuple[str, str]] = [
    (r"^reduce\.", "mlfpn.ffm1.reduce."),
    (r"^up_reduce\.", "mlfpn.ffm1.up_reduce."),
    (r"^leach\.", "mlfpn.leach."),
    (r"^Norm\.", "mlfpn.norm."),
    (r"^sfam_module\.", "mlfpn.sfam."),
    (r"^loc\.", "head.loc."),
    (r"^conf\.", "head.conf."),
]
_TUM_PARTS = {"layers": "encoder", "toplayer.0": "top", "latlayer": "lateral", "smooth": "smooth"}
_TUM_KEY = re.compile(r"^unet(\d+)\.(layers|toplayer\.0|latlayer|smooth)\.(.*)$")


def official_key(key: str, backbone: str) -> Union[str, None]:
    """Our name for an official key, or None if the key is not part of the official layout."""
    if key.startswith("base."):
        prefix = "backbone.features." if backbone in ("vgg16", "tiny") else "backbone."
        return prefix + key[len("base.") :]
    match = _TUM_KEY.match(key)
    if match:
        level, part, rest = match.groups()
        if int(level) < 1:
            return None
        return f"mlfpn.tums.{int(level) - 1}.{_TUM_PARTS[part]}.{rest}"
    for pattern, replacement in _RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return None


@dataclass
class LoadReport:
    """What `load_official` did: keys that had no place and keys the file lacked (empty when strict)."""

    missing: list[str]
    unexpected: list[str]


def _describe(keys: list[str], limit: int = 20) -> str:
    head = ", ".join(keys[:limit])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_official_state_dict(
    state: dict[str, Tensor], model: nn.Module
) -> tuple[dict[str, Tensor], LoadReport, list[str]]:
    """Rename an official state dict for `model`; also return shape mismatches as messages."""
    backbone = model.config.backbone.name
    own = model.state_dict()
    renamed: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        ours = official_key(key, backbone)
        if ours is None or ours not in own:
            unexpected.append(key)
        else:
            renamed[ours] = value
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in renamed.items()
        if own[key].shape != value.shape
    ]
    missing = sorted(k for k in own if k not in renamed)
    return renamed, LoadReport(missing=missing, unexpected=sorted(unexpected)), mismatched


def _read_state(
    source: Union[str, Path, dict[str, Tensor]], where: Union[str, None] = None
) -> tuple[dict[str, Tensor], str]:
    """A state dict from a `.pth` path (weights_only) or a dict, and how errors should name it."""
    if isinstance(source, dict):
        where = where or "state dict"
        return as_state_dict(source, where), where
    return load_state_dict_file(source), where or str(source)


def _check_shared(model: nn.Module, renamed: dict[str, Tensor]) -> None:
    """Where the model shares one module under several names, the checkpoint's copies must agree."""
    for names, _ in shared_state_groups(model):
        present = [n for n in names if n in renamed]
        if len(present) > 1:
            first = renamed[present[0]]
            differing = [n for n in present[1:] if not torch.equal(renamed[n], first)]
            if differing:
                raise ValueError(
                    f"the checkpoint holds different values for {present[0]} and {_describe(differing)}, "
                    "which this model shares as one module (as the official code does); build the model with "
                    "mlfpn.shared_leach=False / mlfpn.shared_sfam=False to load them separately"
                )


def load_official(
    model: nn.Module,
    source: Union[str, Path, dict[str, Tensor]],
    strict: bool = True,
    where: Union[str, None] = None,
) -> LoadReport:
    """Load an official M2Det checkpoint (a `.pth` path, read with weights_only=True, or a state dict).

    With `strict`, any missing or unexpected key raises a ValueError that lists them; a shape
    mismatch always raises. Returns what was missing/unexpected.
    """
    state, where = _read_state(source, where)
    renamed, report, mismatched = convert_official_state_dict(state, model)
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_describe(mismatched)}")
    if strict and report.missing:
        problems.append(f"missing from the checkpoint: {_describe(report.missing)}")
    if strict and report.unexpected:
        problems.append(f"not in the official layout for this model: {_describe(report.unexpected)}")
    if problems:
        hint = ""
        if any(".conf." in m or "head.conf" in m for m in mismatched):
            hint = " (the conf heads differ: pass num_classes matching the checkpoint)"
        raise ValueError(f"{where}: does not fit {model.config.name}{hint}; " + "; ".join(problems))
    _check_shared(model, renamed)
    model.load_state_dict(renamed, strict=False)
    return report


def official_num_classes(state: dict[str, Tensor], anchors_per_location: int = 6) -> int:
    """Number of classes (background included) implied by an official checkpoint's conf.0 head."""
    if "conf.0.weight" not in state:
        raise ValueError("not an official M2Det checkpoint: no conf.0.weight")
    return int(state["conf.0.weight"].shape[0]) // anchors_per_location


def build_official_model(
    source: Union[str, Path, dict[str, Tensor]], preset: str, **overrides: Any
) -> nn.Module:
    """An M2Det of `preset` with the class count and SFAM the official checkpoint implies, loaded.

    A COCO checkpoint (81 classes) gets the COCO class names. `overrides` go to `get_config`
    (e.g. ``mlfpn.num_levels=4`` for a checkpoint of a Table 3 variant).
    """
    from m2det.config import get_config
    from m2det.data.names import COCO_CLASSES
    from m2det.models import build_model

    state, where = _read_state(source)
    base = get_config(preset, **overrides)
    num_classes = overrides.get("num_classes") or official_num_classes(
        state, base.anchors.num_anchors_per_location
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

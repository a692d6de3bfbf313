"""The official M2Det checkpoint layout (VDIGPKU/M2Det) and its mapping onto our modules.

Official keys: `base.*`, `reduce`, `up_reduce`, `leach.i`, `unetK.{layers,toplayer,latlayer,smooth}`,
`sfam_module.fc{1,2}.i`, `Norm`, `loc.i`, `conf.i`. The authors' full layouts (key and shape) ship
with the package, see `official_layout`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor, nn

from m2det.errors import FileFormatError, M2DetError
from m2det.io.torchfile import as_state_dict, load_state_dict_file, shared_state_groups

if TYPE_CHECKING:  # models imports io: a run-time import would be a cycle
    from m2det.models.m2det import M2Det

# Backbones of the authors' released configurations; their layouts are `official_layouts/<name>.tsv`.
OFFICIAL_BACKBONES = ("vgg16", "resnet101")

# Keys of the authors' layout that detection never uses: their ResNet-101 keeps torchvision's ImageNet
# classifier, so their state dict holds it. Loading drops exactly these; any other stray key is an error.
UNUSED_OFFICIAL_KEYS: dict[str, frozenset[str]] = {"resnet101": frozenset({"base.fc.weight", "base.fc.bias"})}

# (the authors' prefix, ours) for everything but the TUMs, whose index also shifts by one
_PREFIXES: list[tuple[str, str]] = [
    ("reduce.", "mlfpn.ffm1.reduce."),
    ("up_reduce.", "mlfpn.ffm1.up_reduce."),
    ("leach.", "mlfpn.leach."),
    ("Norm.", "mlfpn.norm."),
    ("sfam_module.", "mlfpn.sfam."),
    ("loc.", "head.loc."),
    ("conf.", "head.conf."),
]
_TUM_PARTS = {"layers": "encoder", "toplayer.0": "top", "latlayer": "lateral", "smooth": "smooth"}
_TUM_KEY = re.compile(r"^unet(\d+)\.(layers|toplayer\.0|latlayer|smooth)\.(.*)$")
_OUR_TUM_KEY = re.compile(r"^mlfpn\.tums\.(\d+)\.(encoder|top|lateral|smooth)\.(.*)$")


def _prefixes(backbone: str) -> list[tuple[str, str]]:
    ours = "backbone.features." if backbone in ("vgg16", "tiny") else "backbone."
    return [("base.", ours), *_PREFIXES]


def official_key(key: str, backbone: str) -> Union[str, None]:
    """Our name for an official key, or None if the key is not part of the official layout."""
    match = _TUM_KEY.match(key)
    if match:
        level, part, rest = match.groups()
        if int(level) < 1:
            return None
        return f"mlfpn.tums.{int(level) - 1}.{_TUM_PARTS[part]}.{rest}"
    for theirs, ours in _prefixes(backbone):
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def authors_key(key: str, backbone: str) -> Union[str, None]:
    """The official name of one of our keys (the inverse of `official_key`), or None if it has none."""
    match = _OUR_TUM_KEY.match(key)
    if match:
        level, part, rest = match.groups()
        theirs = next(t for t, o in _TUM_PARTS.items() if o == part)
        return f"unet{int(level) + 1}.{theirs}.{rest}"
    for theirs, ours in _prefixes(backbone):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None


@functools.cache
def _read_layout(backbone: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The package's `key<TAB>shape` file (`scalar` for num_batches_tracked), read once."""
    text = (resources.files(__package__) / "official_layouts" / f"{backbone}.tsv").read_text()
    rows = []
    for line in text.splitlines():
        key, shape = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return tuple(rows)


def official_layout(backbone: str) -> dict[str, tuple[int, ...]]:
    """The authors' checkpoint layout for `backbone`: key -> shape, in their state dict's order.

    As in their released configurations: 81 classes, 8 TUMs x 256 planes, 6 scales, SFAM off. The
    input size changes no shape (their 320 and 512 VGG16 layouts are identical).
    """
    if backbone not in OFFICIAL_BACKBONES:
        raise M2DetError(
            f"no official layout for backbone {backbone!r}; the authors' layouts are for {', '.join(OFFICIAL_BACKBONES)}"
        )
    return dict(_read_layout(backbone))


def official_backbone_of(state: dict[str, Tensor]) -> Union[str, None]:
    """The backbone whose official layout holds every `base.*` key of `state`, or None."""
    keys = {k for k in state if k.startswith("base.")}
    for backbone in OFFICIAL_BACKBONES:
        if keys and keys <= official_layout(backbone).keys():
            return backbone
    return None


@dataclass
class LoadReport:
    """What `load_official` did, in the official key names: keys the file lacked, keys that had no
    place in the model (both empty when strict) and the unused keys it dropped (`UNUSED_OFFICIAL_KEYS`)."""

    missing: list[str]
    unexpected: list[str]
    ignored: list[str] = field(default_factory=list)


def _describe(keys: list[str], limit: int = 20) -> str:
    head = ", ".join(keys[:limit])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_official_state_dict(
    state: dict[str, Tensor], model: M2Det
) -> tuple[dict[str, Tensor], LoadReport, list[str]]:
    """Rename an official state dict for `model`; also return shape mismatches as messages."""
    backbone = model.config.backbone.name
    unused = UNUSED_OFFICIAL_KEYS.get(backbone, frozenset())
    own = model.state_dict()
    renamed: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key in unused:
            continue
        ours = official_key(key, backbone)
        if ours in own:
            renamed[ours] = value
        else:
            unexpected.append(key)
    theirs = {key: authors_key(key, backbone) or key for key in own}
    mismatched = [
        f"{theirs[key]}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in renamed.items()
        if own[key].shape != value.shape
    ]
    report = LoadReport(
        missing=sorted(theirs[k] for k in own if k not in renamed),
        unexpected=sorted(unexpected),
        ignored=sorted(k for k in state if k in unused),
    )
    return renamed, report, mismatched


def read_official_state(
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
                raise FileFormatError(
                    f"the checkpoint holds different values for {present[0]} and {_describe(differing)}, "
                    "which this model shares as one module (as the official code does); build the model with "
                    "mlfpn.shared_leach=False / mlfpn.shared_sfam=False to load them separately"
                )


def _hint(state: dict[str, Tensor], model: M2Det, mismatched: list[str]) -> str:
    """The likely cause of a checkpoint not fitting: another backbone, or another class count."""
    from m2det.config import get_config, list_presets

    ours = model.config.backbone.name
    theirs = official_backbone_of(state)
    if theirs is not None and theirs != ours:
        presets = [name for name in list_presets() if get_config(name).backbone.name == theirs]
        return (
            f" (its base.* keys are the authors' {theirs} backbone, not {ours}: "
            f"use a {theirs} preset: {', '.join(presets)})"
        )
    if any(m.startswith("conf.") for m in mismatched):
        return " (the conf heads differ: pass num_classes matching the checkpoint)"
    return ""


def load_official(
    model: M2Det,
    source: Union[str, Path, dict[str, Tensor]],
    strict: bool = True,
    where: Union[str, None] = None,
) -> LoadReport:
    """Load an official M2Det checkpoint (a `.pth` path, read with weights_only=True, or a state dict).

    With `strict`, any missing or unexpected key raises a ValueError that lists them (in the
    official names); a shape mismatch always raises. The backbone keys the authors' layout holds but
    detection never uses (ResNet-101's `base.fc.*`) are dropped. Returns what was missing, unexpected
    and dropped.
    """
    state, where = read_official_state(source, where)
    renamed, report, mismatched = convert_official_state_dict(state, model)
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_describe(mismatched)}")
    if strict and report.missing:
        problems.append(f"missing from the checkpoint: {_describe(report.missing)}")
    if strict and report.unexpected:
        problems.append(f"not in the official layout of this model: {_describe(report.unexpected)}")
    if problems:
        raise FileFormatError(
            f"{where}: does not fit {model.config.name}{_hint(state, model, mismatched)}; "
            + "; ".join(problems)
        )
    _check_shared(model, renamed)
    model.load_state_dict(renamed, strict=False)
    return report


def official_num_classes(
    state: dict[str, Tensor], anchors_per_location: int = 6, where: str = "state dict"
) -> int:
    """Number of classes (background included) implied by an official checkpoint's conf.0 head."""
    if "conf.0.weight" not in state:
        raise FileFormatError(
            f"{where}: not an official M2Det checkpoint: it has no conf.0.weight (the first class head) "
            f"among its {len(state)} tensors"
        )
    return int(state["conf.0.weight"].shape[0]) // anchors_per_location

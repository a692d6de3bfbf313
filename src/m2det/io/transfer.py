"""Start from a trained detector: initialise a model from any M2Det checkpoint, for other classes too.

`transfer_weights(model, source)` copies every tensor whose name and shape fit, from our model file
(`.safetensors`), an official checkpoint (`.pth`, e.g. `m2det512_vgg.pth`) or a state dict. The
class-specific conf heads are the only tensors that may differ: when the class sets differ, the rows
of the background and of every class whose name the checkpoint also has are copied (for each of
the anchors per location) and the rows of the other classes keep the model's initial values. A
checkpoint of another architecture (another backbone, another number of MLFPN levels, ...) is
refused as a whole, with the reason; nothing is loaded in part.

The conf heads are laid out anchor-major with the class fastest: output channel `a * C + c` is
class `c` of anchor `a` (the official layout), so class `c_old` of the checkpoint becomes class
`c_new` of the model through the rows `a * C_old + c_old -> a * C_new + c_new`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

from m2det.config import ModelConfig, get_config, with_overrides
from m2det.errors import FileFormatError, M2DetError
from m2det.io.torchfile import as_state_dict, load_state_dict_file, shared_state_groups

if TYPE_CHECKING:  # models imports io: a run-time import would be a cycle
    from m2det.models.m2det import M2Det

Source = Union[str, Path, dict[str, Tensor], "Checkpoint"]

_CONF = re.compile(r"^head\.conf\.\d+\.(weight|bias)$")


@dataclass
class Checkpoint:
    """A detector's weights in our names, with what is known of how it was built."""

    state: dict[str, Tensor]  # our names; a shared module's tensor may appear under one of its names
    where: str  # how messages name it
    config: Optional[ModelConfig] = None  # how it was built, when known (our files; official + preset)
    class_names: Optional[list[str]] = None  # foreground classes by label (label i + 1), when known
    official: bool = False

    @property
    def num_classes(self) -> Optional[int]:
        """Classes of its conf heads, background included (None if it has none)."""
        weight = self.state.get("head.conf.0.weight")
        loc = self.state.get("head.loc.0.weight")
        if weight is None or loc is None:
            return None
        return int(weight.shape[0]) // (int(loc.shape[0]) // 4)


def is_official_layout(state: dict[str, Tensor]) -> bool:
    """Whether a state dict uses the official key names (`base.*`, `unetN.*`, `conf.N.*`)."""
    return any(k.startswith(("base.", "unet1.", "conf.0.")) for k in state)


def _from_official(
    state: dict[str, Tensor], where: str, preset: Optional[str], overrides: dict[str, Any]
) -> Checkpoint:
    from m2det.classes import COCO_CLASSES
    from m2det.io.official import (
        UNUSED_OFFICIAL_KEYS,
        official_backbone_of,
        official_key,
        official_num_classes,
    )

    # a layout that is neither authors' backbone is VGG's (its keys are then reported as not fitting)
    backbone = official_backbone_of(state) or "vgg16"
    unused = UNUSED_OFFICIAL_KEYS.get(backbone, frozenset())
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in unused:
            continue
        ours = official_key(key, backbone)
        renamed[ours if ours is not None else f"<official>.{key}"] = value
    num_classes = official_num_classes(state) if "conf.0.weight" in state else None
    names = list(COCO_CLASSES) if num_classes == len(COCO_CLASSES) + 1 else None
    config = None
    if preset is not None:
        settings: dict[str, Any] = {"mlfpn.sfam": any(k.startswith("sfam_module.") for k in state)}
        if num_classes is not None:
            settings.update(num_classes=num_classes, class_names=names)
        config = get_config(preset, **{**settings, **overrides})
    return Checkpoint(renamed, where, config, names, official=True)


def read_checkpoint(
    source: Source, preset: Optional[str] = None, where: Optional[str] = None, **overrides: Any
) -> Checkpoint:
    """A detector checkpoint from a path or a state dict.

    * our `.safetensors` (written by `m2det train`, `m2det convert`, `save_model`): weights, config
      and class names;
    * an official `.pth` (`m2det512_vgg.pth`) or any state dict in the official layout: renamed to
      ours; an 81-class one gets the COCO names; `preset` (what it was trained as, e.g.
      `m2det512_vgg16`, with `overrides` such as ``{"mlfpn.num_levels": 4}``) gives its config;
    * a state dict in our names (e.g. `torch.save(model.state_dict())`): weights only.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, dict):
        where = where or "state dict"
        state = as_state_dict(source, where)
        if is_official_layout(state):
            return _from_official(state, where, preset, overrides)
        return Checkpoint(state, where)
    path = Path(source)
    where = where or str(path)
    if path.suffix == ".safetensors":
        from m2det.io.checkpoint import is_model_metadata, read_safetensors

        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        state, metadata = read_safetensors(path)
        if is_model_metadata(metadata):
            config = ModelConfig.from_dict(json.loads(metadata["config"]))
            return Checkpoint(state, where, config, config.class_names)
        if is_official_layout(state):
            return _from_official(state, where, preset, overrides)
        return Checkpoint(state, where)
    state = load_state_dict_file(path)
    if is_official_layout(state):
        return _from_official(state, where, preset, overrides)
    return Checkpoint(state, where)


def finetune_config(
    checkpoint: Checkpoint, base: Optional[ModelConfig] = None, **overrides: Any
) -> ModelConfig:
    """The config of a model to fine-tune from `checkpoint`: `base` (an architecture chosen by the
    caller) or the checkpoint's own, with `overrides` (typically `class_names` of the new data; the
    class count follows them). The checkpoint holds the backbone, so no backbone weights file is read.

    When the input size changes from the checkpoint's own (a 512 model fine-tuned at 320) and the
    anchors' steps are not overridden, the steps are derived from the feature maps, which is how
    the checkpoint's model lays out its anchors at any size other than its own.
    """
    config = base if base is not None else checkpoint.config
    if config is None:
        raise FileFormatError(
            f"{checkpoint.where}: holds no model configuration; give the preset it was trained as "
            "(e.g. --preset m2det512_vgg16, or build_model('m2det512_vgg16', weights=...))"
        )
    overrides = dict(overrides)
    if overrides.get("class_names") is not None and "num_classes" not in overrides:
        overrides["num_classes"] = len(overrides["class_names"]) + 1
    if (
        base is None
        and overrides.get("input_size", config.input_size) != config.input_size
        and config.anchors.steps is not None
        and not any(k in ("anchors", "anchors.steps") for k in overrides)
    ):
        overrides["anchors.steps"] = None
    overrides["backbone.weights"] = None  # the checkpoint holds the backbone
    return with_overrides(config, **overrides)


@dataclass
class TransferReport:
    """What `transfer_weights` did. Tensor names are the model's (one name per shared tensor)."""

    source: str
    loaded: list[str] = field(default_factory=list)  # copied whole from the checkpoint
    mapped: list[str] = field(default_factory=list)  # class heads: the rows of some classes copied
    reinitialized: list[str] = field(default_factory=list)  # left entirely at the model's init
    class_map: dict[str, str] = field(default_factory=dict)  # model class -> checkpoint class copied
    new_classes: list[str] = field(default_factory=list)  # model classes whose rows kept their init
    unused: list[str] = field(default_factory=list)  # checkpoint tensors not used (its old class heads)
    note: str = ""  # how the class heads were matched

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """A few lines for the user: counts, the classes carried over, what was re-initialised."""
        out = [
            f"initialised from {self.source}:",
            f"  loaded: {len(self.loaded)} tensors as they are ({_modules(self.loaded, depth=2)})",
        ]
        if self.mapped:
            carried = ["background"] + [
                new if _norm(new) == _norm(old) else f"{new} <- {old}" for new, old in self.class_map.items()
            ]
            out.append(
                f"  mapped by class name: {len(self.mapped)} tensors of {_modules(self.mapped)}, "
                f"the rows of {', '.join(carried)}"
            )
            if self.new_classes:
                shown = ", ".join(self.new_classes[:10]) + (", ..." if len(self.new_classes) > 10 else "")
                out.append(
                    f"  re-initialised: the rows of {len(self.new_classes)} new class"
                    f"{'es' if len(self.new_classes) > 1 else ''} in "
                    f"{_modules(self.mapped)} ({shown})"
                )
        if self.reinitialized:
            out.append(
                f"  re-initialised: {len(self.reinitialized)} tensors ({_modules(self.reinitialized)})"
            )
        if self.note:
            out.append(f"  note: {self.note}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _modules(names: Sequence[str], depth: Optional[int] = None) -> str:
    """`head.conf.0.weight, head.conf.0.bias, ..., head.conf.5.bias` -> `head.conf.0-5`."""
    if not names:
        return "none"
    modules: dict[str, list[int]] = {}
    plain: list[str] = []
    for name in names:
        parts = name.split(".")[:-1] or [name]
        if depth is not None:
            parts = parts[:depth]
        if len(parts) > 1 and parts[-1].isdigit():
            modules.setdefault(".".join(parts[:-1]), []).append(int(parts[-1]))
        else:
            module = ".".join(parts)
            if module not in plain:
                plain.append(module)
    ranged = []
    for module, indices in modules.items():
        indices = sorted(set(indices))
        contiguous = indices == list(range(indices[0], indices[-1] + 1))
        if len(indices) == 1:
            ranged.append(f"{module}.{indices[0]}")
        elif contiguous:
            ranged.append(f"{module}.{indices[0]}-{indices[-1]}")
        else:
            ranged.append(f"{module}.{{{','.join(map(str, indices))}}}")
    return ", ".join(plain + ranged)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def match_classes(
    model_names: Sequence[str], checkpoint_names: Sequence[str], class_map: Optional[dict[str, str]] = None
) -> dict[int, int]:
    """Model label -> checkpoint label (both 1-based) for the classes the checkpoint also has.

    Names match ignoring case, and spaces, `_` and `-` alike; `class_map` (model name ->
    checkpoint name) adds or overrides pairs, e.g. ``{"motorbike": "motorcycle"}``.
    """
    index: dict[str, int] = {}
    for label, name in enumerate(checkpoint_names, start=1):
        index.setdefault(_norm(name), label)
    explicit = {_norm(k): _norm(v) for k, v in (class_map or {}).items()}
    unknown = sorted(v for v in explicit.values() if v not in index)
    if unknown:
        raise M2DetError(f"class_map names checkpoint classes it does not have: {unknown}")
    pairs = {}
    for label, name in enumerate(model_names, start=1):
        key = _norm(name)
        found = index.get(explicit.get(key, key))
        if found is not None:
            pairs[label] = found
    return pairs


def _architecture(state: dict[str, Tensor]) -> dict[str, Any]:
    """What a state dict in our names says of the network it came from."""
    keys = list(state)

    def indices(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)})

    if any(k.startswith("backbone.layer1.") for k in keys):
        backbone = "resnet101"
    elif any(k.startswith("backbone.stem.") for k in keys):
        backbone = f"tiny (width {int(state['backbone.stem.0.weight'].shape[0]) * 2})"
    elif any(k.startswith("backbone.features.") for k in keys):
        backbone = "vgg16"
    else:
        backbone = "none"
    top = state.get("mlfpn.tums.0.top.conv.weight")
    loc = state.get("head.loc.0.weight")
    conf = state.get("head.conf.0.weight")
    return {
        "backbone": backbone,
        "MLFPN levels (TUMs)": indices("mlfpn.tums."),
        "MLFPN planes": None if top is None else int(top.shape[0]),
        "pyramid scales": indices("head.loc."),
        "SFAM": "on" if any(k.startswith("mlfpn.sfam.") for k in keys) else "off",
        "anchors per location": None if loc is None else int(loc.shape[0]) // 4,
        "pyramid channels": None if conf is None else int(conf.shape[1]),
    }


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal values (tensors without data, on the meta device, count as equal)."""
    return a.is_meta or b.is_meta or torch.equal(a, b)


def _listed(items: Sequence[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def transfer_weights(
    model: M2Det,
    source: Source,
    *,
    class_map: Optional[dict[str, str]] = None,
    where: Optional[str] = None,
) -> TransferReport:
    """Initialise `model` from a trained detector's weights; see the module docstring.

    `source`: our `.safetensors`, an official `.pth`, a state dict (either naming) or a
    `Checkpoint`. `class_map` maps model class names to checkpoint class names where they are not
    spelled alike. Raises a ValueError, with nothing loaded, when the checkpoint is of another
    architecture. Returns what was loaded, mapped and re-initialised.
    """
    checkpoint = read_checkpoint(source, where=where)
    state, name = checkpoint.state, model.config.name
    own = model.state_dict()
    groups = shared_state_groups(model)

    # Take each of the model's tensors from the checkpoint under any of its (shared) names.
    taken: dict[str, Tensor] = {}  # first name of the model's tensor -> the checkpoint's tensor
    used: set[str] = set()
    missing: list[str] = []
    for names, _ in groups:
        found = [n for n in names if n in state]
        if not found:
            missing.append(names[0])
            continue
        taken[names[0]] = state[found[0]]
        used.update(found)
        if len(found) > 1 and any(not _same(state[n], state[found[0]]) for n in found[1:]):
            raise FileFormatError(
                f"{checkpoint.where}: holds different values for {_listed(found)}, which {name} shares as "
                "one module; build the model with mlfpn.shared_leach=False / mlfpn.shared_sfam=False"
            )
    unexpected = sorted(k for k in state if k not in used and not _CONF.match(k))
    mismatched = [
        f"{n}: checkpoint {list(t.shape)} vs model {list(own[n].shape)}"
        for n, t in taken.items()
        if t.shape != own[n].shape and not _CONF.match(n)
    ]
    conf_missing = [n for n in missing if _CONF.match(n)]
    missing = [n for n in missing if not _CONF.match(n)]
    # The class heads must agree in everything but the class count.
    loc = own["head.loc.0.weight"]
    for n in (k for k in taken if _CONF.match(k)):
        old, new = taken[n], own[n]
        anchors = int(loc.shape[0]) // 4
        if old.dim() != new.dim() or old.shape[1:] != new.shape[1:] or old.shape[0] % anchors:
            mismatched.append(f"{n}: checkpoint {list(old.shape)} vs model {list(new.shape)}")
    if conf_missing and len(conf_missing) != sum(1 for n in own if _CONF.match(n)):
        missing += conf_missing
    if missing or unexpected or mismatched:
        ours, theirs = _architecture(own), _architecture(state)
        differs = [f"{k}: checkpoint {theirs[k]}, model {ours[k]}" for k in ours if ours[k] != theirs[k]]
        details = []
        if missing:
            details.append(f"{len(missing)} tensors of the model are not in it ({_listed(missing)})")
        if unexpected:
            shown = [k.removeprefix("<official>.") for k in unexpected]
            details.append(f"{len(unexpected)} of its tensors have no place in the model ({_listed(shown)})")
        if mismatched:
            details.append(f"{len(mismatched)} shapes differ ({_listed(mismatched)})")
        why = "; ".join(differs) if differs else "its tensors do not fit"
        if theirs["MLFPN levels (TUMs)"] == 0:
            why += "; ImageNet weights of a backbone alone go to --backbone-weights"
        raise FileFormatError(
            f"{checkpoint.where}: not a checkpoint of {name}'s architecture ({why}), so nothing was loaded: "
            + "; ".join(details)
            + ". Fine-tune a model built as the checkpoint was (the same backbone, MLFPN and anchors "
            "per location; the classes and the input size may differ)"
        )

    report = TransferReport(source=checkpoint.where)
    conf_names = [names[0] for names, _ in groups if _CONF.match(names[0])]
    model_classes = model.config.class_names
    old_classes = checkpoint.class_names
    c_new = model.config.num_classes
    c_old = checkpoint.num_classes
    pairs: Optional[dict[int, int]] = None  # model label -> checkpoint label; None: copy whole
    if c_old is None:
        report.note = "the checkpoint has no class heads"
    elif model_classes is not None and old_classes is not None:
        if [_norm(n) for n in model_classes] == [_norm(n) for n in old_classes] and not class_map:
            report.note = "the same classes: the class heads are copied whole"
        else:
            pairs = match_classes(model_classes, old_classes, class_map)
    elif c_new == c_old:
        report.note = (
            "class names unknown on one side and the class counts equal: the class heads are copied "
            "whole, class by class in order"
        )
    else:
        pairs = {}
        report.note = "class names unknown on one side: only the background rows are carried over"
    if (
        pairs is not None
        and c_old is not None
        and len(pairs) == c_new - 1 == c_old - 1
        and all(k == v for k, v in pairs.items())
    ):
        pairs = None  # every class in place: a plain copy

    with torch.no_grad():
        params = dict(model.state_dict(keep_vars=True))
        for n, value in taken.items():
            if n in conf_names and (pairs is not None or c_old is None):
                continue
            params[n].copy_(value)
            report.loaded.append(n)
        if c_old is None:
            report.reinitialized = conf_names
            report.new_classes = list(model.config.categories[1:])
        elif pairs is not None:
            anchors = int(loc.shape[0]) // 4
            rows = [(0, 0), *sorted(pairs.items())]
            for n in conf_names:
                target, value = params[n], taken[n]
                new_view = target.view(anchors, c_new, *target.shape[1:])
                old_view = value.reshape(anchors, c_old, *value.shape[1:])
                for new_label, old_label in rows:
                    new_view[:, new_label].copy_(old_view[:, old_label])
                report.mapped.append(n)
            names_new = model.config.categories
            names_old = old_classes or [f"class_{i}" for i in range(1, c_old)]
            report.class_map = {names_new[k]: names_old[v - 1] for k, v in sorted(pairs.items())}
            report.new_classes = [names_new[k] for k in range(1, c_new) if k not in pairs]
    report.reinitialized = sorted(set(report.reinitialized) | set(missing))
    report.unused = sorted(k.removeprefix("<official>.") for k in state if k not in used)
    if pairs is not None:
        report.unused = sorted(set(report.unused) | {k for k in state if _CONF.match(k)})
    return report

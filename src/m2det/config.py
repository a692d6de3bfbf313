"""Model configuration as small typed dataclasses, with the named presets and YAML/JSON round-trips.

A configuration is saved with every checkpoint so that a file alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

# Official input convention: BGR, minus these per-channel means, no std scaling.
BGR_MEANS: tuple[float, float, float] = (104.0, 117.0, 123.0)


@dataclass
class BackboneConfig:
    """Which feature extractor feeds FFMv1 and, optionally, a local ImageNet weights file."""

    name: str = "vgg16"  # vgg16 | resnet101 | tiny
    weights: Optional[str] = None
    width: int = 32  # base width of the tiny backbone; ignored by the others


@dataclass
class MLFPNConfig:
    """The Multi-Level Feature Pyramid Network: FFMv1, `num_levels` TUM/FFMv2 pairs, SFAM.

    `shared_leach` and `shared_sfam` reproduce the official code, where one 1x1 conv reduces the
    base feature for every level and one SE pair serves every scale; checkpoints rely on that.
    """

    planes: int = 256
    num_levels: int = 8
    num_scales: int = 6
    smooth: bool = True
    sfam: bool = False
    sfam_reduction: int = 16
    shared_leach: bool = True
    shared_sfam: bool = True
    shallow_out: int = 256  # FFMv1 `reduce` output channels (fixed in the official code)
    deep_out: int = 512  # FFMv1 `up_reduce` output channels (fixed in the official code)


@dataclass
class AnchorConfig:
    """SSD prior boxes: sizes are fractions of the input side, `steps` in pixels.

    `steps=None` derives each step from the feature map size, which is what lets any input size
    and any scale layout work; the presets keep the official steps so their anchors match exactly.
    """

    size_pattern: list[float] = field(default_factory=lambda: [0.08, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05])
    steps: Optional[list[float]] = field(default_factory=lambda: [8, 16, 32, 64, 107, 320])
    aspect_ratios: list[float] = field(default_factory=lambda: [2.0, 3.0])
    clip: bool = True
    variances: tuple[float, float] = (0.1, 0.2)

    @property
    def num_anchors_per_location(self) -> int:
        return 2 + 2 * len(self.aspect_ratios)


@dataclass
class ModelConfig:
    """Everything needed to rebuild an M2Det network."""

    name: str = "m2det320_vgg16"
    input_size: int = 320
    num_classes: int = 81  # background included, at index 0 (torchvision convention)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    mlfpn: MLFPNConfig = field(default_factory=MLFPNConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    pixel_means: tuple[float, float, float] = BGR_MEANS
    class_names: Optional[list[str]] = None  # foreground names; index i is label i + 1

    def validate(self) -> ModelConfig:
        """Raise a ValueError naming the field when the combination cannot build."""
        m = self.mlfpn
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (background + at least one class), got {self.num_classes}"
            )
        if m.planes < 2 or m.planes % 2:
            raise ValueError(f"mlfpn.planes must be an even number >= 2, got {m.planes}")
        if m.num_levels < 1:
            raise ValueError(f"mlfpn.num_levels must be >= 1, got {m.num_levels}")
        if m.num_scales < 3:
            raise ValueError(f"mlfpn.num_scales must be >= 3, got {m.num_scales}")
        if m.sfam and (m.planes * m.num_levels) // m.sfam_reduction < 1:
            raise ValueError(
                f"mlfpn.sfam_reduction {m.sfam_reduction} leaves no channels for "
                f"{m.planes * m.num_levels} aggregated channels"
            )
        if len(self.anchors.size_pattern) != m.num_scales + 1:
            raise ValueError(
                f"anchors.size_pattern needs num_scales + 1 = {m.num_scales + 1} entries, "
                f"got {len(self.anchors.size_pattern)}"
            )
        if self.anchors.steps is not None and len(self.anchors.steps) != m.num_scales:
            raise ValueError(
                f"anchors.steps needs num_scales = {m.num_scales} entries (or null), got {len(self.anchors.steps)}"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes - 1:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes={self.num_classes} "
                f"means {self.num_classes - 1} foreground classes"
            )
        if self.input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {self.input_size}")
        return self

    @property
    def categories(self) -> list[str]:
        """Names indexed by label, background at 0, like torchvision's weight metadata."""
        names = self.class_names or [f"class_{i}" for i in range(1, self.num_classes)]
        return ["__background__", *names]

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data, "config")

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(_plain(self.to_dict()))

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> ModelConfig:
        """Read a config file: either a full config or `preset: NAME` plus overrides."""
        return cls.from_mapping(read_yaml_mapping(path), path)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: Union[str, Path]) -> ModelConfig:
        """A config file's content (its `model:` section, or the whole of it); errors name `where`."""
        if not data:
            raise ValueError(f"{where}: empty config file; expected `preset: NAME` or a full model config")
        data = dict(data.get("model", data))
        preset = data.pop("preset", None)
        try:
            if preset is not None:
                return get_config(preset, **data)
            return cls.from_dict(data).validate()
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def save_yaml(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_yaml())


def _plain(value: Any) -> Any:
    """Tuples to lists so YAML stays readable by safe_load."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_yaml_mapping(path: Union[str, Path]) -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for an empty one), with errors that name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses; errors name `where.field`."""
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise KeyError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            kwargs[name] = dataclass_from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple) and value is not None:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _vgg_anchors(size: int) -> AnchorConfig:
    table = {
        320: ([8, 16, 32, 64, 107, 320], [0.08, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]),
        512: ([8, 16, 32, 64, 128, 256], [0.06, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]),
        704: ([8, 16, 32, 64, 117, 176], [0.04, 0.11, 0.23, 0.39, 0.58, 0.80, 1.05]),
        800: ([8, 16, 32, 62, 115, 160], [0.04, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]),
    }
    steps, pattern = table[size]
    return AnchorConfig(size_pattern=list(pattern), steps=list(steps))


def _official(name: str, size: int, backbone: str) -> ModelConfig:
    return ModelConfig(
        name=name, input_size=size, backbone=BackboneConfig(name=backbone), anchors=_vgg_anchors(size)
    )


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="m2det_tiny",
        input_size=320,
        num_classes=81,
        backbone=BackboneConfig(name="tiny", width=32),
        mlfpn=MLFPNConfig(planes=64, num_levels=2, num_scales=6, shallow_out=64, deep_out=128),
        anchors=_vgg_anchors(320),
    )


PRESETS: dict[str, Any] = {
    "m2det320_vgg16": lambda: _official("m2det320_vgg16", 320, "vgg16"),
    "m2det512_vgg16": lambda: _official("m2det512_vgg16", 512, "vgg16"),
    "m2det704_vgg16": lambda: _official("m2det704_vgg16", 704, "vgg16"),
    "m2det800_vgg16": lambda: _official("m2det800_vgg16", 800, "vgg16"),
    "m2det320_resnet101": lambda: _official("m2det320_resnet101", 320, "resnet101"),
    "m2det512_resnet101": lambda: _official("m2det512_resnet101", 512, "resnet101"),
    "m2det_tiny": _tiny,
}


def list_presets() -> list[str]:
    return list(PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name with top-level or nested overrides.

    Nested sections take a dict (``mlfpn={"planes": 128}``) or a dataclass instance; a dotted
    form is also accepted (``**{"mlfpn.planes": 128}``).
    """
    if name not in PRESETS:
        # a part of a name ("resnet") suggests every preset holding it, a misspelling the nearest ones
        wanted = str(name).lower()
        close = [p for p in PRESETS if wanted and wanted in p] or difflib.get_close_matches(
            wanted, PRESETS, n=3
        )
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"unknown preset {name!r}; {guess}known presets: {', '.join(PRESETS)}")
    return with_overrides(PRESETS[name](), **overrides)


def with_overrides(config: ModelConfig, **overrides: Any) -> ModelConfig:
    """A validated copy of `config` with the overrides applied (see `get_config`)."""
    data = config.to_dict()
    for key, value in overrides.items():
        if is_dataclass(value):
            value = dataclasses.asdict(value)
        section, _, leaf = key.partition(".")
        if leaf:
            if section not in data or not isinstance(data[section], dict):
                raise KeyError(f"override {key!r}: {section!r} is not a config section")
            data[section][leaf] = value
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return ModelConfig.from_dict(data).validate()

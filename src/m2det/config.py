"""Model configuration as small typed dataclasses, with the named presets and YAML/JSON round-trips.

A configuration is saved with every checkpoint so that a file alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from m2det.errors import ConfigError

# Official input convention: BGR, minus these per-channel means, no std scaling.
BGR_MEANS: tuple[float, float, float] = (104.0, 117.0, 123.0)


@dataclass
class BackboneConfig:
    """Which feature extractor feeds FFMv1 and, optionally, a local ImageNet weights file."""

    name: str = "vgg16"  # vgg16 | resnet101 | tiny
    weights: Optional[str] = None
    width: int = 32  # base width of the tiny backbone; ignored by the others


# What builds the feature pyramid the heads read: the MLFPN, or one of Table 2's SSD baselines.
PYRAMID_KINDS: tuple[str, ...] = ("mlfpn", "ssd", "ssd_deconv")
PyramidKind = Literal["mlfpn", "ssd", "ssd_deconv"]


@dataclass
class MLFPNConfig:
    """The Multi-Level Feature Pyramid Network: FFMv1, `num_levels` TUM/FFMv2 pairs, SFAM.

    `shared_leach` and `shared_sfam` reproduce the official code, where one 1x1 conv reduces the
    base feature for every level and one SE pair serves every scale; checkpoints rely on that.
    The fields after `deep_out` build the paper's Table 2 ablation (`m2det.models.variants`); their
    defaults are M2Det itself, so a configuration written before they existed builds the same net:
    `kind` "ssd" / "ssd_deconv" replaces the MLFPN by SSD's pyramid (one level; `planes` sets the
    extra layers' width), `smooth=False` makes every TUM an s-TUM, `base_every_level=False` feeds
    the base feature to the first TUM only (no FFMv2).
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
    kind: PyramidKind = "mlfpn"
    base_every_level: bool = True  # FFMv2 joins the base feature into every TUM after the first


# the official 320 steps (with the default size_pattern); ints as there, so a written default shows 8, not 8.0
_OFFICIAL_STEPS_320: list[float] = [8, 16, 32, 64, 107, 320]


@dataclass
class AnchorConfig:
    """SSD prior boxes: sizes are fractions of the input side, `steps` in pixels.

    `steps=None` derives each step from the feature map size, which is what lets any input size
    and any scale layout work; the presets keep the official steps so their anchors match exactly.
    """

    size_pattern: list[float] = field(default_factory=lambda: [0.08, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05])
    steps: Optional[list[float]] = field(default_factory=lambda: _OFFICIAL_STEPS_320.copy())
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
            raise ConfigError(
                f"num_classes must be >= 2 (background + at least one class), got {self.num_classes}"
            )
        if m.planes < 2 or m.planes % 2:
            raise ConfigError(f"mlfpn.planes must be an even number >= 2, got {m.planes}")
        if m.num_levels < 1:
            raise ConfigError(f"mlfpn.num_levels must be >= 1, got {m.num_levels}")
        if m.kind not in PYRAMID_KINDS:
            raise ConfigError(f"mlfpn.kind must be one of {', '.join(PYRAMID_KINDS)}, got {m.kind!r}")
        if m.kind != "mlfpn" and m.num_levels != 1:
            raise ConfigError(
                f"mlfpn.kind {m.kind!r} builds SSD's pyramid, which has one level: set mlfpn.num_levels=1 "
                f"(got {m.num_levels}), or use the variant (m2det.models.variants, `m2det models --variants`)"
            )
        if m.kind != "mlfpn" and m.sfam:
            raise ConfigError(
                f"mlfpn.sfam aggregates the levels of the MLFPN; mlfpn.kind {m.kind!r} has none: "
                "set mlfpn.sfam=false or mlfpn.kind=mlfpn"
            )
        if m.num_scales < 3:
            raise ConfigError(f"mlfpn.num_scales must be >= 3, got {m.num_scales}")
        if m.sfam and (m.planes * m.num_levels) // m.sfam_reduction < 1:
            raise ConfigError(
                f"mlfpn.sfam_reduction {m.sfam_reduction} leaves no channels for "
                f"{m.planes * m.num_levels} aggregated channels"
            )
        if len(self.anchors.size_pattern) != m.num_scales + 1:
            raise ConfigError(
                f"anchors.size_pattern needs num_scales + 1 = {m.num_scales + 1} entries, "
                f"got {len(self.anchors.size_pattern)}"
            )
        if self.anchors.steps is not None and len(self.anchors.steps) != m.num_scales:
            raise ConfigError(
                f"anchors.steps needs num_scales = {m.num_scales} entries (or null), got {len(self.anchors.steps)}"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes - 1:
            raise ConfigError(
                f"class_names has {len(self.class_names)} names but num_classes={self.num_classes} "
                f"means {self.num_classes - 1} foreground classes"
            )
        if self.input_size < 32:
            raise ConfigError(f"input_size must be >= 32, got {self.input_size}")
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
        return dataclass_from_dict(cls, data, "model")

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
            raise ConfigError(f"{where}: empty config file; expected `preset: NAME` or a full model config")
        section = data.get("model", data)
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: model: expected a mapping, got {section!r}")
        data = dict(section)
        preset = data.pop("preset", None)
        try:
            if preset is not None:
                return get_config(preset, **data)
            return cls.from_dict(data).validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def save_yaml(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_yaml())


def _plain(value: Any) -> Any:
    """Tuples to lists so YAML stays readable by safe_load."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _NumberLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as people write them: YAML 1.1 reads `1e-3`, `1E3` and
    `-2e-4` as strings (it wants `1.0e-3`); here they are floats, as in YAML 1.2 and Python."""


_NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text as plain Python values (safe), with `1e-3` a number (see `_NumberLoader`)."""
    return yaml.load(text, Loader=_NumberLoader)  # a SafeLoader: plain values only


def read_yaml_mapping(path: Union[str, Path]) -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for an empty one), with errors that name the file."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def close_matches(wanted: str, choices: Sequence[str]) -> list[str]:
    """The choices `wanted` may have meant: those that contain it (a part of a name), else the
    nearest spellings (case ignored)."""
    lowered = str(wanted).lower()
    by_lower = {choice.lower(): choice for choice in choices}
    holding = [choice for choice in choices if lowered and lowered in choice.lower()]
    return holding or [by_lower[c] for c in difflib.get_close_matches(lowered, list(by_lower), n=3)]


def unknown_key_message(key: str, valid: Sequence[str]) -> str:
    """`KEY: unknown key; did you mean ...? valid keys: ...` for dotted keys: the last part of `key`
    is matched against the last parts of the `valid` keys."""
    wanted, last_parts = key.rpartition(".")[2], [name.rpartition(".")[2] for name in valid]
    close = set(close_matches(wanted, last_parts))
    guesses = [name for name, last in zip(valid, last_parts) if last in close]
    guess = f"did you mean {' or '.join(guesses)}? " if guesses else ""
    return f"{key}: unknown key; {guess}valid keys: {', '.join(valid)}"


def _dotted(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


_MISMATCH = object()  # `_convert`'s answer for a value that does not fit the type
_UNIONS = (Union, getattr(types, "UnionType", Union))  # Optional[X] and, from Python 3.10, X | None
_PLURALS = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def check_field_value(value: Any, hint: Any, where: str) -> Any:
    """`value` for a field of type `hint`, or a ValueError naming `where`, the value and the type.

    Lossless conversions only: a list for a tuple field, a whole float (1e2) for an integer field
    (an integer is a number as it is). Types it does not know are left to the config's `validate`.
    """
    converted = _convert(value, hint)
    if converted is _MISMATCH:
        raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r} ({_value_kind(value)})")
    return converted


def _value_kind(value: Any) -> str:
    kinds = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    kinds.update({list: "a list", tuple: "a list", dict: "a mapping"})
    return kinds.get(type(value), type(value).__name__)


def _convert(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if origin in _UNIONS:
        candidates = (_convert(value, arg) for arg in args)
        return next((c for c in candidates if c is not _MISMATCH), _MISMATCH)
    if origin is typing.Literal:
        return value if value in args else _MISMATCH
    if hint is type(None):
        return value if value is None else _MISMATCH
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if hint is float:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISMATCH
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return _MISMATCH
            items = [_convert(v, a) for v, a in zip(value, args)]
        else:
            items = [_convert(v, args[0] if args else Any) for v in value]
        if any(item is _MISMATCH for item in items):
            return _MISMATCH
        return tuple(items) if tuple in (hint, origin) else items
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            return _MISMATCH
        key_hint, value_hint = args or (Any, Any)
        pairs = [(_convert(k, key_hint), _convert(v, value_hint)) for k, v in value.items()]
        if any(k is _MISMATCH or v is _MISMATCH for k, v in pairs):
            return _MISMATCH
        return dict(pairs)
    return value


def _type_name(hint: Any) -> str:
    """A type as a person says it: `a number`, `a list of 2 numbers`, `an integer or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    simple = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
    }
    if hint in simple:
        return simple[hint]
    if origin in _UNIONS:
        return " or ".join(_type_name(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint in (list, tuple) or origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            kinds = {_PLURALS.get(a, "values") for a in args}
            return f"a list of {len(args)} {kinds.pop() if len(kinds) == 1 else 'values'}"
        return f"a list of {_PLURALS.get(args[0], 'values') if args else 'values'}"
    if hint is dict or origin is dict:
        return "a mapping" + (f" of {_PLURALS.get(args[1], 'values')}" if args and args[1] is not Any else "")
    return getattr(hint, "__name__", str(hint))


def dataclass_from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a mapping, recursing into nested dataclasses, each value checked
    against its field's type (`check_field_value`); errors are ValueErrors naming `where.field`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    names = [f.name for f in fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise ConfigError(
            unknown_key_message(_dotted(where, str(unknown[0])), [_dotted(where, n) for n in names])
        )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            kwargs[name] = dataclass_from_dict(type(default), value, _dotted(where, name))
        else:
            kwargs[name] = check_field_value(value, hints[name], _dotted(where, name))
    return cls(**kwargs)


def replace_fields(config: Any, overrides: Mapping[str, Any], where: str) -> Any:
    """A copy of the dataclass `config` with `overrides` applied, built by `dataclass_from_dict`
    (so every value is type-checked and an unknown key names the valid ones). The one merger of
    `--set` values, config-file overrides and keyword overrides.

    A key is a field name or a dotted path through nested dataclass sections (`mlfpn.planes`); at
    a mapping-valued field the rest of the path is one key of that mapping
    (`augment_settings.max_expand`, `lr_mults.head.loc`). A mapping (or a dataclass) given for a
    nested section changes the fields it names; any other value replaces the field.
    """
    data = dataclasses.asdict(config)
    for key, value in overrides.items():
        if is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        target, section, obj = data, where, config
        parts = str(key).split(".")
        for i, part in enumerate(parts[:-1]):
            current = getattr(obj, part, None) if part in target else None
            if is_dataclass(current):
                target, section, obj = target[part], _dotted(section, part), current
            elif isinstance(current, dict):
                target[part] = {**target[part], ".".join(parts[i + 1 :]): value}
                break
            else:
                raise ConfigError(
                    unknown_key_message(_dotted(section, part), [_dotted(section, n) for n in target])
                )
        else:
            leaf = parts[-1]
            if is_dataclass(getattr(obj, leaf, None)) and isinstance(value, Mapping):
                target[leaf] = {**target[leaf], **value}
            else:
                target[leaf] = value
    return dataclass_from_dict(type(config), data, where)


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


# The paper's Table 2 ablation, column by column, as overrides that turn any preset into that column
# (`get_config("m2det320_vgg16+ssd")`; `m2det.models.variants` for the rest). The columns are
# cumulative: SSD -> + DSSD's deconvolution layers -> MLFPN of 8 s-TUMs -> 8 TUMs -> + the base
# feature at every TUM -> + SFAM -> ResNet-101; so the s-TUM and TUM columns come before "+ Base
# feature" and their later TUMs read only the previous TUM's output. Each sets every field that
# tells the columns apart, so that a variant is the same whatever the base preset had on.
_M2DET_PARTS: dict[str, Any] = {
    "mlfpn.kind": "mlfpn",
    "mlfpn.smooth": True,
    "mlfpn.base_every_level": True,
    "mlfpn.sfam": False,
}
TABLE2_VARIANTS: dict[str, dict[str, Any]] = {
    # the baseline: the backbone's own two maps and SSD's extra layers, no MLFPN (one level)
    "ssd": {**_M2DET_PARTS, "mlfpn.kind": "ssd", "mlfpn.num_levels": 1},
    # + DSSD's deconvolution modules, top-down over the SSD pyramid
    "ssd_deconv": {**_M2DET_PARTS, "mlfpn.kind": "ssd_deconv", "mlfpn.num_levels": 1},
    # MLFPN of s-TUMs (no 1x1 smoothing convs after the decoder's sums), base feature into the first only
    "stum": {**_M2DET_PARTS, "mlfpn.smooth": False, "mlfpn.base_every_level": False},
    # TUMs, the base feature into the first only
    "tum_first_base": {**_M2DET_PARTS, "mlfpn.base_every_level": False},
    # + the base feature at every TUM (FFMv2): M2Det as the authors released it
    "tum": dict(_M2DET_PARTS),
    # + SFAM
    "tum_sfam": {**_M2DET_PARTS, "mlfpn.sfam": True},
    # VGG16 -> ResNet-101, with SFAM as in the table's last column; a VGG weights file does not carry over
    "resnet101": {**_M2DET_PARTS, "mlfpn.sfam": True, "backbone.name": "resnet101", "backbone.weights": None},
}
VARIANT_SEPARATOR = "+"  # "m2det320_vgg16+ssd": a preset made into a Table 2 variant


def list_presets() -> list[str]:
    return list(PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name with top-level or nested overrides.

    Nested sections take a dict (``mlfpn={"planes": 128}``) or a dataclass instance; a dotted
    form is also accepted (``**{"mlfpn.planes": 128}``). `PRESET+VARIANT` (``m2det320_vgg16+ssd``)
    is the preset made into one of `TABLE2_VARIANTS` (see `with_variant`), then the overrides.
    """
    preset, separator, variant = (
        name.partition(VARIANT_SEPARATOR) if isinstance(name, str) else (name, "", "")
    )
    if not isinstance(preset, str) or preset not in PRESETS:
        # a part of a name ("resnet") suggests every preset holding it, a misspelling the nearest ones
        close = close_matches(str(preset), list(PRESETS))
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"unknown preset {preset!r}; {guess}known presets: {', '.join(PRESETS)}")
    if separator:
        return with_variant(PRESETS[preset](), variant, **overrides)
    return with_overrides(PRESETS[preset](), **overrides)


def with_variant(config: ModelConfig, variant: str, **overrides: Any) -> ModelConfig:
    """`config` made into Table 2's `variant` (a key of `TABLE2_VARIANTS`), then `overrides`; named
    `<config name>+<variant>` unless the overrides name it."""
    if variant not in TABLE2_VARIANTS:
        close = close_matches(str(variant), list(TABLE2_VARIANTS))
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(
            f"unknown Table 2 variant {variant!r}; {guess}variants: {', '.join(TABLE2_VARIANTS)}"
        )
    name = f"{config.name}{VARIANT_SEPARATOR}{variant}"
    return with_overrides(config, **{"name": name, **TABLE2_VARIANTS[variant], **overrides})


def with_overrides(config: ModelConfig, **overrides: Any) -> ModelConfig:
    """A validated copy of `config` with the overrides applied (see `get_config`, `replace_fields`)."""
    return replace_fields(config, overrides, "model").validate()

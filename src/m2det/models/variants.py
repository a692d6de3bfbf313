"""The paper's Table 2 ablation as configuration: each column a named override of any M2Det preset.

Table 2 builds M2Det up from an SSD baseline one part at a time: SSD -> + DSSD's deconvolution
layers -> MLFPN of 8 s-TUMs -> 8 TUMs -> + the base feature at every TUM -> + SFAM -> ResNet-101.
The overrides live in `m2det.config.TABLE2_VARIANTS` (so that `get_config("m2det320_vgg16+ssd")`,
`m2det train --model m2det320_vgg16+ssd` and a YAML `preset:` reach them too); this module is the
interface that names them. Every variant is an `M2Det` with the base preset's anchors whose heads
read, per scale, `config.mlfpn.num_levels` levels, level k in channels [k * planes, (k + 1) * planes);
the SSD baselines are one level deep, the whole of each scale's channels (which, for "ssd", differ
from scale to scale: see `m2det.models.ssd.SSDPyramid`).
"""

from __future__ import annotations

from typing import Any, Union

from m2det.config import TABLE2_VARIANTS, VARIANT_SEPARATOR, ModelConfig, get_config, with_variant

# Each column in a few words, the paper's where it has them (for listings and reports).
VARIANT_DESCRIPTIONS: dict[str, str] = {
    "ssd": "SSD baseline: the backbone's maps and SSD's extra layers",
    "ssd_deconv": "+ DSSD's deconvolution path",
    "stum": "MLFPN of s-TUMs, base feature into the first TUM only",
    "tum_first_base": "MLFPN of TUMs, base feature into the first TUM only",
    "tum": "+ base feature at every TUM (M2Det)",
    "tum_sfam": "+ SFAM",
    "resnet101": "VGG16 -> ResNet-101 (with SFAM)",
}


def list_variants() -> list[str]:
    """The variant names in Table 2's order."""
    return list(TABLE2_VARIANTS)


def variant_config(base: Union[str, ModelConfig], variant: str, **overrides: Any) -> ModelConfig:
    """The preset (or config) `base` made into Table 2's `variant`, then `overrides` applied; named
    `<base name>+<variant>`, e.g. ``variant_config("m2det512_vgg16", "ssd", num_classes=21)``.

    An unknown variant is a `ConfigError` (an `M2DetError`) listing the names.
    """
    return with_variant(get_config(base) if isinstance(base, str) else base, variant, **overrides)


__all__ = ["TABLE2_VARIANTS", "VARIANT_DESCRIPTIONS", "VARIANT_SEPARATOR", "list_variants", "variant_config"]

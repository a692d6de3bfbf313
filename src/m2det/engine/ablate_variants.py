"""A stand-in for `m2det.models.variants` (issue 16, built on another branch) with the same interface,
holding the two variants that build today, so that the ablation runner works before that module is
merged. Once it is, `m2det.engine.ablate` imports from it instead (one line) and this file goes."""

from __future__ import annotations

from typing import Any, Union

from m2det.config import ModelConfig, get_config, with_overrides
from m2det.errors import ConfigError

# name -> the overrides that turn any MLFPN preset into that variant, in the paper's Table 2 order
TABLE2_VARIANTS: dict[str, dict[str, Any]] = {
    "tum": {},  # TUMs with the base feature at every one: the presets as they are
    "tum_sfam": {"mlfpn.sfam": True},
}


def list_variants() -> list[str]:
    return list(TABLE2_VARIANTS)


def variant_config(base: Union[str, ModelConfig], variant: str, **overrides: Any) -> ModelConfig:
    """The `base` preset (or config) turned into `variant`, then `overrides` applied, validated."""
    if variant not in TABLE2_VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; known variants: {', '.join(TABLE2_VARIANTS)}")
    config = get_config(base) if isinstance(base, str) else base
    return with_overrides(config, **{**TABLE2_VARIANTS[variant], **overrides})

"""The network: backbones, MLFPN, heads and the assembled M2Det."""

from m2det.models.m2det import M2Det, build_model, config_anchors, pyramid_sizes

__all__ = ["M2Det", "build_model", "config_anchors", "pyramid_sizes"]

"""Table 2's baselines without an MLFPN: SSD's own pyramid, and DSSD's deconvolution path over it.

The baseline of the paper's ablation is "a simple detector based on the original SSD"; its next
column extends it "following DSSD" with deconvolution layers. Both keep M2Det's backbone, heads and
anchors, so only the pyramid differs: the pyramid has the MLFPN's number of scales and sizes (at 320:
40, 20, 10, 5, 3, 1; at 512: 64, 32, 16, 8, 4, 2) and is one level deep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2det.config import MLFPNConfig
from m2det.models.mlfpn import upsample_like

L2NORM_INIT = 20.0  # SSD's initial scale of the normalised conv4_3


class L2Norm(nn.Module):
    """SSD's normalisation of the stride-8 feature: each location's channel vector to unit length,
    times a learnt per-channel scale; conv4_3's activations are far larger than the deeper ones'."""

    def __init__(self, channels: int, scale: float = L2NORM_INIT, eps: float = 1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1, eps=self.eps) * self.weight.view(1, -1, 1, 1)


def extra_layer(in_channels: int, mid: int, out: int, last: bool) -> nn.Sequential:
    """One SSD extra layer: 1x1 reduce, then 3x3 at stride 2 (pad 1), or without padding for the
    last; convs with biases and no BN, Xavier-initialised, as SSD's."""
    reduce, expand = (
        nn.Conv2d(in_channels, mid, 1),
        nn.Conv2d(mid, out, 3, stride=1 if last else 2, padding=0 if last else 1),
    )
    for conv in (reduce, expand):
        nn.init.xavier_uniform_(conv.weight)
        assert conv.bias is not None  # built with one above
        nn.init.zeros_(conv.bias)
    return nn.Sequential(reduce, nn.ReLU(inplace=True), expand, nn.ReLU(inplace=True))


def conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 conv (no bias, Kaiming fan_out as M2Det's convs) -> BN, without ReLU: DSSD's unit."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    return [conv, nn.BatchNorm2d(out_channels)]


class DeconvolutionModule(nn.Module):
    """DSSD's deconvolution module (Fu et al. 2017, Fig. 3): the coarser map through a 2x2/stride-2
    deconvolution, 3x3 conv and BN; the lateral SSD feature through conv-BN-ReLU-conv-BN; joined by
    an elementwise product (DSSD found it better than a sum), then ReLU.

    Where the pyramid's sizes are not exact doublings (1 -> 3 and 3 -> 5 at 320, the stride-8 map
    of an odd input) the deconvolution's output is resampled (nearest) to the lateral's size.
    """

    def __init__(self, top_channels: int, lateral_channels: int, planes: int):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(top_channels, planes, 2, stride=2, bias=False)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out")
        self.top = nn.Sequential(*conv_bn(planes, planes))
        self.lateral = nn.Sequential(
            *conv_bn(lateral_channels, planes), nn.ReLU(inplace=True), *conv_bn(planes, planes)
        )

    def forward(self, top: Tensor, lateral: Tensor) -> Tensor:
        skip = self.lateral(lateral)
        up = self.deconv(top)
        if up.shape[-2:] != skip.shape[-2:]:
            up = upsample_like(up, skip)
        return F.relu(self.top(up) * skip)


class SSDPyramid(nn.Module):
    """SSD's feature pyramid on M2Det's backbone (`kind` "ssd"), optionally with DSSD's top-down
    deconvolution path (`kind` "ssd_deconv"); `forward(shallow, deep)` -> `num_scales` maps,
    largest first.

    Choices where the paper is silent:
    * Sources: the stride-8 feature through SSD's L2Norm (as SSD normalises conv4_3; M2Det's BN
      `norm` belongs to the MLFPN), the stride-16 feature (fc7 for VGG16), then `num_scales - 2`
      extra layers: SSD's 1x1-then-3x3 pairs, widths in units of `planes` so that planes=256 gives
      SSD's (256/512, then 128/256); each halves the size but the last, a 3x3 without padding.
      These are the MLFPN's sizes: at 320 SSD300's layers (its 5 -> 3 step is a stride-2 conv here
      rather than an unpadded one, the same size); at 512 SSD512's first four extra layers, its
      seventh scale (2 -> 1) left out so that the heads and anchors are M2Det512's.
    * "ssd_deconv": from the smallest map up, each scale is a `DeconvolutionModule` of the scale
      below and the SSD source, `planes` channels wide (DSSD uses 512); DSSD's prediction module
      is not added, the heads stay M2Det's.
    Channels per scale are in `scale_channels`: SSD's differ (VGG16 at planes=256: 512, 1024, 512,
    256, 256, 256), DSSD's are all `planes`; either way the pyramid is one level deep.
    """

    def __init__(self, shallow_channels: int, deep_channels: int, config: MLFPNConfig):
        super().__init__()
        if config.kind not in ("ssd", "ssd_deconv"):
            raise ValueError(f"SSDPyramid builds mlfpn.kind 'ssd' or 'ssd_deconv', not {config.kind!r}")
        planes, num_extra = config.planes, config.num_scales - 2
        self.l2norm = L2Norm(shallow_channels)
        extras, channels = [], [shallow_channels, deep_channels]
        for i in range(num_extra):
            last = i == num_extra - 1
            out = planes if last or i > 0 else 2 * planes
            extras.append(extra_layer(channels[-1], planes if i == 0 else planes // 2, out, last))
            channels.append(out)
        self.extras = nn.ModuleList(extras)
        self.deconv = (
            nn.ModuleList(
                DeconvolutionModule(channels[-1] if i == len(channels) - 2 else planes, channels[i], planes)
                for i in range(len(channels) - 1)
            )
            if config.kind == "ssd_deconv"
            else None
        )
        # per scale: SSD's sources as they are, or the deconvolution modules' `planes`
        self.scale_channels = channels if self.deconv is None else [planes] * len(channels)

    def forward(self, shallow: Tensor, deep: Tensor) -> list[Tensor]:
        sources = [self.l2norm(shallow), deep]
        for extra in self.extras:
            sources.append(extra(sources[-1]))
        if self.deconv is None:
            return sources
        pyramid = [sources[-1]]
        for i in reversed(range(len(self.deconv))):
            pyramid.insert(0, self.deconv[i](pyramid[0], sources[i]))
        return pyramid

    @staticmethod
    def scale_sizes(shallow_size: int, deep_size: int, num_scales: int) -> list[int]:
        """Spatial sizes of the pyramid, largest first: the two backbone maps, then each extra
        layer halving (rounding up) but the last, which takes 2 off (3x3 without padding)."""
        sizes = [shallow_size, deep_size]
        for _ in range(num_scales - 3):
            sizes.append((sizes[-1] + 1) // 2)
        sizes.append(sizes[-1] - 2)
        return sizes

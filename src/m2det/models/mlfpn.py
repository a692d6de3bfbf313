"""The Multi-Level Feature Pyramid Network (paper Fig. 2 and 4): FFMv1, TUM, FFMv2, SFAM.

Module and parameter names mirror the paper; `m2det.io.official` maps the official key layout
onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2det.config import MLFPNConfig


class BasicConv(nn.Sequential):
    """Conv (no bias) -> BatchNorm (momentum 0.01, as the official code) -> ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.01)
        self.relu = nn.ReLU(inplace=True)


def upsample_like(x: Tensor, reference: Tensor) -> Tensor:
    """Nearest upsampling to the reference's spatial size (equals the official x2 on even sizes)."""
    return F.interpolate(x, size=reference.shape[-2:], mode="nearest")


class FFMv1(nn.Module):
    """Fuses the shallow and the upsampled deep backbone feature into the base feature."""

    def __init__(self, shallow_in: int, deep_in: int, shallow_out: int = 256, deep_out: int = 512):
        super().__init__()
        self.reduce = BasicConv(shallow_in, shallow_out, 3, padding=1)
        self.up_reduce = BasicConv(deep_in, deep_out, 1)
        self.out_channels = shallow_out + deep_out

    def forward(self, shallow: Tensor, deep: Tensor) -> Tensor:
        reduced = self.reduce(shallow)
        return torch.cat([reduced, upsample_like(self.up_reduce(deep), reduced)], dim=1)


class FFMv2(nn.Module):
    """Joins the (reduced) base feature with the previous TUM's largest output; parameter-free."""

    def forward(self, base: Tensor, previous: Tensor) -> Tensor:
        return torch.cat([base, previous], dim=1)


class TUM(nn.Module):
    """Thinned U-shape Module: a stride-2 encoder, a top-down decoder with lateral 3x3 convs and
    1x1 smoothing, returning `num_scales` maps of `planes` channels, smallest first.

    The last encoder conv is 3x3/stride 1/no padding, as in the official code (3x3 -> 1x1 at 320).
    `smooth=False` leaves out the 1x1 convs after the decoder's sums: the paper's s-TUM (Table 2).
    """

    def __init__(self, in_channels: int, planes: int, num_scales: int = 6, smooth: bool = True):
        super().__init__()
        strides = [2] * (num_scales - 2) + [1]
        self.encoder = nn.ModuleList(
            BasicConv(in_channels if i == 0 else planes, planes, 3, stride=s, padding=1 if s == 2 else 0)
            for i, s in enumerate(strides)
        )
        self.top = BasicConv(planes, planes, 1)
        self.lateral = nn.ModuleList(
            BasicConv(in_channels if i == num_scales - 2 else planes, planes, 3, padding=1)
            for i in range(num_scales - 1)
        )
        self.smooth = (
            nn.ModuleList(BasicConv(planes, planes, 1) for _ in range(num_scales - 1)) if smooth else None
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        encoded = [x]
        for layer in self.encoder:
            encoded.append(layer(encoded[-1]))
        decoded = [self.top(encoded[-1])]
        for i, lateral in enumerate(self.lateral):
            skip = lateral(encoded[-2 - i])
            decoded.append(upsample_like(decoded[-1], skip) + skip)
        if self.smooth is None:
            return decoded
        return [decoded[0]] + [smooth(d) for smooth, d in zip(self.smooth, decoded[1:])]


class SFAM(nn.Module):
    """Scale-wise Feature Aggregation: squeeze-and-excitation channel attention per scale.

    With `shared=True` one fc1/fc2 pair serves every scale, as in the official code.
    """

    def __init__(self, channels: int, num_scales: int, reduction: int = 16, shared: bool = True):
        super().__init__()
        hidden = channels // reduction

        def layers(cin: int, cout: int) -> nn.ModuleList:
            if shared:
                return nn.ModuleList([nn.Conv2d(cin, cout, 1)] * num_scales)
            return nn.ModuleList(nn.Conv2d(cin, cout, 1) for _ in range(num_scales))

        self.fc1 = layers(channels, hidden)
        self.fc2 = layers(hidden, channels)

    def channel_weights(self, features: list[Tensor]) -> list[Tensor]:
        """The attention `s` of the paper's Eq. 2 per scale: sigmoid weights `[N, C, 1, 1]` in (0, 1);
        public so that analysis (`m2det.analysis`) reads the very weights `forward` applies."""
        return [
            torch.sigmoid(fc2(F.relu(fc1(F.adaptive_avg_pool2d(x, 1)))))
            for x, fc1, fc2 in zip(features, self.fc1, self.fc2)
        ]

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [x * weights for x, weights in zip(features, self.channel_weights(features))]


class MLFPN(nn.Module):
    """Base feature -> `num_levels` alternating FFMv2/TUM -> scale-wise concat -> SFAM -> Norm.

    Returns `num_scales` maps of `planes * num_levels` channels, largest scale first, level k in
    channels [k * planes, (k + 1) * planes). With `shared_leach=True` (the official code) one 1x1
    conv reduces the base feature for all levels. Table 2's ablation: `smooth=False` builds s-TUMs;
    `base_every_level=False` gives the base feature to the first TUM only, each later TUM reading
    just the previous TUM's largest output (no FFMv2, so one leach conv and `planes` input channels).
    """

    def __init__(self, shallow_channels: int, deep_channels: int, config: MLFPNConfig):
        super().__init__()
        c = config
        self.ffm1 = FFMv1(shallow_channels, deep_channels, c.shallow_out, c.deep_out)
        half = c.planes // 2

        def leach_conv() -> BasicConv:
            return BasicConv(self.ffm1.out_channels, half, 1)

        self.base_every_level = c.base_every_level
        leaches = c.num_levels if c.base_every_level else 1
        if c.shared_leach:
            self.leach = nn.ModuleList([leach_conv()] * leaches)
        else:
            self.leach = nn.ModuleList(leach_conv() for _ in range(leaches))
        self.ffm2 = FFMv2()
        later_in = half + c.planes if c.base_every_level else c.planes
        self.tums = nn.ModuleList(
            TUM(half if level == 0 else later_in, c.planes, c.num_scales, c.smooth)
            for level in range(c.num_levels)
        )
        self.out_channels = c.planes * c.num_levels
        self.scale_channels = [self.out_channels] * c.num_scales
        self.sfam = SFAM(self.out_channels, c.num_scales, c.sfam_reduction, c.shared_sfam) if c.sfam else None
        self.norm = nn.BatchNorm2d(self.out_channels)
        self.num_scales = c.num_scales
        # A shared leach computed once instead of at every level: equal outputs, fewer FLOPs. Off by
        # default, so that eager runs op for op as the official code (and counts its FLOPs); the
        # fast path (`m2det.deploy.optimize_for_inference`) turns it on.
        self.leach_once = False

    def forward(self, shallow: Tensor, deep: Tensor) -> list[Tensor]:
        base = self.ffm1(shallow, deep)
        if self.leach_once and all(leach is self.leach[0] for leach in self.leach):
            # the official shared leach is one conv on one input at every level: the same output
            # each time (nothing below writes into it in place)
            reduced = [self.leach[0](base)] * len(self.leach)
        else:
            reduced = [leach(base) for leach in self.leach]
        levels = [self.tums[0](reduced[0])]
        for level, tum in enumerate(self.tums[1:], start=1):
            previous = levels[-1][-1]
            levels.append(tum(self.ffm2(reduced[level], previous) if self.base_every_level else previous))
        # TUM outputs are smallest-first; the pyramid is largest-first.
        pyramid = [torch.cat([level[i] for level in levels], dim=1) for i in reversed(range(self.num_scales))]
        if self.sfam is not None:
            pyramid = self.sfam(pyramid)
        pyramid[0] = self.norm(pyramid[0])
        return pyramid

    @staticmethod
    def scale_sizes(base_size: int, num_scales: int) -> list[int]:
        """Spatial sizes of the pyramid, largest first, for a base feature of `base_size`: each TUM
        encoder conv halves (rounding up) but the last, a 3x3 without padding (size - 2)."""
        sizes = [base_size]
        for _ in range(num_scales - 2):
            sizes.append((sizes[-1] + 1) // 2)
        sizes.append(sizes[-1] - 2)
        return sizes

"""An independent, functional transcription of the official M2Det forward pass and prior boxes.

It reads the official key names directly (no module of ours is used), so comparing it with our
model shows that every checkpoint tensor lands where it computes.
"""

from __future__ import annotations

import math
from itertools import product

import torch
import torch.nn.functional as F

VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]


def _basic(sd, prefix, x, stride=1, padding=0):
    x = F.conv2d(x, sd[prefix + ".conv.weight"], None, stride, padding)
    x = F.batch_norm(
        x, sd[prefix + ".bn.running_mean"], sd[prefix + ".bn.running_var"],
        sd[prefix + ".bn.weight"], sd[prefix + ".bn.bias"], False, 0.0, 1e-5,
    )  # fmt: skip
    return F.relu(x)


def _vgg(sd, x):
    feats, idx = [], 0
    for v in VGG_CFG:
        if v in ("M", "C"):
            x = F.max_pool2d(x, 2, 2, ceil_mode=(v == "C"))
            idx += 1
        else:
            x = F.relu(F.conv2d(x, sd[f"base.{idx}.weight"], sd[f"base.{idx}.bias"], padding=1))
            idx += 2
            if idx == 23:
                feats.append(x)
    x = F.max_pool2d(x, 3, 1, 1)
    x = F.relu(F.conv2d(x, sd["base.31.weight"], sd["base.31.bias"], padding=6, dilation=6))
    x = F.relu(F.conv2d(x, sd["base.33.weight"], sd["base.33.bias"]))
    feats.append(x)
    return feats


def _tum(sd, name, x, scales=6):
    conved = [x]
    for i in range(scales - 1):
        last = i == scales - 2
        x = _basic(sd, f"{name}.layers.{i}", x, stride=1 if last else 2, padding=0 if last else 1)
        conved.append(x)
    deconved = [_basic(sd, f"{name}.toplayer.0", conved[-1])]
    for i in range(scales - 1):
        lateral = _basic(sd, f"{name}.latlayer.{i}", conved[len(conved) - 2 - i], padding=1)
        deconved.append(F.interpolate(deconved[i], size=lateral.shape[-2:], mode="nearest") + lateral)
    return [deconved[0]] + [_basic(sd, f"{name}.smooth.{i}", deconved[i + 1]) for i in range(scales - 1)]


def official_forward(sd, x, num_levels=8, num_scales=6, num_classes=81, sfam=False):
    shallow, deep = _vgg(sd, x)
    base = torch.cat(
        [
            _basic(sd, "reduce", shallow, padding=1),
            F.interpolate(_basic(sd, "up_reduce", deep), scale_factor=2, mode="nearest"),
        ],
        1,
    )
    outs = [_tum(sd, "unet1", _basic(sd, "leach.0", base), num_scales)]
    for i in range(1, num_levels):
        fused = torch.cat([_basic(sd, f"leach.{i}", base), outs[-1][-1]], 1)
        outs.append(_tum(sd, f"unet{i + 1}", fused, num_scales))
    sources = [torch.cat([o[i - 1] for o in outs], 1) for i in range(num_scales, 0, -1)]
    if sfam:
        new = []
        for i, s in enumerate(sources):
            w = F.adaptive_avg_pool2d(s, 1)
            w = F.relu(F.conv2d(w, sd[f"sfam_module.fc1.{i}.weight"], sd[f"sfam_module.fc1.{i}.bias"]))
            w = torch.sigmoid(F.conv2d(w, sd[f"sfam_module.fc2.{i}.weight"], sd[f"sfam_module.fc2.{i}.bias"]))
            new.append(s * w)
        sources = new
    sources[0] = F.batch_norm(
        sources[0],
        sd["Norm.running_mean"],
        sd["Norm.running_var"],
        sd["Norm.weight"],
        sd["Norm.bias"],
        False,
        0.0,
        1e-5,
    )
    loc, conf = [], []
    for i, s in enumerate(sources):
        loc.append(
            F.conv2d(s, sd[f"loc.{i}.weight"], sd[f"loc.{i}.bias"], padding=1)
            .permute(0, 2, 3, 1)
            .contiguous()
        )
        conf.append(
            F.conv2d(s, sd[f"conf.{i}.weight"], sd[f"conf.{i}.bias"], padding=1)
            .permute(0, 2, 3, 1)
            .contiguous()
        )
    loc = torch.cat([o.view(o.size(0), -1) for o in loc], 1).view(x.shape[0], -1, 4)
    conf = torch.cat([o.view(o.size(0), -1) for o in conf], 1).view(x.shape[0], -1, num_classes)
    return loc, conf


def official_priors(size, steps, size_pattern):
    """The official `mk_anchors` + `PriorBox.forward`, loop for loop."""
    fmaps, s = [], size
    for i in range(7):
        s = math.ceil(s / 2.0)
        if i >= 2:
            fmaps.append(s)
            if i == 6:
                fmaps.append(s - 2)
    min_sizes = [round(p * size, 2) for p in size_pattern[:-1]]
    max_sizes = [round(p * size, 2) for p in size_pattern[1:]]
    mean = []
    for k, f in enumerate(fmaps):
        for i, j in product(range(f), repeat=2):
            f_k = size / steps[k]
            cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
            s_k = min_sizes[k] / size
            mean += [cx, cy, s_k, s_k]
            s_k_prime = math.sqrt(s_k * (max_sizes[k] / size))
            mean += [cx, cy, s_k_prime, s_k_prime]
            for ar in (2, 3):
                mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    return torch.Tensor(mean).view(-1, 4).clamp_(max=1, min=0)

"""Winograd convolution for the CPU fast path: each 3x3 stride-1 conv run as whichever of the direct
oneDNN conv and Winograd's minimal filtering F(2x2, 3x3) or F(4x4, 3x3) is fastest on this machine.

Winograd (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes an m x m
output tile from an (m+2) x (m+2) input tile with (m+2)^2 multiplications per channel pair instead
of 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x fewer for F(4x4, 3x3). The multiplications become one
batched matrix product per tile position, the transforms small matrix products. Here the kernel
transform is done once, in float64; the arithmetic stays float32. F(2x2) is as accurate as the
direct conv (measured: ~5e-7 of the output's magnitude, the direct ~2e-6), F(4x4) about 1e-5 (its
transform matrices hold 4s and 8s). The gain depends on the shape: large maps with many channels
win, small maps or few channels lose to the transforms' memory traffic, so each conv times the
candidates the first time it sees an input shape, as cudnn.benchmark does on a GPU.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2det.deploy.prepack import PackedConv2d

# Lavin & Gray's transform matrices (B^T, G, A^T) for output tiles of 2 and 4, as exact fractions.
_TRANSFORMS: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}
TILE_SIZES = tuple(_TRANSFORMS)


def winograd_eligible(conv: nn.Conv2d) -> bool:
    """Winograd here covers plain, ungrouped, undilated 3x3 stride-1 float32 convs with numeric padding."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.dtype == torch.float32
    )


class WinogradConv2d(nn.Module):
    """A 3x3 stride-1 conv (optionally with its ReLU) computed by Winograd's F(m x m, 3x3), m = `tile`.

    The kernel is transformed once (float64, then float32) into `kernel`: [(m+2)^2, out, in].
    Takes NCHW float32, returns it contiguous.
    """

    # The tiles go through in bands of tile rows of about BAND_BYTES of transformed input, so that
    # a band's intermediates stay in the caches, but never less than the transformed kernel, which
    # each band reads again. Measured in the network, against one pass: m2det512_vgg16 at batch 4
    # 1.10x, m2det320_vgg16 at batch 4 1.07x, at batch 1 level (docs/deploy.md).
    BAND_BYTES: int = 8 << 20

    def __init__(self, conv: nn.Conv2d, tile: int = 4, relu: bool = False):
        super().__init__()
        if not winograd_eligible(conv):
            raise ValueError(f"{conv}: only ungrouped 3x3 stride-1 float32 convs run by Winograd")
        if tile not in _TRANSFORMS:
            raise ValueError(f"tile must be one of {TILE_SIZES}, got {tile}")
        input_transform, kernel_transform, output_transform = (
            torch.tensor(matrix, dtype=torch.float64) for matrix in _TRANSFORMS[tile]
        )
        weight = conv.weight.detach()
        self.tile, self.relu = tile, relu
        self.padding = cast("tuple[int, int]", tuple(conv.padding))
        size = tile + 2
        # G g G^T for every (out, in) pair, flattened: kron(G, G) @ vec(g), one matrix product
        kernel = torch.kron(kernel_transform, kernel_transform) @ weight.double().cpu().reshape(-1, 9).T
        self.kernel = kernel.view(size * size, *weight.shape[:2]).to(weight.device, torch.float32)
        # both 2-D transforms as one matrix each over a flattened tile (Kronecker products)
        self.input_transform = torch.kron(input_transform, input_transform).to(weight.device, torch.float32)
        self.output_transform = torch.kron(output_transform, output_transform).to(
            weight.device, torch.float32
        )
        self.bias: Optional[Tensor] = None if conv.bias is None else conv.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        n, channels, height, width = x.shape
        m, size = self.tile, self.tile + 2
        pad_y, pad_x = self.padding
        out_h, out_w = height + 2 * pad_y - 2, width + 2 * pad_x - 2
        tiles_y, tiles_x = -(-out_h // m), -(-out_w // m)
        # pad to whole tiles; tiles overlap by 2 (the kernel's reach)
        x = F.pad(x, (pad_x, tiles_x * m + 2 - width - pad_x, pad_y, tiles_y * m + 2 - height - pad_y))
        out_channels = self.kernel.shape[1]
        y = torch.empty((n, out_channels, tiles_y, m, tiles_x, m), dtype=x.dtype, device=x.device)
        row_bytes = n * channels * tiles_x * size * size * x.element_size()
        band_bytes = max(self.BAND_BYTES, self.kernel.numel() * self.kernel.element_size())
        rows = max(1, min(tiles_y, band_bytes // row_bytes))
        for first in range(0, tiles_y, rows):  # a band of tile rows at a time, all images together
            last = min(first + rows, tiles_y)
            self._band(x[:, :, first * m : last * m + 2], y[:, :, first:last])
        y = y.view(n, out_channels, tiles_y * m, tiles_x * m)
        if tiles_y * m != out_h or tiles_x * m != out_w:
            y = y[:, :, :out_h, :out_w].contiguous()
        return y.relu_() if self.relu else y

    def _band(self, x: Tensor, y: Tensor) -> None:
        """The conv of padded input rows `x` into `y`: [N, out, the band's tile rows, m, tx, m]."""
        m, size = self.tile, self.tile + 2
        n, channels = x.shape[:2]
        tiles = x.unfold(2, size, m).unfold(3, size, m)  # [N, C, ty, tx, size, size], a view
        tiles_y, tiles_x = tiles.shape[2:4]
        # gathered tile by tile (rows of `size` contiguous values), channels outermost, so that the
        # transform's result is one [C, N * tiles] matrix per tile position: one product for all images
        tiles = tiles.transpose(0, 1).reshape(-1, size * size)
        transformed = (self.input_transform @ tiles.T).view(size * size, channels, -1)
        products = torch.bmm(self.kernel, transformed)  # [size^2, out, N * tiles]
        # transposed, so that each output tile comes out as m x m contiguous values
        outputs = (products.view(size * size, -1).T @ self.output_transform.T).view(
            -1, n, tiles_y, tiles_x, m, m
        )
        # tile rows and columns back in place, with the bias added in the same pass
        arranged = outputs.permute(1, 0, 2, 4, 3, 5)
        if self.bias is None:
            y.copy_(arranged)
        else:
            torch.add(arranged, self.bias.view(1, -1, 1, 1, 1, 1), out=y)

    def extra_repr(self) -> str:
        out_channels, in_channels = self.kernel.shape[1:]
        return f"{in_channels}, {out_channels}, tile={self.tile}, padding={self.padding}, relu={self.relu}"


class FastestConv2d(nn.Module):
    """A 3x3 stride-1 conv (optionally with its ReLU) that runs, for each input shape, the fastest
    of the prepacked direct conv (`PackedConv2d`) and Winograd with each tile size, timed on this
    machine the first time the shape is seen. `choices` maps each shape seen to the name chosen:
    "direct", "winograd2" or "winograd4".
    """

    TIMING_RUNS = 2  # after one warm-up run of each candidate: the faster of two calls decides

    def __init__(self, conv: nn.Conv2d, relu: bool = False, input_shape: Optional[list[int]] = None):
        super().__init__()
        self.direct = PackedConv2d(conv, relu, input_shape)
        self.winograd = nn.ModuleList(WinogradConv2d(conv, tile, relu) for tile in TILE_SIZES)
        # what a wrapping module (AffineInputConv2d) reads of its conv
        self.padding, self.stride, self.dilation = (
            self.direct.padding,
            self.direct.stride,
            self.direct.dilation,
        )
        self.candidates: dict[str, Callable[[Tensor], Tensor]] = {"direct": self.direct}
        self.candidates.update(
            (f"winograd{w.tile}", w) for w in cast("list[WinogradConv2d]", list(self.winograd))
        )
        self.choices: dict[tuple[int, ...], str] = {}

    def forward(self, x: Tensor) -> Tensor:
        shape = tuple(x.shape)
        choice = self.choices.get(shape)
        if choice is None:
            choice = self.choices[shape] = fastest(self.candidates, x, self.TIMING_RUNS)
        return self.candidates[choice](x)

    def extra_repr(self) -> str:
        return f"choices={self.choices}"


def fastest(candidates: dict[str, Callable[[Tensor], Tensor]], x: Tensor, runs: int) -> str:
    """The name of the candidate that computes `x` in the least time here: the best of `runs` calls
    after a warm-up, except that one whose warm-up already took twice the best so far is dropped."""
    best: dict[str, float] = {}
    for name, run in candidates.items():
        start = time.perf_counter()
        run(x)
        if best and time.perf_counter() - start > 2 * min(best.values()):  # a clear loser
            continue
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return min(best, key=best.__getitem__)


def pack_fastest(conv: nn.Conv2d, relu: bool, input_shape: Optional[list[int]]) -> nn.Module:
    """A `prepack_convolutions` packer: a `FastestConv2d` where Winograd can run, else a `PackedConv2d`."""
    kind = FastestConv2d if winograd_eligible(conv) else PackedConv2d
    return kind(conv, relu, input_shape)


def count_winograd(model: nn.Module) -> tuple[int, int]:
    """(convs that chose Winograd for some input shape, convs that could) in a prepared model."""
    tuned = [m for m in model.modules() if isinstance(m, FastestConv2d)]
    return sum(any(c != "direct" for c in m.choices.values()) for m in tuned), len(tuned)

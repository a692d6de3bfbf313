"""Decode time of a 640x480 JPEG: m2det's reader (Pillow, the full rule) against OpenCV.

Encodes a photo-like 640x480 picture once (quality 90), then decodes it `--rounds` times each way,
the ways interleaved in a shuffled order every round so that both see the same machine load, and
prints the median, quartiles and minimum per way, and whether the pixels agree. One thread.

    python benchmarks/image_decode.py [--rounds 400] [--quality 90]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from m2det.io.image import decode_image


def photo_like(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo, unlike a flat or random picture."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], axis=-1)
    noisy = base + np.random.default_rng(seed).normal(0, 20, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    buffer = io.BytesIO()
    Image.fromarray(photo_like()).save(buffer, "JPEG", quality=args.quality)
    data = buffer.getvalue()
    ways: dict[str, Callable[[], np.ndarray]] = {
        "m2det decode_image (Pillow, RGB CHW tensor)": lambda: decode_image(data).permute(1, 2, 0).numpy(),
        "cv2.imdecode (BGR) + cvtColor to RGB": lambda: cv2.cvtColor(
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        ),
    }
    outputs = {name: fn() for name, fn in ways.items()}  # warm-up, and the pixels to compare
    first, second = outputs.values()
    print(
        f"640x480 JPEG, {len(data)} bytes; max pixel difference {int(np.abs(first.astype(int) - second).max())}"
    )
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    order = list(ways)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            ways[name]()
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        ms = sorted(v * 1e3 for v in values)
        q1, median, q3 = statistics.quantiles(ms, n=4)
        print(f"{name:45s} median {median:.2f} ms (p25 {q1:.2f}, p75 {q3:.2f}, min {ms[0]:.2f})")


if __name__ == "__main__":
    main()

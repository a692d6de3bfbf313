"""End-to-end `m2det detect` throughput on a folder of images (random weights; CPU by default).

Copies the first N images of a folder into a temporary one, runs `m2det detect` on it as a user
would (a fresh process), and prints the images per second of the detection loop (reading, network,
post-processing, drawing, writing) and the wall time including start-up and model construction.

    python benchmarks/detect_throughput.py [--images 20] [--preset m2det320_vgg16] [--batch 4] [--no-save]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd" / "JPEGImages"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--folder", type=Path, default=DEFAULT_FOLDER, help="Folder of images (default: BCCD)."
    )
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--preset", default="m2det320_vgg16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="paper")
    parser.add_argument("--score", type=float, default=None, help="Score threshold (default: the settings').")
    parser.add_argument("--no-save", action="store_true", help="Skip drawing and writing pictures.")
    args = parser.parse_args()

    images = sorted(p for p in args.folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[
        : args.images
    ]
    if not images:
        raise SystemExit(f"no images found in {args.folder}")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "images"
        source.mkdir()
        for path in images:
            shutil.copy(path, source / path.name)
        command = [
            sys.executable, "-m", "m2det.cli.main", "detect", str(source),
            "--preset", args.preset, "--batch", str(args.batch), "--device", args.device,
            "--settings", args.settings, "--out", str(Path(tmp) / "out"),
        ]  # fmt: skip
        if args.score is not None:
            command += ["--score", str(args.score)]
        if args.no_save:
            command.append("--no-save")
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"m2det detect failed ({done.returncode}):\n{done.stderr}\n{done.stdout}")
    match = re.search(
        r"detected in (\d+) images: (\d+) detections, ([\d.]+) s \(([\d.]+) images/s\)", done.stdout
    )
    if match is None:
        raise SystemExit(f"unexpected output from m2det detect:\n{done.stdout}")
    count, detections, seconds, rate = match.groups()
    print(
        f"m2det detect, {args.preset}, random weights, {args.device}, batch {args.batch}, "
        f"settings {args.settings}, {'no pictures' if args.no_save else 'annotated pictures written'}"
    )
    print(f"{count} images ({images[0].parent}), {detections} detections")
    print(f"detection loop: {float(seconds):.1f} s, {float(rate):.2f} images/s")
    print(f"wall time with start-up and model construction: {wall:.1f} s")


if __name__ == "__main__":
    main()

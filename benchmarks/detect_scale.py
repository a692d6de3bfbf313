"""How `m2det detect` scales: 1 process vs 2, DataLoader workers decoding vs not, and what a kill costs.

Builds a folder of N images (BCCD's repeated through symlinks; default 500), saves random weights
for each preset (several processes need one weights file), and runs `m2det detect` on the folder
as a user would, in fresh processes (`torchrun --standalone` for 2):

* images/s of the detection loop (rank 0's clock; every process's images) and of the wall time
  including start-up, for each preset x processes x workers;
* a run killed (SIGKILL to torchrun and every process under it) at a random point and run again on the same
  folder: images done before the kill, images the resumed run detected, images lost (in flight,
  detected twice), and the time lost against the uninterrupted run.

Prints a table and writes everything to a JSON file.

    python benchmarks/detect_scale.py [--images 500] [--presets m2det_tiny,m2det320_vgg16]
        [--device cpu|cuda] [--batch 8] [--workers 4] [--processes 1,2] [--json out.json]
    python benchmarks/detect_scale.py --tiny     # a smoke test: 12 images, m2det_tiny, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# BCCD in ../shared (beside the checkout, or beside the main checkout of a worktree), else the test subset
DEFAULT_FOLDER = next(
    (
        p
        for p in (ROOT.parent / "shared" / "data" / "bccd" / "JPEGImages",
                  ROOT.parents[1] / "shared" / "data" / "bccd" / "JPEGImages")
        if p.is_dir()
    ),
    ROOT / "tests" / "data" / "bccd" / "JPEGImages",
)  # fmt: skip
SRC = ROOT / "src"
RATE = re.compile(r"detected in (\d+) images(?: in \d+ processes)?: (\d+) detections, ([\d.]+) s")


def make_folder(source: Path, target: Path, count: int) -> None:
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not images:
        raise SystemExit(f"no images in {source}")
    target.mkdir(parents=True)
    for k in range(count):
        image = images[k % len(images)]
        (target / f"img{k:06d}{image.suffix.lower()}").symlink_to(image.resolve())


def save_weights(preset: str, path: Path) -> Path:
    import torch

    from m2det.io.checkpoint import save_model
    from m2det.models import build_model

    torch.manual_seed(0)
    return save_model(build_model(preset), path)


def detect_command(processes: int, folder: Path, weights: Path, out: Path, args: argparse.Namespace,
                   workers: int) -> list[str]:  # fmt: skip
    launcher = [sys.executable, "-m", "m2det.cli.main"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={processes}", "-m", "m2det.cli.main"]  # fmt: skip
    return [*launcher, "detect", str(folder), "--weights", str(weights), "--out", str(out), "--no-save",
            "--batch", str(args.batch), "--device", args.device, "--workers", str(workers)]  # fmt: skip


def environment(processes: int, args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    if args.threads:  # the cores shared out between the processes
        env["OMP_NUM_THREADS"] = str(max(1, args.threads // processes))
    return env


def run(command: list[str], env: dict[str, str]) -> tuple[float, dict[str, float]]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}\n{done.stdout}"
        )
    match = RATE.search(done.stdout)
    if match is None:
        raise SystemExit(f"unexpected output:\n{done.stdout}")
    images, detections, seconds = int(match[1]), int(match[2]), float(match[3])
    return wall, {"images": images, "detections": detections, "loop_s": seconds}


def records(out: Path) -> int:
    from m2det.io.jsonfile import read_json_lines

    return sum(
        1 for path in out.glob("detections*.jsonl") for r in read_json_lines(path) if "skipped" not in r
    )


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (torchrun starts its workers in sessions of their own, so
    killing torchrun's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def kill_tree(root: int) -> None:
    """SIGKILL `root` and all its descendants at once: a machine that loses power, not a Ctrl-C."""
    for pid in process_tree(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_and_resume(processes: int, folder: Path, weights: Path, out: Path, args: argparse.Namespace,
                    workers: int, full_wall: float, count: int, rng: random.Random) -> dict[str, Any]:  # fmt: skip
    command = detect_command(processes, folder, weights, out, args, workers)
    env = environment(processes, args)
    at = rng.uniform(0.3, 0.8) * full_wall
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        process.wait(timeout=at)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)  # torchrun, its workers and their loaders alike
        process.wait()
    killed_after = time.perf_counter() - start
    done_before = records(out)
    resume_wall, resumed = run(command, env)
    return {
        "killed_after_s": killed_after,
        "done_before_kill": done_before,
        "resumed_images": resumed["images"],
        "images_lost": done_before + resumed["images"] - count,  # detected by both runs: none expected
        "resume_wall_s": resume_wall,
        "time_lost_s": killed_after + resume_wall - full_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--folder", type=Path, default=DEFAULT_FOLDER, help="Images to repeat (default: BCCD)."
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--presets", default="m2det_tiny,m2det320_vgg16")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument(
        "--workers", type=int, default=None, help="Workers when on (default: default_workers)."
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="Cores to share out (OMP_NUM_THREADS).")
    parser.add_argument("--seed", type=int, default=0, help="Where the kill falls.")
    parser.add_argument("--json", type=Path, default=Path("detect_scale.json"))
    parser.add_argument(
        "--skip",
        default="",
        help="processes:workers pairs not to run, e.g. 2:on (workers on in 2 processes).",
    )
    parser.add_argument(
        "--kill-presets", default=None, help="Presets whose fastest run is killed and resumed (default: all)."
    )
    parser.add_argument("--tiny", action="store_true", help="Smoke test: 12 images, m2det_tiny, 1 worker.")
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    from m2det.device import default_workers

    if args.tiny:
        args.images, args.presets, args.batch = 12, "m2det_tiny", 4
        args.workers = args.workers or 1
    workers_on = args.workers if args.workers is not None else max(1, default_workers())
    processes = [int(p) for p in args.processes.split(",")]
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    kills: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        make_folder(args.folder, folder, args.images)
        for preset in args.presets.split(","):
            weights = save_weights(preset, Path(tmp) / f"{preset}.safetensors")
            for n in processes:
                for workers in (0, workers_on):
                    if f"{n}:{'on' if workers else 0}" in args.skip.split(","):
                        continue
                    out = Path(tmp) / f"out_{preset}_{n}_{workers}"
                    wall, found = run(
                        detect_command(n, folder, weights, out, args, workers), environment(n, args)
                    )
                    row = {"preset": preset, "processes": n, "workers": workers, **found, "wall_s": wall,
                           "loop_images_per_s": found["images"] / found["loop_s"] if found["loop_s"] else 0.0,
                           "wall_images_per_s": found["images"] / wall}  # fmt: skip
                    rows.append(row)
                    print(f"{preset:16s} processes {n} workers {workers}: {row['loop_images_per_s']:.2f} img/s "
                          f"(loop), {row['wall_images_per_s']:.2f} img/s (wall)", flush=True)  # fmt: skip
            if args.kill_presets is not None and preset not in args.kill_presets.split(","):
                continue
            fastest = max((r for r in rows if r["preset"] == preset), key=lambda r: r["wall_images_per_s"])
            out = Path(tmp) / f"killed_{preset}"
            kill = kill_and_resume(fastest["processes"], folder, weights, out, args, fastest["workers"],
                                   fastest["wall_s"], args.images, rng)  # fmt: skip
            kills.append(
                {"preset": preset, "processes": fastest["processes"], "workers": fastest["workers"], **kill}
            )
            print(f"{preset:16s} killed after {kill['killed_after_s']:.1f} s with {kill['done_before_kill']} "
                  f"images done; resumed {kill['resumed_images']}, lost {kill['images_lost']}, "
                  f"time lost {kill['time_lost_s']:.1f} s", flush=True)  # fmt: skip
    print()
    print(
        f"m2det detect on {args.images} images, device {args.device}, batch {args.batch} per process, no pictures"
    )
    print(
        f"{'preset':16s} {'procs':>5s} {'workers':>7s} {'loop img/s':>10s} {'wall img/s':>10s} {'wall s':>7s}"
    )
    for r in rows:
        print(f"{r['preset']:16s} {r['processes']:5d} {r['workers']:7d} {r['loop_images_per_s']:10.2f} "
              f"{r['wall_images_per_s']:10.2f} {r['wall_s']:7.1f}")  # fmt: skip
    print()
    print(
        f"{'killed run':16s} {'procs':>5s} {'kill at s':>9s} {'done':>5s} {'resumed':>7s} {'lost':>4s} {'time lost s':>11s}"
    )
    for k in kills:
        print(f"{k['preset']:16s} {k['processes']:5d} {k['killed_after_s']:9.1f} {k['done_before_kill']:5d} "
              f"{k['resumed_images']:7d} {k['images_lost']:4d} {k['time_lost_s']:11.1f}")  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"settings": settings, "runs": rows, "kills": kills}, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

"""Which training recipe learns the most from a small data set in the same CPU wall time (issue 11)?

Each (recipe, seed) is one `m2det train` process on BCCD trainval (a Pascal VOC folder) with a time
budget (`--time MINUTES`), then `m2det eval` of its `last.safetensors` on BCCD test. A recipe is a
list of `--set` overrides: the training presets (`paper`, `official`, `modern`, `finetune`, by
`train.preset=NAME`) and `adamw_cosine`, the settings of benchmarks/train_bccd.py (AdamW, cosine,
batch 8) in `--set` form; `--define NAME:KEY=VALUE` adds overrides to a recipe or makes a new one.
Every run also gets `train.seed=SEED` and `train.eval_every=0`: no validation during the budget, so
that no recipe spends its time on it, and nothing is chosen on the test split (the run validates
once after the budget, on test, which `m2det eval` repeats as the figure of record).

The peer (`--peer yolov8n`): ultralytics' YOLOv8n from scratch (`yolov8n.yaml`) on the same images
for the same budget and seeds, trained by benchmarks/yolo_peer.py in its own virtual environment
(`--peer-python`), its detections on test (score >= 0.001) scored by `m2det eval --detections`, so
that both rows come from the same scoring code. The YOLO labels are written from m2det's own reading
of the VOC files, so the peer learns and is scored in the same pixel frame as the ground truth.

    python benchmarks/recipes_bccd.py [--recipes paper,modern,adamw_cosine] [--seeds 0,1,2]
        [--minutes 15] [--peer yolov8n --peer-python /tmp/yolo-venv/bin/python]
        [--data ../shared/data/bccd] [--out runs/recipes_bccd] [--define NAME:KEY=VALUE ...]

The peer's environment: `python3 -m venv /tmp/yolo-venv && /tmp/yolo-venv/bin/pip install ultralytics`.

`--report` writes the tables from the finished runs and trains nothing.

Resumable: a run whose `result.json` exists is not run again (a failed run neither, unless
`--retry-failed`); an interrupted one starts over. The recipe definitions and the budget are kept in
`settings.json` and each `result.json`, and a run that was made with other ones is refused rather
than mixed into the table. Writes into `--out`:

* `results.csv`: one row per run (AP50, AP, AP75, epochs, wall times, threads);
* `results.md`: the machine (CPU flags, cores, threads), then per recipe the mean ± spread (max - min
  over the seeds) of each figure, the peer's row, and whether the default recipe meets the goal;
* `runs/RECIPE/seedN/`: `train.log`, the run folder `train1/`, `eval/` (`metrics.json`, ...),
  `result.json`; the peer's hold `yolo/` (ultralytics' folder, `predictions.json`) instead;
* `yolo_data/`: BCCD in YOLO form (the peer's data).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "bccd"
if not DEFAULT_DATA.is_dir():
    DEFAULT_DATA = Path("/work/shared/data/bccd")

# The recipes, as `m2det train --set` overrides. `adamw_cosine` is benchmarks/train_bccd.py's
# `scratch_recipe`: AdamW at 2e-3, weight decay 0.05, batch 8, a one-epoch warm-up from lr/10, cosine
# to 0, gradients clipped at 10. train_bccd.py sizes its epochs to the budget from a timing; here
# the time budget lays the schedule over the minutes, so `epochs` only sets the warm-up's share of
# them: 1/12, about one real epoch, as there, since m2det_tiny trains at 3-4 images/s on two cores
# (about 12 epochs of BCCD's 292 trainval images in 15 minutes).
RECIPES: dict[str, list[str]] = {
    "paper": ["train.preset=paper"],
    "official": ["train.preset=official"],
    "modern": ["train.preset=modern"],
    "finetune": ["train.preset=finetune"],
    "adamw_cosine": ["train.preset=adamw_cosine"],
    # the same recipe as `--set` overrides of the paper's, as first measured (the preset stretches a
    # 120-epoch schedule with a 10-epoch warm-up onto the budget: the same rate at every instant)
    "adamw_cosine_sets": [
        "train.preset=paper",
        "train.optimizer=adamw",
        "train.lr=2e-3",
        "train.weight_decay=0.05",
        "train.batch_size=8",
        "train.epochs=12",
        "train.warmup_epochs=1",
        "train.warmup_start_lr=2e-4",
        "train.policy=cosine",
        "train.milestones=[]",
        "train.min_lr=0",
        "train.clip_grad=10",
    ],
}
PEERS = {"yolov8n": "yolov8n.yaml"}
METRICS = ("AP50", "AP", "AP75")
CSV_FIELDS = [
    "recipe",
    "seed",
    "status",
    *METRICS,
    "epochs",
    "train_s",
    "trained_s",
    "images_per_s",
    "eval_s",
    "batch_size",
    "workers",
    "torch_threads",
    "finished",
]


# ----- helpers -----
def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    """Written to a temporary file and renamed, so that a kill never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def m2det_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_logged(command: list[str], log: Path, env: dict[str, str], timeout: float) -> tuple[int, float]:
    """Run `command` from the repository with its output in `log`; (exit code, wall seconds). A
    timeout is code -9 (`m2det.utils.process.TIMED_OUT`)."""
    from m2det.utils.process import run_logged as run_with_log

    return run_with_log(command, log, env=env, cwd=REPO, timeout=timeout)


def log_tail(log: Path, lines: int = 8) -> str:
    from m2det.utils.process import log_tail as tail

    return tail(log, lines)


def eval_metrics(out_dir: Path) -> dict[str, float]:
    """AP50 / AP / AP75 from `m2det eval`'s metrics.json."""
    data = read_json(out_dir / "metrics.json")
    if data is None:
        raise RuntimeError(f"{out_dir / 'metrics.json'}: not written")
    return {name: float(data["metrics"][name]) for name in METRICS}


def m2det_eval(args: argparse.Namespace, source: list[str], out_dir: Path, log: Path) -> tuple[int, float]:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    command = [
        sys.executable,
        "-m",
        "m2det.cli.main",
        "eval",
        "--data",
        str(args.data),
        "--split",
        args.test_split,
        "--device",
        "cpu",
        "--out",
        str(out_dir),
        *source,
    ]
    return run_logged(command, log, m2det_env(), timeout=1800)


# ----- one M2Det run -----
def train_summary(run_dir: Path) -> dict[str, Any]:
    """Epochs reached, batch size and workers from the run folder's results.csv and config.yaml."""
    import yaml

    info: dict[str, Any] = {}
    try:
        with open(run_dir / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows:
            info["epochs"] = int(float(rows[-1]["epoch"]))
            seconds = [float(r["seconds"]) for r in rows]  # each epoch's, by the trainer's clock
            info["trained_s"] = round(sum(seconds), 1)
            images = sum(float(r["images_per_s"]) * s for r, s in zip(rows, seconds))
            info["images_per_s"] = round(images / max(sum(seconds), 1e-9), 2)
            ap50 = rows[-1].get("AP50")
            if ap50:
                info["train_val_AP50"] = float(ap50)
    except (OSError, KeyError, ValueError):
        pass
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    )
    train = (config or {}).get("train", {})
    info["batch_size"] = train.get("batch_size")
    info["workers"] = train.get("workers")
    return info


def run_recipe(args: argparse.Namespace, recipe: str, overrides: list[str], seed: int, folder: Path) -> dict:
    for stale in folder.glob("train*"):  # an interrupted attempt: start over
        if stale.is_dir():
            shutil.rmtree(stale)
    sets = [*overrides, f"train.seed={seed}", "train.eval_every=0"]
    command = [
        sys.executable,
        "-m",
        "m2det.cli.main",
        "train",
        "--data",
        str(args.data),
        "--train-split",
        args.train_split,
        "--val-split",
        args.test_split,
        "--model",
        args.model,
        "--device",
        "cpu",
        "--time",
        f"{args.minutes:g}",
        "--project",
        str(folder),
        "--name",
        "train",
        *(item for value in sets for item in ("--set", value)),
    ]
    code, train_s = run_logged(command, folder / "train.log", m2det_env(), timeout=args.minutes * 120 + 900)
    result: dict[str, Any] = {"train_s": round(train_s, 1)}
    run_dir = folder / "train1"
    if code != 0 or not (run_dir / "last.safetensors").is_file():
        return {
            **result,
            "status": "failed",
            "error": f"m2det train exited {code}: {log_tail(folder / 'train.log')}",
        }
    result.update(train_summary(run_dir))
    code, eval_s = m2det_eval(
        args, ["--weights", str(run_dir / "last.safetensors")], folder / "eval", folder / "eval.log"
    )
    result["eval_s"] = round(eval_s, 1)
    if code != 0:
        return {
            **result,
            "status": "failed",
            "error": f"m2det eval exited {code}: {log_tail(folder / 'eval.log')}",
        }
    result.update(eval_metrics(folder / "eval"))
    result["torch_threads"] = args.machine["torch_threads"]
    return {**result, "status": "ok"}


# ----- the peer -----
def write_yolo_data(args: argparse.Namespace) -> tuple[Path, Path]:
    """BCCD in YOLO form under OUT/yolo_data (images copied, one label file each) from m2det's reading
    of the VOC files, and the list of test images with the image ids `m2det eval` scores against.

    A label line is `class cx cy w h` normalised by the image size, class = label - 1; the boxes are
    the data set's (VOC's 1-based pixel indices less 1, as the ground truth `m2det eval` builds), so
    the peer's predictions are in the ground truth's frame. Difficult boxes are left out of training,
    as in the M2Det runs."""
    from m2det.data import build_dataset

    root = args.out / "yolo_data"
    data_yaml, test_list = root / "data.yaml", root / "test_images.json"
    if data_yaml.is_file() and test_list.is_file():
        return data_yaml, test_list
    if root.exists():
        shutil.rmtree(root)
    names: list[str] = []
    entries: list[dict[str, Any]] = []
    for split in (args.train_split, args.test_split):
        dataset = build_dataset(args.data, split, keep_ignored=split == args.test_split)
        names = list(dataset.class_names)
        for record in dataset.records:
            info = record.info
            image = root / "images" / split / Path(info.path).name
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(info.path, image)
            label = root / "labels" / split / (image.stem + ".txt")
            label.parent.mkdir(parents=True, exist_ok=True)
            lines = []
            for box, cls, crowd in zip(
                record.boxes.tolist(), record.labels.tolist(), record.iscrowd.tolist()
            ):
                if crowd:
                    continue
                x1, y1, x2, y2 = (max(0.0, v) for v in box)
                x2, y2 = min(x2, info.width), min(y2, info.height)
                lines.append(
                    f"{int(cls) - 1} {(x1 + x2) / 2 / info.width:.6f} {(y1 + y2) / 2 / info.height:.6f} "
                    f"{(x2 - x1) / info.width:.6f} {(y2 - y1) / info.height:.6f}"
                )
            label.write_text("".join(line + "\n" for line in lines))
            if split == args.test_split:
                entries.append({"file": str(image.resolve()), "image_id": int(info.image_id)})
    yaml_text = (
        f"path: {root.resolve()}\ntrain: images/{args.train_split}\nval: images/{args.test_split}\n"
        + "names:\n"
        + "".join(f"  {k}: {name}\n" for k, name in enumerate(names))
    )
    check_yolo_labels(args, root, entries)
    write_json(test_list, entries)
    data_yaml.write_text(yaml_text)
    return data_yaml, test_list


def check_yolo_labels(args: argparse.Namespace, root: Path, entries: list[dict[str, Any]]) -> None:
    """The test labels read back as the peer's predictions are (pixels of the image, category id =
    class + 1, the image ids of `entries`) and scored by `m2det eval --detections`: anything but AP
    ~1 means the conversion would score the peer in another frame, and stops the benchmark."""
    from m2det.io.image import image_size

    detections = []
    for entry in entries:
        image = Path(entry["file"])
        width, height = image_size(image)  # upright, as the data sets read it
        for line in (root / "labels" / args.test_split / (image.stem + ".txt")).read_text().splitlines():
            cls, cx, cy, w, h = line.split()
            x, y = (float(cx) - float(w) / 2) * width, (float(cy) - float(h) / 2) * height
            detections.append(
                {
                    "image_id": entry["image_id"],
                    "category_id": int(cls) + 1,
                    "bbox": [x, y, float(w) * width, float(h) * height],
                    "score": 1.0,
                }
            )
    write_json(root / "labels_as_detections.json", detections)
    code, _ = m2det_eval(
        args, ["--detections", str(root / "labels_as_detections.json")], root / "check", root / "check.log"
    )
    metrics = eval_metrics(root / "check") if code == 0 else {}
    if code != 0 or metrics["AP"] < 0.99:
        sys.exit(
            f"error: the YOLO test labels, scored as detections, give {metrics or log_tail(root / 'check.log')}, "
            "not AP 1: the conversion is wrong"
        )
    print(f"YOLO labels checked: scored as detections they give AP {metrics['AP']:.4f}", flush=True)


def run_peer(args: argparse.Namespace, peer: str, seed: int, folder: Path) -> dict:
    data_yaml, test_list = write_yolo_data(args)
    yolo_dir = folder / "yolo"
    if yolo_dir.exists():
        shutil.rmtree(yolo_dir)
    command = [
        str(args.peer_python),
        str(REPO / "benchmarks" / "yolo_peer.py"),
        "--data",
        str(data_yaml),
        "--test-list",
        str(test_list),
        "--minutes",
        f"{args.minutes:g}",
        "--seed",
        str(seed),
        "--model",
        PEERS[peer],
        "--imgsz",
        str(args.peer_imgsz),
        "--batch",
        str(args.peer_batch),
        "--workers",
        str(args.peer_workers),
        "--threads",
        str(args.peer_threads),
        "--conf",
        "0.001",
        "--out",
        str(yolo_dir),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str((args.out / "yolo_config").resolve()))
    code, wall_s = run_logged(command, folder / "train.log", env, timeout=args.minutes * 120 + 1800)
    info = read_json(yolo_dir / "info.json")
    if code != 0 or info is None:
        return {
            "status": "failed",
            "train_s": round(wall_s, 1),
            "error": f"peer exited {code}: {log_tail(folder / 'train.log')}",
        }
    result: dict[str, Any] = {
        "train_s": round(info["train_seconds"], 1),
        "epochs": info["epochs"],
        "batch_size": info["batch"],
        "workers": info["workers"],
        "torch_threads": info["torch_threads"],
        "peer": info,
    }
    code, eval_s = m2det_eval(
        args, ["--detections", str(yolo_dir / "predictions.json")], folder / "eval", folder / "eval.log"
    )
    result["eval_s"] = round(info["predict_seconds"] + eval_s, 1)
    if code != 0:
        return {
            **result,
            "status": "failed",
            "error": f"m2det eval exited {code}: {log_tail(folder / 'eval.log')}",
        }
    result.update(eval_metrics(folder / "eval"))
    return {**result, "status": "ok"}


# ----- the table -----
def spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f} ± {max(values) - min(values):.3f}"


def write_tables(args: argparse.Namespace, names: list[str], results: list[dict[str, Any]]) -> None:
    with open(args.out / ".results.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(results, key=lambda r: (names.index(r["recipe"]), r["seed"])):
            writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    os.replace(args.out / ".results.csv.tmp", args.out / "results.csv")

    from m2det.engine.train_config import DEFAULT_PRESET
    from m2det.utils.machine import describe_flags

    machine = args.machine
    flags = describe_flags(machine["flags"])
    lines = [
        f"# Training recipes on BCCD: {args.model}, {args.minutes:g} minutes of CPU training each",
        "",
        f"Train on `{args.train_split}`, score `last` on `{args.test_split}` with `m2det eval` (COCO AP by "
        f"pycocotools). Seeds {','.join(map(str, args.seed_list))}; figures are mean ± spread "
        "(max - min over the seeds). Updated " + now() + ".",
        "",
        f"* CPU: {machine['model']}; {flags}",
        f"* cores: {machine['cores']} ({machine['usable_cores']} usable); torch {machine['torch']}: "
        f"{machine['torch_threads']} threads, {machine['torch_interop_threads']} inter-op"
        + (f"; {machine['env']}" if machine["env"] else "")
        + f"; load average at the start {machine['load_average']}",
        f"* data: {args.data}",
    ]
    if any(name in PEERS for name in names):
        lines.append(
            f"* peer: ultralytics {args.peer_info.get('ultralytics', '?')}, from scratch, imgsz "
            f"{args.peer_imgsz}, batch {args.peer_batch}, detections with score >= 0.001 scored by "
            "`m2det eval --detections`"
        )
    lines += [
        "",
        "| recipe | runs | AP50 | AP | AP75 | AP50 per seed | epochs | train min | eval s | batch | workers | threads |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    means: dict[str, tuple[float, float]] = {}
    for name in names:
        rows = sorted((r for r in results if r["recipe"] == name), key=lambda r: r["seed"])
        ok = [r for r in rows if r["status"] == "ok"]
        if not rows:
            continue
        ap50 = [r["AP50"] for r in ok]
        if ap50:
            means[name] = (sum(ap50) / len(ap50), max(ap50) - min(ap50))

        def column(key: str, rows: list[dict[str, Any]] = ok) -> list[Any]:
            return [r[key] for r in rows if r.get(key) is not None]

        def mean_of(values: list[Any], scale: float = 1.0, digits: int = 1) -> str:
            return f"{sum(values) / len(values) / scale:.{digits}f}" if values else "-"

        def distinct(values: list[Any]) -> str:
            return "/".join(str(v) for v in sorted(set(values), key=str)) or "-"

        per_seed = " / ".join(
            f"{r['AP50']:.3f}" if r["status"] == "ok" else f"s{r['seed']} failed" for r in rows
        )
        label = name + (" (default)" if name == DEFAULT_PRESET else "") + (" (peer)" if name in PEERS else "")
        lines.append(
            f"| {label} | {len(ok)}/{len(rows)} | {spread(ap50)} | {spread(column('AP'))} | "
            f"{spread(column('AP75'))} | {per_seed} | {mean_of(column('epochs'))} | "
            f"{mean_of(column('train_s'), 60)} | {mean_of(column('eval_s'), digits=0)} | "
            f"{distinct(column('batch_size'))} | {distinct(column('workers'))} | {distinct(column('torch_threads'))} |"
        )
    lines += [
        "",
        "epochs: reached (the last one cut by the budget counts); train min: the training process's wall "
        "time, with its start-up and the validation after the budget; eval s: `m2det eval` (the peer: its "
        "prediction too); batch, workers (data loading processes), threads (torch): as the runs had them.",
        "",
        "Recipes (`m2det train --set`; every run also has `train.seed=SEED train.eval_every=0`):",
        "",
    ]
    for name in names:
        if name in PEERS:
            lines.append(
                f"* {name}: ultralytics `{PEERS[name]}`, its own default training settings, `time=` the budget"
            )
        else:
            lines.append(f"* {name}: `{' '.join(args.recipes[name])}`")
    peer = next((name for name in names if name in PEERS), None)
    if DEFAULT_PRESET in means and peer in means:
        default_mean, default_spread = means[DEFAULT_PRESET]
        peer_mean = means[peer][0]
        met = default_mean >= peer_mean and default_spread <= 0.03
        lines += [
            "",
            f"Goal (the default recipe `{DEFAULT_PRESET}` at or above the peer's AP50 with a seed spread of at "
            f"most 0.03): {'met' if met else 'not met'}: AP50 {default_mean:.4f} vs {peer} {peer_mean:.4f}, "
            f"spread {default_spread:.4f}.",
        ]
    ranked = sorted((m for m in means.items() if m[0] not in PEERS), key=lambda m: -m[1][0])
    if ranked:
        lines += ["", "By mean AP50: " + ", ".join(f"{n} {m:.3f}" for n, (m, _) in ranked) + "."]
    text = "\n".join(lines) + "\n"
    tmp = args.out / ".results.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.out / "results.md")


# ----- main -----
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipes",
        dest="recipe_names",
        default="paper,modern,adamw_cosine",
        help=f"comma separated: {', '.join(RECIPES)} or --define'd names",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma separated")
    parser.add_argument("--minutes", type=float, default=15.0, help="training wall budget of each run")
    parser.add_argument("--peer", default="", help=f"also train a peer: {', '.join(PEERS)} (empty: none)")
    parser.add_argument("--peer-python", type=Path, default=Path("/tmp/yolo-venv/bin/python"))
    parser.add_argument(
        "--peer-imgsz",
        type=int,
        default=0,
        help="the peer's input size (0: the M2Det model's, 320 for m2det_tiny; ultralytics' default is 640)",
    )
    parser.add_argument("--peer-batch", type=int, default=16, help="the peer's batch (ultralytics' default)")
    parser.add_argument(
        "--peer-workers", type=int, default=1, help="(ultralytics loads in the main process on CPU)"
    )
    parser.add_argument(
        "--peer-threads", type=int, default=0, help="the peer's torch threads (0: every usable core)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a Pascal VOC folder (BCCD)")
    parser.add_argument("--train-split", default="trainval")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--model", default="m2det_tiny")
    parser.add_argument("--out", type=Path, default=Path("runs/recipes_bccd"))
    parser.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="add an override to a recipe, or start a new one (e.g. fast:train.preset=modern fast:train.lr=4e-3)",
    )
    parser.add_argument("--retry-failed", action="store_true", help="run failed (recipe, seed) runs again")
    parser.add_argument(
        "--report", action="store_true", help="write the tables from the finished runs only; train nothing"
    )
    args = parser.parse_args()

    recipes = {name: list(values) for name, values in RECIPES.items()}
    for item in args.define:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override or not name:
            parser.error(f"--define {item!r}: expected NAME:KEY=VALUE")
        if name in PEERS:
            parser.error(f"--define {item!r}: {name} is the peer's name")
        recipes.setdefault(name, []).append(override)
    args.recipes = recipes
    return args


def main() -> None:
    args = parse_args()
    names = [n.strip() for n in args.recipe_names.split(",") if n.strip()]
    unknown = [n for n in names if n not in args.recipes]
    if unknown:
        sys.exit(f"error: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(args.recipes)}")
    if args.peer:
        if args.peer not in PEERS:
            sys.exit(f"error: --peer {args.peer}: known peers: {', '.join(PEERS)}")
        if not args.peer_python.is_file():
            sys.exit(
                f"error: --peer-python {args.peer_python}: not found; make it with\n"
                f"  python3 -m venv /tmp/yolo-venv && /tmp/yolo-venv/bin/pip install ultralytics"
            )
        names.append(args.peer)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.data = args.data.resolve()
    if not args.peer_imgsz:
        from m2det.config import get_config

        args.peer_imgsz = get_config(args.model).input_size
    args.out.mkdir(parents=True, exist_ok=True)
    from m2det.utils.machine import machine_info

    args.machine = machine_info()
    args.peer_info = {}

    # one budget, data and model per folder: refuse to mix another's results into the table
    settings = {
        "minutes": args.minutes,
        "data": str(args.data),
        "model": args.model,
        "train_split": args.train_split,
        "test_split": args.test_split,
    }
    stored = read_json(args.out / "settings.json")
    if stored is not None and stored.get("run") != settings:
        sys.exit(f"error: {args.out} holds runs of {stored.get('run')}, not {settings}: use another --out")
    if args.report and stored is not None:
        args.machine = stored["machine"]  # the machine the runs were made on, not this one
    else:
        write_json(args.out / "settings.json", {"run": settings, "machine": args.machine})

    def definition(name: str) -> dict[str, Any]:
        if name in PEERS:
            return {"peer": PEERS[name], "imgsz": args.peer_imgsz, "batch": args.peer_batch}
        return {"overrides": args.recipes[name]}

    # seed-major order: a partial run already compares every recipe, and a change in the machine's
    # load falls on all of them alike
    plan = [(name, seed) for seed in args.seed_list for name in names]
    results: list[dict[str, Any]] = []
    todo = []
    for name, seed in plan:
        folder = args.out / "runs" / name / f"seed{seed}"
        done = read_json(folder / "result.json")
        if done is not None:
            if done.get("definition") != definition(name):
                sys.exit(
                    f"error: {folder} was run as {done.get('definition')}, not {definition(name)}: "
                    "use another --out or another recipe name"
                )
            if done["status"] == "ok" or not args.retry_failed:
                results.append(done)
                args.peer_info = done.get("peer", args.peer_info)
                continue
        todo.append((name, seed, folder))
    if args.report:
        missing = ", ".join(f"{name} seed {seed}" for name, seed, _ in todo) or "none"
        print(f"--report: {len(results)} finished runs in the tables; not run: {missing}")
        write_tables(args, names, results)
        return
    per_run = args.minutes + 1.5  # start-up, the final validation, evaluation
    print(
        f"{len(plan)} runs ({len(plan) - len(todo)} done): {len(todo)} to go, about "
        f"{len(todo) * per_run:.0f} min ({len(todo) * per_run / 60:.1f} h); {args.machine['torch_threads']} torch threads; results in {args.out}",
        flush=True,
    )
    for name, seed, folder in todo:
        print(f"[{now()}] {name} seed {seed}: training {args.minutes:g} min ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        if name in PEERS:
            result = run_peer(args, name, seed, folder)
            args.peer_info = result.get("peer", args.peer_info)
        else:
            result = run_recipe(args, name, args.recipes[name], seed, folder)
        # the load at the end: another process on the machine during the run shows here
        load = [round(x, 2) for x in os.getloadavg()]
        result.update(recipe=name, seed=seed, definition=definition(name), finished=now(), load_average=load)
        write_json(folder / "result.json", result)
        results.append(result)
        if result["status"] == "ok":
            print(
                f"[{now()}] {name} seed {seed}: AP50 {result['AP50']:.4f} AP {result['AP']:.4f} "
                f"({result.get('epochs')} epochs, train {result['train_s']:.0f} s, eval {result['eval_s']:.0f} s)",
                flush=True,
            )
        else:
            print(f"[{now()}] {name} seed {seed}: FAILED: {result['error']}", flush=True)
        write_tables(args, names, results)
    for r in results:
        if r["recipe"] in PEERS and "peer" in r:
            args.peer_info = r["peer"]
    write_tables(args, names, results)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()

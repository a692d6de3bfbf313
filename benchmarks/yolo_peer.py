"""The peer of benchmarks/recipes_bccd.py: an ultralytics YOLO model trained from scratch for a wall
budget, then its detections on a list of test images written as COCO results.

Runs in the virtual environment that has ultralytics (not m2det's: it imports nothing of m2det), as
recipes_bccd.py starts it; offline (`YOLO_OFFLINE=1`, a model yaml instead of a .pt download, no AMP
check, no plots). It writes into `--out`:

* `train/`: ultralytics' run folder (`weights/last.pt`, `results.csv`, `args.yaml`);
* `predictions.json`: COCO results (`image_id`, `category_id`, `bbox` [x, y, w, h] in the image's
  pixels, `score`) of `weights/last.pt` on the images of `--test-list`, a JSON list of
  `{"file": PATH, "image_id": N}`; the category id of YOLO class k is k + 1 (the labels of the data
  set the YOLO labels were written from);
* `info.json`: versions, epochs, wall times, threads.

    python benchmarks/yolo_peer.py --data DATA.yaml --test-list TEST.json --minutes 15 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def last_epoch(results_csv: Path) -> int | None:
    """The last epoch ultralytics logged (its `epoch` column counts from 1), None without a log."""
    if not results_csv.is_file():
        return None
    with open(results_csv, newline="") as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    return int(float(rows[-1]["epoch"])) if rows else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="YOLO data yaml")
    parser.add_argument("--test-list", type=Path, required=True, help="JSON list of {file, image_id}")
    parser.add_argument("--minutes", type=float, required=True, help="training wall budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="yolov8n.yaml", help="a model yaml: from scratch")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per usable core)")
    parser.add_argument("--conf", type=float, default=0.001, help="lowest score kept (low, for AP)")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU (ultralytics' validation default)")
    parser.add_argument("--max-det", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")

    import torch
    import ultralytics
    from ultralytics import YOLO

    # On a CPU ultralytics trains in the main process (workers=0) on cores - 1 torch threads, which its
    # device selection sets; the M2Det runs compute on every core, so the peer does too: the threads
    # are set again when training starts, after that selection.
    threads = args.threads or usable_cores()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = YOLO(args.model)
    model.add_callback("on_train_start", lambda trainer: torch.set_num_threads(threads))
    model.train(
        data=str(args.data.resolve()),
        epochs=1000,  # `time` decides the length; ultralytics refits the schedule to it every epoch
        time=args.minutes / 60,
        imgsz=args.imgsz,
        batch=args.batch,
        workers=args.workers,
        device="cpu",
        seed=args.seed,
        deterministic=True,
        pretrained=False,
        amp=False,
        plots=False,
        val=False,  # no validation during the run (the final epoch still validates), as the M2Det runs
        project=str(args.out.resolve()),
        name="train",
        exist_ok=True,
        verbose=False,
    )
    train_seconds = time.perf_counter() - start
    workers = model.trainer.args.workers if model.trainer is not None else args.workers
    run_dir = args.out / "train"
    last = run_dir / "weights" / "last.pt"

    start = time.perf_counter()
    trained = YOLO(str(last))
    entries = json.loads(args.test_list.read_text())
    detections = []
    for entry in entries:
        result = trained.predict(
            entry["file"],
            imgsz=args.imgsz,
            conf=args.conf,
            iou=args.iou,
            max_det=args.max_det,
            device="cpu",
            verbose=False,
        )[0]
        boxes = result.boxes
        for (x1, y1, x2, y2), cls, score in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist()):
            detections.append(
                {
                    "image_id": int(entry["image_id"]),
                    "category_id": int(cls) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    predict_seconds = time.perf_counter() - start
    (args.out / "predictions.json").write_text(json.dumps(detections))
    info = {
        "ultralytics": ultralytics.__version__,
        "torch": torch.__version__,
        "model": args.model,
        "imgsz": args.imgsz,
        "batch": args.batch,
        "workers": workers,
        "torch_threads": threads,
        "seed": args.seed,
        "minutes": args.minutes,
        "epochs": last_epoch(run_dir / "results.csv"),
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "detections": len(detections),
        "images": len(entries),
        "weights": str(last),
    }
    (args.out / "info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


if __name__ == "__main__":
    main()

"""Evaluation: COCO metrics through pycocotools, Pascal VOC AP, and inference over a data set.

`evaluate(model, dataset)` runs the detector and scores its detections; `score_detections(coco_gt,
detections)` scores an existing list in COCO results format (what a test-dev submission holds).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from m2det.boxes.postprocess import PostprocessSettings
from m2det.classes import class_mismatch
from m2det.config import ModelConfig
from m2det.engine.voc_eval import mean_ap, voc_evaluate
from m2det.errors import FileFormatError, M2DetError
from m2det.inference.network import Network
from m2det.inference.pipeline import DetectionPipeline
from m2det.inference.results import coco_results
from m2det.io.atomic import atomic_path
from m2det.io.jsonfile import finite_json, read_json, write_json

# The 12 numbers of COCOeval.summarize() for boxes, in its order.
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
VOC_NAMES: tuple[str, ...] = ("VOC_AP07", "VOC_AP")  # mean over classes of the 2007 11-point / area AP
PER_CLASS_COLUMNS: tuple[str, ...] = ("class", "category_id", "num_gt", "AP", "AP50", *VOC_NAMES)
NO_DETECTIONS = "no detections: every AP and AR is 0 where the ground truth has boxes (-1 where it has none)"
NO_GROUND_TRUTH = (
    "the ground truth has no boxes to score in these images (none, or only crowd boxes): every AP and "
    "AR is undefined (-1 from pycocotools, NaN for VOC), shown as '-'"
)


@dataclass
class ClassMetrics:
    """One category: COCO AP (IoU .50:.95) and AP50, VOC AP (2007 11-point and area) at IoU .5.

    NaN where the category has no ground truth in the evaluated images.
    """

    name: str
    category_id: int
    num_gt: int
    ap: float
    ap50: float
    voc_ap07: float
    voc_ap: float

    def as_row(self) -> dict[str, Any]:
        """The row of per_class.csv / metrics.json (columns `PER_CLASS_COLUMNS`)."""
        values = (self.name, self.category_id, self.num_gt, self.ap, self.ap50, self.voc_ap07, self.voc_ap)
        return dict(zip(PER_CLASS_COLUMNS, values))


@dataclass
class EvalResult:
    """Metrics (the 12 COCO stats, then VOC_AP07 and VOC_AP), per-class rows, the detections in COCO
    results format, and precision-recall curves at IoU .5 (name -> (recall, precision))."""

    metrics: dict[str, float]
    per_class: list[ClassMetrics]
    detections_coco: list[dict[str, Any]]
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    num_images: int = 0
    seconds: float = 0.0
    note: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as null): metrics, per_class, counts, note."""
        return finite_json(
            {
                "metrics": self.metrics,
                "per_class": [row.as_row() for row in self.per_class],
                "num_images": self.num_images,
                "num_detections": len(self.detections_coco),
                "seconds": self.seconds,
                "note": self.note,
            }
        )

    def save(self, out_dir: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> dict[str, Path]:
        """Write metrics.json, per_class.csv, pr_curve.png and detections.json into `out_dir`."""
        from m2det.engine.plots import plot_pr_curves

        out_dir = Path(out_dir)
        paths = {
            name: out_dir / name
            for name in ("metrics.json", "per_class.csv", "pr_curve.png", "detections.json")
        }
        write_json(paths["metrics.json"], {**self.to_json(), **(extra or {})}, indent=2)
        rows = [row.as_row() for row in self.per_class]
        with atomic_path(paths["per_class.csv"]) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=PER_CLASS_COLUMNS)
            writer.writeheader()
            writer.writerows({k: _cell(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
        plot_pr_curves(
            self.curves,
            paths["pr_curve.png"],
            title="Precision-recall at IoU 0.5 (COCO interpolation; legend: AP50)",
            ap={r.name: r.ap50 for r in self.per_class},
        )
        write_json(paths["detections.json"], self.detections_coco)
        return paths


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


# ----- checking a detections list and a ground-truth file -----
def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is a Python int


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_xywh(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(_is_number(v) for v in value)
        and value[2] >= 0
        and value[3] >= 0
    )


# Field kinds: the test a value must pass and what the error says was expected.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "id": (_is_id, "an integer"),
    "number": (_is_number, "a finite number"),
    "bbox": (_is_xywh, "[x, y, w, h] with w, h >= 0"),
    "flag": (lambda v: isinstance(v, (int, float)) and v in (0, 1), "0 or 1"),
}
DETECTION_FIELDS: dict[str, str] = {"image_id": "id", "category_id": "id", "bbox": "bbox", "score": "number"}
# What COCOeval reads of a ground-truth file (bbox): every entry of each list needs these fields.
GT_FIELDS: dict[str, dict[str, str]] = {
    "images": {"id": "id"},
    "categories": {"id": "id"},
    "annotations": {
        "id": "id",
        "image_id": "id",
        "category_id": "id",
        "bbox": "bbox",
        "area": "number",
        "iscrowd": "flag",
    },
}


def _check_fields(entry: Any, fields: dict[str, str], where: str) -> None:
    """Raise a ValueError naming `where` and the field unless `entry` is an object whose `fields`
    (name -> kind of `_KINDS`) are all present and valid."""
    if not isinstance(entry, dict):
        raise FileFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [name for name in fields if name not in entry]
    if missing:
        raise FileFormatError(f"{where}: missing field(s) {missing}")
    for name, kind in fields.items():
        test, expected = _KINDS[kind]
        if not test(entry[name]):
            raise FileFormatError(f"{where}: field {name!r} must be {expected}, got {entry[name]!r}")


def check_detections(
    detections: Any,
    coco_gt: COCO,
    source: str = "detections",
    category_ids: Optional[Sequence[int]] = None,
) -> list[dict[str, Any]]:
    """Validate a COCO results list against the ground truth; return clean copies.

    Each entry needs an integer `image_id` of `coco_gt`, an integer `category_id` of `category_ids`
    (default: those of `coco_gt`), `bbox` [x, y, w, h] with w, h >= 0 and a numeric `score`. Errors
    name `source`, the entry and the field, where pycocotools would fail with a traceback, silently
    leave the detection out (an unknown category) or take `true` for the id 1.
    """
    if not isinstance(detections, list):
        raise FileFormatError(
            f"{source}: expected a list of detections in COCO results format, got {type(detections).__name__}"
        )
    image_ids = set(coco_gt.getImgIds())
    known_categories = set(coco_gt.getCatIds() if category_ids is None else category_ids)
    clean = []
    for i, det in enumerate(detections):
        where = f"{source}: detection {i}"
        _check_fields(det, DETECTION_FIELDS, where)
        if det["image_id"] not in image_ids:
            raise FileFormatError(
                f"{where}: field 'image_id' {det['image_id']!r} is not an image of the ground truth "
                f"({len(image_ids)} images, ids e.g. {sorted(image_ids)[:5]})"
            )
        if det["category_id"] not in known_categories:
            raise FileFormatError(
                f"{where}: field 'category_id' {det['category_id']!r} is not a category of the ground truth "
                f"(ids {sorted(known_categories)[:20]})"
            )
        clean.append(
            {
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": [float(v) for v in det["bbox"]],
                "score": float(det["score"]),
            }
        )
    return clean


def read_detections(
    path: Union[str, Path], coco_gt: COCO, category_ids: Optional[Sequence[int]] = None
) -> list[dict[str, Any]]:
    """A COCO results JSON file, checked as `check_detections` does (errors name the file)."""
    data = read_json(path, "detections file")
    return check_detections(data, coco_gt, str(path), category_ids)


def read_coco_gt(path: Union[str, Path]) -> COCO:
    """A COCO instances json as pycocotools' `COCO(path)` loads it, for scoring exactly as written.

    No image files are needed. The fields COCOeval reads (`GT_FIELDS`) are checked first, so that a
    malformed file is an error naming the file, the entry and the field rather than a traceback
    from inside pycocotools; the content itself is passed on unchanged.
    """
    from m2det.data.coco import load_coco_json

    data = load_coco_json(Path(path))
    for key, fields in GT_FIELDS.items():
        for k, entry in enumerate(data[key]):
            _check_fields(entry, fields, f"{path}: {key}[{k}]")
    for key in ("images", "categories"):
        if not data[key]:
            raise FileFormatError(f"{path}: {key!r} is empty, so there is nothing to score")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


# ----- COCO metrics -----
def run_cocoeval(
    coco_gt: COCO, detections: Sequence[dict[str, Any]], image_ids: Optional[Sequence[int]] = None
) -> COCOeval:
    """COCOeval (bbox) evaluated, accumulated and summarised (`.stats`), without its printing.

    An empty list is scored as pycocotools would score no detections (its `loadRes` rejects []).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            # loadRes adds fields to the dicts it is given; give it copies
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        else:
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset.get("categories", [])),
                "annotations": [],
            }
            coco_dt.createIndex()
        cocoeval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            cocoeval.params.imgIds = sorted({int(i) for i in image_ids})  # each image once
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return cocoeval


def _per_class_ap(cocoeval: COCOeval) -> dict[int, tuple[float, float]]:
    """Category id -> (AP over IoU .50:.95, AP50), all areas, 100 detections; NaN without ground truth."""
    precision = cocoeval.eval["precision"]  # [IoU T, recall R, class K, area A, max dets M]
    at50 = int(np.argmin(np.abs(cocoeval.params.iouThrs - 0.5)))
    out = {}
    for k, category_id in enumerate(cocoeval.params.catIds):
        values = []
        for p in (precision[:, :, k, 0, -1], precision[at50, :, k, 0, -1]):
            valid = p[p > -1]
            values.append(float(valid.mean()) if valid.size else math.nan)
        out[int(category_id)] = (values[0], values[1])
    return out


def _note(cocoeval: COCOeval, num_detections: int) -> Optional[str]:
    """Why a report is all undefined (no ground-truth box to score) or all 0 (no detections), else None.

    COCOeval ignores crowd boxes, so ground truth of crowd boxes alone counts as none.
    """
    params, coco_gt = cocoeval.params, cocoeval.cocoGt
    # getAnnIds with no image ids means every image; there are none here
    ann_ids = coco_gt.getAnnIds(imgIds=params.imgIds, catIds=params.catIds) if params.imgIds else []
    if all(ann.get("iscrowd", 0) for ann in coco_gt.loadAnns(ann_ids)):
        return NO_GROUND_TRUTH
    return None if num_detections else NO_DETECTIONS


def coco_metrics(coco_gt: COCO, detections: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The 12 COCO box stats by name (AP, AP50, ..., ARl, exactly as pycocotools gives them), plus
    `per_class` {category_id: {"name", "AP", "AP50"}} and `note` (set when there are no detections or
    no ground-truth boxes)."""
    cocoeval = run_cocoeval(coco_gt, detections)
    metrics: dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, cocoeval.stats)}
    names = {c["id"]: c["name"] for c in coco_gt.dataset.get("categories", [])}
    metrics["per_class"] = {
        cid: {"name": names.get(cid, str(cid)), "AP": ap, "AP50": ap50}
        for cid, (ap, ap50) in _per_class_ap(cocoeval).items()
    }
    metrics["note"] = _note(cocoeval, len(detections))
    return metrics


# ----- both metrics from one detections list -----
def _ground_truth_arrays(coco_gt: COCO, image_ids: set[int]) -> dict[str, np.ndarray]:
    """Flat ground-truth arrays of `image_ids` for VOC AP; COCO crowd boxes (VOC difficult) are
    'difficult'."""
    anns = [a for a in coco_gt.dataset.get("annotations", []) if a["image_id"] in image_ids]
    return {
        "images": np.array([a["image_id"] for a in anns], dtype=np.int64),
        "boxes": _xywh_to_xyxy([a["bbox"] for a in anns]),
        "labels": np.array([a["category_id"] for a in anns], dtype=np.int64),
        "difficult": np.array([bool(a.get("iscrowd", 0) or a.get("ignore", 0)) for a in anns], dtype=bool),
    }


def _xywh_to_xyxy(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    xywh = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def score_detections(
    coco_gt: COCO,
    detections: Sequence[dict[str, Any]],
    *,
    category_ids: Optional[Sequence[int]] = None,
    image_ids: Optional[Sequence[int]] = None,
    voc_pixel_inclusive: bool = False,
) -> EvalResult:
    """COCO metrics, VOC AP at IoU .5 and PR curves for a checked COCO results list.

    `category_ids[label - 1]`, when given, is the data set's id of the category that `coco_gt` calls
    `label` (a data set's `coco_gt()` numbers categories by label): detections carry the data set's
    ids and are scored by label. `image_ids` restricts the evaluation to those images (default: all
    of `coco_gt`); `voc_pixel_inclusive` selects the VOC devkit's +1 pixel convention for VOC AP.
    """
    labels = sorted(int(c) for c in coco_gt.getCatIds())
    if category_ids is None:
        category_ids = labels
        scored = list(detections)
    else:
        if len(category_ids) != len(labels):
            raise ValueError(
                f"got {len(category_ids)} category ids for {len(labels)} ground-truth categories"
            )
        to_label = {int(c): label for c, label in zip(category_ids, labels)}
        scored = [{**d, "category_id": to_label[d["category_id"]]} for d in detections]
    cocoeval = run_cocoeval(coco_gt, scored, image_ids)
    metrics = {name: float(v) for name, v in zip(STAT_NAMES, cocoeval.stats)}
    selected = {int(i) for i in cocoeval.params.imgIds}
    dets = [d for d in scored if d["image_id"] in selected]
    gt = _ground_truth_arrays(coco_gt, selected)
    voc = voc_evaluate(
        [d["image_id"] for d in dets],
        _xywh_to_xyxy([d["bbox"] for d in dets]),
        [d["score"] for d in dets],
        [d["category_id"] for d in dets],
        gt["images"],
        gt["boxes"],
        gt["labels"],
        gt["difficult"],
        labels=labels,
        pixel_inclusive=voc_pixel_inclusive,
    )
    metrics[VOC_NAMES[0]] = mean_ap(voc, use_07_metric=True)
    metrics[VOC_NAMES[1]] = mean_ap(voc)
    coco_ap = _per_class_ap(cocoeval)
    names = {c["id"]: c["name"] for c in coco_gt.dataset.get("categories", [])}
    per_class = [
        ClassMetrics(
            name=names.get(label, str(label)),
            category_id=int(category_id),
            num_gt=voc[label].num_gt,
            ap=coco_ap[label][0],
            ap50=coco_ap[label][1],
            voc_ap07=voc[label].ap07,
            voc_ap=voc[label].ap,
        )
        for label, category_id in zip(labels, category_ids)
    ]
    precision50 = cocoeval.eval["precision"][int(np.argmin(np.abs(cocoeval.params.iouThrs - 0.5)))]
    curves = {
        row.name: (cocoeval.params.recThrs.copy(), precision50[:, k, 0, -1].copy())
        for k, row in enumerate(per_class)
        if (precision50[:, k, 0, -1] > -1).any()
    }
    return EvalResult(
        metrics=metrics,
        per_class=per_class,
        detections_coco=list(detections),
        curves=curves,
        num_images=len(cocoeval.params.imgIds),
        note=_note(cocoeval, len(dets)),
    )


# ----- inference over a data set -----
def _as_lists(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def base_dataset(dataset: Any) -> Any:
    """The data set that owns `coco_gt()`, looking through wrappers such as `torch.utils.data.Subset`."""
    while not hasattr(dataset, "coco_gt") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not hasattr(dataset, "coco_gt"):
        raise ValueError(
            f"{type(dataset).__name__}: evaluation needs a data set with coco_gt() (see m2det.data.build_dataset)"
        )
    return dataset


def dataset_category_ids(dataset: Any) -> list[int]:
    """The data set's category id of each label (index label - 1): a COCO json's own ids, else the labels."""
    ids = getattr(dataset, "category_ids", None)
    return [int(i) for i in ids] if ids is not None else list(range(1, len(dataset.class_names) + 1))


def ground_truth(dataset: Any) -> tuple[COCO, Optional[list[int]]]:
    """The ground truth to score `dataset`'s detections against, and the `category_ids` argument of
    `score_detections` for it.

    A COCO json is scored as written, as pycocotools' `COCO(path)` reads it, so that the numbers
    are pycocotools' to the last digit (the data set's own copy holds float32 boxes, clipped to the
    image, with recomputed ids). A json pycocotools could not score (e.g. no `area`) falls back to
    the data set's reading, with a warning saying so. Other formats use the data set's `coco_gt()`.
    """
    base = base_dataset(dataset)
    path = getattr(base, "annotation_file", None)
    if path is not None:
        try:
            return read_coco_gt(path), None  # detections carry the json's own category ids
        except ValueError as exc:
            warnings.warn(
                f"{exc}; scoring against the data set's reading of the file instead (its boxes clipped "
                "to the images, areas filled in), which is not what pycocotools would score",
                stacklevel=2,
            )
    return base.coco_gt(), dataset_category_ids(base)


def is_voc(dataset: Any) -> bool:
    """Whether the data set is Pascal VOC style (integer pixel-index boxes: the devkit's +1 convention):
    a VOC folder, or images with VOC XML files beside them."""
    from m2det.data.folder import VOCImageFolder
    from m2det.data.voc import VOCDetection

    return isinstance(dataset, (VOCDetection, VOCImageFolder))


def _check_classes(config: ModelConfig, dataset: Any) -> None:
    """A class count that differs is an error; names that differ only a warning (labels match by position)."""
    names = list(dataset.class_names)
    problem = class_mismatch(config.num_classes - 1, names, "the model", "the data set")
    if problem:
        raise M2DetError(problem)
    own = config.class_names
    problem = class_mismatch(own, names, "the model", "the data set") if own is not None else None
    if problem:
        warnings.warn(f"{problem}; labels are matched by position", stacklevel=3)


def _pipeline(model_or_detector: Any, settings: Union[str, PostprocessSettings, None]) -> DetectionPipeline:
    """What runs: a `DetectionPipeline` (also a `Detector`'s) as built, or a `Network` (a DDP
    wrapper's `.module` too) in a pipeline of its own. `settings` (a `PostprocessSettings`, "paper" or
    "official") replaces the pipeline's; a bare network gets the paper's. Never state left on the model."""
    from m2det.inference.detector import Detector

    given = model_or_detector
    if isinstance(given, Detector):
        given = given.pipeline
    if isinstance(given, DetectionPipeline):
        if settings is None:
            return given
        return DetectionPipeline(
            given.network, settings, sizes=given.sizes, flip=given.flip, label_names=False
        )
    if isinstance(given, torch.nn.parallel.DistributedDataParallel):
        given = given.module
    if not isinstance(given, Network):
        raise TypeError(
            f"evaluate needs an M2Det model, another runtime of its network (m2det.inference.Network) or a "
            f"detector, got {type(model_or_detector).__name__}"
        )
    return DetectionPipeline(given, "paper" if settings is None else settings, label_names=False)


# One image's result: (data set index, image id, its detections in COCO results format).
ImageResult = tuple[int, int, list[dict[str, Any]]]


@torch.inference_mode()
def _predict(
    model_or_detector: Any,
    dataset: Any,
    batch_size: int,
    device: Union[str, torch.device, None],
    settings: Union[str, PostprocessSettings, None],
    progress: bool,
    workers: int,
    shard: tuple[int, int] = (0, 1),
) -> list[ImageResult]:
    """Detections of each image of this process's shard (`shard` = (rank, number of processes);
    `m2det.utils.distributed.ShardSampler`), in data set order.

    Boxes are in the original image pixels (the data set's `target["orig_size"]`; an image a
    transform resized has its boxes scaled back) and labels are the data set's category ids.
    """
    from m2det.progress import progress_bar
    from m2det.utils.distributed import ShardSampler

    base = base_dataset(dataset)
    pipeline = _pipeline(model_or_detector, settings)
    network = pipeline.network
    if device is not None and isinstance(network, torch.nn.Module):
        network.to(device)  # an ONNX Runtime network stays where it runs (the CPU)
    _check_classes(network.config, base)
    categories = dataset_category_ids(base)
    sampler = ShardSampler(len(dataset), *shard)
    on_cuda = torch.device(network.device).type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_as_lists,
        pin_memory=on_cuda,
    )
    # every module back in its mode afterwards (e.g. frozen BatchNorm in training)
    modules = list(network.modules()) if isinstance(network, torch.nn.Module) else []
    modes = {module: module.training for module in modules}
    for module in modules:
        module.eval()
    results: list[ImageResult] = []
    indices = iter(sampler)
    try:
        with progress_bar(total=len(sampler), desc="eval", unit="img", enabled=progress) as bar:
            for images, targets in loader:
                tensors = [
                    torch.as_tensor(im).as_subclass(Tensor).to(network.device, non_blocking=on_cuda)
                    for im in images
                ]
                outputs = pipeline(tensors)
                for output, target, tensor in zip(outputs, targets, tensors):
                    size = (int(tensor.shape[-2]), int(tensor.shape[-1]))
                    image_id = int(target["image_id"])
                    results.append((next(indices), image_id, _to_coco(output, target, size, categories)))
                bar.update(len(images))
    finally:
        for module, training in modes.items():
            module.train(training)
    return results


def merge_image_results(parts: Sequence[Sequence[ImageResult]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The detections (COCO results format) and image ids of every shard's results, in data set
    order, each image once: exactly what one process over the whole data set finds.

    An image the data set cannot read is reported and dropped by it (`DetectionDataset` hands the
    next image instead), so an image id can come twice; only its first result counts, and the
    unreadable image is left out of the scores (the warning names it).
    """
    detections: list[dict[str, Any]] = []
    image_ids: list[int] = []
    seen: set[int] = set()
    for _, image_id, found in sorted((r for part in parts for r in part), key=lambda r: r[0]):
        if image_id in seen:
            continue
        seen.add(image_id)
        image_ids.append(image_id)
        detections.extend(found)
    return detections, image_ids


def _to_coco(
    output: dict[str, Tensor], target: dict[str, Any], size: tuple[int, int], categories: list[int]
) -> list[dict[str, Any]]:
    """One image's detections (xyxy in the pixels of the image given) as COCO results in original pixels."""
    orig_h, orig_w = (int(v) for v in torch.as_tensor(target["orig_size"]).tolist())
    scale = torch.tensor([orig_w / size[1], orig_h / size[0]] * 2)
    boxes = output["boxes"].detach().float().cpu() * scale
    return coco_results(boxes, output["scores"], output["labels"], int(target["image_id"]), categories)


def evaluate(
    model_or_detector: Any,
    dataset: Any,
    *,
    batch_size: int = 8,
    device: Union[str, torch.device, None] = None,
    settings: Union[str, PostprocessSettings, None] = None,
    progress: bool = True,
    workers: int = 0,
    max_images: Optional[int] = None,
    voc_pixel_inclusive: Optional[bool] = None,
    distributed: Optional[bool] = None,
) -> EvalResult:
    """Run inference over `dataset` (or its first `max_images`) and score it (COCO + VOC metrics).

    `dataset`: a data set with `coco_gt()` (e.g. `m2det.data.build_dataset(..., keep_ignored=True)`),
    untransformed or with a resizing transform, or a `Subset` of one. `model_or_detector`: an
    `M2Det` or any other `m2det.inference.Network` (the fast path, ONNX Runtime), or a `Detector` /
    `DetectionPipeline` with its sizes, flip and settings. `settings`: post-processing (a
    `PostprocessSettings` or "paper" / "official"); default: a detector's own, else "paper" (never
    what `M2Det.set_postprocess` left on the model). `voc_pixel_inclusive` defaults to True for VOC
    data sets. `device` moves a PyTorch model there. Every module is left in the train/eval mode it
    came in.

    In a `torch.distributed` group of more than one process (`torchrun`), by default
    (`distributed=None` or True) every process must call this: each runs the model on its shard of
    the images (`m2det.utils.distributed.ShardSampler`: every image exactly once, no padding), the
    detections are gathered and scored once on rank 0, in data set order, so the metrics are
    those of one process on the same images. Every process returns the metrics; the detections
    and curves are only on rank 0 (empty elsewhere). `distributed=False`: this process evaluates
    every image alone.
    """
    from m2det.utils.distributed import all_gather_objects, broadcast_object, rank_and_world

    base = base_dataset(dataset)
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    rank, world_size = rank_and_world() if distributed is not False else (0, 1)
    start = time.perf_counter()
    mine = _predict(
        model_or_detector,
        dataset,
        batch_size,
        device,
        settings,
        progress and rank == 0,
        workers,
        shard=(rank, world_size),
    )
    parts = all_gather_objects(mine) if world_size > 1 else [mine]
    seconds = time.perf_counter() - start
    result: Optional[EvalResult] = None
    failure: Optional[Exception] = None
    if rank == 0:
        try:
            result = _score(base, parts, voc_pixel_inclusive)
            result.seconds = seconds
        except Exception as exc:
            if world_size == 1:
                raise
            failure = exc  # raised on every process below, rather than leaving the others waiting
    if world_size == 1:
        assert result is not None
        return result
    # the others get the numbers, not the (possibly large) detections again
    failure, shared = broadcast_object(
        (failure, None if result is None else dataclasses.replace(result, detections_coco=[], curves={}))
    )
    if failure is not None:
        raise failure
    return result if result is not None else shared


def _score(
    base: Any, parts: Sequence[Sequence[ImageResult]], voc_pixel_inclusive: Optional[bool]
) -> EvalResult:
    """The gathered results of every process scored against `base`'s ground truth."""
    detections, image_ids = merge_image_results(parts)
    coco_gt, category_ids = ground_truth(base)
    unknown = sorted(set(image_ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(
            f"{type(base).__name__}: target image ids {unknown[:5]} are not images of its ground truth"
        )
    return score_detections(
        coco_gt,
        detections,
        category_ids=category_ids,
        image_ids=image_ids,
        voc_pixel_inclusive=is_voc(base) if voc_pixel_inclusive is None else voc_pixel_inclusive,
    )


# ----- the two flows of `m2det eval`: a results file scored, or a model run and scored -----
def score_results_file(
    detections: Union[str, Path],
    data: str,
    split: str = "val",
    *,
    max_images: Optional[int] = None,
    voc_plus_one: Optional[bool] = None,
) -> tuple[EvalResult, dict[str, Any]]:
    """Score a COCO results file against the ground truth `data` (all images, or the first
    `max_images`); returns the result and what was scored, for its metrics.json.

    A COCO json is read as written and scored as pycocotools scores it, so the numbers are
    pycocotools' to the last digit and no image files are needed. VOC and YOLO ground truth goes
    through the data set, which turns it into COCO form. VOC AP uses the devkit's +1 pixel areas
    when `voc_plus_one` says so, by default for VOC data only.
    """
    from m2det.data import build_dataset

    category_ids: Optional[list[int]] = None  # a COCO json's own ids
    if Path(data).suffix.lower() == ".json":  # a COCO json, as build_dataset decides
        coco_gt = read_coco_gt(data)
        image_ids = [image["id"] for image in coco_gt.dataset["images"]]
        pixel_inclusive = bool(voc_plus_one)
    else:
        dataset = build_dataset(data, split, keep_ignored=True)
        coco_gt = dataset.coco_gt()
        category_ids = dataset_category_ids(dataset)
        image_ids = [dataset.image_info(i).image_id for i in range(len(dataset))]
        pixel_inclusive = is_voc(dataset) if voc_plus_one is None else voc_plus_one
    result = score_detections(
        coco_gt,
        read_detections(detections, coco_gt, category_ids),
        category_ids=category_ids,
        image_ids=image_ids[:max_images],
        voc_pixel_inclusive=pixel_inclusive,
    )
    described = {"data": str(data), "split": split, "voc_plus_one": pixel_inclusive}
    return result, {**described, "detections": str(detections)}


def evaluate_weights(
    weights: Union[str, Path],
    data: str,
    split: str = "val",
    *,
    preset: Optional[str] = None,
    device: str = "auto",
    settings: str = "paper",
    score_threshold: Optional[float] = None,
    sizes: Optional[list[int]] = None,
    flip: bool = False,
    precision: Optional[str] = None,
    batch_size: int = 8,
    workers: int = 0,
    max_images: Optional[int] = None,
    voc_plus_one: Optional[bool] = None,
    backend: Optional[str] = None,
) -> tuple[EvalResult, dict[str, Any]]:
    """Run the model file `weights` (an official .pth with its `preset`) on `data` with these
    post-processing settings and test-time options, on `backend` (None: the file's own, as
    `Detector` picks it) in `precision` (as `Detector`'s), and score it; returns the result and
    what was run, for its metrics.json. VOC AP's +1 pixel areas: as in `score_results_file`."""
    from dataclasses import asdict

    from m2det.data import build_dataset
    from m2det.device import resolve_device
    from m2det.inference.detector import Detector

    dataset = build_dataset(data, split, keep_ignored=True)
    pixel_inclusive = is_voc(dataset) if voc_plus_one is None else voc_plus_one
    detector = Detector(
        weights,
        preset=preset,
        device=resolve_device(device),
        score_threshold=score_threshold,
        settings=settings,
        batch_size=batch_size,
        sizes=sizes,
        flip=flip,
        precision=precision,
        backend=backend,
    )
    result = evaluate(
        detector,
        dataset,
        batch_size=batch_size,
        workers=workers,
        max_images=max_images,
        voc_pixel_inclusive=pixel_inclusive,
    )
    return result, {
        "data": str(data),
        "split": split,
        "voc_plus_one": pixel_inclusive,
        "weights": str(weights),
        "model": detector.model.config.name,
        "settings": asdict(detector.settings),
        "sizes": detector.sizes,
        "flip": detector.flip,
        "precision": precision,
        "device": str(detector.device),
        "runtime": type(detector.network).__name__,
    }

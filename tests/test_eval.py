"""Evaluation: COCO metrics equal pycocotools called directly, VOC AP, and `m2det eval` end to end."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from m2det.cli.main import app
from m2det.engine.evaluate import (
    NO_DETECTIONS,
    NO_GROUND_TRUTH,
    STAT_NAMES,
    check_detections,
    coco_metrics,
    evaluate,
    score_detections,
)

# Non-contiguous category ids, as in real COCO files; every area range has boxes.
CATEGORIES = [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 9, "name": "bird"}]
SIZES = {1: (200, 150), 2: (160, 120), 3: (200, 200), 4: (120, 90)}  # id -> (width, height)
BOXES = [  # image id, category id, [x, y, w, h], iscrowd
    (1, 2, [10, 10, 100, 80], 0),  # large
    (1, 5, [120, 20, 40, 50], 0),  # medium
    (1, 9, [150, 100, 20, 25], 0),  # small
    (2, 2, [5, 5, 60, 60], 0),
    (2, 9, [80, 60, 12, 14], 0),
    (2, 9, [100, 60, 30, 30], 1),  # crowd: neither TP nor FP
    (3, 5, [20, 30, 150, 120], 0),
    (3, 5, [0, 0, 28, 30], 0),
    (3, 2, [60, 160, 30, 30], 0),
]  # image 4 has no boxes


def _coco_json(tmp_path: Path) -> Path:
    """A small COCO data set on disk: the json and (blank) images beside it."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images = []
    for image_id, (w, h) in SIZES.items():
        name = f"img{image_id}.png"
        Image.new("RGB", (w, h)).save(images_dir / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
        for k, (i, c, b, crowd) in enumerate(BOXES)
    ]
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def _gt_as_detections() -> list[dict]:
    return [
        {"image_id": i, "category_id": c, "bbox": list(b), "score": 0.9 - 0.05 * k}
        for k, (i, c, b, crowd) in enumerate(BOXES)
        if not crowd
    ]


def _shifted_detections() -> list[dict]:
    """Boxes moved by various amounts (some below IoU .5, some duplicated), plus false positives."""
    rng = np.random.default_rng(0)
    dets = []
    for k, (i, c, b, _) in enumerate(BOXES):
        dx, dy = (k % 4) * 0.12 * b[2], ((k + 1) % 3) * 0.1 * b[3]
        dets.append(
            {"image_id": i, "category_id": c, "bbox": [b[0] + dx, b[1] + dy, b[2], b[3]], "score": 0.9}
        )
        if k % 3 == 0:
            dets.append(
                {"image_id": i, "category_id": c, "bbox": [b[0] + 1, b[1], b[2] * 0.8, b[3]], "score": 0.4}
            )
    for _ in range(6):
        i = int(rng.integers(1, 5))
        x, y = rng.uniform(0, 60, 2)
        dets.append(
            {
                "image_id": i,
                "category_id": int(rng.choice([2, 5, 9])),
                "bbox": [x, y, 30.0, 20.0],
                "score": float(rng.random()),
            }
        )
    return dets


def _pycocotools_stats(gt_file: Path, detections, cat_ids=None, img_ids=None) -> np.ndarray:
    """The reference: pycocotools called directly, as its README shows (`detections`: a list or a
    results file)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(str(detections) if isinstance(detections, Path) else copy.deepcopy(detections))
        cocoeval = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            cocoeval.params.catIds = cat_ids
        if img_ids is not None:
            cocoeval.params.imgIds = img_ids
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    return cocoeval.stats


def _load_gt(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ----- COCO metrics -----
def test_ground_truth_against_itself_gives_ap_one(tmp_path):
    gt_file = _coco_json(tmp_path)
    detections = _gt_as_detections()
    metrics = coco_metrics(_load_gt(gt_file), detections)
    for name in STAT_NAMES:
        if name != "AR1":  # one detection per image and class cannot recall image 3's two dogs
            assert metrics[name] == pytest.approx(1.0), name
    assert metrics["AR1"] == _pycocotools_stats(gt_file, detections)[STAT_NAMES.index("AR1")] < 1.0
    assert all(row["AP"] == pytest.approx(1.0) for row in metrics["per_class"].values())
    result = score_detections(_load_gt(gt_file), _gt_as_detections())
    assert result.metrics["VOC_AP07"] == pytest.approx(1.0) and result.metrics["VOC_AP"] == pytest.approx(1.0)


def test_shifted_boxes_give_exactly_the_pycocotools_numbers(tmp_path):
    gt_file = _coco_json(tmp_path)
    detections = _shifted_detections()
    expected = _pycocotools_stats(gt_file, detections)
    metrics = coco_metrics(_load_gt(gt_file), detections)
    assert [metrics[name] for name in STAT_NAMES] == [float(v) for v in expected]
    assert 0.05 < metrics["AP"] < 0.9  # a case that is neither trivial nor empty
    # per class: pycocotools restricted to that one category gives the same AP and AP50
    for category in CATEGORIES:
        alone = _pycocotools_stats(gt_file, detections, cat_ids=[category["id"]])
        row = metrics["per_class"][category["id"]]
        assert row["name"] == category["name"]
        assert row["AP"] == pytest.approx(alone[0], abs=1e-12)
        assert row["AP50"] == pytest.approx(alone[1], abs=1e-12)


def test_hand_worked_shift():
    # one 10x10 box; the detection moved 2 px right has IoU 8*10 / (12*10) = 2/3: a hit at the
    # thresholds .50, .55, .60, .65 (4 of 10) with precision 1 at every recall -> AP 0.4
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 7, "width": 50, "height": 50}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0}
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    metrics = coco_metrics(gt, [{"image_id": 7, "category_id": 1, "bbox": [7, 5, 10, 10], "score": 0.5}])
    assert metrics["AP"] == pytest.approx(0.4)
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP75"] == 0.0
    assert metrics["AR100"] == pytest.approx(0.4)
    assert metrics["APs"] == pytest.approx(0.4) and metrics["APm"] == -1.0  # 100 px^2 is "small"


def test_empty_detections_score_zero_with_a_note(tmp_path):
    gt = _load_gt(_coco_json(tmp_path))
    metrics = coco_metrics(gt, [])
    assert all(metrics[name] == 0.0 for name in STAT_NAMES)
    assert metrics["note"] == NO_DETECTIONS
    result = score_detections(gt, [])
    assert result.metrics["VOC_AP"] == 0.0 and result.note == NO_DETECTIONS


def test_bad_detections_are_named(tmp_path):
    gt = _load_gt(_coco_json(tmp_path))
    good = {"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}
    with pytest.raises(ValueError, match="res.json: expected a list"):
        check_detections({"a": 1}, gt, "res.json")
    with pytest.raises(ValueError, match=r"detection 1: missing field\(s\) \['score'\]"):
        check_detections([good, {k: v for k, v in good.items() if k != "score"}], gt, "res.json")
    with pytest.raises(ValueError, match="field 'image_id' 99"):
        check_detections([{**good, "image_id": 99}], gt, "res.json")
    with pytest.raises(ValueError, match="field 'category_id' 3"):
        check_detections([{**good, "category_id": 3}], gt, "res.json")
    with pytest.raises(ValueError, match="field 'bbox'"):
        check_detections([{**good, "bbox": [1, 2, -3, 4]}], gt, "res.json")
    # JSON true is a Python int equal to 1, and 1.0 == 1: an id must be a real integer all the same
    for name in ("image_id", "category_id"):
        for value in (True, float(good[name]), str(good[name])):
            with pytest.raises(ValueError) as error:
                check_detections([good, {**good, name: value}], gt, "res.json")
            assert (
                str(error.value) == f"res.json: detection 1: field {name!r} must be an integer, got {value!r}"
            )


# ----- m2det eval --detections -----
def _run(args: list[str]):
    result = CliRunner().invoke(app, ["eval", *args], terminal_width=160)
    assert result.exit_code == 0, result.output
    return result


def _outputs(out: Path) -> tuple[dict, list[dict], list[dict]]:
    for name in ("metrics.json", "per_class.csv", "pr_curve.png", "detections.json"):
        assert (out / name).is_file(), name
    assert (out / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    return (
        json.loads((out / "metrics.json").read_text()),
        json.loads((out / "detections.json").read_text()),
        rows,
    )


def test_cli_detections_on_coco_json(tmp_path):
    gt_file = _coco_json(tmp_path)
    detections = _shifted_detections()
    (tmp_path / "results.json").write_text(json.dumps(detections))
    out = tmp_path / "out"
    _run(["--data", str(gt_file), "--detections", str(tmp_path / "results.json"), "--out", str(out)])
    metrics, written, rows = _outputs(out)
    expected = _pycocotools_stats(gt_file, detections)
    assert [metrics["metrics"][name] for name in STAT_NAMES] == [float(v) for v in expected]
    assert written == detections  # the json's own category ids, untouched
    assert [(r["class"], int(r["category_id"])) for r in rows] == [(c["name"], c["id"]) for c in CATEGORIES]
    assert int(rows[2]["num_gt"]) == 2  # bird: the crowd box does not count
    assert metrics["num_images"] == len(SIZES)


def test_cli_detections_errors_name_the_file_and_field(tmp_path):
    gt_file = _coco_json(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    result = CliRunner().invoke(
        app, ["eval", "--data", str(gt_file), "--detections", str(bad), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "bad.json" in result.output and "category_id" in result.output
    result = CliRunner().invoke(app, ["eval", "--data", str(gt_file)])
    assert result.exit_code == 2 and "--weights" in result.output
    bad.write_text("[{")  # not JSON at all: still a user mistake, one line
    result = CliRunner().invoke(
        app, ["eval", "--data", str(gt_file), "--detections", str(bad), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and result.output.startswith(f"error: {bad}: not valid JSON")


# A public-style COCO file as pycocotools sees it: no image files, ids in no particular order,
# non-contiguous category ids, float boxes, segmentation areas that are not w*h, crowd regions and
# images without annotations.
EXACT_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"},
                    {"id": 90, "name": "toothbrush"}]  # fmt: skip
EXACT_IMAGES = {42: (640, 480), 7: (500, 375), 139: (640, 427), 3: (320, 240), 1000: (612, 612)}
EXACT_BOXES = [  # annotation id, image id, category id, [x, y, w, h], area, iscrowd
    (900100, 42, 1, [10.37, 20.81, 150.25, 300.62], 31415.9, 0),  # large box, large area
    (17, 42, 1, [200.5, 40.25, 38.7, 52.3], 1010.25, 0),  # w*h 2024 (medium), area small
    (5, 42, 3, [300.0, 200.0, 120.4, 60.6], 7296.24, 1),  # crowd
    (2500, 42, 90, [420.11, 300.33, 9.9, 30.3], 150.0, 0),
    (8, 7, 3, [50.5, 60.5, 80.25, 40.75], 2800.5, 0),  # w*h 3270 (medium), area medium
    (9, 7, 7, [120.0, 100.0, 300.5, 200.25], 48000.0, 0),
    (10, 7, 1, [0.0, 0.0, 30.25, 95.75], 1200.5, 0),
    (11, 7, 1, [10.0, 5.0, 200.0, 150.0], 25000.0, 1),  # crowd over the person at the left
    (77, 139, 90, [100.75, 100.25, 60.5, 45.25], 1500.0, 0),
    (78, 139, 7, [5.5, 150.5, 600.0, 250.0], 98765.4, 0),
    (79, 139, 3, [400.0, 20.0, 33.3, 33.3], 1108.89, 0),  # w*h 1108.89: medium either way
    # what a detour through float32 boxes, clipped to the image, would change: an area just over
    # 32**2 (medium only; 1024.0, also small, in float32) and a box past the image's right edge
    (80, 139, 3, [200.25, 300.5, 30.5, 33.75], 1024.00001, 0),
    (81, 42, 7, [610.5, 100.25, 36.0, 50.0], 1500.0, 0),
]  # images 3 and 1000 have none


def _exact_case(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """The ground-truth json, a results file for it (hits, near misses, duplicates, detections on
    crowd regions and on images without boxes) and the results as a list."""
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in EXACT_IMAGES.items()
    ]
    annotations = [
        {
            "id": a,
            "image_id": i,
            "category_id": c,
            "bbox": b,
            "area": area,
            "iscrowd": crowd,
            "segmentation": [],
        }
        for a, i, c, b, area, crowd in EXACT_BOXES
    ]
    gt_file = tmp_path / "instances_val.json"
    gt_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": EXACT_CATEGORIES})
    )
    rng = np.random.default_rng(7)
    detections = []
    for k, (_, i, c, (x, y, w, h), _, _) in enumerate(EXACT_BOXES):
        for j in range(1 + k % 3):  # some duplicated
            jitter = rng.normal(0, 0.08 * (j + 1), 4)
            box = [x + jitter[0] * w, y + jitter[1] * h, w * (1 + jitter[2]), h * (1 + jitter[3])]
            detections.append(
                {
                    "image_id": i,
                    "category_id": c,
                    "bbox": [round(v, 3) for v in box],
                    "score": round(float(rng.uniform(0.05, 1)), 5),
                }
            )
    for _, i, c, box, _, _ in EXACT_BOXES[-2:]:  # exact hits: IoU 1, or 0.82 with the box clipped
        detections.append({"image_id": i, "category_id": c, "bbox": box, "score": 0.97})
    for _ in range(12):  # false positives, also on the images without boxes
        i = int(rng.choice(list(EXACT_IMAGES)))
        x, y = rng.uniform(0, 200, 2)
        box = [float(x), float(y), float(rng.uniform(5, 150)), float(rng.uniform(5, 150))]
        category = int(rng.choice([c["id"] for c in EXACT_CATEGORIES]))
        detections.append(
            {"image_id": i, "category_id": category, "bbox": box, "score": float(rng.uniform(0, 1))}
        )
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(detections))
    return gt_file, results_file, detections


def test_cli_scores_a_coco_json_exactly_as_pycocotools_without_images(tmp_path):
    gt_file, results_file, detections = _exact_case(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances_val.json", "results.json"]  # no images
    expected = [float(v) for v in _pycocotools_stats(gt_file, results_file)]
    assert -1.0 not in expected and 0.2 < expected[0] < 0.9  # every area range has boxes; not trivial
    # the case is sensitive to the annotations' own areas: recomputed ones give other numbers
    data = json.loads(gt_file.read_text())
    for annotation in data["annotations"]:
        annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
    recomputed = tmp_path / "recomputed" / "instances_val.json"
    recomputed.parent.mkdir()
    recomputed.write_text(json.dumps(data))
    assert [float(v) for v in _pycocotools_stats(recomputed, results_file)] != expected

    out = tmp_path / "out"
    result = _run(["--data", str(gt_file), "--detections", str(results_file), "--out", str(out)])
    metrics, written, rows = _outputs(out)
    assert [metrics["metrics"][name] for name in STAT_NAMES] == expected  # every stat, exactly
    for name, value in zip(STAT_NAMES, expected):  # and the printed digits are pycocotools' digits
        assert f" {name} " in result.output and f" {value:.4f} " in result.output, name
    assert metrics["num_images"] == len(EXACT_IMAGES) and metrics["note"] is None
    assert written == detections
    assert [(r["class"], int(r["category_id"])) for r in rows] == [
        (c["name"], c["id"]) for c in EXACT_CATEGORIES
    ]
    assert [int(r["num_gt"]) for r in rows] == [3, 3, 3, 2]  # crowd boxes do not count

    # --max-images N: the first N images of the json, as pycocotools with those image ids
    _run(["--data", str(gt_file), "--detections", str(results_file), "--out", str(out), "--max-images", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    expected = [float(v) for v in _pycocotools_stats(gt_file, results_file, img_ids=[7, 42])]
    assert [metrics["metrics"][name] for name in STAT_NAMES] == expected and metrics["num_images"] == 2


def _with_placeholder_images(gt_file: Path) -> Path:
    folder = gt_file.parent / "images"
    folder.mkdir()
    for image in json.loads(gt_file.read_text())["images"]:
        Image.new("RGB", (image["width"], image["height"])).save(folder / image["file_name"])
    return folder


def test_a_coco_data_set_is_scored_against_its_json_as_written(tmp_path):
    # what evaluate() (eval --weights, the trainer's validation) scores against: the file, not the
    # data set's float32, clipped copy with recomputed areas
    from m2det.data.coco import CocoDetection
    from m2det.engine.evaluate import dataset_category_ids, ground_truth

    gt_file, results_file, detections = _exact_case(tmp_path)
    dataset = CocoDetection(gt_file, _with_placeholder_images(gt_file), keep_ignored=True)
    expected = [float(v) for v in _pycocotools_stats(gt_file, results_file)]
    image_ids = list(EXACT_IMAGES)
    coco_gt, category_ids = ground_truth(dataset)
    assert coco_gt.dataset == json.loads(gt_file.read_text()) and category_ids is None
    result = score_detections(coco_gt, detections, category_ids=category_ids, image_ids=image_ids)
    assert [result.metrics[name] for name in STAT_NAMES] == expected
    # the data set's own reading of the same file scores differently: the reason for the above
    copy_gt = score_detections(
        dataset.coco_gt(), detections, category_ids=dataset_category_ids(dataset), image_ids=image_ids
    )
    assert [copy_gt.metrics[name] for name in STAT_NAMES] != expected


def test_a_coco_json_pycocotools_cannot_score_falls_back_with_a_warning(tmp_path):
    from m2det.data.coco import CocoDetection
    from m2det.engine.evaluate import ground_truth

    gt_file, _, _ = _exact_case(tmp_path)
    data = json.loads(gt_file.read_text())
    for annotation in data["annotations"]:
        del annotation["area"]  # the data set fills in w * h; COCOeval needs the field
    gt_file.write_text(json.dumps(data))
    dataset = CocoDetection(gt_file, _with_placeholder_images(gt_file), keep_ignored=True)
    with pytest.warns(UserWarning, match="missing field.*'area'.*not what pycocotools would score"):
        coco_gt, category_ids = ground_truth(dataset)
    assert category_ids == [c["id"] for c in EXACT_CATEGORIES]
    assert coco_gt is dataset.coco_gt()


def _invoke_error(args: list[str]) -> str:
    """Run `m2det eval` expecting a user error: exit code 2 and one message, no traceback."""
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("field", ["image_id", "category_id"])
@pytest.mark.parametrize("value", [True, 42.0, "42", None])
def test_cli_refuses_non_integer_ids_naming_file_entry_and_field(tmp_path, field, value):
    gt_file, results_file, detections = _exact_case(tmp_path)
    detections[3][field] = value  # True == 1 and 42.0 == 42 in Python: neither may pass for an id
    results_file.write_text(json.dumps(detections))
    message = _invoke_error(
        ["--data", str(gt_file), "--detections", str(results_file), "--out", str(tmp_path)]
    )
    assert f"{results_file}: detection 3: field '{field}' must be an integer, got {value!r}" in message


@pytest.mark.parametrize(("field", "value"), [("image_id", 5), ("category_id", 2)])
def test_cli_refuses_ids_not_in_the_ground_truth(tmp_path, field, value):
    # pycocotools would stop on an unknown image with an assertion and leave an unknown category out
    gt_file, results_file, detections = _exact_case(tmp_path)
    detections[1][field] = value
    results_file.write_text(json.dumps(detections))
    message = _invoke_error(
        ["--data", str(gt_file), "--detections", str(results_file), "--out", str(tmp_path)]
    )
    assert f"{results_file}: detection 1: field '{field}' {value} is not" in message
    assert "of the ground truth" in message


@pytest.mark.parametrize(
    ("entry", "change", "expected"),
    [
        ("annotations", {"area": None}, "annotations[2]: missing field(s) ['area']"),
        ("annotations", {"iscrowd": 2}, "annotations[2]: field 'iscrowd' must be 0 or 1, got 2"),
        ("annotations", {"bbox": [1, 2, 3]}, "annotations[2]: field 'bbox' must be [x, y, w, h]"),
        ("images", {"id": True}, "images[2]: field 'id' must be an integer, got True"),
        ("categories", {"id": "3"}, "categories[2]: field 'id' must be an integer, got '3'"),
    ],
)
def test_cli_malformed_ground_truth_is_named(tmp_path, entry, change, expected):
    gt_file, results_file, _ = _exact_case(tmp_path)
    data = json.loads(gt_file.read_text())
    data[entry][2].update(change)
    data[entry][2] = {k: v for k, v in data[entry][2].items() if v is not None}
    gt_file.write_text(json.dumps(data))
    message = _invoke_error(
        ["--data", str(gt_file), "--detections", str(results_file), "--out", str(tmp_path)]
    )
    assert f"{gt_file}: {expected}" in message


def test_cli_ground_truth_without_boxes_explains_the_empty_report(tmp_path):
    gt_file, results_file, _ = _exact_case(tmp_path)
    data = json.loads(gt_file.read_text())
    del data["annotations"]  # pycocotools accepts a file without them
    gt_file.write_text(json.dumps(data))
    out = tmp_path / "out"
    result = _run(["--data", str(gt_file), "--detections", str(results_file), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    expected = [float(v) for v in _pycocotools_stats(gt_file, results_file)]
    assert [metrics["metrics"][name] for name in STAT_NAMES] == expected == [-1.0] * len(STAT_NAMES)
    assert metrics["metrics"]["VOC_AP"] is None and metrics["note"] == NO_GROUND_TRUTH
    assert f"note: {NO_GROUND_TRUTH}" in " ".join(result.output.split())


def test_crowd_boxes_alone_are_no_ground_truth_to_score(tmp_path):
    gt = _load_gt(_coco_json(tmp_path))
    assert coco_metrics(gt, _gt_as_detections())["note"] is None
    for annotation in gt.dataset["annotations"]:
        annotation["iscrowd"] = 1
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    metrics = coco_metrics(gt, _gt_as_detections())
    assert metrics["note"] == NO_GROUND_TRUTH and metrics["AP"] == -1.0
    assert score_detections(gt, _gt_as_detections()).note == NO_GROUND_TRUTH


def _voc_folder(tmp_path: Path) -> Path:
    """A VOC-layout data set: two images, one difficult object."""
    root = tmp_path / "voc"
    objects = {
        "a": [("cat", (11, 21, 110, 100), 0), ("dog", (121, 11, 180, 90), 0)],
        "b": [("cat", (31, 31, 90, 80), 0), ("cat", (101, 5, 150, 40), 1)],
    }
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for name, objs in objects.items():
        Image.new("RGB", (200, 120)).save(root / "JPEGImages" / f"{name}.png")
        xml_objects = "".join(
            f"<object><name>{cls}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for cls, b, d in objs
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename><size><width>200</width><height>120</height>"
            f"<depth>3</depth></size>{xml_objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\nb\n")
    return root


def test_cli_detections_on_voc_folder(tmp_path):
    root = _voc_folder(tmp_path)
    # image ids are positions in val.txt, labels follow the sorted names (cat 1, dog 2), and boxes
    # are the file's 1-based pixel indices minus one
    detections = [
        {"image_id": 0, "category_id": 1, "bbox": [10, 20, 99, 79], "score": 0.9},
        {"image_id": 0, "category_id": 2, "bbox": [120, 10, 59, 79], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [30, 30, 59, 49], "score": 0.7},
        {"image_id": 1, "category_id": 1, "bbox": [100, 4, 49, 35], "score": 0.95},  # the difficult one
    ]
    (tmp_path / "results.json").write_text(json.dumps(detections))
    out = tmp_path / "out"
    args = ["--data", str(root), "--split", "val", "--detections", str(tmp_path / "results.json")]
    args += ["--out", str(out)]
    _run(args)
    metrics, _, rows = _outputs(out)
    assert metrics["voc_plus_one"] is True  # the devkit's convention by default on VOC data
    for name in ("AP", "AP50", "VOC_AP07", "VOC_AP"):
        assert metrics["metrics"][name] == pytest.approx(1.0), name
    assert [(r["class"], int(r["num_gt"])) for r in rows] == [("cat", 2), ("dog", 1)]
    # without the detection on the difficult box nothing changes; a wrong-class one lowers dog's AP
    extra = {"image_id": 1, "category_id": 2, "bbox": [30, 30, 59, 49], "score": 0.99}
    (tmp_path / "results.json").write_text(json.dumps([*detections[:3], extra]))
    _run(args)
    metrics, _, rows = _outputs(out)
    assert float(rows[0]["VOC_AP"]) == pytest.approx(1.0)
    assert float(rows[1]["VOC_AP"]) == pytest.approx(0.5)  # dog: FP then TP -> precision 1/2 at recall 1
    assert float(rows[1]["VOC_AP07"]) == pytest.approx(0.5)


# ----- running a model -----
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from m2det.io.checkpoint import save_model
    from m2det.models import build_model

    torch.manual_seed(0)
    model = build_model("m2det_tiny", num_classes=4, class_names=["Platelets", "RBC", "WBC"])
    return save_model(model, tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def test_cli_weights_on_bccd(bccd_root, tiny_weights, tmp_path):
    out = tmp_path / "out"
    args = [
        "--data",
        str(bccd_root),
        "--split",
        "test",
        "--max-images",
        "2",
        "--batch",
        "2",
        "--device",
        "cpu",
    ]
    result = _run([*args, "--weights", str(tiny_weights), "--out", str(out)])
    assert "Platelets" in result.output and "VOC_AP" in result.output
    metrics, detections, rows = _outputs(out)
    assert metrics["num_images"] == 2 and metrics["settings"]["score_threshold"] == 0.05
    assert detections and {d["image_id"] for d in detections} <= {0, 1}
    assert {d["category_id"] for d in detections} <= {1, 2, 3}
    assert all(-1.0 <= (v if v is not None else -1.0) <= 1.0 for v in metrics["metrics"].values())
    assert [r["class"] for r in rows] == ["Platelets", "RBC", "WBC"]
    # scoring the written detections again gives the same numbers
    again = tmp_path / "again"
    _run([*args, "--detections", str(out / "detections.json"), "--out", str(again)])
    assert json.loads((again / "metrics.json").read_text())["metrics"] == metrics["metrics"]


def test_cli_weights_on_coco_json(tmp_path, one_thread):
    # running a model needs the images; detections carry the json's own category ids and are scored
    # against the json as written, on the images seen
    from m2det.io.checkpoint import save_model
    from m2det.models import build_model

    torch.manual_seed(0)
    model = build_model("m2det_tiny", num_classes=4, class_names=[c["name"] for c in CATEGORIES])
    weights = save_model(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    args = ["--data", str(_coco_json(tmp_path)), "--max-images", "2", "--device", "cpu", "--out", str(out)]
    _run([*args, "--weights", str(weights), "--score", "0.01"])
    metrics, detections, rows = _outputs(out)
    assert metrics["num_images"] == 2 and metrics["voc_plus_one"] is False
    assert detections and {d["image_id"] for d in detections} <= {1, 2}
    assert {d["category_id"] for d in detections} <= {c["id"] for c in CATEGORIES}
    assert [r["class"] for r in rows] == [c["name"] for c in CATEGORIES]
    # its detections.json scored as a results file on the json as written: the same COCO numbers
    again = tmp_path / "again"
    _run([*args[:-2], "--detections", str(out / "detections.json"), "--out", str(again)])
    rescored = json.loads((again / "metrics.json").read_text())["metrics"]
    assert [rescored[name] for name in STAT_NAMES] == [metrics["metrics"][name] for name in STAT_NAMES]


def test_evaluate_resized_images_give_boxes_in_original_pixels(bccd_root, tiny_weights):
    from torchvision.transforms import v2

    from m2det.data import build_dataset
    from m2det.models.loading import load_model

    model = load_model(tiny_weights).train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()  # as a trainer with frozen BatchNorm leaves it
    plain = build_dataset(bccd_root, "test", keep_ignored=True)
    # the resize the model would do itself (float, bilinear, no antialias), done by the data set instead
    resize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Resize((320, 320), antialias=False)])
    resized = build_dataset(bccd_root, "test", keep_ignored=True, transforms=resize)
    a = evaluate(model, plain, batch_size=2, max_images=2, progress=False)
    b = evaluate(model, resized, batch_size=2, max_images=2, progress=False)
    assert model.training and not frozen.training  # every module left as it came
    assert a.num_images == 2 and len(a.detections_coco) == len(b.detections_coco) > 0
    boxes_a = torch.tensor([d["bbox"] for d in a.detections_coco])
    boxes_b = torch.tensor([d["bbox"] for d in b.detections_coco])
    torch.testing.assert_close(boxes_a, boxes_b, atol=0.05, rtol=0)  # boxes back in original pixels
    assert all(math.isclose(a.metrics[k], b.metrics[k], abs_tol=1e-6) for k in STAT_NAMES)


def test_the_two_eval_flows_are_functions_of_the_engine(tmp_path):
    """`m2det eval --detections` is `score_results_file`: a perfect results file scores AP 1 and is
    described for metrics.json by what was scored."""
    from m2det.engine.evaluate import score_results_file

    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    found = [{"image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "score": 0.9}]
    (tmp_path / "found.json").write_text(json.dumps(found))
    result, described = score_results_file(tmp_path / "found.json", str(tmp_path / "gt.json"))
    assert result.metrics["AP50"] == pytest.approx(1.0)
    assert described == {
        "data": str(tmp_path / "gt.json"),
        "split": "val",
        "voc_plus_one": False,
        "detections": str(tmp_path / "found.json"),
    }

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


def _pycocotools_stats(gt_file: Path, detections: list[dict], cat_ids=None) -> np.ndarray:
    """The reference: pycocotools called directly, as its README shows."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        dt = gt.loadRes(copy.deepcopy(detections))
        cocoeval = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            cocoeval.params.catIds = cat_ids
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
    assert [metrics["metrics"][name] for name in STAT_NAMES] == pytest.approx(
        [float(v) for v in expected], abs=1e-12
    )
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


def test_evaluate_resized_images_give_boxes_in_original_pixels(bccd_root, tiny_weights):
    from torchvision.transforms import v2

    from m2det.data import build_dataset
    from m2det.io.checkpoint import load_model

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

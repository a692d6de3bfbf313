"""COCO json data sets: class names from the json, crowd handling, bad data reported or refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from m2det.data import CocoDetection, DatasetError, build_dataset


def write_image(path: Path, width: int, height: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, value, value)).save(path)


def write_coco(
    root: Path, json_path: str = "annotations/instances_train.json", image_folder: str = "train"
) -> Path:
    """Four images listed (one missing on disk, one with a malformed box), two categories out of id order."""
    for name, (w, h) in {"a.png": (64, 48), "b.png": (80, 60), "d.png": (32, 32)}.items():
        write_image(root / image_folder / name, w, h)
    data = {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 12, "file_name": "b.png", "width": 80, "height": 60},
            {"id": 13, "file_name": "c.png", "width": 50, "height": 50},  # not on disk
            {"id": 14, "file_name": "d.png", "width": 32, "height": 32},
        ],
        "categories": [{"id": 7, "name": "square"}, {"id": 3, "name": "circle"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [10, 5, 20, 15], "area": 250.0, "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [30, 20, 10, 10], "area": 80.0, "iscrowd": 1},
            {
                "id": 3,
                "image_id": 12,
                "category_id": 3,
                "bbox": [60, 40, 30, 30],
                "iscrowd": 0,
            },  # past the edge
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
            {
                "id": 7,
                "image_id": 12,
                "category_id": 7,
                "bbox": [90, 10, 5, 5],
                "iscrowd": 0,
            },  # beyond the image
            {"id": 5, "image_id": 14, "category_id": 7, "bbox": [1, 2, 3], "iscrowd": 0},  # malformed
            {"id": 6, "image_id": 99, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0},  # unknown image
        ],
    }
    path = root / json_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_reads_boxes_labels_and_class_names(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        dataset = build_dataset(write_coco(tmp_path))
    assert isinstance(dataset, CocoDetection) and dataset.image_dir == tmp_path / "train"
    assert dataset.class_names == ["circle", "square"] and dataset.num_classes == 3
    assert dataset.category_ids == [3, 7]
    assert [dataset.image_info(i).image_id for i in range(len(dataset))] == [11, 12]
    image, target = dataset[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[10, 5, 30, 20]]  # the crowd box is left out for training
    assert target["labels"].tolist() == [2] and target["iscrowd"].tolist() == [False]
    assert target["image_id"] == 11 and target["orig_size"].tolist() == [48, 64]
    _, target_b = dataset[1]
    assert target_b["boxes"].tolist() == [[60, 40, 80, 60]] and target_b["labels"].tolist() == [1]
    # one warning, naming every problem
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    for needle in (
        "c.png",
        "d.png",
        "'bbox'",
        "clipped",
        "zero or negative size",
        "lies outside the 80x60",
        "image id 99",
    ):
        assert needle in messages[0], needle
    assert (
        dataset.report.dropped_images == 2
        and dataset.report.dropped_boxes == 2
        and dataset.report.clipped_boxes == 1
    )


def test_keep_ignored_flags_crowd_and_coco_gt_scores_perfect_detections(tmp_path):
    dataset = build_dataset(write_coco(tmp_path), keep_ignored=True)
    _, target = dataset[0]
    assert target["iscrowd"].tolist() == [False, True] and target["labels"].tolist() == [2, 1]
    gt = dataset.coco_gt()
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[11]))
    assert sorted((a["category_id"], a["iscrowd"], a["area"]) for a in anns) == [(1, 1, 80.0), (2, 0, 250.0)]
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt.dataset["annotations"]
        if not a["iscrowd"]
    ]
    evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_plain_json_with_images_folder(tmp_path):
    dataset = build_dataset(write_coco(tmp_path, json_path="shapes.json", image_folder="images"))
    assert dataset.image_dir == tmp_path / "images" and len(dataset) == 2
    explicit = build_dataset(tmp_path / "shapes.json", image_dir=tmp_path / "images")
    assert [r.info.path for r in explicit.records] == [r.info.path for r in dataset.records]


def test_strict_stops_at_the_first_problem_naming_the_file(tmp_path):
    with pytest.raises(
        DatasetError, match=r"instances_train\.json: annotations\[6\] refers to image id 99.*strict"
    ):
        build_dataset(write_coco(tmp_path), strict=True)


def test_broken_json_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON"):
        build_dataset(path, image_dir=tmp_path)
    path.write_text('{"images": {}, "categories": []}')
    with pytest.raises(DatasetError, match=r"bad\.json: field 'images' must be a list"):
        build_dataset(path, image_dir=tmp_path)


def test_image_of_the_wrong_size_is_dropped_when_the_set_is_built(tmp_path, caplog):
    path = write_coco(tmp_path)
    write_image(tmp_path / "train" / "a.png", 10, 10)  # json says 64x48
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        dataset = build_dataset(path)
    assert [r.info.path.name for r in dataset.records] == ["b.png"]
    image, target = dataset[0]
    assert target["image_id"] == 12 and image.shape == (3, 60, 80)
    (issue,) = [i for i in dataset.report.issues if i.where.endswith("a.png")]
    assert issue.problem == "image is 10x10 but its annotation says 64x48" and issue.action == "image dropped"
    (record,) = caplog.records  # one warning: the summary, naming the file
    assert "a.png: image is 10x10 but its annotation says 64x48 (image dropped)" in record.getMessage()


def test_records_match_the_json_independently(tmp_path):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    dataset = build_dataset(path, keep_ignored=True)
    expected = {}
    for ann in data["annotations"]:
        if ann["image_id"] == 11:
            x, y, w, h = ann["bbox"]
            expected[ann["id"]] = [x, y, x + w, y + h]
    np.testing.assert_allclose(sorted(dataset.records[0].boxes.tolist()), sorted(expected.values()))


def test_annotation_without_id_or_category_is_reported_not_a_crash(tmp_path, caplog):
    path = write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0].pop("id")
    data["annotations"][1].pop("category_id")  # both on image 11 (a.png)
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        dataset = build_dataset(path)
    assert [dataset.image_info(i).image_id for i in range(len(dataset))] == [12]
    assert "a.png" in caplog.records[0].getMessage() and "category_id None" in caplog.records[0].getMessage()

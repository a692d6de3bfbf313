"""YOLO data sets: data YAML, image folders and txt lists, label conversion, bad lines reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from m2det.data import DatasetError, YOLODetection, build_dataset


def write_yolo(root: Path) -> Path:
    """train: a folder of 5 images (one malformed label, one bad class, one without label file);
    val: a txt list with one missing image."""
    labels = {
        "a": "0 0.5 0.5 0.5 0.5\n1 0.1 0.2 0.3 0.4 0.2 0.4\n",  # a box and a triangle polygon
        "b": "1 0.95 0.5 0.2 0.2\n\n0 0.5 0.5 0 0.3\n",  # past the right edge; zero width
        "c": "0 0.5 0.5\n",  # malformed
        "d": "7 0.5 0.5 0.1 0.1\n",  # class out of range
    }
    for split, names in (("train", "abcde"), ("val", "ab")):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (100, 80), (50, 60, 70)).save(root / "images" / split / f"{name}.png")
            if name in labels:
                (root / "labels" / split / f"{name}.txt").write_text(labels[name])
    (root / "val.txt").write_text("./images/val/a.png\nimages/val/b.png\nimages/val/zz.png\n")
    yaml_path = root / "data.yaml"
    yaml_path.write_text("path: .\ntrain: images/train\nval: val.txt\nnames:\n  0: cat\n  1: dog\n")
    return yaml_path


def test_labels_become_pixel_boxes(tmp_path):
    dataset = build_dataset(write_yolo(tmp_path), "train")
    assert isinstance(dataset, YOLODetection) and dataset.class_names == ["cat", "dog"]
    assert [r.info.path.stem for r in dataset.records] == ["a", "b", "e"]
    image, target = dataset[0]
    assert image.shape == (3, 80, 100)
    torch.testing.assert_close(
        target["boxes"].as_subclass(torch.Tensor),
        torch.tensor([[25.0, 20.0, 75.0, 60.0], [10.0, 16.0, 30.0, 32.0]]),
    )
    assert target["labels"].tolist() == [1, 2] and target["iscrowd"].tolist() == [False, False]
    _, target_b = dataset[1]
    torch.testing.assert_close(
        target_b["boxes"].as_subclass(torch.Tensor), torch.tensor([[85.0, 32.0, 100.0, 48.0]])
    )
    _, target_e = dataset[2]
    assert target_e["boxes"].shape == (0, 4) and target_e["labels"].shape == (0,)


def test_problems_are_reported_by_label_file(tmp_path):
    report = build_dataset(write_yolo(tmp_path), "train").report
    by_file = {(Path(i.where).name, i.action) for i in report.issues}
    assert by_file == {
        ("b.txt", "box clipped"),
        ("b.txt", "box dropped"),
        ("c.txt", "image dropped"),
        ("d.txt", "image dropped"),
    }
    text = report.summary()
    assert "line 1" in text and "'7'" in text and "zero or negative size" in text


def test_txt_list_and_missing_image(tmp_path):
    dataset = build_dataset(write_yolo(tmp_path), "val")
    assert [r.info.path.name for r in dataset.records] == ["a.png", "b.png"]
    assert [
        (Path(i.where).name, i.problem) for i in dataset.report.issues if i.action == "image dropped"
    ] == [("zz.png", "image not found")]


def test_strict_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"b\.txt: box 0 .*outside"):
        build_dataset(write_yolo(tmp_path), "train", strict=True)


def test_bad_yaml_is_a_clear_error(tmp_path):
    yaml_path = write_yolo(tmp_path)
    with pytest.raises(DatasetError, match=r"data\.yaml: no 'test' entry; entries found: train, val"):
        build_dataset(yaml_path, "test")
    yaml_path.write_text("train: images/train\nnames: {0: cat, 2: dog}\n")
    with pytest.raises(DatasetError, match="'names' keys must be the class ids"):
        build_dataset(yaml_path)
    yaml_path.write_text("train: images/train\nnames: [cat, dog]\n")
    for label in (tmp_path / "labels" / "train").iterdir():
        label.unlink()
    with pytest.raises(
        DatasetError, match=r"no label file for any 'train' image \(e\.g\. expected .*labels/train/a\.txt"
    ):
        build_dataset(yaml_path)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not a data set m2det can read"):
        build_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        build_dataset(tmp_path / "nothing.json")

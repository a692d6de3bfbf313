"""Pascal VOC data sets: the real BCCD data (with its two degenerate boxes) and small written ones."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image

from m2det.data import DatasetError, VOCDetection, build_dataset, build_train_transform


def parse_split(root: Path, split: str) -> dict[str, list[tuple[str, list[float]]]]:
    """Independent reading of a split: image id -> [(name, [xmin, ymin, xmax, ymax] as in the file)]."""
    ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    objects = {}
    for image_id in ids:
        tree = ET.parse(root / "Annotations" / f"{image_id}.xml")
        objects[image_id] = [
            (
                o.find("name").text,
                [float(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")],
            )
            for o in tree.findall("object")
        ]
    return objects


@pytest.mark.parametrize("split", ["trainval", "test"])
def test_bccd_loads_with_degenerate_boxes_dropped_and_named(bccd_root, split, caplog):
    expected = parse_split(bccd_root, split)
    degenerate = {i for i, objs in expected.items() for _, b in objs if b[2] <= b[0] or b[3] <= b[1]}
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        dataset = build_dataset(bccd_root, split)
    assert isinstance(dataset, VOCDetection) and len(dataset) == len(expected)
    assert dataset.class_names == ["Platelets", "RBC", "WBC"]
    counts = {name: 0 for name in dataset.class_names}
    for objs in expected.values():
        for name, b in objs:
            counts[name] += b[2] > b[0] and b[3] > b[1]
    assert dataset.box_counts() == counts
    assert dataset.report.dropped_boxes == len(degenerate) and dataset.report.dropped_images == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for image_id in degenerate:
        assert f"{image_id}.xml" in logged and "zero or negative size" in logged
    if split == "trainval":
        assert degenerate == {"BloodImage_00338", "BloodImage_00343"}
    else:
        assert not caplog.records


def test_bccd_boxes_are_the_file_values_minus_one(bccd_root):
    dataset = build_dataset(bccd_root, "test")
    first_id = dataset.image_info(0).path.stem
    objs = parse_split(bccd_root, "test")[first_id]
    image, target = dataset[0]
    assert image.shape == (3, 480, 640)
    expected = torch.tensor([b for _, b in objs]) - 1
    assert torch.equal(target["boxes"].as_subclass(torch.Tensor), expected)
    assert [dataset.class_names[i - 1] for i in target["labels"].tolist()] == [n for n, _ in objs]


def test_bccd_through_the_training_transform(bccd_root):
    dataset = build_dataset(bccd_root, "val", transforms=build_train_transform(128))
    torch.manual_seed(0)
    image, target = dataset[3]
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
    assert len(target["boxes"]) == len(target["labels"]) > 0 and target["labels"].min() >= 1


def write_voc(root: Path) -> Path:
    """A tiny VOC tree: a difficult object, an unknown class, a broken XML, a missing image, a box past the edge."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)

    def obj(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
        coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        return (
            f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{coords}</bndbox></object>"
        )

    files = {
        "img1": (60, 40, obj("cat", (5, 5, 20, 30)) + obj("dog", (30, 10, 50, 35), difficult=1)),
        "img2": (60, 40, obj("dog", (40, 20, 70, 39)) + obj("bird", (1, 1, 10, 10))),
        "img3": (60, 40, obj("cat", (1, 1, 5, 5))),  # no image file
    }
    for image_id, (w, h, objects) in files.items():
        xml = f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height></size>{objects}</annotation>"
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        if image_id != "img3":
            Image.new("RGB", (w, h), (10, 20, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "Annotations" / "img4.xml").write_text("<annotation><object>")
    Image.new("RGB", (8, 8)).save(root / "JPEGImages" / "img4.jpg")
    (root / "ImageSets" / "Main" / "train.txt").write_text("img1\nimg2\nimg3\nimg4\n")
    (root / "ImageSets" / "Main" / "cat_train.txt").write_text("img1  1\nimg2 -1\n")
    return root


def test_difficult_ignored_in_training_and_flagged_for_evaluation(tmp_path):
    root = write_voc(tmp_path)
    train = build_dataset(root, "train", class_names=["cat", "dog"])
    assert [r.info.path.name for r in train.records] == ["img1.jpg", "img2.jpg"]
    _, target = train[0]
    assert target["boxes"].tolist() == [[4, 4, 19, 29]] and target["labels"].tolist() == [1]
    evaluation = build_dataset(root, "train", class_names=["cat", "dog"], keep_ignored=True)
    _, target = evaluation[0]
    assert target["iscrowd"].tolist() == [False, True] and target["labels"].tolist() == [1, 2]
    gt = evaluation.coco_gt()
    assert sorted((a["category_id"], a["iscrowd"]) for a in gt.loadAnns(gt.getAnnIds(imgIds=[0]))) == [
        (1, 0),
        (2, 1),
    ]
    assert gt.imgs[1]["width"] == 60 and gt.imgs[1]["height"] == 40


def test_problems_are_reported_by_file(tmp_path):
    root = write_voc(tmp_path)
    dataset = build_dataset(root, "train", class_names=["cat", "dog"])
    issues = {Path(i.where).name: i for i in dataset.report.issues if i.action == "image dropped"}
    assert set(issues) == {"img3.xml", "img4.xml"}
    assert "image not found" in issues["img3.xml"].problem and "not valid XML" in issues["img4.xml"].problem
    others = [str(i) for i in dataset.report.issues if i.action != "image dropped"]
    assert any("img2.xml" in s and "'bird'" in s for s in others)
    assert any("img2.xml" in s and "outside" in s and "clipped" in s for s in others)
    _, target = dataset[1]
    assert target["boxes"].tolist() == [[39, 19, 60, 38]]


def test_class_names_default_to_all_names_in_the_annotations(tmp_path):
    dataset = build_dataset(write_voc(tmp_path), "train")
    assert dataset.class_names == ["bird", "cat", "dog"]


def test_strict_and_bad_split(tmp_path):
    root = write_voc(tmp_path)
    with pytest.raises(DatasetError, match=r"img2\.xml.*'bird'"):
        build_dataset(root, "train", class_names=["cat", "dog"], strict=True)
    with pytest.raises(DatasetError, match=r"val\.txt: no such split; splits found: train"):
        build_dataset(root, "val")

"""A folder of images with VOC XML files beside them (LabelImg's layout): the split picks the
subfolder, val falls back to test and then to a fixed hold-out of train, images without XML have
no objects, XML without image is reported; read as the VOC folder reads the same files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from m2det.cli.main import app
from m2det.data import DatasetError, VOCImageFolder, build_dataset
from m2det.engine.evaluate import is_voc


def bccd_ids(bccd_root: Path, split: str) -> list[str]:
    return (bccd_root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def lay_out(bccd_root: Path, root: Path, folders: dict[str, str], xml_folder: str = "") -> Path:
    """BCCD's train/val/test images copied into `root/<folder>` (split -> folder), each XML beside
    its image, or in the folder with `images` replaced by `xml_folder`."""
    for split, folder in folders.items():
        image_dir = root / folder
        xml_dir = root / folder.replace("images", xml_folder) if xml_folder else image_dir
        image_dir.mkdir(parents=True, exist_ok=True)
        xml_dir.mkdir(parents=True, exist_ok=True)
        for image_id in bccd_ids(bccd_root, split):
            shutil.copy(bccd_root / "JPEGImages" / f"{image_id}.jpg", image_dir)
            shutil.copy(bccd_root / "Annotations" / f"{image_id}.xml", xml_dir)
    return root


def by_name(dataset) -> dict[str, tuple[list, list, list]]:
    """File name -> (boxes, labels, iscrowd) of every image, as the data set gives them."""
    out = {}
    for i in range(len(dataset)):
        target = dataset.target(i)
        out[dataset.image_info(i).path.name] = (
            target["boxes"].tolist(),
            target["labels"].tolist(),
            target["iscrowd"].tolist(),
        )
    return out


LAYOUTS = {
    "images/<split> beside": ({"train": "images/train", "val": "images/val", "test": "images/test"}, ""),
    "<split> at the top, valid": ({"train": "train", "val": "valid", "test": "test"}, ""),
    "annotations/<split>": ({"train": "images/train", "val": "images/val", "test": "images/test"}, "annotations"),
    "labels/<split>": ({"train": "images/train", "val": "images/val", "test": "images/test"}, "labels"),
    "<split>/images + <split>/Annotations": ({"train": "train/images", "val": "val/images", "test": "test/images"}, "Annotations"),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_reads_as_the_voc_folder_does(bccd_root, tmp_path, layout):
    folders, xml_folder = LAYOUTS[layout]
    root = lay_out(bccd_root, tmp_path / "photos", folders, xml_folder)
    for split in ("train", "val", "test"):
        dataset = build_dataset(root, split, keep_ignored=True)
        reference = build_dataset(bccd_root, split, keep_ignored=True)
        assert isinstance(dataset, VOCImageFolder) and is_voc(dataset)
        assert dataset.class_names == reference.class_names == ["Platelets", "RBC", "WBC"]
        assert by_name(dataset) == by_name(reference)
        assert sorted(i.problem for i in dataset.report.issues) == sorted(
            i.problem for i in reference.report.issues
        )  # BCCD's two degenerate boxes, reported the same way


def test_samples_load_through_the_training_transform(bccd_root, tmp_path):
    from m2det.data import build_train_transform

    root = lay_out(bccd_root, tmp_path, {"train": "images/train"})
    dataset = build_dataset(root, "train", transforms=build_train_transform(96))
    torch.manual_seed(0)
    image, target = dataset[0]
    assert image.shape == (3, 96, 96) and len(target["labels"]) > 0


def test_val_falls_back_to_test(bccd_root, tmp_path, caplog):
    root = lay_out(bccd_root, tmp_path, {"train": "images/train", "test": "images/test"})
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        val = build_dataset(root, "val")
    assert [r.info.path.stem for r in val.records] == sorted(bccd_ids(bccd_root, "test"))
    assert f"{root}: no val folder: validating on test ({root / 'images' / 'test'})" in caplog.text
    train = build_dataset(root, "train")  # a test folder keeps train whole
    assert len(train) == len(bccd_ids(bccd_root, "train"))


def write_flat(root: Path, count: int, start: int = 0) -> Path:
    """`count` small images each with a one-box XML beside it, in one folder."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(start, start + count):
        Image.new("RGB", (40, 30), (k, k, k)).save(root / f"img{k:03d}.png")
        (root / f"img{k:03d}.xml").write_text(voc_xml(40, 30, [("cat", (5, 5, 20, 20))]))
    return root


def voc_xml(width: int, height: int, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    boxes = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
        f"<ymax>{y2}</ymax></bndbox></object>"
        for name, (x1, y1, x2, y2) in objects
    )
    return f"<annotation><size><width>{width}</width><height>{height}</height></size>{boxes}</annotation>"


@pytest.mark.parametrize("flat", [True, False])
def test_without_val_or_test_a_fixed_tenth_of_train_is_held_out(tmp_path, caplog, flat):
    root = tmp_path / "photos"
    write_flat(root if flat else root / "images" / "train", 30)
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        train = build_dataset(root, "train")
        val = build_dataset(root, "val")
    train_names = {r.info.path.name for r in train.records}
    val_names = {r.info.path.name for r in val.records}
    assert len(val_names) == 3 and len(train_names) == 27 and not train_names & val_names
    assert f"{root}: no val or test folder, so 3 of the 30 images of train are held out as val" in caplog.text
    assert f"{root}: no val or test folder: validating on the 3 of the 30 images of train" in caplog.text
    # the same images every time, and a new image moves at most one of them
    assert {r.info.path.name for r in build_dataset(root, "val").records} == val_names
    write_flat(root if flat else root / "images" / "train", 1, start=30)
    again = {r.info.path.name for r in build_dataset(root, "val").records}
    assert len(again) == 3 and len(again - val_names) <= 1


def test_one_image_cannot_be_split(tmp_path):
    write_flat(tmp_path / "one", 1)
    with pytest.raises(DatasetError, match=r"1 image\(s\) in train are too few to hold some out for val"):
        build_dataset(tmp_path / "one", "val")


def test_unknown_split_names_the_ones_that_exist(bccd_root, tmp_path):
    root = lay_out(bccd_root, tmp_path / "p", {"train": "images/train", "test": "images/test"})
    with pytest.raises(DatasetError) as info:
        build_dataset(root, "tset")
    assert str(info.value) == (
        f"{root}: no 'tset' split; did you mean test? splits found in {root / 'images'}: test, train "
        "(val falls back to test, then to a hold-out of train: see docs/data.md)"
    )
    flat = write_flat(tmp_path / "flat", 4)
    with pytest.raises(DatasetError, match=r"flat folder of images: one split, train \(and val, held out"):
        build_dataset(flat, "test")


def test_image_without_xml_has_no_objects_and_xml_without_image_is_reported(tmp_path, caplog):
    root = tmp_path / "photos"
    train = write_flat(root / "images" / "train", 3)
    write_flat(root / "images" / "val", 1)
    Image.new("RGB", (40, 30)).save(train / "empty_scene.jpg")  # left without boxes in LabelImg
    (train / "gone.xml").write_text(voc_xml(40, 30, [("cat", (1, 1, 9, 9))]))  # its image was deleted
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        dataset = build_dataset(root, "train")
    names = [r.info.path.name for r in dataset.records]
    assert names == ["empty_scene.jpg", "img000.png", "img001.png", "img002.png"]
    image, target = dataset[0]
    assert image.shape == (3, 30, 40) and target["boxes"].shape == (0, 4) and target["labels"].tolist() == []
    assert dataset.target(1)["labels"].tolist() == [1]
    assert (
        "1 of the 4 images have no XML file, used as images with no objects (e.g. empty_scene.jpg)"
        in caplog.text
    )
    (issue,) = dataset.report.issues
    assert issue.where == str(train / "gone.xml") and issue.action == "annotation ignored"
    assert issue.problem == "no image named gone for it (an image and its XML share their name)"
    with pytest.raises(DatasetError, match=r"gone\.xml: no image named gone"):
        build_dataset(root, "train", strict=True)


def test_folder_without_any_xml_says_where_it_looked(tmp_path):
    root = tmp_path / "data"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(root / "images" / "train" / f"{name}.jpg")
        (root / "labels" / "train" / f"{name}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/train\nnames: [x]\n")
    with pytest.raises(DatasetError) as info:
        build_dataset(root, "train")
    message = str(info.value)
    assert message.startswith(f"{root / 'images' / 'train'}: no VOC XML file for any of its 2 image(s)")
    assert (
        str(root / "images" / "train" / "a.xml") in message
        and str(root / "labels" / "train" / "a.xml") in message
    )
    assert "a.txt looks like a YOLO label file" in message and f"give {root / 'data.yaml'} itself" in message


def test_empty_folder_and_loose_images_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no image files found .*not a data set m2det can read"):
        build_dataset(tmp_path / "empty")
    root = write_flat(tmp_path / "mixed", 2)
    write_flat(root / "train", 2)
    with pytest.raises(
        DatasetError, match=r"mixed: 2 image\(s\) \(img000.png, ...\) lie beside the split folders train"
    ):
        build_dataset(root)


def test_cli_trains_evaluates_and_browses_an_image_folder(bccd_root, tmp_path, one_thread, caplog):
    root = lay_out(bccd_root, tmp_path / "photos", {"train": "images/train", "test": "images/test"})
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n  preset: m2det_tiny\n  input_size: 64\n  backbone: {width: 16}\n"
        "  mlfpn: {num_scales: 3, planes: 32, shallow_out: 32, deep_out: 64}\n"
        "  anchors: {steps: null, size_pattern: [0.2, 0.4, 0.7, 1.0]}\n"
    )
    args = ["train", "--data", str(root), "--config", str(config), "--device", "cpu", "--quiet"]
    args += ["--set", "train.epochs=1", "--set", "train.batch_size=2", "--set", "train.workers=0"]
    args += ["--set", "train.lr=1e-3", "--project", str(tmp_path / "runs")]
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        trained = CliRunner().invoke(app, args)
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "exp1"
    assert "no val folder: validating on test" in caplog.text and (run / "last.safetensors").is_file()

    out = tmp_path / "eval"
    evaluated = CliRunner().invoke(
        app, ["eval", "--data", str(root), "--split", "test", "--weights", str(run / "last.safetensors"),
              "--out", str(out), "--device", "cpu"],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert (out / "metrics.json").is_file()

    look = tmp_path / "look"
    browsed = CliRunner().invoke(
        app, ["browse-data", str(root), "--num", "2", "--out", str(look), "--size", "64"]
    )
    assert browsed.exit_code == 0, browsed.output
    assert f"{root} [train]: {len(bccd_ids(bccd_root, 'train'))} images" in browsed.output
    assert len(list(look.glob("*.png"))) == 2

"""The generated shapes data set: valid COCO, pixel-tight boxes, occlusion, determinism, knobs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2det.data import synthetic
from m2det.data.synthetic import ShapesConfig, generate_shapes_dataset, render_sample

# flat backgrounds, no clutter, lossless files: every pixel is either background or one object
PLAIN = {"backgrounds": ("flat",), "clutter": 0, "image_format": "png"}


def quiet_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def annotations_by_image(path: Path) -> dict[int, list[dict]]:
    data = json.loads(path.read_text())
    out: dict[int, list[dict]] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_writes_valid_coco(tmp_path):
    config = ShapesConfig(seed=1)
    paths = generate_shapes_dataset(tmp_path / "shapes", 8, 4, config)
    assert not paths.reused and paths.class_names == config.classes
    for split, count in ((paths.train, 8), (paths.val, 4)):
        assert split.annotations == tmp_path / "shapes" / split.annotations.parent.name / "annotations.json"
        coco = quiet_coco(split.annotations)
        assert sorted(coco.getImgIds()) == list(range(1, count + 1))
        categories = coco.loadCats(coco.getCatIds())
        assert [(c["id"], c["name"]) for c in categories] == list(enumerate(config.classes, start=1))
        for image in coco.dataset["images"]:
            assert read_rgb(split.images / image["file_name"]).shape == (config.height, config.width, 3)
        assert coco.dataset["annotations"], "expected some objects"
        for ann in coco.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(config.classes)
            assert x >= 0 and y >= 0 and x + w <= config.width and y + h <= config.height
            assert 0 < ann["area"] <= w * h
        # the ground truth scored against itself is perfect: the file is what pycocotools expects
        detections = [{**ann, "score": 1.0} for ann in coco.dataset["annotations"]]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0)


def test_boxes_are_the_connected_pixels_of_each_object(tmp_path):
    # objects never overlap (occlusion 0, 2-pixel gaps): each is one connected blob in the image file
    config = ShapesConfig(occlusion=0.0, objects_per_image=(3, 6), seed=2, **PLAIN)
    paths = generate_shapes_dataset(tmp_path / "shapes", 10, 1, config)
    by_image = annotations_by_image(paths.train.annotations)
    for image_id, anns in by_image.items():
        image = read_rgb(paths.train.images / f"{image_id - 1:06d}.png")
        colors, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        background = colors[np.argmax(counts)]
        foreground = (image != background).any(axis=2).astype(np.uint8)
        num, _, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
        found = sorted(tuple(int(v) for v in row) for row in stats[1:num])  # x, y, w, h, area
        expected = sorted((*(int(v) for v in a["bbox"]), int(a["area"])) for a in anns)
        assert found == expected


def test_occluded_boxes_enclose_what_stays_visible(tmp_path):
    config = ShapesConfig(occlusion=1.0, objects_per_image=(4, 8), size_range=(0.1, 0.5), seed=3, **PLAIN)
    paths = generate_shapes_dataset(tmp_path / "shapes", 12, 1, config)
    by_image = annotations_by_image(paths.train.annotations)
    partly_hidden = overlapping = 0
    for image_id, anns in by_image.items():
        sample = render_sample(config, "train", image_id - 1)
        image = read_rgb(paths.train.images / f"{image_id - 1:06d}.png")
        assert np.array_equal(image, sample.image)
        # placement never hides too much, so without clutter in front every drawn object is annotated
        assert len(anns) == len(sample.annotations) == len(sample.objects)
        for ann, obj in zip(anns, sample.annotations):
            # the pixels of exactly this object's colour, found in the file, not in the bookkeeping
            ys, xs = np.nonzero((image == obj.color).all(axis=2))
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
            assert ann["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
            assert ann["area"] == len(xs) == obj.visible_area
            assert ann["category_id"] == obj.label
            assert obj.visible_area >= config.min_visible * obj.full_area
            partly_hidden += obj.visible_area < obj.full_area
        boxes = np.array([a["bbox"] for a in anns], dtype=float)
        for i in range(len(boxes)):
            for j in range(i):
                overlapping += bool(
                    boxes[i, 0] < boxes[j, 0] + boxes[j, 2]
                    and boxes[j, 0] < boxes[i, 0] + boxes[i, 2]
                    and boxes[i, 1] < boxes[j, 1] + boxes[j, 3]
                    and boxes[j, 1] < boxes[i, 1] + boxes[i, 3]
                )
    assert partly_hidden >= 5 and overlapping >= 5


def test_objects_hidden_by_clutter_are_dropped():
    config = ShapesConfig(clutter=12, min_visible=0.97, occlusion=0.0, objects_per_image=(4, 6), seed=4)
    dropped = kept = 0
    for index in range(25):
        sample = render_sample(config, "train", index)
        for k, obj in enumerate(sample.objects):
            assert obj.visible_area == int((sample.owner == k).sum())
            assert obj.annotated == (obj.visible_area >= 0.97 * obj.full_area)
            dropped += not obj.annotated
            kept += obj.annotated
    assert dropped > 0 and kept > 0


def test_same_seed_same_bytes(tmp_path):
    config = ShapesConfig(seed=5)
    a = generate_shapes_dataset(tmp_path / "a", 6, 3, config)
    b = generate_shapes_dataset(tmp_path / "b", 6, 3, config)
    assert tree_digest(a.root) == tree_digest(b.root)
    # an image depends on its seed and index only, not on how many images the split holds
    c = generate_shapes_dataset(tmp_path / "c", 4, 1, config)
    assert (c.train.images / "000003.jpg").read_bytes() == (a.train.images / "000003.jpg").read_bytes()
    d = generate_shapes_dataset(tmp_path / "d", 6, 3, ShapesConfig(seed=6))
    assert a.train.annotations.read_bytes() != d.train.annotations.read_bytes()
    # the two splits are different images
    assert (a.train.images / "000000.jpg").read_bytes() != (a.val.images / "000000.jpg").read_bytes()


def test_reuses_identical_generation_and_replaces_others(tmp_path):
    out = tmp_path / "shapes"
    config = ShapesConfig(seed=7)
    generate_shapes_dataset(out, 3, 2, config)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = generate_shapes_dataset(out, 3, 2, ShapesConfig(seed=7))
    assert again.reused and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    changed = generate_shapes_dataset(out, 3, 2, ShapesConfig(seed=7, clutter=0))
    assert not changed.reused
    assert json.loads((out / "generation.json").read_text())["config"]["clutter"] == 0
    assert not generate_shapes_dataset(out, 4, 2, ShapesConfig(seed=7, clutter=0)).reused
    assert len(list((out / "train" / "images").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no staging left behind

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a generated shapes data set"):
        generate_shapes_dataset(foreign, 2, 1, config)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_failed_generation_leaves_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    generate_shapes_dataset(out, 3, 1, ShapesConfig(seed=8))
    before = tree_digest(out)
    calls = []

    def failing(config, split, index):
        calls.append(index)
        if len(calls) > 2:
            raise RuntimeError("disk full")
        return render_sample(config, split, index)

    monkeypatch.setattr(synthetic, "render_sample", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_shapes_dataset(out, 3, 1, ShapesConfig(seed=9))
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]


# ----- knobs -----


def test_image_size_classes_and_counts():
    knobs = {"objects_per_image": (4, 4), "size_range": (0.1, 0.15), "occlusion": 0.0, "seed": 10}
    config = ShapesConfig(width=200, height=120, classes=("star", "hexagon"), **knobs)
    for index in range(5):
        sample = render_sample(config, "val", index)
        assert sample.image.shape == (120, 200, 3)
        assert len(sample.annotations) == 4  # small objects always find room
        assert {obj.label for obj in sample.objects} <= {1, 2}
    labels = {obj.label for i in range(5) for obj in render_sample(config, "val", i).objects}
    assert labels == {1, 2}
    empty = ShapesConfig(objects_per_image=(0, 0))
    assert all(not render_sample(empty, "train", i).objects for i in range(3))


@pytest.mark.parametrize("size_range", [(0.05, 0.1), (0.3, 0.45)])
def test_size_range(size_range):
    config = ShapesConfig(size_range=size_range, occlusion=0.0, clutter=0, seed=11)
    side = min(config.width, config.height)
    extents = [
        max(x1 - x0 + 1, y1 - y0 + 1)
        for i in range(10)
        for x0, y0, x1, y1 in (obj.box for obj in render_sample(config, "train", i).annotations)
    ]
    assert extents
    # the extent of a shape inscribed in a circle of that diameter: at least a square's side (0.71)
    assert min(extents) >= 0.7 * size_range[0] * side - 1
    assert max(extents) <= size_range[1] * side + 2


def test_occlusion_zero_keeps_objects_apart():
    config = ShapesConfig(occlusion=0.0, objects_per_image=(6, 8), seed=12)
    for index in range(10):
        boxes = [obj.box for obj in render_sample(config, "train", index).objects]
        for i in range(len(boxes)):
            for j in range(i):
                a, b = boxes[i], boxes[j]
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_clutter_and_backgrounds():
    def background_colors(config: ShapesConfig, index: int) -> int:
        sample = render_sample(config, "train", index)
        pixels = sample.image[sample.owner < 0].astype(np.int32)
        return len(np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2]))

    flat = ShapesConfig(backgrounds=("flat",), clutter=0, seed=13)
    assert all(background_colors(flat, i) == 1 for i in range(5))
    cluttered = ShapesConfig(backgrounds=("flat",), clutter=6, seed=13)
    assert sum(background_colors(cluttered, i) > 1 for i in range(5)) >= 4
    noisy = ShapesConfig(backgrounds=("noise",), clutter=0, seed=13)
    assert all(background_colors(noisy, i) > 1000 for i in range(3))
    for style in ("gradient", "texture"):
        assert background_colors(ShapesConfig(backgrounds=(style,), clutter=0, seed=13), 0) > 20


def test_config_checks_and_lists():
    config = ShapesConfig(classes=["circle", "star"], size_range=[0.1, 0.2])  # as read from YAML
    assert config.classes == ("circle", "star") and hash(config)
    for field_name, value in [
        ("classes", ("blob",)),
        ("classes", ("circle", "circle")),
        ("size_range", (0.5, 0.1)),
        ("objects_per_image", (3, 1)),
        ("occlusion", 2.0),
        ("min_visible", 0.0),
        ("backgrounds", ("plaid",)),
        ("image_format", "gif"),
        ("size_range", 0.5),
    ]:
        with pytest.raises(ValueError, match=field_name):
            ShapesConfig(**{field_name: value})
    with pytest.raises(ValueError, match="split"):
        render_sample(ShapesConfig(), "test", 0)

"""Augmentation keeps boxes on their objects, follows the official semantics, and repeats under a seed."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

from m2det.data import (
    MEAN_FILL_RGB,
    AugmentSettings,
    PhotometricDistort,
    SSDRandomCrop,
    SSDZoomOut,
    build_eval_transform,
    build_loader,
    build_train_transform,
    collate_fn,
)

# One pure colour per box; labels 1..3 index this list.
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
# Identity colour distortion (same random draws as the real one) so colours can be traced.
NO_COLOUR = AugmentSettings(
    brightness_delta=0.0, contrast_range=(1.0, 1.0), hue_delta=0, saturation_range=(1.0, 1.0)
)


def painted_sample(height: int = 180, width: int = 240) -> tuple[tv_tensors.Image, dict]:
    """Black image with three filled rectangles of unique colours, and their boxes."""
    boxes = torch.tensor([[20, 30, 100, 110], [130, 20, 220, 80], [120, 100, 200, 170]], dtype=torch.float32)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for box, colour in zip(boxes.int().tolist(), COLOURS):
        image[:, box[1] : box[3], box[0] : box[2]] = colour[:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([1, 2, 3]),
        "iscrowd": torch.zeros(3, dtype=torch.bool),
        "image_id": 7,
    }
    return tv_tensors.Image(image), target


def colour_extent(image: torch.Tensor, colour: torch.Tensor, tolerance: int = 60) -> list[int]:
    """[x1, y1, x2, y2] of the pixels close to `colour` (continuous pixel edges)."""
    distance = (image.int() - colour.int()[:, None, None]).abs().amax(dim=0)
    ys, xs = torch.nonzero(distance <= tolerance, as_tuple=True)
    assert len(xs), "colour region vanished"
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def assert_boxes_on_colours(image, target, tolerance_px: float) -> None:
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        extent = colour_extent(image, COLOURS[label - 1])
        assert max(abs(a - b) for a, b in zip(extent, box)) <= tolerance_px, (label, box, extent)


def test_flip_moves_boxes_with_their_pixels():
    image, target = painted_sample()
    out_image, out_target = v2.RandomHorizontalFlip(p=1.0)(image, target)
    assert_boxes_on_colours(out_image, out_target, tolerance_px=0)
    assert out_target["boxes"][0].tolist() == [240 - 100, 30, 240 - 20, 110]


@pytest.mark.parametrize("seed", range(6))
def test_crop_keeps_boxes_on_their_pixels_and_drops_outside_centres(seed):
    image, target = painted_sample()
    torch.manual_seed(seed)
    out_image, out_target = v2.Compose(
        [SSDRandomCrop(), v2.SanitizeBoundingBoxes(labels_getter=lambda s: (s[1]["labels"], s[1]["iscrowd"]))]
    )(image, target)
    assert len(out_target["boxes"]) >= 1 and len(out_target["labels"]) == len(out_target["iscrowd"]) == len(
        out_target["boxes"]
    )
    assert_boxes_on_colours(out_image, out_target, tolerance_px=0)
    assert tuple(out_target["boxes"].canvas_size) == tuple(out_image.shape[-2:])


def test_crop_window_meets_the_official_rules():
    """Every box (not just one) overlaps the window by the minimum IoU; area s^2 with s >= 0.3; aspect in [1/2, 2]."""
    _, target = painted_sample()
    crop = SSDRandomCrop(min_ious=(0.1,))
    torch.manual_seed(0)
    for _ in range(40):
        params = crop.make_params([target["boxes"]])
        window = torch.tensor(
            [
                [
                    params["left"],
                    params["top"],
                    params["left"] + params["width"],
                    params["top"] + params["height"],
                ]
            ],
            dtype=torch.float32,
        )
        assert box_iou(target["boxes"], window).min() >= 0.1
        fw, fh = params["width"] / 240, params["height"] / 180
        assert 0.3**2 - 0.02 <= fw * fh <= 1.0 and 0.5 - 0.03 <= fw / fh <= 2.0 + 0.03
        centres = (target["boxes"][:, :2] + target["boxes"][:, 2:]) / 2
        inside = (centres > window[0, :2]).all(1) & (centres < window[0, 2:]).all(1)
        assert torch.equal(params["is_within_crop_area"], inside)
    assert (
        crop.make_params([tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(9, 9))])
        == {}
    )


@pytest.mark.parametrize("seed", range(4))
def test_zoom_out_places_image_on_mean_colour_canvas(seed):
    image, target = painted_sample()
    torch.manual_seed(seed)
    out_image, out_target = SSDZoomOut(fill=MEAN_FILL_RGB, side_range=(1.0, 4.0), p=1.0)(image, target)
    height, width = out_image.shape[-2:]
    assert 180 <= height <= 4 * 180 * 2**0.5 and 240 <= width <= 4 * 240 * 2**0.5
    left, top = (out_target["boxes"][0, :2] - target["boxes"][0, :2]).int().tolist()
    assert torch.equal(out_image[:, top : top + 180, left : left + 240], image)
    canvas = out_image.clone()
    canvas[:, top : top + 180, left : left + 240] = torch.tensor(MEAN_FILL_RGB, dtype=torch.uint8)[
        :, None, None
    ]
    assert (canvas == torch.tensor(MEAN_FILL_RGB, dtype=torch.uint8)[:, None, None]).all()
    assert_boxes_on_colours(out_image, out_target, tolerance_px=0)


def test_zoom_out_jitters_the_aspect_like_the_official_expand():
    zoom = SSDZoomOut(fill=MEAN_FILL_RGB, side_range=(1.0, 4.0), p=1.0)
    image = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))
    torch.manual_seed(0)
    aspects = []
    for _ in range(50):
        left, top, right, bottom = zoom.make_params([image])["padding"]
        fw, fh = (100 + left + right) / 100, (100 + top + bottom) / 100
        assert fw >= 1 and fh >= 1 and fw * fh <= 16.0 + 1e-6 and 0.5 - 0.02 <= fw / fh <= 2.0 + 0.02
        aspects.append(fw / fh)
    assert max(aspects) > 1.2 and min(aspects) < 1 / 1.2  # v2.RandomZoomOut would keep it at 1


@pytest.mark.parametrize("seed", range(8))
def test_full_pipeline_keeps_boxes_on_their_objects(seed):
    image, target = painted_sample()
    torch.manual_seed(seed)
    out_image, out_target = build_train_transform(160, NO_COLOUR)(image, target)
    assert out_image.shape == (3, 160, 160) and out_image.dtype == torch.uint8
    assert (
        isinstance(out_target["boxes"], tv_tensors.BoundingBoxes)
        and out_target["boxes"].dtype == torch.float32
    )
    assert tuple(out_target["boxes"].canvas_size) == (160, 160) and out_target["image_id"] == 7
    assert len(out_target["boxes"]) >= 1
    assert_boxes_on_colours(out_image, out_target, tolerance_px=2.5)
    sides = out_target["boxes"][:, 2:] - out_target["boxes"][:, :2]
    assert (sides >= 0.01 * 160).all()


def test_same_seed_same_sample_and_seeds_differ():
    image, target = painted_sample()
    transform = build_train_transform(96)
    results = []
    for seed in (3, 3, 4, 5):
        torch.manual_seed(seed)
        results.append(transform(image, target))
    (a, ta), (b, tb) = results[0], results[1]
    assert (
        torch.equal(a, b)
        and torch.equal(ta["boxes"], tb["boxes"])
        and torch.equal(ta["labels"], tb["labels"])
    )
    assert any(not torch.equal(a, other) for other, _ in results[2:])


def test_photometric_steps_match_the_official_arithmetic():
    distort = PhotometricDistort()
    image = tv_tensors.Image(torch.tensor([[[250, 10]], [[0, 100]], [[0, 40]]], dtype=torch.uint8))
    none = {"brightness": None, "contrast": None, "hue": None, "saturation": None}
    brighter = distort.transform(image, {**none, "brightness": 10.5})
    assert brighter.tolist() == [[[255, 20]], [[10, 110]], [[10, 50]]]  # added, clipped, truncated
    assert distort.transform(image, {**none, "contrast": 1.5}).tolist() == [
        [[255, 15]],
        [[0, 150]],
        [[0, 60]],
    ]
    red = tv_tensors.Image(
        torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None].expand(3, 2, 2).clone()
    )
    # OpenCV hue units are 2 degrees: +30 turns red (0 deg) into yellow (60 deg)
    assert distort.transform(red, {**none, "hue": 30})[:, 0, 0].tolist() == [255, 255, 0]
    assert distort.transform(red, {**none, "hue": -60})[:, 0, 0].tolist() == [0, 0, 255]  # wraps at 180
    pale = distort.transform(red, {**none, "saturation": 0.5})[:, 0, 0].tolist()
    assert pale[0] == 255 and abs(pale[1] - 128) <= 1 and pale[1] == pale[2]
    assert isinstance(brighter, tv_tensors.Image)


def test_photometric_draws_official_ranges():
    distort = PhotometricDistort()
    torch.manual_seed(0)
    draws = [distort.make_params([]) for _ in range(400)]
    for key, low, high in (
        ("brightness", -32, 32),
        ("contrast", 0.5, 1.5),
        ("hue", -18, 18),
        ("saturation", 0.5, 1.5),
    ):
        values = [d[key] for d in draws if d[key] is not None]
        assert 0.4 < len(values) / len(draws) < 0.6
        assert low <= min(values) and max(values) <= high
    assert all(isinstance(d["hue"], int) for d in draws if d["hue"] is not None)


def test_boxes_that_all_vanish_fall_back_to_the_resized_image():
    image = tv_tensors.Image(torch.zeros(3, 400, 400, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[100.0, 100.0, 102.0, 102.0]]), format="XYXY", canvas_size=(400, 400)
        ),
        "labels": torch.tensor([1]),
        "iscrowd": torch.tensor([False]),
    }
    torch.manual_seed(0)
    out_image, out_target = build_train_transform(100)(image, target)
    assert out_image.shape == (3, 100, 100)
    assert out_target["boxes"].tolist() == [[25.0, 25.0, 25.5, 25.5]] and out_target["labels"].tolist() == [1]


def test_eval_transform_only_resizes():
    image, target = painted_sample()
    out_image, out_target = build_eval_transform(120)(image, target)
    assert out_image.shape == (3, 120, 120) and out_image.dtype == torch.uint8
    assert torch.allclose(
        out_target["boxes"], target["boxes"] * torch.tensor([0.5, 120 / 180, 0.5, 120 / 180])
    )
    assert out_target["labels"].tolist() == [1, 2, 3]


def test_collate_stacks_and_refuses_mixed_sizes():
    image, target = painted_sample()
    resize = build_eval_transform(64)
    images, targets = collate_fn([resize(image, target), resize(image, target)])
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8 and type(images) is torch.Tensor
    assert len(targets) == 2 and targets[1]["labels"].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="one size"):
        collate_fn([(image, target), resize(image, target)])


class PaintedDataset(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transform(*painted_sample(60 + 10 * index, 80))


def test_loader_with_workers_repeats_under_seed_and_varies_by_epoch():
    dataset = PaintedDataset(build_train_transform(48))

    def epochs(seed):
        loader = build_loader(dataset, batch_size=2, shuffle=True, num_workers=2, seed=seed)
        return [torch.cat([images for images, _ in loader]) for _ in range(2)]

    first, again = epochs(1), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_settings_are_checked_by_field_name():
    assert AugmentSettings(fill=[1, 2, 3], crop_min_ious=[None, 0.5]).fill == (1, 2, 3)
    with pytest.raises(ValueError, match="expand_probability"):
        AugmentSettings(expand_probability=1.5)
    with pytest.raises(ValueError, match="contrast_range"):
        AugmentSettings(contrast_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="fill"):
        AugmentSettings(fill=(0, 0))

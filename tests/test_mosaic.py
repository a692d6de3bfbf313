"""Mixing training samples: mosaic, mixup, close-mosaic, and multi-scale training."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from m2det.data.transforms import MosaicMixup, mixup, mosaic
from m2det.engine.callbacks import Callback
from m2det.engine.train import Trainer
from m2det.engine.train_config import TrainConfig
from train_helpers import SIZE, ToyBoxes, tiny_model, weights

pytestmark = pytest.mark.usefixtures("one_thread")

S = 100  # the side of the hand-worked tiles


def tile(value: int, boxes: list[list[float]], labels: list[int]):
    """An S x S tile whose pixel (y, x) holds its `value` in channel 0, y in channel 1, x in channel 2."""
    rows = torch.arange(S)[:, None].expand(S, S)
    image = torch.stack([torch.full((S, S), value), rows, rows.T]).to(torch.uint8)
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes).reshape(-1, 4), format="XYXY", canvas_size=(S, S)
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "iscrowd": torch.zeros(len(labels), dtype=torch.bool),
        "image_id": value,
    }
    return tv_tensors.Image(image), target


def test_mosaic_by_hand():
    samples = [
        # top-left part [0, 40) x [0, 30) shows the tile's bottom-right corner: shift (-60, -70)
        tile(10, [[70, 80, 90, 95], [0, 0, 50, 50], [50, 60, 70, 80]], [1, 2, 3]),
        # top-right part [40, 100) x [0, 30): shift (40, -70)
        tile(20, [[0, 80, 30, 100]], [4]),
        # bottom-left part [0, 40) x [30, 100): shift (-60, 30)
        tile(30, [[55, 0, 95, 20]], [5]),
        # bottom-right part [40, 100) x [30, 100): shift (40, 30)
        tile(40, [], []),
    ]
    image, target = mosaic(samples, centre=(40, 30), min_visible=0.25, min_size=2.0)
    assert image.shape == (3, S, S) and image.dtype == torch.uint8
    # every pixel comes from the right tile, at the right place in it
    for (x0, y0, x1, y1), value, (dx, dy) in [
        ((0, 0, 40, 30), 10, (-60, -70)),
        ((40, 0, 100, 30), 20, (40, -70)),
        ((0, 30, 40, 100), 30, (-60, 30)),
        ((40, 30, 100, 100), 40, (40, 30)),
    ]:
        assert (image[0, y0:y1, x0:x1] == value).all()
        assert (image[1, y0:y1, x0:x1] == torch.arange(y0 - dy, y1 - dy)[:, None]).all()
        assert (image[2, y0:y1, x0:x1] == torch.arange(x0 - dx, x1 - dx)[None, :]).all()
    # tile 0: [70, 80, 90, 95] -> [10, 10, 30, 25], whole; [0, 0, 50, 50] -> [-60, -70, -10, -20]:
    # outside; [50, 60, 70, 80] -> [-10, -10, 10, 10], clipped to [0, 0, 10, 10]: 100 of 400 px kept
    # tile 1: [0, 80, 30, 100] -> [40, 10, 70, 30], whole
    # tile 2: [55, 0, 95, 20] -> [-5, 30, 35, 50], clipped to [0, 30, 35, 50]: 700 of 800 px
    assert target["boxes"].tolist() == [[10, 10, 30, 25], [0, 0, 10, 10], [40, 10, 70, 30], [0, 30, 35, 50]]
    assert target["labels"].tolist() == [1, 3, 4, 5] and target["iscrowd"].tolist() == [False] * 4
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].canvas_size == (S, S)
    assert target["image_id"] == 10
    # a stricter visibility drops the quarter-visible box
    _, strict = mosaic(samples, centre=(40, 30), min_visible=0.3)
    assert strict["labels"].tolist() == [1, 4, 5]
    with pytest.raises(ValueError, match="inside"):
        mosaic(samples, centre=(0, 30))


def test_mixup_blends_and_keeps_the_labels_of_both():
    first, second = tile(100, [[1, 2, 30, 40]], [1]), tile(200, [[50, 50, 90, 70], [0, 0, 10, 10]], [2, 3])
    image, target = mixup(first, second, 0.25)
    assert (image[0] == 175).all()  # 0.25 * 100 + 0.75 * 200
    assert target["boxes"].tolist() == [[1, 2, 30, 40], [50, 50, 90, 70], [0, 0, 10, 10]]
    assert target["labels"].tolist() == [1, 2, 3] and len(target["iscrowd"]) == 3


def test_mosaic_mixup_dataset_samples_and_its_switch():
    data = ToyBoxes(8)
    mixed = MosaicMixup(data, mosaic=1.0, mixup=1.0)
    assert len(mixed) == 8 and mixed.class_names == data.class_names
    torch.manual_seed(0)
    image, target = mixed[3]
    boxes = target["boxes"]
    assert image.shape == (3, SIZE, SIZE) and len(boxes) == len(target["labels"]) > 2
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= SIZE).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    torch.manual_seed(0)
    again_image, again = mixed[3]
    assert torch.equal(again_image, image) and torch.equal(again["boxes"], boxes)  # the seed fixes it
    mixed.enabled = False
    plain_image, plain = mixed[3]
    assert torch.equal(plain_image, data[3][0]) and torch.equal(plain["boxes"], data[3][1]["boxes"])
    with pytest.raises(ValueError, match=r"MosaicMixup.mixup must be a probability"):
        MosaicMixup(data, mixup=2.0)


# ----- in the trainer -----
def _config(**overrides) -> TrainConfig:
    base = dict(
        epochs=3, batch_size=4, lr=0.02, warmup_epochs=1, milestones=[], workers=0, eval_every=0, log_every=1
    )
    return TrainConfig(**{**base, **overrides}).validate()


class Seen(Callback):
    """What each epoch trained with: whether samples were mixed, and the input size of every step."""

    def __init__(self, model) -> None:
        self.mixing: list[bool] = []
        self.sizes: list[int] = []
        model.backbone.register_forward_pre_hook(lambda _, inputs: self.sizes.append(inputs[0].shape[-1]))

    def on_epoch_start(self, run):
        self.mixing.append(run.train_set.enabled)


def test_close_mosaic_and_multiscale_in_the_trainer(tmp_path):
    config = _config(mosaic=1.0, mixup=0.5, close_mosaic=1, multiscale_sizes=[64, 96, 128])
    model = tiny_model()
    seen = Seen(model)
    result = Trainer(
        model, config, ToyBoxes(8), run_dir=tmp_path / "whole", device="cpu", progress=False, callbacks=[seen]
    ).fit()
    assert result.finished
    assert seen.mixing == [True, True, False]  # the last epoch sees plain samples
    assert set(seen.sizes) <= {64, 96, 128} and len(set(seen.sizes)) > 1 and len(seen.sizes) == 6
    # a resumed run mixes, sizes and ends the same
    first = tiny_model()
    Trainer(first, config, ToyBoxes(8), run_dir=tmp_path / "split", device="cpu", progress=False).fit(
        stop_at_epoch=2
    )
    resumed = tiny_model(seed=4)
    again = Seen(resumed)
    Trainer(
        resumed,
        config,
        ToyBoxes(8),
        run_dir=tmp_path / "split",
        device="cpu",
        progress=False,
        callbacks=[again],
    ).fit(resume=True)
    assert again.mixing == [False] and again.sizes == seen.sizes[4:]
    assert all(torch.equal(v, weights(model)[k]) for k, v in weights(resumed).items())


def test_mixing_settings_are_checked(tmp_path):
    with pytest.raises(
        ValueError, match=r"train.multiscale_sizes must be a list of input sizes that are multiples of 32"
    ):
        _config(multiscale_sizes=[300])
    with pytest.raises(ValueError, match=r"train.mosaic must be a probability"):
        _config(mosaic=1.5)
    with pytest.raises(ValueError, match=r"train.close_mosaic must be a number of epochs"):
        _config(close_mosaic=-1)
    model = tiny_model()
    trainer = Trainer(
        model,
        _config(multiscale_sizes=[32]),
        ToyBoxes(8),
        run_dir=tmp_path / "run",
        device="cpu",
        progress=False,
    )
    with pytest.raises(ValueError, match=r"train.multiscale_sizes: input size 32 is too small"):
        trainer.fit()
    assert not (tmp_path / "run").exists()

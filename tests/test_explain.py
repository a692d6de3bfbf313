"""Fig. 6 as a tool: `m2det.explain` and `m2det explain` on tiny models whose answer is known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import m2det
from m2det.analysis import explain, reduce_levels
from m2det.boxes.postprocess import get_settings
from m2det.cli.main import app
from m2det.errors import M2DetError
from m2det.inference.pipeline import DetectionPipeline
from m2det.models.loading import load_model
from m2det.models.m2det import pyramid_sizes
from train_helpers import tiny_model

PLANES = 8
HEIGHT, WIDTH = 48, 80  # not square: the maps are stretched over the image, x and y differently


def explain_model(levels: int = 3, sfam: bool = False, seed: int = 0) -> m2det.M2Det:
    overrides = {
        "mlfpn.planes": PLANES,
        "mlfpn.num_levels": levels,
        "mlfpn.sfam": sfam,
        "mlfpn.sfam_reduction": 4,
    }
    return tiny_model(class_names=["red", "green"], seed=seed, **overrides).eval()


def random_image(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def block_values() -> list[float]:
    """The forced channel block: channel c of the level fires with (c + 1) / PLANES."""
    return [(c + 1) / PLANES for c in range(PLANES)]


EXPECTED = {
    "l2": math.sqrt(sum(v * v for v in block_values())),
    "mean": sum(block_values()) / PLANES,
    "max": max(block_values()),
}


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("reduction", ["l2", "mean", "max"])
def test_only_the_forced_level_fires_where_it_was_forced(levels, reduction, one_thread):
    model = explain_model(levels)
    sizes = pyramid_sizes(model.config)
    scale, level = 1, levels - 1
    side = sizes[scale]
    assert side >= 3, sizes  # room for a 2x2 region away from the first cell
    rows, cols = (1, 3), (side - 2, side)

    def force(module, args, output):
        """The head's inputs are zero but for one level's channels on one region of one scale."""
        forced = [torch.zeros_like(f) for f in output]
        values = torch.tensor(block_values()).reshape(1, PLANES, 1, 1)
        forced[scale][:, level * PLANES : (level + 1) * PLANES, rows[0] : rows[1], cols[0] : cols[1]] = values
        return forced

    handle = model.mlfpn.register_forward_hook(force)
    try:
        found = explain(model, random_image(), reduction=reduction, score_threshold=0.0)
    finally:
        handle.remove()
    assert found.num_scales == 3 and found.num_levels == levels
    assert [tuple(a.shape) for a in found.activation] == [(levels, f, f) for f in sizes]
    expected = torch.zeros(side, side)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = EXPECTED[reduction]
    for s, maps in enumerate(found.activation):
        for k in range(levels):
            want = expected if (s, k) == (scale, level) else torch.zeros_like(maps[k])
            torch.testing.assert_close(maps[k], want, rtol=1e-6, atol=1e-7, msg=f"scale {s} level {k}")
    peak = found.peak(scale, level)
    assert (peak.row, peak.col) == (rows[0], cols[0])  # the first of the tied cells, row-major
    # without the official steps a cell's anchors sit at its centre
    assert peak.x == pytest.approx((cols[0] + 0.5) / side * WIDTH)
    assert peak.y == pytest.approx((rows[0] + 0.5) / side * HEIGHT)
    # a box around the region: "it fires at level `level` of scale `scale`"
    box = [cols[0] / side * WIDTH, rows[0] / side * HEIGHT, cols[1] / side * WIDTH, rows[1] / side * HEIGHT]
    assert found.strongest(box) == (scale, level, pytest.approx(EXPECTED[reduction]))
    # a box elsewhere sees nothing at that scale
    assert float(found.box_activation([0, 0, WIDTH / side, HEIGHT / side])[scale].abs().max()) == 0.0
    # the JSON's per-detection numbers; a diverged model's non-finite box fires nowhere
    found.detections = {
        "boxes": torch.tensor([box, [0.0, 0.0, math.nan, 10.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 2]),
    }
    first, diverged = found.to_dict()["detections"]
    assert (
        first["name"] == "red"
        and first["strongest"]["scale"] == scale
        and first["strongest"]["level"] == level
    )
    assert first["strongest_level_per_scale"][scale] == level
    assert diverged["strongest"] is None and found.strongest(diverged["box"]) is None
    assert all(math.isnan(v) for row in diverged["activation"] for v in row)


def test_the_network_runs_unchanged_and_the_hooks_go(one_thread):
    model = explain_model(sfam=True)
    image = random_image(1)
    found = explain(model, image, score_threshold=0.05)
    plain = DetectionPipeline(model, get_settings("paper").replace(score_threshold=0.05, min_score=0.05))
    want = plain([image])[0]
    assert len(want["boxes"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(found.detections[key], want[key])
    assert not model.head._forward_pre_hooks and not model.mlfpn.sfam._forward_hooks
    # the captured features are the head's input, computed here without any hook
    with torch.inference_mode():
        batch, _ = plain.preprocess([image])
        pyramid = model.mlfpn(*model.backbone(batch))
    assert len(found.activation) == len(pyramid)
    for maps, feature in zip(found.activation, pyramid):
        torch.testing.assert_close(maps, reduce_levels(feature[0], 3), rtol=1e-5, atol=1e-6)


def test_a_model_in_training_mode_runs_in_eval_mode_and_stays_in_training(one_thread):
    model = explain_model()
    evaluated = explain(model, random_image(2))
    model.train()
    again = explain(model, random_image(2))
    assert model.training
    for a, b in zip(evaluated.activation, again.activation):
        assert torch.equal(a, b)


def test_sfam_attention_is_the_modules_sigmoid_weights_averaged_per_level(one_thread):
    model = explain_model(levels=3, sfam=True)
    sfam = model.mlfpn.sfam
    inputs = {}
    handle = sfam.register_forward_pre_hook(lambda module, args: inputs.update(features=args[0]))
    try:
        found = explain(model, random_image(3))
    finally:
        handle.remove()
    assert found.attention is not None and found.attention.shape == (3, 3)
    for scale, (x, fc1, fc2) in enumerate(zip(inputs["features"], sfam.fc1, sfam.fc2)):
        fc1_weight, fc1_bias = fc1.weight.detach()[:, :, 0, 0], fc1.bias.detach()
        fc2_weight, fc2_bias = fc2.weight.detach()[:, :, 0, 0], fc2.bias.detach()
        # Eq. 2 by hand: global average pool, fc (1x1 conv as a matrix), ReLU, fc, sigmoid
        z = x[0].mean(dim=(1, 2))
        hidden = torch.relu(fc1_weight @ z + fc1_bias)
        weights = torch.sigmoid(fc2_weight @ hidden + fc2_bias)
        torch.testing.assert_close(found.channel_attention[scale], weights, rtol=1e-5, atol=1e-6)
        per_level = [float(weights[k * PLANES : (k + 1) * PLANES].mean()) for k in range(3)]
        assert found.attention[scale].tolist() == pytest.approx(per_level, abs=1e-6)
    assert explain(explain_model(sfam=False), random_image(3)).attention is None


def test_explain_takes_a_detector_and_refuses_what_has_no_features(sfam_weights, one_thread):
    detector = m2det.Detector(sfam_weights, settings="official", sizes=[96])
    image = random_image(4)
    found = explain(detector, image)
    assert found.input_size == 96 and found.model_name == "m2det_tiny"
    assert [a.shape[0] for a in found.activation] == [2, 2, 2]
    want = detector(image)
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(found.detections[key], want[key])

    class Exported:  # what an ONNX Runtime network looks like from outside: no modules to hook
        config = detector.network.config

    with pytest.raises(M2DetError, match="inside the PyTorch M2Det, got Exported"):
        explain(Exported(), image)
    with pytest.raises(M2DetError, match="reduction must be one of"):
        explain(detector, image, reduction="median")
    with pytest.raises(M2DetError, match="do not split into num_levels=3"):
        reduce_levels(torch.zeros(10, 2, 2), 3)


@pytest.fixture(scope="module")
def sfam_weights(tmp_path_factory):
    from m2det.io.checkpoint import save_model

    model = explain_model(levels=2, sfam=True, seed=5)
    return save_model(model, tmp_path_factory.mktemp("explain") / "tiny_sfam.safetensors")


def test_cli_writes_the_grid_the_attention_and_the_numbers(tmp_path, bccd_root, sfam_weights, one_thread):
    image = sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["explain", str(image), "--weights", str(sfam_weights), "--out", str(out), "--score", "0.05"]
    )
    assert result.exit_code == 0, result.output
    stem = image.stem
    assert sorted(p.name for p in out.iterdir()) == [
        f"{stem}_activation.png",
        f"{stem}_attention.png",
        f"{stem}_explain.json",
    ]
    for png in out.glob("*.png"):
        with Image.open(png) as picture:
            assert picture.format == "PNG" and min(picture.size) > 200
    data = json.loads((out / f"{stem}_explain.json").read_text())
    width, height = Image.open(image).size
    assert data["image_size"] == [height, width] and data["input_size"] == 64
    assert (data["num_scales"], data["num_levels"], data["sfam"], data["reduction"]) == (3, 2, True, "l2")
    sizes = pyramid_sizes(explain_model(levels=2).config)
    assert [s["size"] for s in data["scales"]] == [[f, f] for f in sizes]
    for scale in data["scales"]:
        assert len(scale["levels"]) == 2 and len(scale["attention"]) == 2
        for level in scale["levels"]:
            x, y = level["argmax_xy"]
            assert 0 <= x <= width and 0 <= y <= height and level["max"] >= level["mean"] >= 0
    # the same numbers as the Python call
    found = explain(load_model(sfam_weights), image, score_threshold=0.05)
    assert len(data["detections"]) == len(found.detections["boxes"]) > 0
    for detection in data["detections"]:
        assert detection["name"] in ("red", "green")
        assert len(detection["activation"]) == 3 and all(len(row) == 2 for row in detection["activation"])
        s, k = detection["strongest"]["scale"], detection["strongest"]["level"]
        assert detection["strongest"]["value"] == max(max(row) for row in detection["activation"])
        assert detection["activation"][s][k] == detection["strongest"]["value"]
    assert f"{len(found.detections['boxes'])} detections" in result.output

    # --scales draws fewer rows: a shorter picture
    fewer = tmp_path / "fewer"
    result = CliRunner().invoke(
        app, ["explain", str(image), "-w", str(sfam_weights), "--out", str(fewer), "--scales", "0"]
    )
    assert result.exit_code == 0, result.output
    with (
        Image.open(fewer / f"{stem}_activation.png") as one,
        Image.open(out / f"{stem}_activation.png") as all_,
    ):
        assert one.size[1] < all_.size[1]


def test_cli_errors_name_what_is_wrong(tmp_path, bccd_root, sfam_weights):
    image = sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0]
    runner = CliRunner()
    cases = [
        (["explain", str(tmp_path / "nope.jpg"), "-w", str(sfam_weights)], "nope.jpg: image file not found"),
        (
            ["explain", str(image), "-w", str(tmp_path / "missing.safetensors")],
            "missing.safetensors: file not found",
        ),
        (
            ["explain", str(image), "-w", str(sfam_weights), "--reduction", "median"],
            "--reduction must be one of",
        ),
        (["explain", str(image), "-w", str(sfam_weights), "--scales", "0,7"], "the model has scales 0..2"),
        (["explain", str(image), "-w", str(sfam_weights), "--scales", "a"], "--scales expects scale indexes"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_without_sfam_no_attention_picture_and_each_row_on_its_own_scale(tmp_path, one_thread):
    from m2det.analysis.figures import plot_attention, save_explanation

    found = explain(explain_model(levels=2), random_image(5), score_threshold=0.5)
    written = save_explanation(found, random_image(5), tmp_path, "noise", normalize="scale", scales=[2, 0])
    assert sorted(written) == ["activation", "json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise_activation.png", "noise_explain.json"]
    data = json.loads(written["json"].read_text())
    assert data["normalize"] == "scale" and data["sfam"] is False
    assert all(scale["attention"] is None for scale in data["scales"])
    with pytest.raises(M2DetError, match="has no SFAM"):
        plot_attention(found, tmp_path / "attention.png")
    with pytest.raises(M2DetError, match="scales must be among 0..2"):
        save_explanation(found, random_image(5), tmp_path, "bad", scales=[3])
    with pytest.raises(M2DetError, match="normalize must be one of"):
        save_explanation(found, random_image(5), tmp_path, "bad", normalize="row")
    assert len(list(tmp_path.iterdir())) == 2  # the refused calls wrote nothing

"""Evaluation and detection sharded over processes (gloo on the CPU, as torchrun would start them):
the same numbers and files as one process, every image once, and detection runs that resume."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from m2det.utils.distributed import ShardSampler, shard, shard_indices

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_worker(rank: int, world_size: int, port: int, args: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from m2det.cli.main import app

    app(args, standalone_mode=False)


def run_cli(args: list[str], processes: int) -> None:
    """`m2det ARGS` in `processes` processes of one gloo group (one: in this process, no group)."""
    if processes == 1:
        from typer.testing import CliRunner

        from m2det.cli.main import app

        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return
    mp.spawn(_cli_worker, args=(processes, _free_port(), args), nprocs=processes, join=True)


def test_shards_cover_every_index_once_without_padding():
    for count in (0, 1, 5, 7, 8):
        for world in (1, 2, 3):
            parts = [list(shard_indices(count, r, world)) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(count))
            assert [len(ShardSampler(count, r, world)) for r in range(world)] == [len(p) for p in parts]
    assert shard(list("abcde"), 1, 2) == ["b", "d"]
    assert list(ShardSampler(3)) == [0, 1, 2]  # outside a group: everything
    with pytest.raises(ValueError, match="does not fit"):
        shard_indices(3, 2, 2)


# ----- evaluation -----
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from m2det.io.checkpoint import save_model
    from m2det.models import build_model

    torch.manual_seed(0)
    model = build_model("m2det_tiny", num_classes=4, class_names=["Platelets", "RBC", "WBC"])
    return save_model(model, tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def scored_coco(bccd_root, tiny_weights, tmp_path_factory):
    """A COCO json over 7 BCCD images whose boxes are some of the tiny random model's own detections,
    moved a little: random weights find nothing real, and this gives AP between 0 and 1 to compare."""
    import warnings

    from m2det.inference.detector import Detector
    from m2det.inference.results import coco_results

    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    files = sorted((bccd_root / "JPEGImages").glob("*.jpg"))[:7]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = Detector(tiny_weights, score_threshold=0.01)
    images, annotations = [], []
    for image_id, path in enumerate(files, start=1):
        (root / "images" / path.name).symlink_to(path)
        result = detector(str(path))
        height, width = (int(v) for v in result["size"]) if "size" in result else (480, 640)
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        found = coco_results(result["boxes"], result["scores"], result["labels"], image_id, [1, 2, 3])
        for det in found[::4]:
            x, y, w, h = (round(v + (3.0 if i < 2 else 0.0), 1) for i, v in enumerate(det["bbox"]))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": det["category_id"],
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
    categories = [{"id": i, "name": n} for i, n in enumerate(["Platelets", "RBC", "WBC"], start=1)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.mark.parametrize("batch", [1, 3])
def test_eval_in_two_processes_equals_one_process(scored_coco, tiny_weights, tmp_path, batch):
    # 7 images: the two shards differ in size. With batches of 1 every image goes through the network
    # alone, as in one process, and everything is identical to the bit. With batches of 3 the
    # processes batch other images together than one process does, and a convolution over another
    # batch can round differently (~1e-7): the boxes may differ in their last digit, the metrics not
    # in the printed ones.
    args = ["eval", "--data", str(scored_coco), "--weights", str(tiny_weights)]
    args += ["--batch", str(batch), "--device", "cpu", "--score", "0.01"]
    run_cli([*args, "--out", str(tmp_path / "one")], 1)
    run_cli([*args, "--out", str(tmp_path / "two")], 2)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["num_images"] == two["num_images"] == 7
    assert two["processes"] == 2 and one["processes"] == 1
    assert 0.05 < one["metrics"]["AP50"] < 0.95, "nothing worth comparing"
    detections = [json.loads((tmp_path / d / "detections.json").read_text()) for d in ("one", "two")]
    assert len(detections[0]) == len(detections[1]) > 100
    if batch == 1:
        assert one["metrics"] == two["metrics"] and one["per_class"] == two["per_class"]
        assert detections[0] == detections[1]
        csv = [(tmp_path / d / "per_class.csv").read_text() for d in ("one", "two")]
        assert csv[0] == csv[1]
    else:
        printed = [{k: f"{v:.4f}" for k, v in m["metrics"].items()} for m in (one, two)]
        assert printed[0] == printed[1]
        for a, b in zip(*detections):
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
            assert a["bbox"] == pytest.approx(b["bbox"], abs=0.011) and a["score"] == pytest.approx(
                b["score"]
            )

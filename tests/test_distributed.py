"""Evaluation and detection sharded over processes (gloo on the CPU, as torchrun would start them):
the same numbers and files as one process, every image once, and detection runs that resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddp_helpers import free_port, join_as_rank
from m2det.utils.distributed import ShardSampler, shard, shard_indices

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli_worker(rank: int, world_size: int, port: int, args: list[str]) -> None:
    join_as_rank(rank, world_size, port)
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
    mp.spawn(_cli_worker, args=(processes, free_port(), args), nprocs=processes, join=True)


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


# ----- detection -----
@pytest.fixture(scope="module")
def photo_folder(bccd_root, tmp_path_factory):
    """7 readable images of three sizes (7 does not divide by 2), one broken file and one text file."""
    import cv2

    folder = tmp_path_factory.mktemp("photos")
    files = sorted((bccd_root / "JPEGImages").glob("*.jpg"))
    for k, path in enumerate(files[:5]):
        (folder / f"img{k}.jpg").symlink_to(path)
    for k, path in enumerate(files[5:7]):
        image = cv2.imread(str(path))
        cv2.imwrite(str(folder / f"small{k}.png"), cv2.resize(image, (200 + 40 * k, 150)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def detect_args(source, weights, out, *extra) -> list[str]:
    return ["detect", str(source), "--weights", str(weights), "--out", str(out), "--score", "0.05",
            "--batch", "2", "--workers", "0", *map(str, extra)]  # fmt: skip


def final_files(out: Path) -> tuple[list, dict]:
    coco = json.loads((out / "results_coco.json").read_text())
    report = json.loads((out / "detections.json").read_text())
    return coco, report


def test_detect_in_two_processes_gives_every_image_once_as_one_process(photo_folder, tiny_weights, tmp_path):
    run_cli(detect_args(photo_folder, tiny_weights, tmp_path / "one", "--batch", "1"), 1)
    run_cli(detect_args(photo_folder, tiny_weights, tmp_path / "two", "--batch", "1"), 2)
    (coco1, report1), (coco2, report2) = final_files(tmp_path / "one"), final_files(tmp_path / "two")
    names = [Path(image["file"]).name for image in report2["images"]]
    assert names == [f"img{k}.jpg" for k in range(5)] + ["small0.png", "small1.png"]  # each once, in order
    assert [image["id"] for image in report2["images"]] == list(range(1, 8))
    assert {Path(s["file"]).name for s in report2["skipped"]} == {"broken.jpg", "notes.txt"}
    assert report1 == report2 and coco1 == coco2 and len(coco1) > 20
    pictures = sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix in (".jpg", ".png"))
    assert pictures == sorted(names)
    assert not list((tmp_path / "two").glob("detections.rank*.jsonl"))  # merged into detections.jsonl
    assert [r["id"] for r in _records(tmp_path / "two") if "id" in r] == list(range(1, 8))


def _records(out: Path) -> list[dict]:
    from m2det.io.jsonfile import read_json_lines

    return read_json_lines(out / "detections.jsonl")


def test_workers_decoding_give_identical_detections(photo_folder, tiny_weights, tmp_path):
    run_cli(detect_args(photo_folder, tiny_weights, tmp_path / "main", "--no-save"), 1)
    run_cli(
        [*detect_args(photo_folder, tiny_weights, tmp_path / "workers", "--no-save"), "--workers", "1"], 1
    )
    for name in ("results_coco.json", "detections.json"):
        assert (tmp_path / "main" / name).read_bytes() == (tmp_path / "workers" / name).read_bytes()
    # resizing before the pipeline (in a worker or not) is what the pipeline itself does on the CPU
    import warnings

    from m2det.inference.detector import Detector
    from m2det.inference.results import detection_records

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector = Detector(tiny_weights, score_threshold=0.05)
    _, report = final_files(tmp_path / "workers")
    by_name = {Path(image["file"]).name: image for image in report["images"]}
    # batches of 2 in file order: [broken.jpg, img0.jpg], [img1.jpg, img2.jpg], ...; compare the same batches
    for pair in (["img1.jpg", "img2.jpg"], ["small0.png", "small1.png"]):
        found = detector.detect([by_name[name]["file"] for name in pair])
        assert [detection_records(r) for r in found] == [by_name[name]["detections"] for name in pair]


KILLER = """
import os, signal, sys
from m2det.inference import runner

after = int(os.environ["KILL_AFTER"])
original = runner.DetectRun._record

def record_then_die(self, *args, **kwargs):
    original(self, *args, **kwargs)
    if self.num_records == after:
        self._records._file.write('{"file": "torn by the kill", "fra')  # a line cut short
        self._records._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

runner.DetectRun._record = record_then_die
from m2det.cli.main import app
app(sys.argv[1:])
"""


def test_a_killed_detect_run_resumes_to_the_same_results(photo_folder, tiny_weights, tmp_path):
    import subprocess
    import sys

    args = detect_args(photo_folder, tiny_weights, tmp_path / "killed")
    env = {**os.environ, "KILL_AFTER": "3", "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "killed" / "detections.json").exists()
    done = [r for r in _records(tmp_path / "killed") if "skipped" not in r]
    assert len(done) == 3  # the torn line is no record
    # again in two processes: the 4 images left (and the broken file) shared out, the 3 done skipped
    run_cli(args, 2)
    run_cli(detect_args(photo_folder, tiny_weights, tmp_path / "whole"), 1)
    assert final_files(tmp_path / "killed") == final_files(tmp_path / "whole")
    assert _records(tmp_path / "killed") == _records(tmp_path / "whole")
    # once more: nothing left to do, the same files
    before = (tmp_path / "killed" / "results_coco.json").read_bytes()
    run_cli(args, 1)
    assert (tmp_path / "killed" / "results_coco.json").read_bytes() == before


def test_resume_refuses_other_settings_and_no_resume_starts_again(photo_folder, tiny_weights, tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app

    out = tmp_path / "out"
    run_cli(detect_args(photo_folder, tiny_weights, out, "--no-save"), 1)
    other = CliRunner().invoke(
        app, [*detect_args(photo_folder, tiny_weights, out, "--no-save"), "--score", "0.5"]
    )
    assert other.exit_code == 2 and "--no-resume" in other.output and "settings" in other.output
    again = CliRunner().invoke(
        app, [*detect_args(photo_folder, tiny_weights, out, "--no-save"), "--score", "0.5", "--no-resume"]
    )
    assert again.exit_code == 0, again.output
    coco, _ = final_files(out)
    assert coco and min(d["score"] for d in coco) >= 0.5


def test_detect_reads_a_list_file_in_its_order(photo_folder, tiny_weights, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{photo_folder / 'small1.png'}\n\n../{tmp_path.name}/missing.jpg\n")
    (tmp_path / "local.jpg").symlink_to(photo_folder / "img0.jpg")
    listing.write_text(listing.read_text() + "local.jpg\n")
    run_cli(detect_args(listing, tiny_weights, tmp_path / "out", "--no-save"), 1)
    _, report = final_files(tmp_path / "out")
    assert [Path(i["file"]).name for i in report["images"]] == ["small1.png", "local.jpg"]
    assert [(Path(s["file"]).name, s["reason"]) for s in report["skipped"]] == [("missing.jpg", "not found")]


# ----- the trainer's validation -----
def _train_worker(rank: int, world_size: int, port: int, out_dir: str, val_file: str) -> None:
    join_as_rank(rank, world_size, port)
    from m2det.data import build_dataset
    from m2det.engine.train import Trainer
    from m2det.engine.train_config import TrainConfig
    from train_helpers import ToyBoxes, tiny_model, weights

    model = tiny_model(seed=0)
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_epochs=0, milestones=[], workers=0,
                         eval_every=1, freeze_bn=True, clip_grad=1.0)  # fmt: skip
    val_set = build_dataset(val_file, keep_ignored=True)
    result = Trainer(model, config, ToyBoxes(count=8), val_set, run_dir=f"{out_dir}/run", device="cpu",
                     progress=False).fit()  # fmt: skip
    Path(out_dir, f"metrics{rank}.json").write_text(json.dumps(result.metrics))
    if rank == 0:
        torch.save(weights(model), f"{out_dir}/final.pt")


def test_the_trainers_validation_in_two_processes_scores_every_image_once(tmp_path):
    from m2det.data import build_dataset
    from m2det.engine.evaluate import evaluate
    from train_helpers import tiny_cli_data, tiny_model

    data, _ = tiny_cli_data(tmp_path, "")
    val_file = str(data.val.annotations)
    mp.spawn(_train_worker, args=(2, free_port(), str(tmp_path), val_file), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and "AP50" in ranks[0]  # every process gets rank 0's numbers
    model = tiny_model(seed=0)
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    alone = evaluate(model, build_dataset(val_file, keep_ignored=True), batch_size=2, progress=False)
    assert alone.num_images == 4  # the validation images, each once
    assert {k: f"{v:.4f}" for k, v in ranks[0].items()} == {k: f"{v:.4f}" for k, v in alone.metrics.items()}


def test_a_second_run_on_a_folder_being_written_is_refused(photo_folder, tiny_weights, tmp_path):
    from typer.testing import CliRunner

    from m2det.cli.main import app
    from m2det.inference.runner import LOCK_FILE
    from m2det.io.lock import FileLock

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / LOCK_FILE):  # as a run still writing there (e.g. orphaned workers) holds it
        refused = CliRunner().invoke(app, detect_args(photo_folder, tiny_weights, out, "--no-save"))
    assert refused.exit_code == 2, refused.output
    assert f"process {os.getpid()}" in refused.output and "another --out" in refused.output
    assert not (out / "detections.jsonl").exists()  # nothing written
    # once the holder is gone, the same command runs
    run_cli(detect_args(photo_folder, tiny_weights, out, "--no-save"), 1)
    assert (out / "results_coco.json").is_file()

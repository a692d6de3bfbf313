"""`m2det ablate`: variants trained alike into one table that its CSV, Markdown, JSON and plot agree
on; a rerun keeps what is finished, continues an interrupted training and retries a failure; other
settings are refused. One real ablation (two tiny variants, seconds of training each, two failing
ones) is shared by the tests of this file."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from m2det.cli.main import app
from m2det.engine.ablate import (
    ABLATION_CSV,
    ABLATION_JSON,
    ABLATION_MD,
    ABLATION_PLOT,
    COLUMNS,
    METRICS,
    AblationSettings,
    VariantSpec,
    read_ablation_file,
    train_command,
)
from m2det.engine.evaluate import evaluate_weights
from m2det.errors import ConfigError
from m2det.models.loading import load_model
from train_helpers import tiny_cli_data

BUDGET_MIN = 0.02  # about a second of training per variant
NAMES = ["tum", "tum_sfam", "odd_planes", "missing_weights"]


def _command(ablation_file: Path, out: Path, *more: str) -> list[str]:
    return [
        "ablate", "--config", str(ablation_file), "--out", str(out), "--device", "cpu",
        "--set", "train.batch_size=4", "--set", "train.workers=0", "--bench-repeats", "2", "--quiet", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """One ablation run: tum and tum_sfam train; odd_planes fails in its config (planes must be
    even), missing_weights in its training process (a backbone weights file that is not there)."""
    tmp = tmp_path_factory.mktemp("ablate")
    data, base = tiny_cli_data(tmp, "")
    ablation_file = tmp / "ablate.yaml"
    ablation_file.write_text(
        f"data: {data.train.annotations}\nval_data: {data.val.annotations}\nbase: {base.name}\n"
        f"budget: {BUDGET_MIN}\nseed: 3\nvariants:\n  - tum\n  - tum_sfam\n"
        "  - {name: odd_planes, variant: tum, overrides: {mlfpn.planes: 33}}\n"
        "  - {name: missing_weights, variant: tum, overrides: {backbone.weights: /no/such/weights.pth}}\n"
    )
    out = tmp / "out"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread; the training processes too:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        result = CliRunner().invoke(app, _command(ablation_file, out))
    torch.set_num_threads(previous)
    return ablation_file, out, result


def _records(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / ABLATION_JSON).read_text())["records"]}


def test_every_variant_has_a_row_and_the_files_agree(ablation):
    ablation_file, out, result = ablation
    data = str(ablation_file.parent / "shapes" / "val" / "annotations.json")
    assert result.exit_code == 1, result.output  # a variant failed: the command says so
    records = _records(out)
    assert list(records) == NAMES
    assert [records[n]["status"] for n in NAMES] == ["ok", "ok", "failed", "failed"]
    for name in ("tum", "tum_sfam"):
        r = records[name]
        assert all(-1.0 <= r[key] <= 1.0 for key in METRICS)
        # 8 images, batch 4: two steps an epoch, the last epoch cut short by the budget
        assert r["epochs"] >= 1 and 2 * r["epochs"] >= r["steps"] >= 2 * r["epochs"] - 1
        assert r["images_per_s"] > 0 and r["gflops"] > 0
        # the parameters of the model the run saved, counted here, and its scores as `m2det eval` wrote them
        weights = out / "variants" / name / "train1" / "last.safetensors"
        model = load_model(weights)
        assert r["params"] == sum(p.numel() for p in model.parameters())
        assert model.config.mlfpn.sfam is (name == "tum_sfam") is r["sfam"]
        scored, _ = evaluate_weights(weights, data, device="cpu")  # as `m2det eval` scores them
        assert {key: r[key] for key in METRICS} == pytest.approx(
            {key: scored.metrics[key] for key in METRICS}
        )
    assert records["tum_sfam"]["params"] > records["tum"]["params"]  # SFAM's squeeze-excitation layers
    assert "mlfpn.planes" in records["odd_planes"]["error"]
    assert records["missing_weights"]["error"].startswith("train: m2det train exited 2")
    assert "/no/such/weights.pth" in records["missing_weights"]["error"]

    with open(out / ABLATION_CSV, newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert list(rows) == NAMES and list(next(iter(rows.values()))) == list(COLUMNS)
    for name in ("tum", "tum_sfam"):
        for key in (*METRICS, "params", "gflops", "images_per_s", "epochs"):
            assert float(rows[name][key]) == pytest.approx(records[name][key], rel=1e-12), key
    assert rows["odd_planes"]["status"] == "failed" and rows["odd_planes"]["AP"] == ""

    table = (out / ABLATION_MD).read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    for name in ("tum", "tum_sfam"):
        r = records[name]
        assert f"| {r['AP']:.3f} | {r['AP50']:.3f} |" in lines[name]
        assert (
            f"| {r['params'] / 1e6:.3f} | {r['gflops']:.2f} | {r['images_per_s']:.1f} | {r['epochs']} | ok |"
            in lines[name]
        )
    assert lines["odd_planes (tum)"].endswith("| failed |")
    assert "avx" in table  # the CPU flags the speeds were measured with
    assert (out / ABLATION_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_keeps_finished_variants_continues_an_interrupted_one_and_retries_failures(
    ablation, tmp_path
):
    ablation_file, finished, _ = ablation
    out, variants = tmp_path / "out", tmp_path / "out" / "variants"
    shutil.copytree(finished, out)  # mtimes kept
    before = _records(out)
    # tum as if killed after its training, before it was scored: its checkpoint is there, its result not
    (variants / "tum" / "result.json").unlink()
    stamps = {
        name: (variants / name / "train1" / "last.safetensors").stat().st_mtime_ns
        for name in ("tum", "tum_sfam")
    }
    sfam_log = (variants / "tum_sfam" / "train.log").read_text()
    failed_at = (variants / "odd_planes" / "result.json").stat().st_mtime_ns
    # the same ablation, missing_weights left out of this run (another training process to start)
    rerun = tmp_path / "ablate.yaml"
    rerun.write_text(
        ablation_file.read_text()
        .replace("base: ", f"base: {ablation_file.parent}/")
        .replace(
            "  - {name: missing_weights, variant: tum, overrides: {backbone.weights: /no/such/weights.pth}}\n",
            "",
        )
    )

    result = CliRunner().invoke(app, _command(rerun, out))
    assert result.exit_code == 1, result.output  # odd_planes still fails
    after = _records(out)
    assert list(after) == NAMES[:3]
    # nothing trained again: the same weights, the same scores
    assert stamps == {
        name: (variants / name / "train1" / "last.safetensors").stat().st_mtime_ns for name in stamps
    }
    assert {key: after["tum"][key] for key in (*METRICS, "epochs", "params")} == {
        key: before["tum"][key] for key in (*METRICS, "epochs", "params")
    }
    assert after["tum_sfam"] == before["tum_sfam"]
    assert (variants / "tum_sfam" / "train.log").read_text() == sfam_log  # not even started
    commands = [
        line for line in (variants / "tum" / "train.log").read_text().splitlines() if line.startswith("$ ")
    ]
    assert len(commands) == 2 and "--resume" in commands[1]  # continued from the checkpoint
    assert (variants / "odd_planes" / "result.json").stat().st_mtime_ns > failed_at  # tried again
    assert after["odd_planes"]["status"] == "failed"


def test_other_settings_on_the_same_folder_are_refused(ablation):
    ablation_file, out, _ = ablation
    stored = (out / ABLATION_JSON).read_bytes()
    result = CliRunner().invoke(app, _command(ablation_file, out, "--budget", "0.5"))
    assert result.exit_code == 2
    assert f"budget_min: {BUDGET_MIN} -> 0.5" in result.output and "--no-resume" in result.output
    changed = CliRunner().invoke(app, _command(ablation_file, out, "--set", "train.lr=1e-3"))
    assert changed.exit_code == 2 and "train_overrides" in changed.output
    assert (out / ABLATION_JSON).read_bytes() == stored  # nothing written


def test_a_variant_whose_definition_changed_is_refused(ablation, tmp_path):
    ablation_file, out, _ = ablation
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    text = ablation_file.read_text().replace("  - tum_sfam\n", "  - {name: tum_sfam, variant: tum}\n")
    changed = tmp_path / "ablate.yaml"
    changed.write_text(text.replace("base: ", f"base: {ablation_file.parent}/"))
    result = CliRunner().invoke(app, _command(changed, copy))
    assert result.exit_code == 2
    assert "variant tum_sfam" in result.output and "another name" in result.output


def test_train_command_resumes_a_checkpoint_and_starts_fresh_without_one(ablation, tmp_path):
    _, out, _ = ablation
    settings = AblationSettings(data="d.json", variants=[VariantSpec("tum")], budget_min=2, seed=5, nproc=2)
    resumed, run_dir = train_command(settings, out / "variants" / "tum_sfam")
    assert resumed[resumed.index("--resume") + 1] == str(run_dir) and "--time" not in resumed
    folder = tmp_path / "v"
    (folder / "train1").mkdir(parents=True)  # an attempt that died before its first checkpoint
    fresh, run_dir = train_command(settings, folder)
    assert not run_dir.exists() and "--resume" not in fresh
    assert (
        fresh[fresh.index("--time") + 1] == "2" and "train.seed=5" in fresh and "train.eval_every=0" in fresh
    )
    assert "--nproc-per-node=2" in fresh and fresh.index("torch.distributed.run") < fresh.index(
        "m2det.cli.main"
    )


def test_settings_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="tum more than once"):
        AblationSettings("d", [VariantSpec("tum"), VariantSpec("tum")], 1).validate()
    with pytest.raises(ConfigError, match="--budget"):
        AblationSettings("d", [VariantSpec("tum")], 1, train_overrides={"time_limit_min": 3}).validate()
    with pytest.raises(ConfigError, match="budget"):
        AblationSettings("d", [VariantSpec("tum")], 0).validate()
    path = tmp_path / "a.yaml"
    path.write_text("data: x\nbudgte: 3\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown field\(s\) budgte"):
        read_ablation_file(path)
    path.write_text("variants:\n  - {name: a, overrides: {train.lr: 0.1}}\n")
    with pytest.raises(ConfigError, match=r"variants\[0\]: overrides: model settings only"):
        read_ablation_file(path)
    path.write_text("data: sub/x.json\nbudget: 2\nvariants: [tum]\n")
    read = read_ablation_file(path)
    assert read["data"] == str(tmp_path / "sub" / "x.json") and read["budget_min"] == 2


def test_list_names_the_known_variants():
    result = CliRunner().invoke(app, ["ablate", "--list"])
    assert result.exit_code == 0 and {"tum", "tum_sfam"} <= set(result.output.split())
    missing = CliRunner().invoke(app, ["ablate", "--variants", "tum"])
    assert missing.exit_code == 2 and "--data and --budget required" in missing.output

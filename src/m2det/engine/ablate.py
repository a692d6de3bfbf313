"""The ablation runner (`m2det ablate`): model variants trained, scored, counted and timed alike, in
one table in the paper's Table 2/3 form and one plot of mAP against GFLOPs.

Every variant trains on the same data with the same recipe (`DEFAULT_PRESET` and the shared
`train` overrides), the same seed and the same wall-clock budget (`train.time_limit_min`: the
schedule is laid over the minutes, so each variant gets as many epochs as its speed allows, and
that number is recorded). The training validates once, after its budget, on the scored split
(`m2det.engine.evaluate`, the code of `m2det eval`): those are the scores of its last weights
(nothing is chosen on that split). The weights are then counted by `m2det.models.complexity` and
timed at batch 1 at the model's input size by `m2det.engine.bench`, on the machine in the table.

Each training is its own `m2det train` process (`torchrun` with `nproc` > 1): a crash, even one
that kills the process (a segfault, the kernel's out-of-memory killer), ends that variant only,
its memory is returned before the next, and torch's process-wide state (threads, seeds, the
process group) starts fresh for each. The start-up costs a few seconds per variant.

The output folder holds `ablation.{json,csv,md}` and `ablation_map_vs_gflops.png`, rewritten
(atomically) after every variant, and one folder per variant, `variants/NAME/`: `model.yaml` (the
variant's model), `train.log`, the run folder `train1/` and `result.json` (its row). Rerunning on the same folder resumes: a variant with a result is kept,
an interrupted training continues from its last checkpoint (`m2det train --resume`), a failed
variant is tried again; other settings than the folder's are refused, or with `resume=False`
replace them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from m2det.config import ModelConfig, get_config, read_yaml_mapping
from m2det.errors import ConfigError, M2DetError
from m2det.io.atomic import atomic_path
from m2det.io.jsonfile import finite_json, read_json, write_json
from m2det.models.variants import list_variants, variant_config

logger = logging.getLogger("m2det.ablate")

ABLATION_JSON = "ablation.json"
ABLATION_CSV = "ablation.csv"
ABLATION_MD = "ablation.md"
ABLATION_PLOT = "ablation_map_vs_gflops.png"
VARIANTS_DIR = "variants"
RESULT_FILE = "result.json"
MODEL_FILE = "model.yaml"
TRAIN_LOG = "train.log"
RUN_NAME = "train"  # the run folder of a variant is variants/NAME/train1 (`m2det train --name`)
SHAPES = "shapes"  # `data`: the generated shapes data set of `m2det demo`, written into the output folder
INTERRUPTED = 130  # the exit code of `m2det train` stopped by Ctrl-C (its checkpoint resumes it)

# The runner's own settings, which the shared `train` overrides cannot change: the budget and the
# seed are `budget_min` and `seed`, so that every variant has the same.
RESERVED_TRAIN_KEYS = {"time_limit_min": "the budget", "seed": "the seed"}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# One row per variant: ablation.csv's columns, the keys of each record in ablation.json.
COLUMNS = (
    "name", "variant", "overrides", "status", *METRICS, "params", "gflops", "images_per_s",
    "latency_ms", "epochs", "steps", "train_min", "wall_min", "backbone", "input_size", "num_levels",
    "planes", "sfam", "num_classes", "threads", "device", "error",
)  # fmt: skip


@dataclass
class VariantSpec:
    """One row of the table: its `name`, the Table 2 `variant` it builds (default: the name) and
    model overrides on top of it (dotted keys, e.g. {"mlfpn.planes": 128} for Table 3's rows)."""

    name: str
    variant: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def table2_name(self) -> str:
        return self.variant or self.name

    def definition(self) -> dict[str, Any]:
        """What the variant is, as its result records it: a result is reused only for the same."""
        return {"variant": self.table2_name, "overrides": dict(self.overrides)}


@dataclass
class AblationSettings:
    """What `run_ablation` trains and how: the data, the variants, the budget, the recipe, the seed.

    `base`: a model preset or a YAML file with a model (its `model:` section, or the whole file);
    every variant is `variant_config(base, ...)`. `data` / `val_data` / `train_split` / `split`: as
    `m2det train`'s `--data` / `--val-data` / `--train-split` / `--val-split`; `split` is the one
    scored (the training validates on it once, after its budget). `data="shapes"`: `m2det demo`'s
    generated data set, written into the output folder. `model_overrides` apply to every variant
    before its own; `train_overrides` change the recipe (`DEFAULT_PRESET`) of all of them alike
    (`eval_every` is 0 unless set: no validation eats into the budget). `nproc` > 1 trains each
    variant on that many processes (GPUs) under torchrun, one variant after another.
    """

    data: str
    variants: list[VariantSpec]
    budget_min: float
    val_data: Optional[str] = None
    base: str = "m2det_tiny"
    split: str = "test"
    train_split: str = "trainval"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    nproc: int = 1
    bench_warmup: int = 2
    bench_repeats: int = 20

    def validate(self) -> AblationSettings:
        """Raise a ConfigError naming the setting when one cannot work."""
        if not self.variants:
            raise ConfigError(
                "variants: give at least one variant (known: " + ", ".join(list_variants()) + ")"
            )
        names = [spec.name for spec in self.variants]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"variants: each name once, got {', '.join(repeated)} more than once")
        for name in names:
            if not name or name != Path(name).name or name.startswith("."):
                raise ConfigError(f"variants: {name!r} is no usable name (it names the variant's folder)")
        if not (isinstance(self.budget_min, (int, float)) and self.budget_min > 0):
            raise ConfigError(f"budget: expected minutes > 0, got {self.budget_min!r}")
        for key, what in RESERVED_TRAIN_KEYS.items():
            if key in self.train_overrides:
                raise ConfigError(
                    f"train.{key}: every variant has {what} of the ablation; set it with --"
                    f"{'budget' if key == 'time_limit_min' else key} instead"
                )
        if self.nproc < 1:
            raise ConfigError(f"nproc: expected a number of processes >= 1, got {self.nproc}")
        if self.bench_repeats < 1 or self.bench_warmup < 0:
            raise ConfigError(
                f"bench_repeats must be >= 1 and bench_warmup >= 0, got {self.bench_repeats}, {self.bench_warmup}"
            )
        return self

    def base_config(self) -> ModelConfig:
        """The model every variant starts from: the preset, or the YAML file's model."""
        if Path(self.base).suffix.lower() in (".yaml", ".yml"):
            if not Path(self.base).is_file():
                raise FileNotFoundError(f"base: {self.base}: no such model file")
            return ModelConfig.from_yaml(self.base)
        return get_config(self.base)

    def identity(self) -> dict[str, Any]:
        """What every variant of one table must share; a rerun with another is refused."""
        return {
            "data": self.data,
            "val_data": self.val_data,
            "train_split": self.train_split,
            "split": self.split,
            "base": self.base,
            "base_config": json.loads(self.base_config().to_json()),
            "budget_min": float(self.budget_min),
            "seed": self.seed,
            "model_overrides": dict(self.model_overrides),
            "train_overrides": dict(self.train_overrides),
            "nproc": self.nproc,
        }


@dataclass
class AblationResult:
    """The table's rows (ablation.json's records, in the settings' order), its files and the failures."""

    out_dir: Path
    records: list[dict[str, Any]]
    files: dict[str, Path]

    @property
    def failed(self) -> list[str]:
        return [r["name"] for r in self.records if r["status"] == "failed"]


class AblationInterrupted(KeyboardInterrupt):
    """A training was stopped by Ctrl-C; rerunning the same command continues it from its checkpoint."""


# ----- settings from the command line and from a file -----
def parse_variant_names(text: str) -> list[VariantSpec]:
    """`--variants a,b,c` as specs (no overrides of their own)."""
    return [VariantSpec(name.strip()) for name in text.split(",") if name.strip()]


def read_ablation_file(path: Union[str, Path]) -> dict[str, Any]:
    """An ablation YAML file as `AblationSettings` keyword arguments: `data`, `val_data` (paths
    relative to the file's folder), `base`, `budget` (minutes), `split`, `train_split`, `seed`,
    `model` / `train` (overrides of every variant / of the recipe) and `variants`, a list of names or
    of mappings `{name, variant, overrides}`. Errors name the file and the field."""
    path = Path(path)
    data = read_yaml_mapping(path)
    known = {
        "data",
        "val_data",
        "base",
        "budget",
        "split",
        "train_split",
        "seed",
        "model",
        "train",
        "variants",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}"
        )
    settings: dict[str, Any] = {}
    for key in ("data", "val_data"):
        if key in data:
            value = data[key]
            if not isinstance(value, str):
                raise ConfigError(f"{path}: {key}: expected a path, got {value!r}")
            settings[key] = value if value == SHAPES else str((path.parent / value).resolve())
    for key, target, kind in (
        ("base", "base", str), ("split", "split", str), ("train_split", "train_split", str),
        ("budget", "budget_min", (int, float)), ("seed", "seed", int),
    ):  # fmt: skip
        if key in data:
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{path}: {key}: expected a {_kind_name(kind)}, got {value!r}")
            settings[target] = value
    if "base" in settings and Path(settings["base"]).suffix.lower() in (".yaml", ".yml"):
        settings["base"] = str((path.parent / settings["base"]).resolve())
    for key, target in (("model", "model_overrides"), ("train", "train_overrides")):
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping of overrides, got {value!r}")
        settings[target] = dict(value)
    if "variants" in data:
        settings["variants"] = _variant_specs(data["variants"], path)
    return settings


def _kind_name(kind: Any) -> str:
    return {str: "text", int: "whole number"}.get(kind, "number")


def _variant_specs(items: Any, path: Path) -> list[VariantSpec]:
    if not isinstance(items, list):
        raise ConfigError(
            f"{path}: variants: expected a list of names or {{name, variant, overrides}}, got {items!r}"
        )
    specs = []
    for i, item in enumerate(items):
        where = f"{path}: variants[{i}]"
        if isinstance(item, str):
            specs.append(VariantSpec(item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ConfigError(f"{where}: expected a name or a mapping with a name, got {item!r}")
        extra = sorted(set(item) - {"name", "variant", "overrides"})
        if extra:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(extra)}; expected name, variant, overrides"
            )
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: overrides: expected a mapping of model overrides, got {overrides!r}")
        if any(str(key).startswith("train.") for key in overrides):
            raise ConfigError(
                f"{where}: overrides: model settings only; every variant trains with the same recipe "
                "(the file's train: section)"
            )
        specs.append(
            VariantSpec(item["name"], item.get("variant"), {str(k): v for k, v in overrides.items()})
        )
    return specs


# ----- the run -----
def run_ablation(
    settings: AblationSettings,
    out_dir: Union[str, Path],
    *,
    resume: bool = True,
    progress: Callable[[str], None] = logger.info,
) -> AblationResult:
    """Train, score, count and time every variant of `settings` into `out_dir` (see the module
    docstring), one after another; a failed variant is recorded with its error and the next runs.

    `resume`: keep the variants the folder finished and continue an interrupted one; refused (an
    M2DetError naming what differs) when the folder holds another ablation. `resume=False` starts
    every listed variant over, replacing the folder's results. Ctrl-C during a training raises
    `AblationInterrupted` after the tables are written.
    """
    settings.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _resolve_data(settings, out_dir)
    identity = settings.identity()
    _check_folder(out_dir, settings, identity, resume)
    machine = _machine()
    records = {spec.name: _pending(spec) for spec in settings.variants}
    for spec in settings.variants:
        folder = variant_dir(out_dir, spec.name)
        done = read_json(folder / RESULT_FILE) if (folder / RESULT_FILE).is_file() else None
        if not resume and folder.exists():
            shutil.rmtree(folder)
        elif done is not None and done.get("status") == "ok":
            records[spec.name] = done["record"]
    files = write_tables(out_dir, settings, identity, machine, list(records.values()))

    configs: dict[str, ModelConfig] = {}
    for spec in settings.variants:  # every config first: a bad one is reported before hours of training
        if records[spec.name]["status"] == "ok":
            continue
        try:
            configs[spec.name] = variant_model_config(settings, spec)
        except (M2DetError, ValueError, OSError) as exc:
            records[spec.name] = _failed(spec, "config", exc)
            _save_result(out_dir, spec, identity, records[spec.name])
            progress(f"{spec.name}: failed: {records[spec.name]['error']}")
    files = write_tables(out_dir, settings, identity, machine, list(records.values()))

    todo = [spec for spec in settings.variants if spec.name in configs]
    kept = sum(r["status"] == "ok" for r in records.values())
    progress(
        f"{len(settings.variants)} variants ({kept} done): {len(todo)} to train for "
        f"{settings.budget_min:g} min each; tables in {out_dir}"
    )
    for number, spec in enumerate(todo, 1):
        progress(f"[{number}/{len(todo)}] {spec.name}: training {settings.budget_min:g} min ...")
        try:
            records[spec.name] = run_variant(settings, spec, configs[spec.name], out_dir, machine, identity)
        except KeyboardInterrupt as exc:  # Ctrl-C: the tables as they are, and how to go on
            write_tables(out_dir, settings, identity, machine, list(records.values()))
            if isinstance(exc, AblationInterrupted):
                raise
            raise AblationInterrupted(f"{spec.name}: interrupted; rerun the same command to go on") from None
        except Exception as exc:  # a failure of the runner itself: recorded, with its traceback beside it
            variant_dir(out_dir, spec.name).mkdir(parents=True, exist_ok=True)
            (variant_dir(out_dir, spec.name) / "error.txt").write_text(traceback.format_exc())
            records[spec.name] = _failed(spec, "runner", exc)
        _save_result(out_dir, spec, identity, records[spec.name])
        record = records[spec.name]
        if record["status"] == "ok":
            progress(
                f"[{number}/{len(todo)}] {spec.name}: mAP {record['AP']:.4f} AP50 {record['AP50']:.4f} "
                f"({record['epochs']} epochs, {record['gflops']:.2f} GFLOPs, {record['images_per_s']:.1f} img/s)"
            )
        else:
            progress(f"[{number}/{len(todo)}] {spec.name}: failed: {record['error']}")
        files = write_tables(out_dir, settings, identity, machine, list(records.values()))
    return AblationResult(out_dir, list(records.values()), files)


def variant_dir(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / VARIANTS_DIR / name


def variant_model_config(settings: AblationSettings, spec: VariantSpec) -> ModelConfig:
    """The variant's model: the base turned into its Table 2 variant, then the shared and its own
    model overrides (its own win)."""
    overrides = {**settings.model_overrides, **spec.overrides}
    config = variant_config(settings.base_config(), spec.table2_name, **overrides)
    return config


def _resolve_data(settings: AblationSettings, out_dir: Path) -> AblationSettings:
    """Absolute data paths (a rerun from another folder is the same ablation); `shapes` generated."""
    from dataclasses import replace

    if settings.data == SHAPES:
        from m2det.data.synthetic import ShapesConfig, generate_shapes_dataset
        from m2det.engine.demo import DemoSettings

        demo = DemoSettings()
        generated = generate_shapes_dataset(
            out_dir / SHAPES, demo.num_train, demo.num_val, ShapesConfig(**demo.shapes)
        )
        return replace(
            settings, data=str(generated.train.annotations), val_data=str(generated.val.annotations)
        )
    paths: dict[str, Any] = {"data": str(Path(settings.data).resolve())}
    if settings.val_data is not None:
        paths["val_data"] = str(Path(settings.val_data).resolve())
    if Path(settings.base).suffix.lower() in (".yaml", ".yml"):
        paths["base"] = str(Path(settings.base).resolve())
    return replace(settings, **paths)


def _check_folder(out_dir: Path, settings: AblationSettings, identity: dict[str, Any], resume: bool) -> None:
    """Refuse to mix two ablations in one table: the folder's settings must be these, and every
    finished variant of the same name must be the same variant."""
    if not resume:
        return
    stored_path = out_dir / ABLATION_JSON
    stored = read_json(stored_path) if stored_path.is_file() else None
    hint = "rerun with its settings to resume it, give another --out, or --no-resume to start over there"
    if stored is not None:
        before = stored.get("settings", {}).get("identity", {})
        changed = [key for key in identity if before.get(key) != identity[key]]
        if changed:
            differences = "; ".join(
                f"{key}: {_short(before.get(key))} -> {_short(identity[key])}" for key in changed
            )
            raise M2DetError(f"{out_dir} holds an ablation with other settings ({differences}); {hint}")
    for spec in settings.variants:
        result_path = variant_dir(out_dir, spec.name) / RESULT_FILE
        done = read_json(result_path) if result_path.is_file() else None
        if done is None:
            continue
        if done.get("identity") != identity:
            raise M2DetError(f"{result_path}: made with other settings than these; {hint}")
        if done.get("definition") != spec.definition():
            raise M2DetError(
                f"variant {spec.name}: {out_dir} holds it as {done.get('definition')}, now "
                f"{spec.definition()}; give it another name, or {hint}"
            )


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _pending(spec: VariantSpec) -> dict[str, Any]:
    record: dict[str, Any] = {key: None for key in COLUMNS}
    record.update(name=spec.name, variant=spec.table2_name, overrides=dict(spec.overrides), status="pending")
    return record


def _failed(
    spec: VariantSpec, stage: str, error: Union[BaseException, str], record: Optional[dict] = None
) -> dict:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    failed = dict(record) if record is not None else _pending(spec)
    failed.update(status="failed", error=f"{stage}: {message}")
    return failed


def _save_result(out_dir: Path, spec: VariantSpec, identity: dict[str, Any], record: dict[str, Any]) -> None:
    write_json(
        variant_dir(out_dir, spec.name) / RESULT_FILE,
        finite_json(
            {
                "status": record["status"],
                "identity": identity,
                "definition": spec.definition(),
                "record": record,
            }
        ),
        indent=1,
    )


def _machine() -> dict[str, Any]:
    from m2det.utils.machine import machine_info

    return machine_info()


# ----- one variant -----
def run_variant(
    settings: AblationSettings,
    spec: VariantSpec,
    config: ModelConfig,
    out_dir: Path,
    machine: dict[str, Any],
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Train (or continue), score, count and time one variant; its record, status ok or failed.
    Its result.json says `running` meanwhile, so that a rerun with another definition of the same
    name is refused rather than continuing this training."""
    import yaml

    folder = variant_dir(out_dir, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    record = _pending(spec)
    record.update(
        backbone=config.backbone.name,
        input_size=config.input_size,
        num_levels=config.mlfpn.num_levels,
        planes=config.mlfpn.planes,
        sfam=config.mlfpn.sfam,
    )
    with atomic_path(folder / MODEL_FILE) as tmp:
        tmp.write_text(yaml.safe_dump({"model": json.loads(config.to_json())}, sort_keys=False))
    _save_result(out_dir, spec, identity, {**record, "status": "running"})
    command, run_dir = train_command(settings, folder)
    code, wall_s = _run_training(command, folder / TRAIN_LOG)
    record["wall_min"] = wall_s / 60
    if code == INTERRUPTED:
        raise AblationInterrupted(f"{spec.name}: training interrupted; rerun the same command to continue it")
    if code != 0:
        from m2det.utils.process import log_tail

        said = [line for line in log_tail(folder / TRAIN_LOG, 4).splitlines() if not line.startswith("$ ")]
        return _failed(spec, "train", f"m2det train exited {code}: " + "\n".join(said), record)
    try:
        record.update(_training_facts(run_dir))
        record.update(_cost_and_speed(settings, run_dir))
    except Exception as exc:  # recorded, with the traceback beside it; the next variant runs
        (folder / "error.txt").write_text(traceback.format_exc())
        return _failed(spec, "evaluation", exc, record)
    (folder / "error.txt").unlink(missing_ok=True)  # an earlier attempt's
    record["threads"] = machine["torch_threads"]
    record["status"] = "ok"
    return record


def train_command(settings: AblationSettings, folder: Path) -> tuple[list[str], Path]:
    """The `m2det train` command of the variant in `folder` and its run folder: a new run, or
    `--resume` where an earlier attempt left a checkpoint (run folders an attempt left without
    one are removed first, so that the new run is train1)."""
    from m2det.engine.checkpoint_state import named_state

    run_dir = folder / f"{RUN_NAME}1"
    launcher = [sys.executable, "-m"]
    if settings.nproc > 1:
        launcher += ["torch.distributed.run", "--standalone", f"--nproc-per-node={settings.nproc}", "-m"]
    launcher += ["m2det.cli.main", "train", "--device", settings.device]
    if run_dir.is_dir() and named_state(run_dir) is not None:
        return [*launcher, "--resume", str(run_dir)], run_dir
    for stale in folder.glob(f"{RUN_NAME}*"):
        if stale.is_dir():
            shutil.rmtree(stale)
    data = ["--data", settings.data, "--train-split", settings.train_split, "--val-split", settings.split]
    if settings.val_data is not None:
        data += ["--val-data", settings.val_data]
    train = {"eval_every": 0, **settings.train_overrides, "seed": settings.seed}
    sets = [f"train.{key}={json.dumps(value)}" for key, value in train.items()]
    command = [
        *launcher, *data, "--config", str(folder / MODEL_FILE), "--time", f"{settings.budget_min:g}",
        "--project", str(folder), "--name", RUN_NAME, *(item for value in sets for item in ("--set", value)),
    ]  # fmt: skip
    return command, run_dir


def _run_training(command: list[str], log: Path) -> tuple[int, float]:
    """Run the training process with its output in `log` (appended: a resumed run's follows the
    first attempt's); the child imports the same m2det as this process."""
    import m2det
    from m2det.utils.process import run_logged

    env = dict(os.environ)
    package_root = str(Path(m2det.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    try:
        return run_logged(command, log, env=env, append=True)
    except KeyboardInterrupt:
        raise AblationInterrupted("training interrupted; rerun the same command to continue it") from None


def _training_facts(run_dir: Path) -> dict[str, Any]:
    """Epochs and steps the budget allowed, the minutes its clock counted, and the COCO metrics of
    the run's validation after the budget: the saved weights scored on the split by
    `m2det.engine.evaluate`, as `m2det eval` scores them, so that they are not scored twice."""
    from m2det.engine.checkpoint_state import load_checkpoint

    state = load_checkpoint(run_dir).state
    metrics = state.get("metrics") or {}
    missing = [key for key in METRICS if key not in metrics]
    if missing:
        raise M2DetError(f"{run_dir}: the run's checkpoint holds no validation metrics {missing}")
    return {
        "epochs": int(state["epoch"]),  # the last one, cut by the budget, counts
        "steps": int(state["step"]),
        "train_min": float(state.get("elapsed_s") or 0.0) / 60,
        **{key: float(metrics[key]) for key in METRICS},
    }


def _cost_and_speed(settings: AblationSettings, run_dir: Path) -> dict[str, Any]:
    """Parameters and GFLOPs of the trained model, and its images/s at batch 1 at its input size
    (the network, optimised for inference as `m2det bench` runs it)."""
    from m2det.device import resolve_device
    from m2det.engine.bench import BenchSettings, run_bench

    device = resolve_device(settings.device)
    bench = run_bench(
        BenchSettings(
            model=str(run_dir / "last.safetensors"),
            device=str(device),
            batch_sizes=(1,),
            warmup=settings.bench_warmup,
            repeats=settings.bench_repeats,
            reference=False,
            postprocess_load="model",  # the trained network's own detections, not a synthesised load
        )
    )
    row = bench["throughput"][0]
    return {
        "params": int(bench["params"]),
        "gflops": float(bench["gflops_per_image"]),
        "images_per_s": float(row["images_per_s"]),
        "latency_ms": float(bench["latency_batch1"]["total_median_ms"]),
        "num_classes": int(bench["num_classes"]),
        "device": str(bench["device"]),
    }


# ----- the table -----
def write_tables(
    out_dir: Path,
    settings: AblationSettings,
    identity: dict[str, Any],
    machine: dict[str, Any],
    records: Sequence[dict[str, Any]],
) -> dict[str, Path]:
    """ablation.json, .csv, .md and the plot from the records, each written atomically."""
    from m2det.engine.plots import plot_accuracy_vs_cost

    files = {
        "json": out_dir / ABLATION_JSON,
        "csv": out_dir / ABLATION_CSV,
        "md": out_dir / ABLATION_MD,
        "plot": out_dir / ABLATION_PLOT,
    }
    described = {
        "identity": identity,
        "variants": [{"name": s.name, **s.definition()} for s in settings.variants],
        "device": settings.device,
        "bench": {"batch": 1, "warmup": settings.bench_warmup, "repeats": settings.bench_repeats},
        "recipe": _recipe(settings),
    }
    write_json(
        files["json"],
        finite_json({"settings": described, "machine": machine, "records": list(records)}),
        indent=1,
    )
    with atomic_path(files["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow({key: _csv_cell(record.get(key)) for key in COLUMNS})
    with atomic_path(files["md"]) as tmp:
        tmp.write_text(markdown_table(settings, machine, records))
    done = {r["name"]: (r["gflops"], r["AP"]) for r in records if r["status"] == "ok"}
    plot_accuracy_vs_cost(
        done, files["plot"], title=f"Ablation: mAP against GFLOPs, {settings.budget_min:g} min each"
    )
    return files


def _recipe(settings: AblationSettings) -> str:
    from m2det.engine.train_config import DEFAULT_PRESET

    changes = {"eval_every": 0, **settings.train_overrides}
    return f"{DEFAULT_PRESET} " + " ".join(f"{k}={json.dumps(v)}" for k, v in changes.items())


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else ""
    return "" if value is None else value


def _fixed(value: Any, digits: int, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def markdown_table(
    settings: AblationSettings, machine: dict[str, Any], records: Sequence[dict[str, Any]]
) -> str:
    """The table in the paper's Table 2/3 form, a row per variant, with the settings and the
    machine its speeds were measured on."""
    from m2det.utils.machine import describe_flags

    def model_cell(r: dict[str, Any]) -> str:
        if r["num_levels"] is None:
            return "-"
        return f"{r['backbone']}, {r['num_levels']} x {r['planes']}{', SFAM' if r['sfam'] else ''}"

    lines = [
        f"# Ablation: {len(records)} variants of {Path(settings.base).name}, {settings.budget_min:g} min of training each",
        "",
        f"* data: train `{settings.data}` ({settings.train_split}), scored on `{settings.val_data or settings.data}` "
        f"({settings.split}) with `m2det eval`'s COCO metrics (pycocotools), the last weights of each run",
        f"* recipe: `{_recipe(settings)}`, seed {settings.seed}, every variant the same budget "
        f"(`train.time_limit_min`); {settings.nproc} training process(es) per variant, one variant after another",
        f"* speed: the network at batch 1 at its input size (`m2det bench`, optimised for inference), "
        f"device {settings.device}; CPU {machine['model']} ({describe_flags(machine['flags'])}); "
        f"{machine['usable_cores']} usable cores, {machine['torch_threads']} torch threads"
        + (f"; GPUs {', '.join(machine['gpus'])}" if machine.get("gpus") else ""),
        "",
        "| variant | model | mAP | AP50 | AP75 | AP_S | AP_M | AP_L | params (M) | GFLOPs | img/s | epochs | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        label = r["name"] if r["name"] == r["variant"] else f"{r['name']} ({r['variant']})"
        lines.append(
            f"| {label} | {model_cell(r)} | "
            + " | ".join(_fixed(r[key], 3) for key in METRICS)
            + f" | {_fixed(r['params'], 3, 1e6)} | {_fixed(r['gflops'], 2)} | {_fixed(r['images_per_s'], 1)} | "
            f"{'-' if r['epochs'] is None else r['epochs']} | {r['status']} |"
        )
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed:", ""]
        lines += [f"* {r['name']}: {str(r['error']).splitlines()[0] if r['error'] else ''}" for r in failed]
    with_overrides = [r for r in records if r["overrides"]]
    if with_overrides or settings.model_overrides:
        lines += ["", "Model overrides:", ""]
        if settings.model_overrides:
            lines.append(f"* every variant: `{json.dumps(settings.model_overrides)}`")
        lines += [f"* {r['name']}: `{json.dumps(r['overrides'])}`" for r in with_overrides]
    lines += [
        "",
        "mAP: COCO AP@[.5:.95]; AP_S/M/L: by object area (-1: no object of that size); epochs: reached "
        "in the budget (the last one, cut by it, counts).",
    ]
    return "\n".join(lines) + "\n"


__all__ = [
    "AblationInterrupted",
    "AblationResult",
    "AblationSettings",
    "VariantSpec",
    "parse_variant_names",
    "read_ablation_file",
    "run_ablation",
    "train_command",
]

"""`m2det train`: train on a COCO / Pascal VOC / YOLO data set, on one device or under torchrun (DDP)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import typer

from m2det.cli.common import parse_overrides, user_errors
from m2det.errors import ConfigError, M2DetError

ARGS_FILE = "args.yaml"  # the data arguments of a run, so that `--resume` needs nothing else
TRANSFER_FILE = "transfer.json"  # what --weights loaded, mapped and re-initialised


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@user_errors
def train(
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="Training data: a COCO .json, a Pascal VOC folder, a YOLO data.yaml, or a folder of images "
        "with VOC XML files beside them (LabelImg; train/val/test subfolders, or none).",
    ),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Validation data (default: --data)."),
    train_split: Optional[str] = typer.Option(
        None,
        "--train-split",
        help="Split of --data to train on (VOC image set, YOLO key, image subfolder; default train).",
    ),
    val_split: Optional[str] = typer.Option(
        None,
        "--val-split",
        help="Split of the validation data to score (default val). An image folder without val/ uses "
        "test/, and without that a fixed tenth of train/, held out of training.",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="YAML with a model: section (or preset:) and/or a train: section."
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        "--preset",
        help="Model preset when --config has no model (default m2det320_vgg16, or the --weights file's "
        "own), or PRESET+VARIANT for one of the paper's Table 2 variants (m2det models --variants); "
        "with an official .pth in --weights, the preset it was trained as.",
    ),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override KEY=VALUE, e.g. train.epochs=10, train.lr=1e-3, model.mlfpn.planes=128, "
        "'train.milestones=[20, 25]' (repeatable; a bare key such as lr=1e-3 goes to the section that has it).",
    ),
    backbone_weights: Optional[Path] = typer.Option(
        None, "--backbone-weights", help="Local ImageNet weights for the backbone (.pth / .safetensors)."
    ),
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        help="Start from a trained detector: our .safetensors or an official .pth (with --preset); "
        "any classes (the class rows are mapped by name). See docs/train.md.",
    ),
    time_limit: Optional[float] = typer.Option(
        None,
        "--time",
        help="Train for this many minutes (train.time_limit_min): the schedule of train.epochs epochs, "
        "warm-up and decay, is fitted to the time, which ends the run.",
    ),
    resume: Optional[Path] = typer.Option(
        None,
        "--resume",
        help="Continue a run exactly: its folder (or a file in it). Data options given here replace "
        "the run's; those not given are the run's own.",
    ),
    project: Path = typer.Option(Path("runs/train"), "--project", help="Parent folder of new runs."),
    name: str = typer.Option("exp", "--name", help="Run folder name prefix: NAME1, NAME2, ..."),
    device: str = typer.Option(
        "auto", "--device", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar or per-epoch lines."),
) -> None:
    """Train M2Det. Multi-GPU / multi-machine: `torchrun --nproc-per-node N -m m2det.cli.main train ...`.

    Examples:

      m2det train --data photos/ --set train.epochs=50 --set train.lr=1e-3
      m2det train --data voc/ --train-split trainval --val-split test
      m2det train --data my.yaml --weights best.safetensors --set lr=4e-3
      m2det train --resume runs/train/exp3
      m2det train --resume runs/train/exp3 --data /new/place/of/photos/
      m2det train --data photos/ --model m2det_tiny --time 15 --set train.preset=paper

    The training recipe is the adamw_cosine preset (AdamW, cosine, batch 8; the one that learnt the most in the recipe benchmark), finetune with --weights; --set train.preset=paper reproduces the paper's (docs/train.md).

    With --resume, an option given on the command line wins over what the run stored: the data options (--data, --val-data, --train-split, --val-split) given replace the run's and are stored for the next resume; those not given are the run's own. The run's settings (--config, --set, --time, --backbone-weights, --weights) cannot change on resume: giving one is an error.
    """
    import yaml

    from m2det.cli.common import next_run_dir
    from m2det.engine import distributed
    from m2det.engine.checkpoint_state import LAST_MODEL, load_checkpoint
    from m2det.engine.train import (
        Trainer,
        TrainingDiverged,
        resolve_resume,
        seed_everything,
    )
    from m2det.engine.train_config import TrainConfig
    from m2det.io.atomic import atomic_path
    from m2det.io.checkpoint import read_config
    from m2det.models import build_model
    from m2det.progress import show_logs

    show_logs(quiet)  # the trainer's epoch lines, above its progress bar
    model_overrides, train_overrides = split_overrides(parse_overrides(overrides))
    if time_limit is not None:
        train_overrides["time_limit_min"] = time_limit
    given = {"data": data, "val_data": val_data, "train_split": train_split, "val_split": val_split}
    info, _ = distributed.setup(device)
    try:
        if resume is not None and weights is not None:
            raise M2DetError(
                "--resume continues a run exactly, from its own weights; --weights starts a new run from "
                "a trained detector: they cannot be combined"
            )
        if resume is not None:
            if overrides or config is not None or backbone_weights is not None or time_limit is not None:
                raise M2DetError(
                    "--resume continues a run with its own settings; --config, --set, --time and "
                    "--backbone-weights cannot change it (start a new run instead)"
                )
            run_dir = resolve_resume(resume)
            stored: dict[str, Any] = (
                yaml.safe_load((run_dir / ARGS_FILE).read_text()) or {}
                if (run_dir / ARGS_FILE).is_file()
                else {}
            )
            data_args = resolve_data_args(given, stored)
            if not data_args["data"]:
                raise M2DetError(f"--resume {resume}: {run_dir / ARGS_FILE} is missing; give --data again")
            last = load_checkpoint(run_dir)  # the run's own; `checkpoint` below is a detector to start from
            model_config = read_config(last.model_path)
            model_config.backbone.weights = None  # the checkpoint holds the trained backbone
            train_config = TrainConfig.from_dict(last.state["train_config"])
        else:
            if not data:
                raise M2DetError("--data is required (a COCO .json, a Pascal VOC folder or a YOLO data.yaml)")
            stored = {}  # a new run: the command line and the defaults
            data_args = resolve_data_args(given, stored)
            if info.is_main and not val_data and Path(data).suffix.lower() == ".json":
                typer.echo("note: no --val-data: validating on the training json itself", err=True)
            checkpoint = None
            if weights is not None:
                from m2det.io.transfer import read_checkpoint

                if backbone_weights is not None:
                    raise M2DetError(
                        "--weights holds the backbone already; --backbone-weights is for starting from "
                        "ImageNet weights"
                    )
                checkpoint = read_checkpoint(weights, preset=model)
                data_args["weights"] = str(weights.resolve())
            model_config, train_config = load_configs(
                config, model, model_overrides, train_overrides, checkpoint
            )
            if backbone_weights is not None:
                if not backbone_weights.is_file():
                    raise FileNotFoundError(f"--backbone-weights: file not found: {backbone_weights}")
                model_config.backbone.weights = str(backbone_weights)
        train_set, val_set = build_datasets(data_args, model_config, train_config)
        model_config = _with_classes(model_config, train_set)
        seed_everything(train_config.seed)  # the initial weights repeat under the seed
        net = build_model(model_config)
        report = None
        if resume is None and checkpoint is not None:
            from m2det.io.transfer import transfer_weights

            report = transfer_weights(net, checkpoint)
            if info.is_main:
                typer.echo("\n".join(report.lines()))
        if resume is None:
            # made only now that the data and the model are built, so that a bad start leaves no folder
            run_dir = distributed.broadcast_object(next_run_dir(project, name) if info.is_main else None)
        if info.is_main and data_args != stored:  # a new run, or a resume given other data options
            with atomic_path(run_dir / ARGS_FILE) as tmp:
                tmp.write_text(yaml.safe_dump(data_args, sort_keys=False))
        if info.is_main and report is not None:
            from m2det.io.jsonfile import write_json

            write_json(run_dir / TRANSFER_FILE, report.to_dict(), indent=1)
        try:
            trainer = Trainer(
                net, train_config, train_set, val_set, run_dir=run_dir, device=device, progress=not quiet
            )
            result = trainer.fit(resume=resume is not None)
        except BaseException as exc:
            if info.is_main and resume is None:
                _remove_if_unused(run_dir)
            if isinstance(exc, TrainingDiverged):
                typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
                raise typer.Exit(code=1) from None
            if isinstance(exc, KeyboardInterrupt):
                if info.is_main:
                    hint = (
                        f"continue with: m2det train --resume {run_dir}"
                        if (run_dir / LAST_MODEL).is_file()
                        else "no epoch had finished, so there is nothing to resume"
                    )
                    typer.echo(f"\ninterrupted; {hint}", err=True)
                raise typer.Exit(code=130) from None
            raise
        if info.is_main:
            best = f"; best {train_config.best_metric} {result.best_metric:.4f} at epoch {result.best_epoch}"
            typer.echo(f"run folder: {run_dir}" + (best if result.best_metric is not None else ""))
    finally:
        distributed.cleanup()


# The data options of `m2det train` and their defaults; a run stores them in ARGS_FILE.
DATA_DEFAULTS: dict[str, Optional[str]] = {
    "data": None,
    "val_data": None,
    "train_split": "train",
    "val_split": "val",
}


def resolve_data_args(given: dict[str, Optional[str]], stored: dict[str, Any]) -> dict[str, Any]:
    """The data arguments of a run, by one rule: an option given on the command line (not None)
    wins, else the run's stored value (`--resume`; `stored` is {} for a new run), else its default.
    Paths given are made absolute, so that a resume from another folder finds them. Stored keys
    that are no option (`weights`) are kept."""
    resolved = dict(stored)
    for key, default in DATA_DEFAULTS.items():
        value = given.get(key)
        if value is not None and key in ("data", "val_data"):
            value = str(Path(value).resolve())
        resolved[key] = value if value is not None else stored.get(key, default)
    return resolved


def _remove_if_unused(run_dir: Path) -> None:
    """Delete a new run's folder if the run failed before writing anything but its start files."""
    start_files = {ARGS_FILE, TRANSFER_FILE}
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= start_files:
        for name in start_files:
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`model.X` / `train.X` keys to their section; a bare key goes to the section that has it
    (train first). A bare key neither has is an error naming the closest keys of both."""
    from m2det.config import ModelConfig, unknown_key_message
    from m2det.engine.train_config import TrainConfig

    sections = {
        "train": [f.name for f in fields(TrainConfig)],
        "model": [f.name for f in fields(ModelConfig)],
    }
    routed: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in overrides.items():
        section, _, rest = key.partition(".")
        if section in routed and rest:
            routed[section][rest] = value
            continue
        owner = next((name for name, keys in sections.items() if section in keys), None)
        if owner is None:
            valid = [f"{name}.{k}" for name, keys in sections.items() for k in keys]
            raise ConfigError(unknown_key_message(key, valid))
        routed[owner][key] = value
    return routed["model"], routed["train"]


def load_configs(
    path: Optional[Path],
    preset: Optional[str],
    model_overrides: dict[str, Any],
    train_overrides: dict[str, Any],
    checkpoint: Any = None,
) -> tuple[Any, Any]:
    """(ModelConfig, TrainConfig) from an optional YAML file, a fallback preset and overrides.

    Starting from a trained detector (`checkpoint`, see `m2det.io.transfer`), the model is the
    checkpoint's own unless the file or `preset` names one (for an official checkpoint `preset` is
    what it was trained as). The training settings start from the `finetune` preset then, else from
    `DEFAULT_PRESET`; a file's `train:` section changes them unless it names its own `preset:`. A
    `preset` among the training overrides (`--set train.preset=NAME`) replaces the file's
    `train: preset:`; the file's other training fields still apply.
    """
    from m2det.config import ModelConfig, get_config, read_yaml_mapping, with_overrides
    from m2det.engine.train_config import DEFAULT_PRESET, build_train_config

    data = read_yaml_mapping(path) if path is not None else {}
    has_model = bool(data) and ("model" in data or "train" not in data)
    base = ModelConfig.from_mapping(data, path) if has_model and path is not None else None
    if checkpoint is not None:
        from m2det.io.transfer import finetune_config

        if base is None and preset is not None and not checkpoint.official:
            base = get_config(preset)
        model_config = finetune_config(checkpoint, base, **model_overrides)
    else:
        model_config = with_overrides(base or get_config(preset or "m2det320_vgg16"), **model_overrides)
    default_recipe = "finetune" if checkpoint is not None else DEFAULT_PRESET
    train_config = build_train_config(
        data.get("train") or {}, train_overrides, default_recipe, path or "--set"
    )
    return model_config, train_config


def build_datasets(data_args: dict[str, Any], model_config: Any, train_config: Any) -> tuple[Any, Any]:
    """The training set (augmented to the input size) and the validation set (original images)."""
    from m2det.classes import class_mismatch
    from m2det.data import build_dataset

    train_set = build_dataset(
        data_args["data"],
        data_args["train_split"],
        transforms=train_config.train_transform(model_config.input_size),
    )
    val_set = build_dataset(
        data_args["val_data"] or data_args["data"], data_args["val_split"], keep_ignored=True
    )
    problem = class_mismatch(
        val_set.class_names, train_set.class_names, "the validation data", "the training data"
    )
    if problem:
        raise M2DetError(problem)
    return train_set, val_set


def _with_classes(model_config: Any, train_set: Any) -> Any:
    from m2det.config import with_overrides

    return with_overrides(
        model_config, num_classes=train_set.num_classes, class_names=list(train_set.class_names)
    )

"""`m2det ablate`: train model variants alike and tabulate them (`m2det.engine.ablate`); this module
reads the options and the ablation file, and prints the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from m2det.cli.common import parse_overrides, user_errors
from m2det.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("ablate")(ablate)


@user_errors
def ablate(
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="Training data (as m2det train's --data), or `shapes`: m2det demo's generated data set.",
    ),
    val_data: Optional[str] = typer.Option(None, "--val-data", help="Data to score (default: --data)."),
    variants: Optional[str] = typer.Option(
        None, "--variants", help="Variants, comma separated (the paper's Table 2 names; see --list)."
    ),
    budget: Optional[float] = typer.Option(
        None, "--budget", help="Minutes of training for every variant (m2det train --time)."
    ),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        help="Ablation YAML: data, val_data, base, budget, split, train_split, seed, model: / train: "
        "overrides, variants (names or {name, variant, overrides}). Options given here win.",
    ),
    base: Optional[str] = typer.Option(
        None, "--base", help="Model preset (or model YAML) every variant starts from (default m2det_tiny)."
    ),
    split: Optional[str] = typer.Option(None, "--split", help="Split scored (default test)."),
    train_split: Optional[str] = typer.Option(
        None, "--train-split", help="Split trained on (default trainval)."
    ),
    out: Path = typer.Option(Path("runs/ablate"), "--out", help="Output folder; the same one resumes."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override for every variant: model.KEY=VALUE (the model) or train.KEY=VALUE (the recipe); "
        "repeatable; a bare key goes to the section that has it.",
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every training (default 0)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Train each variant on N processes (GPUs) with torchrun, one variant after another.",
    ),
    bench_repeats: int = typer.Option(
        20, "--bench-repeats", min=1, help="Timed runs of the images/s figure."
    ),
    resume: bool = typer.Option(
        True,
        "--resume/--no-resume",
        help="Keep the folder's finished variants and continue an interrupted one (default); "
        "--no-resume starts the variants over.",
    ),
    list_only: bool = typer.Option(False, "--list", help="List the known variants and exit."),
    quiet: bool = typer.Option(False, "--quiet", help="Only the final table."),
) -> None:
    """Train each variant on the same data with the same recipe, seed and time budget, score each on
    the same split, count its parameters and GFLOPs, time it; one table (ablation.csv / .md / .json)
    and one plot (mAP against GFLOPs), updated after every variant.

    Examples:

      m2det ablate --data bccd/ --variants tum,tum_sfam --budget 15
      m2det ablate --data shapes --variants tum,tum_sfam --budget 2 --out runs/ablate_shapes
      m2det ablate --config ablate.yaml --nproc 4

    Rerunning the same command on the same --out skips the finished variants and continues an
    interrupted training from its checkpoint; a failed variant is tried again. Other settings
    (data, budget, base, seed, overrides) than the folder's are refused. The exit code is 1 when a
    variant failed. See docs/ablate.md.
    """
    from m2det.cli.train import split_overrides
    from m2det.engine.ablate import (
        AblationInterrupted,
        AblationSettings,
        list_variants,
        parse_variant_names,
        read_ablation_file,
        run_ablation,
    )
    from m2det.progress import show_logs

    if list_only:
        typer.echo("\n".join(list_variants()))
        return
    show_logs(quiet)
    fields: dict[str, Any] = read_ablation_file(config) if config is not None else {}
    given = {
        "data": data, "val_data": val_data, "base": base, "split": split, "train_split": train_split,
        "budget_min": budget, "seed": seed,
    }  # fmt: skip
    fields.update({key: value for key, value in given.items() if value is not None})
    if variants is not None:
        fields["variants"] = parse_variant_names(variants)
    model_overrides, train_overrides = split_overrides(parse_overrides(overrides))
    fields["model_overrides"] = {**fields.get("model_overrides", {}), **model_overrides}
    fields["train_overrides"] = {**fields.get("train_overrides", {}), **train_overrides}
    missing = [option for option, key in (("--data", "data"), ("--variants", "variants"), ("--budget", "budget_min"))
               if key not in fields]  # fmt: skip
    if missing:
        raise ConfigError(f"{' and '.join(missing)} required (on the command line or in --config)")
    settings = AblationSettings(**fields, device=device, nproc=nproc, bench_repeats=bench_repeats)
    try:
        result = run_ablation(settings, out, resume=resume)
    except AblationInterrupted as exc:
        typer.echo(f"\ninterrupted: {exc}", err=True)
        raise typer.Exit(code=130) from None
    typer.echo("\n" + result.files["md"].read_text())
    typer.echo(f"wrote {', '.join(p.name for p in result.files.values())} to {out}")
    if result.failed:
        typer.secho(f"failed: {', '.join(result.failed)} (see the table)", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1)

"""`m2det demo`: the built-in default, run by `m2det.engine.demo` (generate shapes, train
`m2det_tiny` on the CPU, evaluate, draw); this module parses the options and prints the summary."""

from __future__ import annotations

from pathlib import Path

import typer

from m2det.cli.common import parse_overrides, user_errors


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@user_errors
def demo(
    out: Path = typer.Option(
        Path("runs/demo"), "--project", help="Parent folder of the run folder (runs/demo/expN)."
    ),
    device: str = typer.Option(
        "cpu", "--device", help="cpu (the default the timings are for), cuda or auto."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the initial weights and the training."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Change a demo setting, e.g. num_train=200, train.epochs=5, shapes.clutter=0 (repeatable).",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar, only the final summary."),
) -> None:
    """Generate a shapes data set, train m2det_tiny on it, evaluate on held-out images, write pictures."""
    from m2det.cli.common import next_run_dir
    from m2det.device import resolve_device
    from m2det.engine.demo import DemoSettings, run_demo
    from m2det.engine.train import TrainingDiverged
    from m2det.progress import show_logs

    show_logs(quiet)  # the demo's steps and the trainer's epoch lines
    settings = DemoSettings(seed=seed).with_overrides(parse_overrides(overrides))
    run_dir = next_run_dir(out)
    try:
        result = run_demo(run_dir, settings, device=str(resolve_device(device)), progress=not quiet)
    except TrainingDiverged as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=1) from None
    minutes, seconds = divmod(result.seconds, 60)
    typer.echo(
        f"\ndemo finished in {int(minutes)} min {seconds:.0f} s: on {settings.num_val} held-out images "
        f"mAP {result.metrics['AP']:.3f} (IoU .50:.95), mAP@0.5 {result.metrics['AP50']:.3f}"
    )
    typer.echo(f"run folder: {run_dir}")
    for what, label in (
        ("model", "trained model"),
        ("metrics", "COCO metrics"),
        ("per_class", "AP per class"),
        ("pr_curve", "precision-recall curves"),
        ("loss_curve", "loss curve"),
        ("pictures", "ground truth (left) and detections (right)"),
    ):
        typer.echo(f"  {result.files[what]}  {label}")

"""Entry point of the `m2det` command: each subcommand module registers itself on the app."""

from __future__ import annotations

import typer

from m2det.cli import bench, browse, convert, demo, detect, eval, export, models, serve, train

app = typer.Typer(
    help="M2Det object detection: train, evaluate, detect, export, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (models, convert, browse, eval, detect, serve, train, demo, bench, export):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

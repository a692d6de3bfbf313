"""Entry point of the `m2det` command: each subcommand module registers itself on the app."""

from __future__ import annotations

import typer
from typer.core import TyperCommand

from m2det.cli import (
    ablate,
    bench,
    browse,
    convert,
    demo,
    detect,
    eval,
    explain,
    export,
    models,
    serve,
    train,
)
from m2det.cli.common import CleanHelpCommand, CleanHelpGroup

app = typer.Typer(
    cls=CleanHelpGroup,
    help="M2Det object detection: train, evaluate, detect, export, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (models, convert, browse, eval, detect, explain, serve, train, ablate, demo, bench, export):
    module.register(app)
for command in app.registered_commands:  # help without `<bool>` placeholders, SOURCE not {source}
    if command.cls in (None, TyperCommand):
        command.cls = CleanHelpCommand


def main() -> None:
    app()


if __name__ == "__main__":
    main()

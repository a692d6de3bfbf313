"""Helpers shared by the subcommands: expected errors as one clear line and exit code 2, option
parsing (--set, --sizes) and run folders."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import typer

F = TypeVar("F", bound=Callable[..., Any])

# Errors that carry a message meant for the user (bad file, bad field, bad argument).
USER_ERRORS = (
    FileNotFoundError,
    ValueError,
    KeyError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def user_errors(func: F) -> F:
    """Report expected errors as `error: ...` on stderr and exit 2, not as a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["mlfpn.planes=128", "num_classes=21"]` -> overrides for `get_config` (values read as YAML)."""
    import yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. mlfpn.planes=128), got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def next_run_dir(root: Union[Path, str], prefix: str = "exp") -> Path:
    """A new folder `root/expN` with the smallest N not taken yet (created, so runs never share one)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        candidate = root / f"{prefix}{number}"
        try:
            candidate.mkdir()
        except FileExistsError:
            number += 1
            continue
        return candidate


def parse_sizes(text: Optional[str]) -> Optional[list[int]]:
    """`--sizes` text such as "320,512" as a list of input sizes (None when empty)."""
    if text is None or not text.strip():
        return None
    try:
        sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(
            f"--sizes expects integers separated by commas (e.g. 320,512), got {text!r}"
        ) from None
    if not sizes or min(sizes) < 32:
        raise ValueError(f"--sizes expects input sizes >= 32, got {text!r}")
    return sizes

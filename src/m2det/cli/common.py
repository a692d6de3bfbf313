"""Helpers shared by the subcommands: user mistakes as one clear line and exit code 2, help that
reads cleanly, option parsing (--set, --sizes) and run folders."""

from __future__ import annotations

import errno
import functools
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from m2det.errors import ConfigError, M2DetError

F = TypeVar("F", bound=Callable[..., Any])

# Errors of the file system, which name the path and say what is wrong with it (missing file,
# permission denied, a file where a folder should be); `is_user_error` adds those with a system error
# number (a full disk). Other OSErrors (a broken pipe, a refused connection) are no user mistake.
FILE_SYSTEM_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_NETWORK_ERRORS = (ConnectionError, TimeoutError, BlockingIOError, ChildProcessError, ProcessLookupError)


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is a mistake the user can fix, reported in one line: our own `M2DetError` (a bad
    config, file, argument), an error of the file system, or another OSError naming a file or carrying
    a system error number (a full disk). Anything else is a bug and keeps its traceback."""
    if isinstance(exc, (M2DetError, *FILE_SYSTEM_ERRORS)):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, _NETWORK_ERRORS):
        return exc.errno is not None or exc.filename is not None
    return False


def os_error_message(exc: OSError) -> str:
    """`PATH: reason` for an error of the system (`exc.filename`, `exc.strerror`); the message itself
    for one that we raised with a message of our own."""
    if exc.filename is None or not exc.strerror:
        return str(exc)
    path = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    hint = _os_error_hint(exc)
    return f"{path}: {exc.strerror}" + (f" ({hint})" if hint else "")


def _os_error_hint(exc: OSError) -> Optional[str]:
    """What a file-or-folder error means for the path it names, where the system's words are unclear."""
    if not isinstance(exc.filename, (str, Path)):
        return None
    path = Path(exc.filename)
    if exc.errno == errno.EEXIST and path.is_file():
        return "a file, where a folder is needed"
    if exc.errno == errno.EISDIR and path.is_dir():
        return "a folder, where a file is needed"
    if exc.errno == errno.ENOTDIR:
        blocking = next((parent for parent in (path, *path.parents) if parent.is_file()), None)
        return f"{blocking} is a file, not a folder" if blocking is not None else None
    return None


def user_errors(func: F) -> F:
    """Report user mistakes (`is_user_error`) as one line `error: ...` on stderr and exit 2; any other
    exception propagates, so that a bug shows its traceback instead of a bare `error: 'x'`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (M2DetError, OSError) as exc:
            if not is_user_error(exc):
                raise
            message = os_error_message(exc) if isinstance(exc, OSError) else str(exc)
            typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


class _CleanHelp:
    """Help text as the command line reads: a flag (`--flip/--no-flip`, `--help`) shows no `<bool>`
    placeholder, since it takes no value, and an argument shows as its metavar (SOURCE) in the
    usage line, bare when required and `[SOURCE]` when not, instead of Typer's `{source}`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:  # type: ignore[attr-defined]
            _clean_param(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            _clean_param(option)
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        plain = {
            piece: _plain_usage(param)
            for param in self.get_params(ctx)  # type: ignore[attr-defined]
            if isinstance(param, TyperArgument)
            for piece in param.get_usage_pieces(ctx)
        }
        return [plain.get(piece, piece) for piece in super().collect_usage_pieces(ctx)]  # type: ignore[misc]


def _clean_param(param: Any) -> None:
    """No type placeholder for a flag; an argument's metavar is its name in capitals."""
    if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
        param.metavar = ""
    elif isinstance(param, TyperArgument) and param.metavar is None:
        param.metavar = (param.name or "").upper()


def _plain_usage(argument: TyperArgument) -> str:
    """SOURCE for a required argument, [SOURCE] for an optional one, with ... when it repeats."""
    name = argument.display_name_raw
    return (name if argument.required else f"[{name}]") + ("..." if argument.nargs != 1 else "")


class CleanHelpCommand(_CleanHelp, TyperCommand):
    """A subcommand whose help reads cleanly (see `_CleanHelp`)."""


class CleanHelpGroup(_CleanHelp, TyperGroup):
    """The `m2det` group, whose own help reads cleanly too (see `_CleanHelp`)."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["mlfpn.planes=128", "lr=1e-3"]` -> `{"mlfpn.planes": 128, "lr": 0.001}`: values read as YAML
    with numbers as people write them (`1e-3`, `.5`, `1E3` are numbers; see `m2det.config.load_yaml`),
    `true`/`false`, lists `[90, 110]` and mappings `{backbone: 0.1}`; anything else is a string."""
    import yaml

    from m2det.config import load_yaml

    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. mlfpn.planes=128), got {pair!r}")
        try:
            overrides[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(f"--set {key.strip()}: cannot read the value {value!r} ({problem})") from None
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


PRECISION_HELP = (
    "fp32 | winograd | bf16 | fp16: run a PyTorch model on the fast path (optimize_for_inference) in "
    "this precision; winograd (CPU) is fp32 with 3x3 convs by Winograd where faster, outputs within "
    "~1e-5; bf16/fp16 only on a CPU that computes them natively (default: the eager model, fp32)."
)


def parse_sizes(text: Optional[str]) -> Optional[list[int]]:
    """`--sizes` text such as "320,512" as a list of input sizes (None when empty)."""
    if text is None or not text.strip():
        return None
    try:
        sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise M2DetError(
            f"--sizes expects integers separated by commas (e.g. 320,512), got {text!r}"
        ) from None
    if not sizes or min(sizes) < 32:
        raise M2DetError(f"--sizes expects input sizes >= 32, got {text!r}")
    return sizes


def relaunch_with_torchrun(nproc: Optional[int], argv: Optional[list[str]] = None) -> bool:
    """`--nproc N` (N > 1) outside a `torchrun` group: run this same command again under
    `torchrun --standalone --nproc-per-node N` (as `python -m torch.distributed.run`) without the
    option, wait for it and exit with its status. Returns False (nothing done) for N of 1 or None,
    or inside a group already, where the command runs as it is.
    """
    import os
    import subprocess
    import sys

    if nproc is None or nproc <= 1 or "WORLD_SIZE" in os.environ:
        return False
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "m2det.cli.main", *kept,
    ]  # fmt: skip
    code = subprocess.call(command)
    raise typer.Exit(code=code)

"""The package's error types for user mistakes: a bad config, preset, override, argument or file.

The command line reports these as one line (`error: ...`, exit 2); any other exception is a bug
and keeps its traceback. They subclass ValueError, so `except ValueError` callers keep working.
"""

from __future__ import annotations


class M2DetError(ValueError):
    """A mistake the user can fix: the message says what is wrong and where (a file, a field, an option)."""


class ConfigError(M2DetError):
    """A model or training configuration that cannot work: an unknown preset or key, a value of the
    wrong type or out of range, a bad `--set` override or config file."""


class FileFormatError(M2DetError):
    """A file that exists but cannot be used: not the format expected, or missing what it must hold."""


__all__ = ["ConfigError", "FileFormatError", "M2DetError"]

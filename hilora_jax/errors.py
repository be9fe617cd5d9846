"""Errors caused by what the user gave us (a path, a file, an option), as opposed to bugs.

The `hilora` command prints an instance of `HiloraUserError` as one line, `hilora: error: ...`,
and exits 2 (`--debug` or `HILORA_DEBUG=1` shows the traceback); any other exception is a bug and
keeps its traceback. Every class here also derives from the builtin a caller would already catch
(`ValueError`, `FileNotFoundError`, ...), so `except ValueError` keeps working.

The library's own input errors derive from `HiloraUserError` as well: `ManifestError` (pool
manifests), `TaskFormatError` (task files), `CheckpointError` and its `AdapterError` (weights and
adapter files), `GGUFError`, `UnsupportedConfigError` (config fields).
"""

from __future__ import annotations


class HiloraUserError(Exception):
    """Base class: the input is wrong, not the code. The message names the offending thing."""


class UsageError(HiloraUserError, ValueError):
    """A command-line argument or option has a bad value (unknown router option, empty prompt)."""


class MissingPathError(HiloraUserError, FileNotFoundError):
    """A local path the user named does not exist (or is not the kind of file or folder needed)."""


class OutputExistsError(HiloraUserError, FileExistsError):
    """An output path already exists and `--overwrite` was not given."""


class SourceUnavailableError(HiloraUserError, OSError):
    """A remote source (hub id) could not be fetched."""

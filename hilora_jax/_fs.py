"""File-mode helper for atomic writes.

`tempfile.mkstemp`/`mkdtemp` create private files (0600) and directories (0700); renamed into place
they would keep those modes. `public_mode` gives them the mode a plain `open`/`mkdir` would have
(0666/0777 minus the process umask)."""

from __future__ import annotations

import os


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def public_mode(fd_or_path: int | str | os.PathLike, *, directory: bool = False) -> None:
    mode = (0o777 if directory else 0o666) & ~_umask()
    if isinstance(fd_or_path, int):
        os.fchmod(fd_or_path, mode)
    else:
        os.chmod(fd_or_path, mode)

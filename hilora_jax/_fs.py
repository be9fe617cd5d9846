"""Atomic file and directory writes.

`atomic_dir(out)` does the same for a whole directory (a temp dir renamed to `out`).
`atomic_file(path)` yields a file object on a temp file in `path`'s folder and renames it into
place only when the block succeeds; on any error the temp file is removed and `path` is untouched.
`tempfile.mkstemp`/`mkdtemp` create private files (0600) and directories (0700); `public_mode`
gives them the mode a plain `open`/`mkdir` would have (0666/0777 minus the process umask), so
renamed outputs do not keep the private mode."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """`with atomic_file(p, "wb") as f: ...` -- write to a temp file, rename to `p` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        public_mode(fd)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False):
    """Context manager yielding a temp dir that is renamed to `out` on success only."""
    out = Path(out).absolute()

    class _Ctx:
        def __enter__(self_inner):
            if out.exists() and not overwrite:
                raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite)")
            out.parent.mkdir(parents=True, exist_ok=True)
            self_inner.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp",
                                                   dir=out.parent))
            public_mode(self_inner.tmp, directory=True)
            return self_inner.tmp

        def __exit__(self_inner, et, ev, tb):
            if et is None:
                if out.exists():
                    shutil.rmtree(out)
                os.replace(self_inner.tmp, out)
            else:
                shutil.rmtree(self_inner.tmp, ignore_errors=True)
            return False

    return _Ctx()

"""Atomic writes (temp file/dir, then rename) leave the modes a plain open/mkdir would give."""

import os
import stat

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hilora_jax._fs import atomic_dir, atomic_file  # noqa: E402
from hilora_jax.eval.tasks import MCExample, write_jsonl  # noqa: E402
from hilora_jax.viz import save_png  # noqa: E402


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_outputs_get_the_default_modes(tmp_path):
    old = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plain_dir").mkdir()
        ex = MCExample("p", ("a", "b"), 0, "t", "c")
        out = write_jsonl([ex], tmp_path / "x.jsonl")
        fig = Figure()
        fig.add_subplot().plot([0, 1])
        png = save_png(fig, tmp_path / "x.png")
        with atomic_dir(tmp_path / "model") as d:
            (d / "f").write_text("y")
        assert _mode(out) == _mode(png) == _mode(plain) == 0o644
        assert _mode(tmp_path / "model") == _mode(tmp_path / "plain_dir") == 0o755
    finally:
        os.umask(old)


def test_atomic_file_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_file(target) as f:
        f.write("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as f:
            f.write("partial new content")
            raise RuntimeError("boom")
    assert target.read_text() == "old"  # the previous file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # no temp left over
    with atomic_file(tmp_path / "b.bin", "wb") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"

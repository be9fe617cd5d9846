"""Rewrite imports and paths from the old layout to issue 12's (`hilora_jax.io`, `hilora_jax.model`,
`hilora_jax.lora.{build,train}`), in every tracked .py / .ipynb / .md / .toml / Makefile file.

    python tools/relayout_imports.py          # rewrite in place; prints the files changed

For branches written against the old layout (merge them, then run this). Idempotent. `--move`
performs the `git mv`s themselves (already done on this branch)."""
import re
import subprocess
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
moves = [
    ("hilora_jax/interop/safetensors_io.py", "hilora_jax/io/safetensors.py"),
    ("hilora_jax/interop/gguf.py", "hilora_jax/io/gguf.py"),
    ("hilora_jax/interop/hf.py", "hilora_jax/io/hf.py"),
    ("hilora_jax/interop/peft.py", "hilora_jax/io/peft.py"),
    ("hilora_jax/interop/__init__.py", "hilora_jax/io/__init__.py"),
    ("hilora_jax/checkpoint.py", "hilora_jax/io/checkpoint.py"),
    ("hilora_jax/assets.py", "hilora_jax/io/assets.py"),
    ("hilora_jax/loading.py", "hilora_jax/io/loading.py"),
    ("hilora_jax/config.py", "hilora_jax/model/config.py"),
    ("hilora_jax/projections.py", "hilora_jax/model/projections.py"),
    ("hilora_jax/nn/layers.py", "hilora_jax/model/layers.py"),
    ("hilora_jax/nn/model.py", "hilora_jax/model/llama.py"),
    ("hilora_jax/nn/hook.py", "hilora_jax/model/hook.py"),
    ("hilora_jax/nn/__init__.py", "hilora_jax/model/__init__.py"),
    ("hilora_jax/sharding.py", "hilora_jax/model/sharding.py"),
    ("hilora_jax/poolbuild.py", "hilora_jax/lora/build.py"),
    ("hilora_jax/train.py", "hilora_jax/lora/train.py"),
]
# dotted module renames, most specific first
subs = [
    ("hilora_jax.interop.safetensors_io", "hilora_jax.io.safetensors"),
    ("hilora_jax.interop", "hilora_jax.io"),
    ("hilora_jax.checkpoint", "hilora_jax.io.checkpoint"),
    ("hilora_jax.assets", "hilora_jax.io.assets"),
    ("hilora_jax.loading", "hilora_jax.io.loading"),
    ("hilora_jax.config", "hilora_jax.model.config"),
    ("hilora_jax.projections", "hilora_jax.model.projections"),
    ("hilora_jax.nn.layers", "hilora_jax.model.layers"),
    ("hilora_jax.nn.model", "hilora_jax.model.llama"),
    ("hilora_jax.nn.hook", "hilora_jax.model.hook"),
    ("hilora_jax.sharding", "hilora_jax.model.sharding"),
    ("hilora_jax.poolbuild", "hilora_jax.lora.build"),
    ("hilora_jax.train", "hilora_jax.lora.train"),
    ("hilora_jax/interop/safetensors_io.py", "hilora_jax/io/safetensors.py"),
    ("hilora_jax/interop/", "hilora_jax/io/"),
    ("hilora_jax/nn/model.py", "hilora_jax/model/llama.py"),
    ("hilora_jax/nn/layers.py", "hilora_jax/model/layers.py"),
    ("hilora_jax/nn/", "hilora_jax/model/"),
]
line_subs = [
    ("from hilora_jax import sharding as shd", "from hilora_jax.model import sharding as shd"),
    ("from hilora_jax.nn import layers", "from hilora_jax.model import layers"),
]
if "--move" in sys.argv:
    for a, b in moves:
        (root / b).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "mv", a, b], cwd=root, check=True)
files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split()
skip = ("docs/structure_before.txt", "docs/refactor_before_after.md", "tools/structure_report.py",
        "tools/relayout_imports.py")
changed = []
for f in files:
    if f in skip or not re.search(r"\.(py|ipynb|md|toml|cfg|txt)$|Makefile$|\.ci/run$", f):
        continue
    if f.startswith("tests/data/"):
        continue
    p = root / f
    s = p.read_text()
    t = s
    for a, b in line_subs:
        t = t.replace(a, b)
    for a, b in subs:
        t = re.sub(re.escape(a) + r"(?![\w])", b, t)
    if t != s:
        p.write_text(t)
        changed.append(f)
print("\n".join(changed))

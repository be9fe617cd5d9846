"""Mechanical structure figures of a hilora-jax checkout (issue 12's before/after numbers).

    python tools/structure_report.py [--root DIR] [--json OUT] [--no-trace]

Prints, for the library under `DIR/hilora_jax` (default: this checkout):

* **facts**: for each fact the issue names, every place that states it (`file:line[-line]`; hits
  at most two lines apart form one place, a multi-line table), found by a regular expression per
  fact (listed in `FACTS`; a heuristic, applied identically before and after);
* **largest functions**: the five longest function bodies (`ast`, end_lineno - lineno + 1);
* **files per package**: `.py` files per folder of `hilora_jax`;
* **adapter path** (unless `--no-trace`): a tiny random Llama model and one PEFT adapter written to a
  temp dir are loaded through the public front doors (`load_pool`, `build_router("hilora")`,
  `Engine.generate`) under `sys.setprofile`; the library files entered on the way from the adapter's
  files to the first delta computed for `q_proj` are listed in call order (consecutive repeats
  collapsed), with how many files are entered more than once (in separate visits), and the call
  stacks (library files, outermost first) when the adapter's tensors are read and when the `q_proj`
  delta is computed: a file that appears twice on a stack is a round trip between modules.

Run it with `PYTHONPATH=DIR` so the traced code is the checkout being measured.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

PROJ = r"(?:q|k|v|o|gate|up|down)_proj"

# fact -> (description, regex over one source line, files (glob under root) to search)
FACTS: dict[str, tuple[str, str, str]] = {
    "projection names": (
        "a list/tuple/dict naming three or more adaptable projections",
        rf'(["\']{PROJ}["\'].*){{3,}}|^\s*Projection\(["\']{PROJ}', "hilora_jax/**/*.py"),
    "projection -> block": (
        "which block (self_attn / mlp) holds a projection",
        rf'["\']{PROJ}["\']\s*:\s*["\'](self_attn|mlp)["\']|f["\'](self_attn|mlp)\.\{{|'
        rf'\bm in \(["\']q_proj|\bname in (ATTN|MLP)_MODULES|block = layer\.self_attn|'
        rf'^\s*Projection\(["\']{PROJ}["\'],\s*["\'](self_attn|mlp)',
        "hilora_jax/**/*.py"),
    "projection -> logical axes": (
        "logical (sharding) axes of a projection's input/output",
        rf'{PROJ}.*["\'](embed|q_heads|kv_heads|mlp)["\']\s*[,)]', "hilora_jax/**/*.py"),
    "projection -> shape from config": (
        "a projection's (d_in, d_out) from the config",
        rf'["\']{PROJ}["\']\s*:\s*\(\s*(d|f|self\.q_size|cfg\.)|'
        rf'^\s*Projection\(["\']{PROJ}.*["\'](hidden_size|q_size|kv_size|intermediate_size)["\']',
        "hilora_jax/**/*.py"),
    "shape-letter legend": (
        "a definition of the shape letters (L layers, A adapters, R ROCs, ...)",
        r'\b(L layers|A adapters|R ROCs|B batch, T tokens)\b', "hilora_jax/**/*.py"),
    "PEFT tensor key format": (
        "code that builds a PEFT tensor key string",
        r'f["\'].*\.lora_(\{side\}|A|B)\.weight|f["\']base_model\.model\.', "hilora_jax/**/*.py"),
    "PEFT state-dict writer": (
        "a function that writes PEFT-named LoRA tensors",
        r'^\s*def (peft_state_dict|peft_tensors|_peft_state_dict)\b', "hilora_jax/**/*.py"),
    "classes named LoraAdapter": (
        "a class called LoraAdapter", r'^class LoraAdapter\b', "hilora_jax/**/*.py"),
    "continuation scoring (jitted)": (
        "a jitted function scoring continuations (log-probs of target tokens)",
        r'^\s*def (_score_impl|_impl|_tail_impl|_score_tail)\b', "hilora_jax/**/*.py"),
    "batch placement": (
        "code placing a host batch on the mesh's batch sharding",
        r'device_put\(.*batch_sharding|def _put\b|def _?place\b|def place_batch\b',
        "hilora_jax/**/*.py"),
    "hidden router/hook state": (
        "state kept in an object's __dict__ behind its back",
        r'__dict__\.setdefault|__dict__\[', "hilora_jax/**/*.py"),
    "router name special case": (
        "evaluation code testing a router's name", r'\.name\s*==\s*["\']', "hilora_jax/eval/*.py"),
    "hook call implementations": (
        "methods implementing the model's LoRA hook call (`__call__` / `with_aux` / `delta`)",
        r'def (__call__|with_aux|delta)\(\s*self,\s*layer', "hilora_jax/**/*.py"),
    "masked scale": (
        "s_ij on valid ROCs (mask & scale)", r'where\([^)]*mask[^)]*scale', "hilora_jax/**/*.py"),
    "duck-typed with_aux": (
        "hasattr(..., 'with_aux')", r'hasattr\([^)]*with_aux', "hilora_jax/**/*.py"),
    "router/protocol lists re-declared": (
        "a benchmark stating the router or protocol names itself",
        r'["\']unseen-within["\']\s*,\s*["\']unseen-cross|'
        r'["\']oracle["\']\s*,\s*["\']uniform["\']|["\']retrieval["\']\s*,\s*["\']arrow["\']',
        "benchmarks/**/*.py"),
}


def find_facts(root: Path) -> dict[str, list[str]]:
    out = {}
    for fact, (_, rx, pattern) in FACTS.items():
        r = re.compile(rx)
        hits = []
        for f in sorted(root.glob(pattern)):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if r.search(line):
                    hits.append(f"{f.relative_to(root)}:{i}")
        out[fact] = hits
    return out


def places(hits: list[str], gap: int = 2) -> list[str]:
    """Group line hits into places: consecutive hits in one file (at most `gap` lines apart) are
    one statement (a multi-line table), shown as `file:first-last`."""
    out: list[list] = []
    for h in hits:
        f, n = h.rsplit(":", 1)
        if out and out[-1][0] == f and int(n) - out[-1][2] <= gap:
            out[-1][2] = int(n)
        else:
            out.append([f, int(n), int(n)])
    return [f"{f}:{a}" + (f"-{b}" if b != a else "") for f, a, b in out]


def largest_functions(root: Path, n: int = 5) -> list[tuple[str, int]]:
    fns = []
    for f in sorted((root / "hilora_jax").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fns.append((f"{f.relative_to(root)}:{node.lineno} {node.name}",
                            node.end_lineno - node.lineno + 1))
    return sorted(fns, key=lambda x: -x[1])[:n]


def files_per_package(root: Path) -> dict[str, int]:
    c: Counter = Counter()
    for f in (root / "hilora_jax").rglob("*.py"):
        c[str(f.parent.relative_to(root))] += 1
    return dict(sorted(c.items()))


def adapter_path(root: Path) -> dict:
    """Trace one PEFT adapter from its files to the first `q_proj` delta of routed generation."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    from safetensors.numpy import save_file

    import hilora_jax
    from hilora_jax import Engine, ModelConfig, load_pool
    from hilora_jax.embed import PrecomputedEmbedder
    from hilora_jax.routing.routers import build_router
    try:
        from hilora_jax.model.llama import CausalLM
    except ImportError:
        from hilora_jax.nn.model import CausalLM

    lib = str(Path(hilora_jax.__file__).parent)
    if not lib.startswith(str(root)):
        raise SystemExit(f"hilora_jax imported from {lib}, not under {root}: set PYTHONPATH={root}")
    cfg = ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=64, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
    model = CausalLM(cfg)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    samples = [f"s{i}" for i in range(4)]
    for k in range(2):
        d = tmp / f"ad{k}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
        t = {}
        for li in range(cfg.num_layers):
            for m, dout in (("q_proj", cfg.q_size), ("v_proj", cfg.kv_size)):
                pre = f"base_model.model.model.layers.{li}.self_attn.{m}"
                t[f"{pre}.lora_A.weight"] = rng.standard_normal((4, 48)).astype(np.float32)
                t[f"{pre}.lora_B.weight"] = rng.standard_normal((dout, 4)).astype(np.float32)
        save_file(t, str(d / "adapter_model.safetensors"))
    manifest = {"adapters": {f"ad{k}": {"path": str(tmp / f"ad{k}"),
                                        "samples": [f"{s}{k}" for s in samples]} for k in range(2)}}
    table = {f"{s}{k}": rng.standard_normal(6) + 5 * k for s in samples for k in range(2)}
    table["hello"] = rng.standard_normal(6)
    emb = PrecomputedEmbedder(table)
    engine = Engine(model)

    seq: list[str] = []
    done = []
    stacks: dict[str, list[str]] = {}

    def stack_files(frame) -> list[str]:
        out = []
        while frame is not None:
            f = frame.f_code.co_filename
            if f.startswith(lib):
                rel = str(Path(f).relative_to(Path(lib).parent))
                if not out or out[-1] != rel:
                    out.append(rel)
            frame = frame.f_back
        return out[::-1]

    def prof(frame, event, arg):
        if done or event != "call":
            return
        f = frame.f_code.co_filename
        if not f.startswith(lib):
            return
        rel = str(Path(f).relative_to(Path(lib).parent))
        if not seq or seq[-1] != rel:
            seq.append(rel)
        if "safetensors" in rel and "read" not in stacks:
            stacks["read"] = stack_files(frame)
        loc = frame.f_locals
        if loc.get("name") == "q_proj" and "x" in loc and "layer" in loc and (
                "/routing/" in f or "/lora/" in f):
            done.append(f"{rel}:{frame.f_code.co_firstlineno} {frame.f_code.co_name}")
            stacks["delta"] = stack_files(frame)

    sys.setprofile(prof)
    try:
        pool = load_pool(manifest, model=model, progress=False)
        router = build_router("hilora", pool, options={"embedder": emb, "k": 2})
        routing = router.route(["hello"])
        engine.generate([[1, 2, 3]], max_new_tokens=2, lora=routing.hook)
    finally:
        sys.setprofile(None)
    visits = Counter(seq)
    out = {"files_in_order": seq, "distinct_files": len(visits),
           "files_entered_more_than_once": sorted(k for k, v in visits.items() if v > 1),
           "first_q_proj_delta": done[0] if done else None}
    for k, st in stacks.items():  # call stacks (outermost first): a file twice = a round trip
        c = Counter(st)
        out[f"stack_{k}"] = st
        out[f"stack_{k}_twice"] = sorted(f for f, v in c.items() if v > 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    p.add_argument("--no-trace", action="store_true", help="skip the adapter-path trace")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    facts = find_facts(root)
    facts = {k: places(v) for k, v in facts.items()}
    report = {"root": str(root), "facts": facts,
              "largest_functions": largest_functions(root),
              "files_per_package": files_per_package(root)}
    if not args.no_trace:
        report["adapter_path"] = adapter_path(root)
    print(f"# structure of {root}\n")
    print("## places each fact is stated (count: file:line ...)")
    for fact, hits in facts.items():
        print(f"- {fact} [{FACTS[fact][0]}]: {len(hits)}: {' '.join(hits)}")
    print("\n## five largest functions (lines)")
    for name, n in report["largest_functions"]:
        print(f"- {n:4d}  {name}")
    print("\n## .py files per package")
    per = defaultdict(int, report["files_per_package"])
    for k, v in per.items():
        print(f"- {k}: {v}")
    if "adapter_path" in report:
        ap = report["adapter_path"]
        print(f"\n## one PEFT adapter, files -> q_proj delta in routed generation: "
              f"{ap['distinct_files']} files, {len(ap['files_entered_more_than_once'])} entered "
              f"more than once")
        print("  " + " -> ".join(ap["files_in_order"]))
        print(f"  entered more than once: {ap['files_entered_more_than_once']}")
        print(f"  first q_proj delta: {ap['first_q_proj_delta']}")
        for k, what in (("read", "reading the adapter's safetensors"),
                        ("delta", "computing the q_proj delta in generate")):
            st = ap.get(f"stack_{k}", [])
            print(f"  call stack {what}: {len(st)} frames-files, {len(set(st))} files, "
                  f"entered twice: {ap.get(f'stack_{k}_twice')}")
            print("    " + " > ".join(st))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

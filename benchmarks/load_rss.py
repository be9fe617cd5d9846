"""Peak host memory of loading a sharded bf16 safetensors checkpoint onto 8 (fake CPU) devices.

Issue 14 item 5: a 7B-class model must load within host memory: tensors are streamed one at a
time straight into their `NamedSharding`s (no float32 copy, no second full host copy). Goal:
peak RSS <= 1.3 x checkpoint bytes + 1 GB (on CPU the device buffers themselves live in host
memory, so 1.0 x is the floor).

The checkpoint is synthetic: a Llama config of the chosen size (`--size`, default `1.1b`, the
TinyLlama-1.1B shapes), random bf16 weights (N(0, 0.02^2), norms 1), written as `--shards`
safetensors files plus `model.safetensors.index.json` into `--cache` (reused when present;
tensor by tensor, so writing never holds more than one tensor). Each load runs in a fresh
subprocess with 8 fake CPU devices that reports its own peak RSS over its whole life (imports,
device start-up, load): `VmHWM` of /proc/self/status, and `resource.getrusage(RUSAGE_SELF)
.ru_maxrss` beside it (Linux carries the parent's high-water mark into a child across fork +
exec, so `ru_maxrss` can report the parent's peak; here the parent is small and they agree up to
that), its RSS just before the load, the load time and the bytes of the parameters on the
devices.

    python benchmarks/load_rss.py [--size 1.1b] [--shards 4] [--mesh 1x8] [--dtype bfloat16]
        [--baseline /work/main]   # also measure another checkout's loader, same run

Prints a table and writes `benchmarks/results/load_rss.{json,md}` (`--name` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (hidden, intermediate, layers, heads, kv_heads, vocab)
SIZES = {
    "ci": (512, 2048, 12, 8, 4, 8000),  # ~55M params, largest tensor 7% of the checkpoint
    "1.1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B shapes
    "1.5b": (2048, 8192, 24, 32, 8, 32000),
}
GOAL_FACTOR, GOAL_EXTRA = 1.3, 10**9  # the goal: 1.3 x checkpoint + 1 GB


def llama_config(size: str) -> dict:
    if size not in SIZES:
        raise SystemExit(f"load_rss: unknown --size {size!r}; choose from {sorted(SIZES)}")
    h, i, n, heads, kv, vocab = SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": i, "num_hidden_layers": n, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1,
            "eos_token_id": 2}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes (torch layout) of a Llama checkpoint, in HF's save order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_checkpoint(out: Path, cfg: dict, shards: int, *, seed: int = 0) -> int:
    """Write a random bf16 checkpoint in `shards` files (+ index) to `out`; returns its tensor
    bytes. Streams tensor by tensor; `out/.complete` marks a finished cache entry."""
    import ml_dtypes
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    names = tensor_shapes(cfg)
    sizes = [2 * int(np.prod(s)) for _, s in names]
    total, per = sum(sizes), sum(sizes) / shards
    groups: list[list[int]] = [[] for _ in range(shards)]
    acc = 0
    for k, nb in enumerate(sizes):  # contiguous split into `shards` groups of ~equal bytes
        groups[min(int(acc // per), shards - 1)].append(k)
        acc += nb
    if any(not g for g in groups):
        raise SystemExit(f"load_rss: {shards} shards is too many for {len(names)} tensors")
    rng = np.random.default_rng(seed)
    weight_map = {}
    for si, g in enumerate(groups):
        fname = f"model-{si + 1:05d}-of-{shards:05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for k in g:
            name, shape = names[k]
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + sizes[k]]}
            off += sizes[k]
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        tmp = out / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for k in g:
                name, shape = names[k]
                if name.endswith("norm.weight"):
                    a = np.ones(shape, ml_dtypes.bfloat16)
                else:
                    a = (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                f.write(a.tobytes())
                del a
        os.replace(tmp, out / fname)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / ".complete").write_text(str(total))
    return total


def cached_checkpoint(cache: Path, size: str, shards: int) -> tuple[Path, int]:
    d = cache / f"llama-{size}-bf16-{shards}shards"
    if not (d / ".complete").exists():
        print(f"writing synthetic checkpoint {d} ...", flush=True)
        write_checkpoint(d, llama_config(size), shards)
    return d, int((d / ".complete").read_text())


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak RSS in bytes: `VmHWM`, the high-water mark of its own address space.

    `getrusage(RUSAGE_SELF).ru_maxrss` is reported too, but Linux carries the parent's
    high-water mark into a child across fork/vfork + exec (the address space the child execs
    from is the parent's, or a copy of it), so under a large parent (pytest with torch loaded)
    it reports the parent's peak, not the child's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(model_dir: str, mesh: str, dtype: str) -> dict:
    """Runs in the subprocess: load onto the mesh, report RSS (bytes) and timing as JSON."""
    import jax
    import jax.numpy as jnp

    from hilora_jax.io.loading import load_model
    from hilora_jax.model import sharding as shd

    data, model = (int(x) for x in mesh.split("x"))
    m = shd.make_mesh(data, model)
    jax.block_until_ready(jax.device_put(jnp.zeros(8), shd.replicated(m)))  # devices started
    before = _current_rss()
    t0 = time.perf_counter()
    lm = load_model(model_dir, dtype=jnp.dtype(dtype), mesh=m, progress=False)
    leaves = jax.tree.leaves(__import__("flax").nnx.state(lm))
    jax.block_until_ready(leaves)
    secs = time.perf_counter() - t0
    dev_bytes = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    return {"rss_before_load": before, "rss_after_load": _current_rss(),
            "peak_rss": _peak_rss(),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_s": round(secs, 2), "device_bytes": dev_bytes,
            "params": sum(int(x.size) for x in leaves), "devices": len(jax.devices())}


def measure(model_dir: Path, *, mesh: str = "1x8", dtype: str = "bfloat16",
            src: str | None = None, timeout: float = 1800) -> dict:
    """Load `model_dir` in a fresh subprocess (8 fake CPU devices) and return its report.
    `src`: a checkout whose `hilora_jax` the subprocess imports (default: this one)."""
    # CPU only: variables that make jax load the TPU plugin (set by an importing process, e.g.
    # pytest's) would add the plugin library to the child's resident memory
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               HILORA_QUIET="1")
    root = Path(src).resolve() if src else Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(model_dir),
           "--mesh", mesh, "--dtype", dtype]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"load_rss child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1.1b", choices=sorted(SIZES))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--mesh", default="1x8", help="DATAxMODEL over the 8 fake devices")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/hilora/load_rss"))
    ap.add_argument("--baseline", default=None, help="another checkout to measure too (e.g. main)")
    ap.add_argument("--name", default="load_rss")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.mesh, a.dtype)))
        return
    from common import machine_info, markdown_table, write_json

    d, ckpt = cached_checkpoint(Path(a.cache), a.size, a.shards)
    runs = [("this checkout", None)] + ([("baseline " + a.baseline, a.baseline)] if a.baseline else [])
    rows, results = [], []
    for label, src in runs:
        r = measure(d, mesh=a.mesh, dtype=a.dtype, src=src)
        goal = GOAL_FACTOR * ckpt + GOAL_EXTRA
        r.update(loader=label, checkpoint_bytes=ckpt, goal_bytes=int(goal),
                 meets_goal=r["peak_rss"] <= goal,
                 peak_over_checkpoint=round(r["peak_rss"] / ckpt, 3),
                 load_growth_over_checkpoint=round((r["peak_rss"] - r["rss_before_load"]) / ckpt, 3))
        results.append(r)
        gib = 1 << 30
        rows.append([label, f"{r['params'] / 1e9:.2f}B", round(ckpt / gib, 3),
                     round(r["rss_before_load"] / gib, 3), round(r["peak_rss"] / gib, 3),
                     round(goal / gib, 3), r["peak_over_checkpoint"],
                     r["load_growth_over_checkpoint"], r["load_s"], "yes" if r["meets_goal"] else "NO"])
    headers = ["loader", "params", "ckpt GiB", "RSS before load GiB", "peak RSS GiB",
               "goal GiB (1.3x+1GB)", "peak/ckpt", "(peak-before)/ckpt", "load s", "goal met"]
    table = markdown_table(headers, rows)
    print(table)
    cmd = "python benchmarks/load_rss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": cmd.strip(), "size": a.size, "config": llama_config(a.size),
               "shards": a.shards, "mesh": a.mesh, "dtype": a.dtype, "results": results,
               "machine": machine_info()}
    write_json(a.name, payload)
    from hilora_jax._fs import atomic_file

    md = Path(__file__).resolve().parent / "results" / f"{a.name}.md"
    with atomic_file(md, "w") as f:
        f.write(f"# {a.name}\n\n`{payload['command']}`: {a.size} Llama, bf16, {a.shards} "
                  f"shards, mesh {a.mesh} on 8 fake CPU devices; peak RSS = VmHWM of the "
                f"loading subprocess (ru_maxrss beside it in the JSON).\n\n{table}\n")


if __name__ == "__main__":
    main()

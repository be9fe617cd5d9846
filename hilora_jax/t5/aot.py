"""`hilora aot` for T5 / FLAN-T5: `T5Engine`'s real programs compiled with abstract arguments.

The programs are `hilora_jax.t5.generate.prefill_jit` (encode the prompt once, cross-attention K/V
of every decoder layer into a fresh `DecoderCache`) and `decode_step_jit` (one decoder token),
the very functions `T5Engine.generate` composes, lowered with `jax.ShapeDtypeStruct`s carrying
the shardings of the T5 rules table (`t5.projections.PARAM_AXES`) and of the pool (A input-side,
B output-side axis). The LoRA hook is the router's real hook pytree over a T5 pool: a saved pool
dir's stacked arrays (`--pool DIR`: shapes from its `pool.json`, `aot.pool_dir_arrays`), or a
synthetic one whose rows are the projections named by `targets` (PEFT target names: `q`, `v`,
`wi_0`, ...) in every block of both stacks. Programs are compiled by `aot.compile_variant`
(shared with the Llama family). The report has the schema of `hilora_jax.aot.analyze` (so
`format_table` prints it); the prefill's attention share is not estimated (`None`).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from hilora_jax import aot
from hilora_jax.inference import bucket_length, step_jit
from hilora_jax.model import sharding as shd
from hilora_jax.t5.config import T5Config
from hilora_jax.t5.generate import decode_step, decoder_cache_sharding, prefill, prefill_jit
from hilora_jax.t5.model import T5ForConditionalGeneration
from hilora_jax.t5.projections import projections

DEFAULT_TARGETS = ("q", "v")  # PEFT's T5 default (and LoraHub's FLAN-T5 LoRAs)


def parse_mesh(mesh: str | None, n_devices: int, cfg: T5Config, batch: int) -> tuple[int, int]:
    if mesh is None:
        data, model = 1, n_devices
    else:
        m = re.fullmatch(r"(\d+)x(\d+)", mesh.strip().lower())
        if not m:
            raise aot.AotError(f"--mesh {mesh!r}: expected DATAxMODEL, e.g. 1x8")
        data, model = int(m.group(1)), int(m.group(2))
    if data * model != n_devices:
        raise aot.AotError(f"mesh {data}x{model} uses {data * model} devices; the target has "
                           f"{n_devices}")
    if cfg.num_heads % model:
        raise aot.AotError(f"mesh {data}x{model}: the model axis ({model}) does not divide "
                           f"num_heads={cfg.num_heads}")
    if batch % data:
        raise aot.AotError(f"mesh {data}x{model}: the data axis ({data}) does not divide batch "
                           f"{batch}")
    return data, model


def abstract_pool(spec: aot.PoolSpec, cfg: T5Config, dtype, mesh: Mesh):
    """T5 `PoolArrays` of `ShapeDtypeStruct`s on their shardings, and its description: a saved
    pool dir's stacked arrays (`spec.path`: shapes from its `pool.json`, checked against `cfg`,
    `aot.pool_dir_arrays`), or a synthetic pool (`spec.n` adapters of rank `spec.rank` on every
    row whose PEFT target is in `spec.targets`)."""
    from hilora_jax.lora.pool import PoolArrays

    if spec.path is not None:
        return aot.place_pool(*aot.pool_dir_arrays(spec.path, cfg), mesh)
    names = {p.target for p in projections(cfg)}
    bad = [t for t in spec.targets if t not in names]
    if bad or not spec.targets:
        raise aot.AotError(f"--targets {','.join(spec.targets)}: unknown T5 module(s) {bad}; "
                           f"choose from {','.join(sorted(names))}")
    if spec.n < 1 or spec.rank < 1:
        raise aot.AotError(f"--pool-size {spec.n} / --rank {spec.rank}: both must be >= 1")
    n, r = spec.n, spec.rank
    rows = [p for p in projections(cfg) if p.target in spec.targets]
    sds = aot._sds
    A, B, S, M = {}, {}, {}, {}
    for p in rows:
        L, (d_in, d_out) = p.num_layers(cfg), p.shape(cfg)
        A[p.name] = sds((L, n, r, d_in), dtype)
        B[p.name] = sds((L, n, r, d_out), dtype)
        S[p.name] = sds((L, n, r), jnp.float32)
        M[p.name] = sds((L, n, r), bool)
    arrays = PoolArrays(A=A, B=B, scale=S, mask=M, ranks=sds((n,), jnp.int32),
                        active=sds((n,), bool))
    return aot.place_pool(arrays, {"path": None, "n": n, "rank": r,
                                   "targets": list(spec.targets)}, mesh)


def abstract_params(cfg: T5Config, dtype, mesh: Mesh):
    """Graph definition and state of the T5 model with `ShapeDtypeStruct` leaves on their
    shardings (`t5.load.param_sharding`)."""
    from hilora_jax.t5.load import _path_str, param_sharding

    abs_model = nnx.eval_shape(lambda: T5ForConditionalGeneration(cfg, dtype=dtype,
                                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abs_model)
    for path, var in nnx.to_flat_state(state):
        v = var.get_value()
        var.set_value(aot._sds(v.shape, v.dtype, param_sharding(_path_str(path), v.shape, mesh)))
    return graphdef, state


def analyze(spec: aot.AotSpec, *, log=None, hlo_dir: str | None = None) -> dict:
    """Compile the T5 prefill (encoder + cross K/V) and one decode step for every router in
    `spec.routers` (base first); the report of `hilora_jax.aot.analyze`."""
    cfg = spec.cfg
    if spec.dtype not in ("bfloat16", "float32"):
        raise aot.AotError(f"--dtype {spec.dtype!r}: choose bfloat16 or float32")
    for flag, v in (("--weights", spec.weights), ("--pack-weights", spec.pack_weights)):
        if v not in (None, "none", "bf16", "bfloat16", "float32", "fp32"):
            raise aot.AotError(f"{flag} {v}: Llama-family models only (not T5)")
    for r in spec.routers:
        if r not in aot.ROUTERS:
            raise aot.AotError(f"unknown router {r!r}; choose from {', '.join(aot.ROUTERS)} or all")
    for what, v in (("--batch", spec.batch), ("--prompt", spec.prompt), ("--new", spec.new)):
        if v < 1:
            raise aot.AotError(f"{what} {v}: must be >= 1")
    if spec.topology != aot.LOCAL and spec.topology not in aot.TOPOLOGIES:
        raise aot.AotError(f"unknown topology {spec.topology!r}; choose from "
                           f"{', '.join([*aot.TOPOLOGIES, aot.LOCAL])}")
    log = log or (lambda *_: None)
    dtype = jnp.dtype(spec.dtype)
    devices, chip = aot.topology_devices(spec.topology)
    data, model_ax = parse_mesh(spec.mesh, len(devices), cfg, spec.batch)
    mesh = Mesh(np.asarray(devices).reshape(data, model_ax), (shd.DATA, shd.MODEL))
    routers = ["base", *[r for r in spec.routers if r != "base"]]
    pool_arrays, pool_desc = abstract_pool(spec.pool, cfg, dtype, mesh)  # input errors first
    graphdef, state = abstract_params(cfg, dtype, mesh)
    t = bucket_length(spec.prompt)
    cache_size = bucket_length(spec.new, minimum=16, multiple=64)
    b = spec.batch
    tok_sh = shd.batch_sharding(mesh, (b, t))
    ids, mask = aot._sds((b, t), jnp.int32, tok_sh), aot._sds((b, t), bool, tok_sh)
    tok = aot._sds((b,), jnp.int32, shd.batch_sharding(mesh, (b,)))
    cache = jax.eval_shape(functools.partial(prefill, graphdef, cache_size=cache_size),
                           state, ids, mask, None)
    cache = jax.tree.map(lambda a, s: aot._sds(a.shape, a.dtype, s), cache,
                         decoder_cache_sharding(mesh, cache))
    weights_dev = sum(aot._device_bytes(a) for a in jax.tree.leaves(state))
    kv_dev = sum(aot._device_bytes(a) for a in (*cache.k, *cache.v, *cache.cross_k,
                                                 *cache.cross_v))
    pool_dev = sum(aot._device_bytes(a) for a in (*pool_arrays.A.values(),
                                                   *pool_arrays.B.values()))
    # the encoder weights and the embedding table (B rows gathered) are not read by a decode step
    enc_dev = sum(aot._device_bytes(a) for a in jax.tree.leaves(state["encoder"]))
    emb = state["shared"]["embedding"].get_value()
    emb_unread = aot._device_bytes(emb) - min(b, cfg.vocab_size) * cfg.d_model * dtype.itemsize
    enc_pool = sum(aot._device_bytes(a) for m, a in (*pool_arrays.A.items(),
                                                      *pool_arrays.B.items())
                   if m.startswith("encoder."))
    hbm = chip.hbm_bytes if chip is not None else aot._local_hbm(devices[0])
    wshapes = aot.weight_shapes(state, pool_arrays)
    variants: dict[str, dict] = {}
    for r in routers:
        hook, slots = aot.abstract_hook(r, pool_arrays, b, mesh, spec.max_candidates)

        def finish(prog, entry, compiled, slots=slots):
            if prog == "decode_step":
                lora_min = ((pool_dev - enc_pool) * slots / pool_arrays.num_adapters
                            if slots else 0)
                entry["min_bytes"] = float(weights_dev - enc_dev - max(emb_unread, 0) + kv_dev
                                           + lora_min)
                entry["bytes_over_min"] = entry["bytes"] / entry["min_bytes"]
            else:
                entry["attention_flops"] = None
                entry["attention_share"] = None

        programs = {
            "prefill": lambda hook=hook: prefill_jit.lower(graphdef, state, ids, mask, hook,
                                                           cache_size=cache_size, mesh=mesh),
            "decode_step": lambda hook=hook: step_jit(decode_step, aot._target_backend(mesh)).lower(
                graphdef, state, tok, cache, hook, mesh=mesh)}
        variants[r] = aot.compile_variant(programs, router=r, chip=chip, hbm=hbm,
                                          wshapes=wshapes, hlo_dir=hlo_dir, log=log,
                                          finish=finish)
    main = variants[routers[-1]]
    ok = "error" not in main
    return {
        "model": spec.name, "family": "t5", "topology": spec.topology,
        "chip": dataclasses.asdict(chip) if chip else {"name": str(devices[0].device_kind)},
        "devices": len(devices), "mesh": {"data": data, "model": model_ax},
        "dtype": spec.dtype, "weights": str(dtype), "batch": b, "prompt": spec.prompt,
        "new": spec.new, "prompt_bucket": t, "cache_size": cache_size, "pool": pool_desc,
        "router": routers[-1], "hbm_bytes": hbm,
        "per_device": {"weights": weights_dev, "kv_cache": kv_dev, "pool": pool_dev,
                       "embedding_not_read": max(emb_unread, 0), "encoder_weights": enc_dev},
        "fits": main["fits"], "margin_bytes": main["margin_bytes"],
        "error": None if ok else main["error"],
        "memory": {"prefill": main["prefill"]["memory"],
                   "decode_step": main["decode_step"]["memory"],
                   "peak": main["peak_bytes"]} if ok else None,
        "prefill": main.get("prefill"), "decode_step": main.get("decode_step"),
        "collectives": [{**c, "program": p} for p in ("prefill", "decode_step")
                        for c in main[p]["collectives"]] if ok else [],
        "variants": variants, "ratios": aot.compute_ratios(variants),
    }


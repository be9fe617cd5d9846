"""`hilora aot`: Engine's real prefill / decode step compiled for a TPU slice through libtpu (no TPU
needed), the report's schema, the CLI entry point, bad input; Engine's step functions and the
query-chunked attention keep the results."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hf_utils import hf_logits, make_hf_model, padded_batch

from hilora_jax import aot
from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.model import layers

ROOT = Path(__file__).resolve().parents[1]

# tiny Llama: heads and kv heads divisible by the model axis of a 2x4 mesh
TINY_HF = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def tiny_cfg_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("aot") / "config.json"
    p.write_text(json.dumps(TINY_HF))
    return p


@pytest.fixture(scope="module")
def tpu_hlo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tpu_hlo")


@pytest.fixture(scope="module")
def tpu_report(tiny_cfg_file, tpu_hlo_dir):
    """base + hilora (gathered) on a v5e-8 slice: prefill and decode step, compiled by libtpu
    (HLO texts in `tpu_hlo_dir`)."""
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       pool=aot.PoolSpec(n=6, rank=4, targets=("q_proj", "v_proj")),
                       routers=("hilora",), batch=8, prompt=48, new=16)
    t0 = time.perf_counter()
    rep = aot.analyze(spec, hlo_dir=str(tpu_hlo_dir))
    return rep, time.perf_counter() - t0


def test_tiny_model_compiles_for_tpu_and_fits(tpu_report):
    rep, _ = tpu_report  # compile time is reported by the benchmark, never asserted
    assert rep["chip"]["name"] == "v5e" and rep["devices"] == 8
    assert set(rep["variants"]) == {"base", "hilora"}
    for r, v in rep["variants"].items():
        assert v["fits"] is True and v["margin_bytes"] > 0, r
        for prog in ("prefill", "decode_step"):
            e = v[prog]
            mem = e["memory"]
            assert mem["argument"] > 0 and mem["output"] > 0 and mem["code"] > 0, (r, prog)
            assert mem["total"] <= rep["hbm_bytes"]
            assert e["flops"] > 0 and e["bytes"] > 0 and e["roofline_s"] > 0, (r, prog)
            assert e["bound"] in ("compute", "memory", "ici")
            # no all-gather of a weight or of the LoRA pool (the sharded step keeps them in place)
            assert e["weight_gathers"] == [], (r, prog, e["weight_gathers"])
        # the decode step donates its cache: the new cache aliases the old one
        assert v["decode_step"]["memory"]["alias"] >= rep["per_device"]["kv_cache"]
        pd = rep["per_device"]
        assert v["decode_step"]["min_bytes"] >= pd["weights"] - pd["embedding_not_read"] + \
            pd["kv_cache"]
        assert 0 < pd["embedding_not_read"] < pd["weights"]  # untied: only B rows are gathered
        assert v["decode_step"]["hbm_bytes_est"] > 0 and v["decode_step"]["hbm_over_min"] > 0
    # the routed step does strictly more work than the base step
    assert rep["ratios"]["hilora"]["prefill_flops"] > 1.0
    assert rep["ratios"]["hilora"]["decode_bytes"] >= 1.0


def test_hilora_compiles_as_the_router_runs_it(tiny_cfg_file):
    """`hilora` is the router's default (`auto`, which picks `packed` for the TPU target, with
    the pack and the folded decisions as `prepared()` gives them); both it and the per-row
    `gathered` variant compile and fit (their bytes at 7B scale: benchmarks/results/aot.md)."""
    from jax.sharding import Mesh

    from hilora_jax.model import sharding as shd

    name, cfg = aot.model_config(str(tiny_cfg_file))
    devices, _ = aot.topology_devices("v5e-8")
    mesh = Mesh(np.asarray(devices).reshape(2, 4), (shd.DATA, shd.MODEL))
    arrays, _ = aot.abstract_pool(aot.PoolSpec(n=6, rank=4), cfg, jnp.bfloat16, mesh)
    hook, _ = aot.abstract_hook("hilora", arrays, 8, mesh)
    assert hook.strategy == "auto" and hook.backend == "tpu" and hook.pack is not None
    assert hook.packed_args is not None
    assert {hook.choose(m, (8, t, arrays.A[m].shape[-1])) for m in arrays.A for t in (1, 32)} \
        == {"packed"}
    # the abstract pack is the one `pack_rocs` builds on the host from a concrete pool of the
    # same shapes (every ROC valid): same groups, input layout, shapes and dtypes per layer
    from hilora_jax.lora.pool import PoolArrays
    from hilora_jax.routing.hooks import pack_rocs

    rng = np.random.default_rng(0)
    conc = PoolArrays(
        A={m: rng.normal(size=a.shape).astype(np.float32) for m, a in arrays.A.items()},
        B={m: rng.normal(size=b.shape).astype(np.float32) for m, b in arrays.B.items()},
        scale={m: np.ones(a.shape[:3], np.float32) for m, a in arrays.A.items()},
        mask={m: np.ones(a.shape[:3], bool) for m, a in arrays.A.items()},
        ranks=np.full(6, 4, np.int32), active=np.ones(6, bool))
    host = pack_rocs(conc)
    assert (hook.pack.groups, hook.pack.inputs) == (host.groups, host.inputs)
    assert len(host.inputs) < len(arrays.A)  # q/k/v (and gate/up) share their input's pack
    for side in ("A", "B", "w", "valid"):
        got, want = getattr(hook.pack, side), getattr(host, side)
        assert sorted(got) == sorted(want), side
        for m in want:
            assert [x.shape for x in got[m]] == [x.shape for x in want[m]], (side, m)
    for side in ("w", "valid"):
        for m in host.w:
            assert [x.dtype for x in getattr(hook.pack, side)[m]] == \
                [x.dtype for x in getattr(host, side)[m]], (side, m)
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       pool=aot.PoolSpec(n=6, rank=4), routers=("hilora", "hilora-gathered"),
                       batch=8, prompt=16, new=16)
    rep = aot.analyze(spec)
    assert set(rep["variants"]) == {"base", "hilora", "hilora-gathered"}
    for r, v in rep["variants"].items():
        assert v["fits"] is True and v["decode_step"]["weight_gathers"] == [], r
        assert v["decode_step"]["hbm_bytes_est"] >= rep["variants"]["base"]["decode_step"][
            "hbm_bytes_est"], r


def test_tpu_decode_step_has_no_cross_program_prefetch(tpu_report, tpu_hlo_dir, tiny_cfg_file,
                                                      monkeypatch):
    """XLA:TPU's cross-program prefetch copies the largest eligible parameter whole into on-chip
    memory on every run, although the decode step only gathers rows of it (here the embedding
    table; in a 7B batch-1 routed step a stacked LoRA pool array, ~100 MiB per step). The TPU
    decode step is compiled with it off (`inference.DECODE_STEP_OPTIONS`): no prefetch in its
    HLO, and the same step compiled without the options reads the whole table shard more."""
    from hilora_jax import inference

    rep, _ = tpu_report
    for r in ("base", "hilora"):
        hlo = (tpu_hlo_dir / f"{r}_decode_step.hlo.txt").read_text()
        assert "cross_program_prefetch" not in hlo, r
    assert inference.decode_step_jit_for("tpu") is not inference.decode_step_jit_for("cpu")
    assert inference.decode_step_jit_for("cpu") is inference.decode_step_jit
    # without the options (the step as CPU/GPU compile it, lowered for the TPU slice)
    monkeypatch.setattr(aot, "decode_step_jit_for", lambda _p: inference.decode_step_jit)
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       pool=aot.PoolSpec(n=6, rank=4, targets=("q_proj", "v_proj")),
                       routers=(), batch=8, prompt=48, new=16)
    old_dir = tpu_hlo_dir / "default_options"
    old = aot.analyze(spec, hlo_dir=str(old_dir))
    assert "cross_program_prefetch" in (old_dir / "base_decode_step.hlo.txt").read_text()
    extra = (old["variants"]["base"]["decode_step"]["hbm_bytes_est"]
             - rep["variants"]["base"]["decode_step"]["hbm_bytes_est"])
    assert extra >= rep["per_device"]["embedding_not_read"] > 0


def test_report_schema(tpu_report):
    rep, _ = tpu_report
    assert isinstance(rep["fits"], bool)
    assert isinstance(rep["hbm_bytes"], int) and rep["hbm_bytes"] == 16 * 2**30
    assert set(rep["memory"]) >= {"prefill", "decode_step", "peak"}
    assert set(rep["memory"]["prefill"]) >= {"argument", "output", "alias", "temp", "code", "total"}
    assert set(rep["prefill"]) >= {"flops", "bytes", "roofline_s"}
    assert set(rep["decode_step"]) >= {"flops", "bytes", "min_bytes", "roofline_s"}
    assert rep["collectives"], "a 2x4 mesh reduces over the model axis"
    for c in rep["collectives"]:
        assert set(c) >= {"kind", "count", "bytes"} and c["count"] >= 1 and c["bytes"] > 0
    json.dumps(rep)  # JSON-serialisable as is
    assert "| hilora |" in aot.format_table(rep)


@pytest.fixture(scope="module")
def tpu_report_int8(tiny_cfg_file):
    """The `tpu_report` configuration with `--weights int8`."""
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       weights="int8", pool=aot.PoolSpec(n=6, rank=4, targets=("q_proj", "v_proj")),
                       routers=("hilora",), batch=8, prompt=48, new=16)
    return aot.analyze(spec)


def test_int8_weights_compile_for_tpu_and_read_int8(tpu_report, tpu_report_int8):
    """`--weights int8`: int8 kernels + float32 per-channel scales on their rules-table
    shardings. Per device (mesh 2x4, every kernel split 4 ways on its model axis): kernels take
    half their bf16 bytes, plus the scales (sharded with the output axis, replicated for o_proj /
    down_proj whose output is the embedding axis); the decode step's estimated HBM traffic drops
    by exactly the weight bytes saved (the int8 -> bf16 convert is fused into the matmuls, no
    bf16 copy of a kernel is written), and nothing is all-gathered."""
    bf, q8 = tpu_report[0], tpu_report_int8
    assert q8["weights"] == "int8" and bf["weights"] == "bfloat16"
    h, f, v = TINY_HF["hidden_size"], TINY_HF["intermediate_size"], TINY_HF["vocab_size"]
    L, n_q, n_kv = TINY_HF["num_hidden_layers"], 8 * 16, 4 * 16
    kernels = L * (h * n_q * 2 + h * n_kv * 2 + h * f * 3) + h * v  # elements
    sharded_out = L * (n_q + 2 * n_kv + 2 * f) + v  # q, k, v, gate, up, lm_head: out / 4
    replicated_out = L * (h + h)  # o_proj, down_proj: out = hidden (embed axis, replicated)
    scale_bytes = 4 * (sharded_out // 4 + replicated_out)
    saved = kernels * 2 // 4 - kernels // 4 - scale_bytes
    assert bf["per_device"]["weights"] - q8["per_device"]["weights"] == saved
    for r in ("base", "hilora"):
        v8, vb = q8["variants"][r], bf["variants"][r]
        assert v8["fits"] is True
        for prog in ("prefill", "decode_step"):
            assert v8[prog]["weight_gathers"] == [], (r, prog)
        d8, db = v8["decode_step"], vb["decode_step"]
        assert db["min_bytes"] - d8["min_bytes"] == saved
        drop = db["hbm_bytes_est"] - d8["hbm_bytes_est"]
        assert abs(drop - saved) <= 0.02 * saved, (r, drop, saved)
    assert "int8 weights" in aot.format_table(q8)


def test_int4_weights_compile_for_tpu_and_read_five_bits(tiny_cfg_file, tpu_report):
    """`--weights int4`: 4-bit codes `[in/32, 32, out]` with float16 scale and min per group, on
    their rules-table shardings (every group and channel axis here divides the model axis, so each
    device holds a quarter). Per device the kernels take 0.625 bytes per weight (0.5 + 2 x 2 / 32)
    instead of bf16's 2; the decode step's minimum drops by exactly that and its estimated HBM
    traffic by as much within 2% (the decode steps' matmuls read the codes, no float kernel is
    written); nothing is all-gathered; fits."""
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       weights="int4", pool=aot.PoolSpec(n=6, rank=4, targets=("q_proj", "v_proj")),
                       routers=("hilora",), batch=8, prompt=48, new=16)
    q4, bf = aot.analyze(spec), tpu_report[0]
    assert q4["weights"] == "int4"
    h, f, v = TINY_HF["hidden_size"], TINY_HF["intermediate_size"], TINY_HF["vocab_size"]
    L, n_q, n_kv = TINY_HF["num_hidden_layers"], 8 * 16, 4 * 16
    kernels = L * (h * n_q * 2 + h * n_kv * 2 + h * f * 3) + h * v  # elements
    saved = kernels // 4 * 2 - kernels // 4 * 5 // 8
    assert bf["per_device"]["weights"] - q4["per_device"]["weights"] == saved
    for r in ("base", "hilora"):
        v4, vb = q4["variants"][r], bf["variants"][r]
        assert v4["fits"] is True
        for prog in ("prefill", "decode_step"):
            assert v4[prog]["weight_gathers"] == [], (r, prog)
        d4, db = v4["decode_step"], vb["decode_step"]
        assert db["min_bytes"] - d4["min_bytes"] == saved
        drop = db["hbm_bytes_est"] - d4["hbm_bytes_est"]
        assert abs(drop - saved) <= 0.02 * saved, (r, drop, saved)
    assert "int4 weights" in aot.format_table(q4)


def test_int8_pack_compiles_for_tpu_and_reads_less(tiny_cfg_file, tpu_report_int8):
    """`--pack-weights int8` (the hilora router's `pack_weights=int8`): the decode step's
    arguments shrink by the pack's bytes saved, its minimum drops by the int8 slots' share and
    the estimated HBM traffic by exactly as much (the packed path reads the int8 rows; no float
    copy is made); no gathers, fits; the other routers' programs are unchanged."""
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       weights="int8", pack_weights="int8",
                       pool=aot.PoolSpec(n=6, rank=4, targets=("q_proj", "v_proj")),
                       routers=("hilora",), batch=8, prompt=48, new=16)
    rep, fp = aot.analyze(spec), tpu_report_int8
    assert rep["pack_weights"] == "int8" and fp["pack_weights"] is None
    v8, vf = rep["variants"]["hilora"], fp["variants"]["hilora"]
    assert v8["fits"] is True and v8["decode_step"]["weight_gathers"] == []
    d8, df = v8["decode_step"], vf["decode_step"]
    assert d8["memory"]["argument"] < df["memory"]["argument"]
    saved = df["min_bytes"] - d8["min_bytes"]
    assert saved > 0 and df["hbm_bytes_est"] - d8["hbm_bytes_est"] == saved
    assert rep["variants"]["base"]["decode_step"]["bytes"] == fp["variants"]["base"]["decode_step"]["bytes"]
    assert "int8 LoRA pack" in aot.format_table(rep)

@pytest.fixture(scope="module")
def llama_pool_dir(tmp_path_factory, tiny_cfg_file):
    """A real pool dir (`lora.io.save_pool`) of two PEFT adapters on a random model of the tiny
    config: q/v at rank 4 and all-linear rsLoRA at rank 8."""
    import torch
    import transformers as tf
    from peft_utils import POOL_SPECS, make_pool_dirs

    from hilora_jax.lora.io import load_pool, save_pool

    root = tmp_path_factory.mktemp("llamapool")
    torch.manual_seed(0)
    hf_cfg = tf.LlamaConfig(**{k: v for k, v in TINY_HF.items() if k != "model_type"})
    tf.LlamaForCausalLM(hf_cfg).save_pretrained(str(root / "model"))
    dirs = make_pool_dirs(root / "model", root / "adapters",
                          {k: POOL_SPECS[k] for k in ("qv_r4", "all_r8_rslora")}, seed=3)
    (root / "manifest.json").write_text(json.dumps({"adapters": dirs}))
    _, cfg = aot.model_config(str(tiny_cfg_file))
    pool = load_pool(root / "manifest.json", model=cfg, progress=False)
    return save_pool(pool, root / "pool"), cfg


def test_llama_pool_dir_compiles_for_tpu(llama_pool_dir, tiny_cfg_file):
    """`aot --pool DIR` on a Llama pool: the abstract arrays are the saved pool's (shapes and
    dtypes from its pool.json alone), and base + hilora compile and fit on a v5e-8 with no
    all-gather of a weight or of the pool."""
    import jax

    from hilora_jax.lora.io import load_pool_dir

    pdir, cfg = llama_pool_dir
    real = load_pool_dir(pdir).arrays
    arrays, desc = aot.pool_dir_arrays(str(pdir), cfg)
    assert (desc["n"], desc["rank"]) == (2, 8)
    assert set(desc["targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"}
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), arrays)
            == jax.tree.map(lambda a: (a.shape, a.dtype), real))
    name, _ = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       pool=aot.PoolSpec(path=str(pdir)), routers=("hilora",), batch=8,
                       prompt=16, new=16)
    rep = aot.analyze(spec)
    assert rep["pool"]["path"] == str(pdir) and (rep["pool"]["n"], rep["pool"]["rank"]) == (2, 8)
    assert rep["pool"]["bytes"] == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(real))
    assert rep["fits"] is True and set(rep["variants"]) == {"base", "hilora"}
    for prog in ("prefill", "decode_step"):
        assert rep["variants"]["hilora"][prog]["weight_gathers"] == [], prog
    assert (rep["variants"]["hilora"]["decode_step"]["memory"]["argument"]
            > rep["variants"]["base"]["decode_step"]["memory"]["argument"])


def test_cli_weights_flag_reaches_the_spec(tiny_cfg_file):
    import argparse

    p = argparse.ArgumentParser()
    aot.add_aot_args(p)
    spec = aot.spec_from_args(p.parse_args(["--model", str(tiny_cfg_file), "--weights", "int8",
                                            "--pack-weights", "int8"]))
    assert spec.weights == "int8" and spec.pack_weights == "int8"


def test_collective_parser_flags_weight_gathers():
    hlo = (
        "  %all-gather.1 = bf16[4096,4096]{1,0:T(8,128)(2,1)} all-gather(bf16[4096,512]{1,0} %p), "
        "channel_id=1, dimensions={1}\n"
        "  %ags = (bf16[8,64]{1,0}, bf16[8,512]{1,0}) all-gather-start(bf16[8,64]{1,0} %x)\n"
        "  %agd = bf16[8,512]{1,0} all-gather-done((bf16[8,64]{1,0}, bf16[8,512]{1,0}) %ags)\n"
        "  %all-reduce.2 = f32[8,1,128]{2,1,0} all-reduce(f32[8,1,128]{2,1,0} %y), to_apply=%add\n"
    )
    cs = aot.collectives(hlo)
    assert [(c["kind"], c["shape"], c["bytes"]) for c in cs] == [
        ("all-gather", [4096, 4096], 4096 * 4096 * 2), ("all-gather", [8, 512], 8 * 512 * 2),
        ("all-reduce", [8, 1, 128], 8 * 128 * 4)]
    summary = {c["kind"]: (c["count"], c["bytes"]) for c in aot.summarize_collectives(cs)}
    assert summary == {"all-gather": (2, 4096 * 4096 * 2 + 8 * 512 * 2), "all-reduce": (1, 4096)}
    import jax

    state = {"w": jax.ShapeDtypeStruct((4096, 4096), "bfloat16")}
    shapes = aot.weight_shapes(state, None)
    assert [c for c in cs if tuple(c["shape"]) in shapes] == [cs[0]]


def test_local_backend_times_the_compiled_calls(tiny_cfg_file):
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="local", mesh="2x4", dtype="float32",
                       pool=aot.PoolSpec(n=3, rank=2), routers=("oracle",), batch=2, prompt=16,
                       new=8)
    rep = aot.analyze(spec)
    assert rep["fits"] is None and rep["prefill"]["roofline_s"] is None  # no chip table for CPU
    for r in ("base", "oracle"):
        for prog in ("prefill", "decode_step"):
            assert rep["variants"][r][prog]["measured_s"] > 0
    assert rep["ratios"]["oracle"]["decode_measured"] > 0


@pytest.mark.parametrize("kw,match", [
    (dict(topology="v9z-8"), "unknown topology 'v9z-8'"),
    (dict(mesh="1x8"), "does not divide num_key_value_heads=4"),
    (dict(mesh="3x3"), "mesh 3x3 uses 9 devices"),
    (dict(weights="int3"), "--weights 'int3': unknown; choose int8 or int4"),
    (dict(weights="int4", cfg=dataclasses.replace(aot.PRESETS["smollm2-135m"], hidden_size=600)),
     "--weights int4: q_proj has 600 inputs, not a multiple of the group size 32"),
    (dict(pack_weights="int4"), "--pack-weights 'int4': unknown; choose int8"),
    (dict(routers=("nope",)), "unknown router 'nope'"),
    (dict(pool=aot.PoolSpec(targets=("q_proj", "x_proj"))), r"unknown module\(s\) \['x_proj'\]"),
    (dict(prompt=500, new=64), "exceed the model's max_position_embeddings=512"),
])
def test_bad_input_is_one_clear_error(tiny_cfg_file, kw, match):
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(**{**dict(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", batch=8,
                                 prompt=32, new=8), **kw})
    with pytest.raises(aot.AotError, match=match):
        aot.analyze(spec)


def test_unknown_preset_and_pool_that_does_not_fit(tmp_path, tiny_cfg_file):
    with pytest.raises(aot.AotError, match="unknown preset 'llama-9b'"):
        aot.model_config(preset="llama-9b")
    assert aot.model_config(preset="llama-2-7b")[1].num_layers == 32
    # a saved pool whose q_proj was built for another model (hidden 64, not 128)
    pool = tmp_path / "pool"
    pool.mkdir()
    arrays = {"A.q_proj": [2, 3, 4, 64], "B.q_proj": [2, 3, 4, 128], "scale.q_proj": [2, 3, 4],
              "mask.q_proj": [2, 3, 4], "ranks": [3], "active": [3]}
    dt = {"mask.q_proj": "bool", "active": "bool", "ranks": "int32"}
    (pool / "pool.json").write_text(json.dumps({"arrays": {
        k: {"shape": v, "dtype": dt.get(k, "float32")} for k, v in arrays.items()}}))
    name, cfg = aot.model_config(str(tiny_cfg_file))
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4",
                       pool=aot.PoolSpec(path=str(pool)), batch=8, prompt=32, new=8)
    with pytest.raises(aot.AotError, match=r"module q_proj has L=2, \(d_in, d_out\)=\(64, 128\); "
                                           r"the model has L=2, \(128, 128\)"):
        aot.analyze(spec)


def _hilora(*args):
    script = Path(sys.executable).parent / "hilora"
    assert script.exists(), f"the installed entry point {script} is missing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(script), "aot", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_entry_point_writes_the_json(tmp_path, tiny_cfg_file):
    out = tmp_path / "aot.json"
    p = _hilora("--model", str(tiny_cfg_file), "--topology", "v5e-8", "--mesh", "2x4", "--dtype",
                "bfloat16", "--pool-size", "4", "--rank", "4", "--targets", "q_proj,v_proj",
                "--router", "hilora", "--batch", "8", "--prompt", "32", "--new", "8",
                "--json", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["fits"] is True and rep["router"] == "hilora" and rep["topology"] == "v5e-8"
    assert rep["decode_step"]["min_bytes"] > 0 and rep["prefill"]["roofline_s"] > 0
    assert "| hilora |" in p.stdout


def test_cli_bad_input_exits_with_one_line(tmp_path, tiny_cfg_file):
    p = _hilora("--preset", "llama-9b", "--topology", "v5e-8")
    assert p.returncode == 2
    assert p.stderr.strip() == ("hilora: error: unknown preset 'llama-9b'; choose from "
                                "llama-2-7b, llama-3.1-8b, mistral-7b, qwen2.5-7b, smollm2-135m, "
                                "flan-t5-large")
    assert not (tmp_path / "x.json").exists()


# -- the functions hilora aot compiles are the ones Engine runs ---------------------------------
@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_model(d, "llama", kv_heads=2)
    return hf, Engine(load_model(d, progress=False))


def test_engine_step_functions_reproduce_generate(hf_tiny):
    _, eng = hf_tiny
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 61, n)) for n in (5, 9, 3)]
    gen = eng.generate(prompts, max_new_tokens=6, stop_tokens=[-1])
    from hilora_jax.inference import bucket_length, pad_batch

    t = bucket_length(max(map(len, prompts)))
    ids, mask = pad_batch(prompts, t, 0)
    logits, cache = eng.prefill(ids, mask, cache_size=t + bucket_length(6, 16, 64))
    toks = [np.asarray(logits).argmax(-1)]
    for _ in range(5):
        logits, cache = eng.decode_step(toks[-1], cache)
        toks.append(np.asarray(logits).argmax(-1))
    np.testing.assert_array_equal(np.stack(toks, 1), gen.tokens)


@pytest.mark.parametrize("program", ["decode_step", "generate"])
def test_decode_options_a_compiler_refuses_fall_back(hf_tiny, monkeypatch, program):
    """`Engine.decode_step` and `Engine.generate`'s loop compile with the backend's
    `DECODE_STEP_OPTIONS`; a compiler that does not know one of them (another libtpu version)
    compiles with its defaults instead, with one warning, and gives the same result."""
    from hilora_jax import inference
    from hilora_jax.inference import bucket_length, pad_batch

    _, eng = hf_tiny
    ids, mask = pad_batch([[5, 9, 11], [7, 3]], 16, 0)
    size = 16 + bucket_length(4, 16, 64)
    if program == "decode_step":
        def run():
            return eng.decode_step(np.array([4, 6]), eng.prefill(ids, mask, cache_size=size)[1])[0]
    else:
        def run():
            return eng.generate([[5, 9, 11], [7, 3]], max_new_tokens=5, stop_tokens=[-1]).tokens
    ref = run()
    monkeypatch.setitem(inference.DECODE_STEP_OPTIONS, "cpu", {"xla_no_such_option_here": 1})
    monkeypatch.setattr(inference, "_REJECTED_OPTIONS", set())
    assert dict(inference.decode_options("cpu")) == {"xla_no_such_option_here": 1}
    with pytest.warns(RuntimeWarning, match="refused the decode options"):
        got = run()
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert inference._REJECTED_OPTIONS == {"cpu"}
    assert inference.decode_step_jit_for("cpu") is inference.decode_step_jit
    assert eng.generate_jit("cpu") is eng._generate  # back to the defaults' program


def test_generate_loop_compiles_with_the_decode_options_for_tpu(hf_tiny):
    """`Engine.generate_jit("tpu")`: the generation program (prefill + while_loop of decode
    steps) as libtpu compiles it for v5e-1 with `DECODE_STEP_OPTIONS["tpu"]` has no
    cross-program prefetch, and its loop body moves no more HBM bytes per step than the same
    program with XLA's defaults (`hilora_jax.aot.hbm_traffic` of the while body)."""
    import jax

    from hilora_jax.aot import hbm_traffic, loop_body, topology_devices

    _, eng = hf_tiny
    devices, _ = topology_devices("v5e-1")
    sh = jax.sharding.SingleDeviceSharding(devices[0])

    def sds(a, dtype=None):
        return jax.ShapeDtypeStruct(np.shape(a), dtype or a.dtype, sharding=sh)

    state = jax.tree.map(sds, eng.state)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (state, sds(np.zeros((4, 32), np.int32)), sds(np.zeros((4, 32), bool)),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sh), sds(np.float32(0)),
            sds(np.float32(1)), sds(np.zeros(1, np.int32)), sds(np.int32(0)), None)
    kw = dict(cache_size=96, max_new=64, greedy=True)
    on = eng.generate_jit("tpu").lower(*args, **kw).compile().as_text()
    off = jax.jit(eng._generate_impl, static_argnames=("cache_size", "max_new", "greedy")).lower(
        *args, **kw).compile().as_text()
    assert "cross_program_prefetch" not in on
    body_on, body_off = loop_body(on), loop_body(off)
    assert body_on and body_off
    assert 0 < hbm_traffic(on, computation=body_on)[0] <= hbm_traffic(off, computation=body_off)[0]


def test_chunked_attention_matches_transformers(hf_tiny, monkeypatch):
    hf, eng = hf_tiny
    ids, mask = padded_batch(np.random.default_rng(2), (40, 33, 17), 40)
    ref = hf_logits(hf, ids, mask)
    whole = np.asarray(eng.forward(ids, mask))
    assert layers.attention_chunk(3, 6, 40, 40, budget=3 * 6 * 40 * 40) == 40
    monkeypatch.setattr(layers, "ATTN_SCORE_BUDGET", 3 * 6 * 16 * 40)  # 16-query blocks, padded
    assert layers.attention_chunk(3, 6, 40, 40) == 16
    chunked = np.asarray(Engine(eng._model(eng.state)).forward(ids, mask))
    valid = mask.astype(bool)
    assert np.abs(chunked - ref)[valid].max() <= 1e-4
    assert np.abs(chunked - whole)[valid].max() <= 1e-5


def test_hbm_traffic_estimate_counts_kernels_prefetches_and_in_place_updates():
    hlo = """HloModule m

%fused_computation.1 (p0: bf16[100,64], p1: s32[8]) -> bf16[8,64] {
  %p0 = bf16[100,64]{1,0} parameter(0)
  %p1 = s32[8]{0} parameter(1)
  ROOT %gather.1 = bf16[8,64]{1,0} gather(%p0, %p1), offset_dims={1}
}

ENTRY %main (param.0: bf16[100,64], param.1: s32[8], param.2: bf16[8,16,64]) -> bf16[8,16,64] {
  %param.0 = bf16[100,64]{1,0} parameter(0)
  %param.1 = s32[8]{0} parameter(1)
  %param.2 = bf16[8,16,64]{2,1,0} parameter(2)
  %gf = bf16[8,64]{1,0} fusion(%param.0, %param.1), kind=kLoop, calls=%fused_computation.1
  %cs = (bf16[8,16,64]{2,1,0:S(1)}, bf16[8,16,64]{2,1,0}, u32[]) copy-start(%param.2)
  %cd = bf16[8,16,64]{2,1,0:S(1)} copy-done(%cs)
  ROOT %dus = bf16[8,16,64]{2,1,0:S(1)} fusion(%cd, %gf), kind=kLoop, calls=%fc.2, backend_config={"aliasing_operands":{"lists":[{"indices":["0","1"]}]}}
}
"""
    total, parts = aot.hbm_traffic(hlo)
    # gather: its result (1 KiB) + at most that much of the table + the indices; the prefetch of
    # the 16 KiB cache once; the in-place update writes only its 1 KiB update (read from HBM)
    assert parts == {"fusion": 1024 + 1024 + 32, "copy-start": 16384, "in-place update": 1024}
    assert total == sum(parts.values())

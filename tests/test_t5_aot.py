"""`hilora aot` on T5: `T5Engine`'s real prefill (encoder + cross-attention K/V) and decode step
compiled for a v5e-8 slice through libtpu on a tiny T5 config with a routed T5 pool (synthetic, or
a saved pool dir of PEFT adapters: `--pool DIR`, refused when it was built for another model); the
`flan-t5-large` preset's published shapes; the step functions reproduce `T5Engine.generate`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from t5_utils import make_hf_t5, padded

from hilora_jax import aot
from hilora_jax.t5.config import T5Config
from hilora_jax.t5.generate import T5Engine, decode_step_jit, prefill_jit
from hilora_jax.t5.load import load_t5

ROOT = Path(__file__).resolve().parents[1]
# heads divisible by the model axis of a 2x4 mesh; encoder and decoder depths differ
TINY_T5 = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
           "vocab_size": 256, "d_model": 64, "d_kv": 8, "d_ff": 128, "num_layers": 2,
           "num_decoder_layers": 3, "num_heads": 8, "feed_forward_proj": "gated-gelu",
           "tie_word_embeddings": False, "decoder_start_token_id": 0, "pad_token_id": 0,
           "eos_token_id": 1}


@pytest.fixture(scope="module")
def t5_cfg_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t5aot") / "config.json"
    p.write_text(json.dumps(TINY_T5))
    return p


def test_tiny_t5_compiles_for_tpu_with_a_routed_pool(t5_cfg_file):
    name, cfg = aot.model_config(str(t5_cfg_file))
    assert isinstance(cfg, T5Config)
    spec = aot.AotSpec(cfg=cfg, name=name, topology="v5e-8", mesh="2x4", dtype="bfloat16",
                       pool=aot.PoolSpec(n=6, rank=4, targets=("q", "v", "wo")),
                       routers=("hilora", "arrow"), batch=8, prompt=48, new=16)
    rep = aot.analyze(spec)
    assert rep["family"] == "t5" and rep["chip"]["name"] == "v5e" and rep["devices"] == 8
    # q, v of the three attention blocks and wo of both feed-forwards
    assert set(rep["pool"]["targets"]) == {"q", "v", "wo"}
    assert set(rep["variants"]) == {"base", "hilora", "arrow"}
    for r, v in rep["variants"].items():
        assert v["fits"] is True and v["margin_bytes"] > 0, r
        for prog in ("prefill", "decode_step"):
            e = v[prog]
            assert e["memory"]["argument"] > 0 and e["flops"] > 0 and e["bytes"] > 0, (r, prog)
            assert not e["weight_gathers"], (r, prog, e["weight_gathers"])  # sharded in place
        assert v["decode_step"]["min_bytes"] > 0
    assert rep["ratios"]["hilora"]["decode_roofline"] >= 1.0
    # the routed programs read the pool: more argument bytes than base
    assert (rep["variants"]["hilora"]["decode_step"]["memory"]["argument"]
            > rep["variants"]["base"]["decode_step"]["memory"]["argument"])
    assert "| hilora | yes" in aot.format_table(rep)


def test_flan_t5_large_preset_and_bad_targets():
    name, cfg = aot.model_config(preset="flan-t5-large")
    assert isinstance(cfg, T5Config)
    assert (cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads, cfg.num_layers,
            cfg.num_decoder_layers, cfg.vocab_size) == (1024, 2816, 64, 16, 24, 24, 32128)
    assert cfg.is_gated_act and not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs
    spec = aot.AotSpec(cfg=cfg, name=name, pool=aot.PoolSpec(n=33, targets=("q_proj",)))
    with pytest.raises(aot.AotError, match=r"unknown T5 module\(s\) \['q_proj'\]"):
        aot.analyze(spec)
    spec = aot.AotSpec(cfg=cfg, name=name, mesh="1x3", pool=aot.PoolSpec(n=33, targets=("q",)))
    with pytest.raises(aot.AotError, match="mesh 1x3 uses 3 devices"):
        aot.analyze(spec)
    for flag, kw in (("--weights", dict(weights="int8")), ("--pack-weights", dict(pack_weights="int8"))):
        spec = aot.AotSpec(cfg=cfg, name=name, pool=aot.PoolSpec(n=33, targets=("q",)), **kw)
        with pytest.raises(aot.AotError, match=f"^{flag} int8: Llama-family models only"):
            aot.analyze(spec)


def test_step_functions_reproduce_generate(tmp_path):
    """The compiled `prefill_jit` + `decode_step_jit` (what `hilora aot` lowers) greedy-decode the
    tokens `T5Engine.generate` returns."""
    make_hf_t5(tmp_path, "v1.1")
    model = load_t5(tmp_path)
    eng = T5Engine(model)
    ids, mask = padded(np.random.default_rng(0), (9, 5), 9)
    want = eng.generate([list(ids[0, :9]), list(ids[1, :5])], max_new_tokens=7,
                        stop_tokens=[-1]).tokens
    cache = prefill_jit(eng.graphdef, eng.state, jnp.asarray(ids, jnp.int32),
                        jnp.asarray(mask, bool), None, cache_size=16)
    tok = jnp.zeros((2,), jnp.int32)
    got = []
    for _ in range(7):
        logits, cache = decode_step_jit(eng.graphdef, eng.state, tok, cache, None)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        got.append(np.asarray(tok))
    np.testing.assert_array_equal(np.stack(got, 1), want)


def test_cli_aot_on_a_t5_config(tmp_path, t5_cfg_file):
    exe = Path(sys.executable).parent / "hilora"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), TPU_SKIP_MDS_QUERY="1")
    out = tmp_path / "rep.json"
    p = subprocess.run([str(exe), "aot", "--model", str(t5_cfg_file), "--topology", "v5e-8",
                        "--mesh", "2x4", "--pool-size", "5", "--rank", "2", "--batch", "8",
                        "--prompt", "32", "--new", "16", "--json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["family"] == "t5" and rep["pool"]["targets"] == ["q", "v"]  # T5's default targets
    assert rep["fits"] is True and "| hilora | yes" in p.stdout


@pytest.fixture(scope="module")
def t5_pool_dir(tmp_path_factory, t5_cfg_file):
    """A real pool dir (`hilora_jax.lora.io.save_pool`) of two PEFT adapters on the tiny T5:
    q,v,wo at rank 2 and q,v at rank 4."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from hilora_jax.lora.io import load_pool, save_pool

    root = tmp_path_factory.mktemp("t5pool")
    hf_cfg = tf.T5Config(**{k: v for k, v in TINY_T5.items() if k != "architectures"})
    adapters = {"a": (2, ["q", "v", "wo"]), "b": (4, ["q", "v"])}
    for i, (name, (r, targets)) in enumerate(adapters.items()):
        torch.manual_seed(i)
        pm = get_peft_model(tf.T5ForConditionalGeneration(hf_cfg).eval(),
                            LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False, r=r,
                                       lora_alpha=8, target_modules=targets))
        pm.save_pretrained(str(root / name))
    (root / "manifest.json").write_text(json.dumps({"adapters": {n: n for n in adapters}}))
    _, cfg = aot.model_config(str(t5_cfg_file))
    pool = load_pool(root / "manifest.json", model=cfg, progress=False)
    return save_pool(pool, root / "pool"), cfg


def test_cli_aot_on_t5_with_a_pool_dir(t5_pool_dir, t5_cfg_file, tmp_path):
    """`hilora aot --model T5 --pool DIR`: the abstract arrays are the saved pool's (shapes and
    dtypes from its pool.json, nothing else read), and the routed programs compile and fit on a
    v5e-8 (the installed entry point, as a user runs it)."""
    import jax

    from hilora_jax.lora.io import load_pool_dir

    pdir, cfg = t5_pool_dir
    real = load_pool_dir(pdir).arrays
    arrays, desc = aot.pool_dir_arrays(str(pdir), cfg)
    assert (desc["n"], desc["rank"], desc["targets"]) == (2, 4, ["q", "v", "wo"])
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), arrays)
            == jax.tree.map(lambda a: (a.shape, a.dtype), real))
    assert real.A["decoder.EncDecAttention.v"].shape == (3, 2, 4, 64)  # L, adapters, R, D
    assert real.B["encoder.DenseReluDense.wo"].shape == (2, 2, 2, 64)  # only "a" (r=2) has wo
    exe = Path(sys.executable).parent / "hilora"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), TPU_SKIP_MDS_QUERY="1")
    out = tmp_path / "rep.json"
    p = subprocess.run([str(exe), "aot", "--model", str(t5_cfg_file), "--pool", str(pdir),
                        "--topology", "v5e-8", "--mesh", "2x4", "--batch", "8", "--prompt", "32",
                        "--new", "16", "--json", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["family"] == "t5" and rep["pool"]["path"] == str(pdir)
    assert (rep["pool"]["n"], rep["pool"]["rank"]) == (2, 4)
    assert rep["pool"]["bytes"] == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(real))
    assert rep["fits"] is True and rep["variants"]["hilora"]["fits"] is True
    for prog in ("prefill", "decode_step"):
        assert not rep["variants"]["hilora"][prog]["weight_gathers"], prog
    assert (rep["variants"]["hilora"]["decode_step"]["memory"]["argument"]
            > rep["variants"]["base"]["decode_step"]["memory"]["argument"])
    assert "pool N=2 r=4 q,v,wo" in p.stdout and "| hilora | yes" in p.stdout


def test_pool_dir_of_another_model_is_refused(t5_pool_dir, tmp_path):
    pdir, _ = t5_pool_dir
    # same family, other dims: the flan-t5-large preset (checked before anything compiles)
    name, big = aot.model_config(preset="flan-t5-large")
    spec = aot.AotSpec(cfg=big, name=name, pool=aot.PoolSpec(path=str(pdir)))
    with pytest.raises(aot.AotError, match=rf"^--pool {pdir}: pool module encoder.SelfAttention.q "
                       r"has L=2, \(d_in, d_out\)=\(64, 64\); the model has L=24, \(1024, 1024\)"):
        aot.analyze(spec)
    # another family: a Llama model
    name, llama = aot.model_config(preset="smollm2-135m")
    with pytest.raises(aot.AotError, match=rf"^--pool {pdir}: pool module 'encoder.SelfAttention.q'"
                       r" is not a projection of this llama model"):
        aot.pool_dir_arrays(str(pdir), llama)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pool.json").write_text("{}")
    with pytest.raises(aot.AotError, match=rf"^--pool {bad}: unreadable pool metadata"):
        aot.pool_dir_arrays(str(bad), big)
    # the user's command: one line naming the pool dir, exit 2
    exe = Path(sys.executable).parent / "hilora"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), TPU_SKIP_MDS_QUERY="1")
    p = subprocess.run([str(exe), "aot", "--preset", "flan-t5-large", "--pool", str(pdir)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hilora: error: --pool {pdir}: pool module "
                                                   "encoder.SelfAttention.q has L=2"), lines

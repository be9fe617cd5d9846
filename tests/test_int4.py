"""Weight-only int4 (`hilora_jax.model.quant`, `load_model(..., weights="int4")`): the group
round-trip bound, GGUF Q4_1 blocks kept exactly, both matmul paths against the dequantised float
model, Engine generation with a routed pool under jit, sharded == unsharded, save / restore, the
TPU decode step's bytes, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_utils import hf_logits, make_hf_model, padded_batch
from jax.sharding import PartitionSpec as P
from routing_utils import random_pool
from test_int8 import _dequantized_model  # the float model with the quantised kernels' values

from hilora_jax.inference import Engine
from hilora_jax.io.checkpoint import save_model
from hilora_jax.io.loading import load_model
from hilora_jax.lora import merge_into
from hilora_jax.model import quant
from hilora_jax.model.quant import (
    GROUP,
    Int4Linear,
    WeightsError,
    dequantize_int4,
    linear_paths,
    quantize_int4,
    quantize_model,
)
from hilora_jax.model.sharding import make_mesh
from hilora_jax.routing.routers import OracleRouter

VOCAB = 64
DIMS = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)  # every projection's input a multiple of 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4") / "base"
    hf = make_hf_model(root, "llama", layers=3, vocab_size=VOCAB, **DIMS)
    fp = load_model(root, progress=False)
    q4 = load_model(root, progress=False, weights="int4")
    return dict(root=root, hf=hf, fp=fp, q4=q4)


def _batch(rows: int, seed: int = 0):
    lengths = np.random.default_rng(seed).integers(2, 10, rows)
    ids, mask = padded_batch(np.random.default_rng(seed), lengths, 9, side="left", vocab=VOCAB)
    return ids, mask, mask.astype(bool)


def test_round_trip_error_is_at_most_half_a_step_plus_float16():
    """Per group of 32 inputs: `min` = f16(min w), `scale` = f16(span / 15); rounding to the grid
    moves a weight by at most scale/2, and the two float16 roundings (relative 2^-11 each, of
    |min| <= amax and of 15 steps <= 2 amax) add at most 1.5 * 2^-11 * amax < 2^-10 * amax.
    A constant group is exact; an outlier coarsens only its own group."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32) * rng.uniform(0.01, 3, 40)
    w[32:64, 3] = 0.75  # a constant group (a float16 value): scale 1, codes 0, exact
    w[5, 7] = 50.0  # an outlier: group 0 of column 7 only
    q, s, m = quantize_int4(jnp.asarray(w))
    assert q.dtype == jnp.uint4 and q.shape == (3, GROUP, 40)
    assert s.dtype == m.dtype == jnp.float16 and s.shape == m.shape == (3, 40)
    qn, sn, mn = (np.asarray(a).astype(np.float32) for a in (q, s, m))
    deq = np.asarray(dequantize_int4(q, s, m))
    err = np.abs(w - deq).reshape(3, GROUP, 40)
    amax = np.abs(w.reshape(3, GROUP, 40)).max(1)
    assert (err <= sn[:, None] / 2 + 2**-10 * amax[:, None]).all()
    assert err[1, :, 3].max() == 0.0 and sn[1, 3] == 1.0 and (qn[1, :, 3] == 0).all()
    assert sn[0, 7] > 10 * sn[1, 7]  # the outlier's group only
    varying = np.ones((3, 40), bool)
    varying[1, 3] = False
    # the grid spans each group: its min gets code 0, its max code 15
    assert (qn.min(1)[varying] == 0).all() and (qn.max(1)[varying] == 15).all()
    # the bound is tight: some weights are about half a step away
    assert (err.max(1) >= 0.4 * sn)[varying].mean() > 0.9
    with pytest.raises(WeightsError, match="not a multiple of the group size 32"):
        quantize_int4(jnp.zeros((40, 8)))


def test_q4_1_blocks_requantise_to_the_same_codes():
    """Weights that are GGUF Q4_1 blocks (`d * q + m`, float16 d and m, codes spanning 0..15 as
    llama.cpp's min/max quantiser gives them) requantise to the same codes, scale and min: the
    int4 layout keeps them exactly."""
    rng = np.random.default_rng(1)
    g, f = 6, 24
    d = rng.uniform(1e-3, 0.05, (g, f)).astype(np.float16)
    mn = (-rng.uniform(0, 0.4, (g, f))).astype(np.float16)
    codes = rng.integers(0, 16, (g, GROUP, f))
    codes[:, 0], codes[:, 1] = 0, 15
    w = (codes * d.astype(np.float32)[:, None] + mn.astype(np.float32)[:, None]).astype(np.float32)
    q, s, m = quantize_int4(jnp.asarray(w.reshape(g * GROUP, f)))
    np.testing.assert_array_equal(np.asarray(q).astype(np.int64), codes)
    np.testing.assert_array_equal(np.asarray(s), d)
    np.testing.assert_array_equal(np.asarray(m), mn)
    np.testing.assert_array_equal(np.asarray(dequantize_int4(q, s, m)), w.reshape(g * GROUP, f))


def test_gguf_q4_1_model_loads_into_int4_exactly(tmp_path):
    """A Q4_1 GGUF (what the built-in SmolLM2 stores its projections in): `weights="int4"` keeps
    every kernel exactly as the float load dequantises it, and the logits equal the float
    load's (same weights; the matmul differs only in rounding order)."""
    from gguf import GGMLQuantizationType as QT
    from test_gguf import DIMS_Q, _hf_model, _write_gguf

    model, sd = _hf_model(DIMS_Q, tied=True)
    path = _write_gguf(tmp_path / "tiny-Q4_1.gguf", model, sd, qtype=QT.Q4_1)
    fl = load_model(path, progress=False)
    q4 = load_model(path, progress=False, weights="int4")
    qlin = {p: getattr(parent, a) for p, parent, a in linear_paths(q4)}
    assert len(qlin) == 2 * 7
    for p, parent, a in linear_paths(fl):
        assert isinstance(qlin[p], Int4Linear), p
        np.testing.assert_array_equal(np.asarray(qlin[p].dequantized()),
                                      np.asarray(getattr(parent, a).kernel[...]), err_msg=p)
    ids = np.array([[3, 5, 7, 9, 11, 4], [0, 0, 6, 8, 10, 12]])
    mask = (ids > 0).astype(np.int64)
    a = np.asarray(Engine(q4).forward(ids, mask))[mask.astype(bool)]
    b = np.asarray(Engine(fl).forward(ids, mask))[mask.astype(bool)]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_model_kernels_are_int4_with_hf_names(setup):
    q4, fp = setup["q4"], setup["fp"]
    paths = linear_paths(q4)
    assert len(paths) == 3 * 7 + 1
    for path, parent, attr in paths:
        lin = getattr(parent, attr)
        assert isinstance(lin, Int4Linear), path
        assert lin.kernel4[...].dtype == jnp.uint4 and lin.group_scale[...].dtype == jnp.float16
    assert quant.model_weights(q4) == "int4" and quant.model_weights(fp) is None
    flat = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(q4))}
    assert {"model.layers.0.self_attn.q_proj.kernel4", "model.layers.2.mlp.down_proj.group_min",
            "lm_head.group_scale"} <= flat
    np.testing.assert_array_equal(q4.model.embed_tokens.embedding[...],
                                  fp.model.embed_tokens.embedding[...])
    assert fp.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
    # 4 bits per weight plus two float16 per 32 inputs: 5 bits (int8: 8 + 32 per column)
    n_w = sum(int(np.prod(getattr(par, a).kernel[...].shape)) for _, par, a in linear_paths(fp))
    bits = sum(4 * np.prod(getattr(par, a).kernel4[...].shape)
               + 16 * 2 * np.prod(getattr(par, a).group_scale[...].shape)
               for _, par, a in linear_paths(q4))
    assert bits == 5 * n_w


@pytest.mark.parametrize("rows", [4, 12], ids=["split-path", "dequantise-path"])
def test_int4_model_computes_the_dequantized_model(setup, rows):
    """Logits == those of the float model whose kernels are `q * scale + min`, on both matmul
    paths: 4 rows x 9 tokens = 36 <= SPLIT_TOKENS contract group by group (per-group partial
    sums, then the scales: a reordered fp32 sum of <= 96 terms), 12 x 9 = 108 dequantise the
    kernel first (the float model's own product). 1e-5 of the logit range bounds both."""
    ids, mask, valid = _batch(rows)
    assert (rows * 9 <= quant.SPLIT_TOKENS) == (rows == 4)
    fp, q4 = setup["fp"], setup["q4"]
    a = np.asarray(Engine(q4).forward(ids, mask))
    b = np.asarray(Engine(_dequantized_model(fp, q4)).forward(ids, mask))
    assert np.abs(a - b)[valid].max() <= 1e-5 * np.abs(b[valid]).max()


def test_int4_logits_against_fp32_within_the_derived_bound(setup):
    """int4 vs the fp32 model (== transformers within 1e-4, re-checked): as for int8
    (`test_int8.test_int8_logits_against_fp32_within_the_derived_bound`), the relative logit
    error is G * sqrt(sum_k rho_k^2) with rho_k each kernel's relative quantisation error and a
    gain G of order 1; we assert 1/4 <= G <= 2 (a wrong group axis or clipped codes give far more,
    nothing quantised gives zero). 4 bits: rho ~ 8% per kernel here, vs 0.5% for int8."""
    ids, mask, valid = _batch(12)
    fp, q4, hf = setup["fp"], setup["q4"], setup["hf"]
    ref = np.asarray(Engine(fp).forward(ids, mask))
    assert np.abs(ref - hf_logits(hf, ids, mask))[valid].max() <= 1e-4
    out = np.asarray(Engine(q4).forward(ids, mask))
    qlin = {p: getattr(parent, a) for p, parent, a in linear_paths(q4)}
    rho2 = 0.0
    for path, parent, attr in linear_paths(fp):
        w = np.asarray(getattr(parent, attr).kernel[...])
        rho2 += float(((np.asarray(qlin[path].dequantized()) - w) ** 2).sum() / (w**2).sum())
    rel = np.linalg.norm((out - ref)[valid]) / np.linalg.norm(ref[valid])
    gain = rel / np.sqrt(rho2)
    assert 0.25 <= gain <= 2.0, (rel, np.sqrt(rho2), gain)


def test_engine_generate_int4_with_oracle_pool_under_jit(setup):
    """`Engine.generate` (jit: prefill + decode loop; decode steps take the split path) on the
    int4 model with an oracle-routed float32 pool: the greedy tokens of the dequantised float
    model with the same routing, and the LoRAs change the output. merge_into refuses int4."""
    fp, q4 = setup["fp"], setup["q4"]
    pool, _, _ = random_pool(q4.config)
    router = OracleRouter(pool)
    prompts = [[5, 9, 11, 3], [7, 8], [12, 13, 14, 15, 16, 17], [4]]
    names = [pool.names[0], pool.names[3], None, pool.names[1]]
    hook = router.route(["a"] * 4, adapter_names=names).hook
    out = Engine(q4).generate(prompts, max_new_tokens=6, lora=hook, stop_tokens=[])
    ref = Engine(_dequantized_model(fp, q4)).generate(prompts, max_new_tokens=6, lora=hook,
                                                       stop_tokens=[])
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    base = Engine(q4).generate(prompts, max_new_tokens=6, stop_tokens=[])
    assert (base.tokens[[0, 1, 3]] != out.tokens[[0, 1, 3]]).any()
    np.testing.assert_array_equal(base.tokens[2], out.tokens[2])
    with pytest.raises(ValueError, match="int4 kernels"):
        merge_into(q4, pool, np.ones(len(pool), np.float32))


def test_sharded_int4_equals_unsharded(setup):
    """2x4 fake devices: codes and pairs carry the rules table's shardings (the group axis follows
    the kernel's input axis, the channels its output axis); logits match the unsharded int4 model
    on both matmul paths."""
    mesh = make_mesh(2, 4)
    sq = load_model(setup["root"], mesh=mesh, progress=False, weights="int4")
    attn, mlp = sq.model.layers[0].self_attn, sq.model.layers[0].mlp
    assert attn.q_proj.kernel4[...].sharding.spec == P(None, None, "model")
    assert attn.q_proj.group_scale[...].sharding.spec == P(None, "model")
    assert mlp.down_proj.kernel4[...].sharding.spec == P(None, None, None)  # 3 groups, 4 devices
    assert sq.lm_head.group_min[...].sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(mlp.up_proj.kernel4[...]).astype(np.int64),
                                  np.asarray(setup["q4"].model.layers[0].mlp.up_proj.kernel4[...])
                                  .astype(np.int64))
    for rows in (4, 12):
        ids, mask, valid = _batch(rows, seed=rows)
        ref = np.asarray(Engine(setup["q4"]).forward(ids, mask))
        out = np.asarray(Engine(sq, mesh=mesh).forward(ids, mask))
        assert np.abs(out - ref)[valid].max() <= 1e-4, rows


def test_save_and_restore_int4_model(setup, tmp_path):
    """A converted int4 directory restores straight into int4 (codes stored a byte each, restored
    to uint4; same codes, pairs and logits), also onto a mesh with another activation dtype."""
    q4 = setup["q4"]
    out = save_model(q4, tmp_path / "conv")
    assert json.loads((out / "hilora_model.json").read_text())["weights"] == "int4"
    r = load_model(out, progress=False)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(q4)), nnx.to_flat_state(nnx.state(r)),
                              strict=True):
        assert a.get_value().dtype == b.get_value().dtype, p
        np.testing.assert_array_equal(np.asarray(a.get_value()).astype(np.float32),
                                      np.asarray(b.get_value()).astype(np.float32), err_msg=str(p))
    ids, mask, valid = _batch(4)
    np.testing.assert_array_equal(np.asarray(Engine(r).forward(ids, mask))[valid],
                                  np.asarray(Engine(q4).forward(ids, mask))[valid])
    rb = load_model(out, progress=False, mesh=make_mesh(2, 4), dtype=jnp.bfloat16)
    k = rb.model.layers[1].self_attn.v_proj
    assert k.kernel4[...].dtype == jnp.uint4 and k.group_scale[...].dtype == jnp.float16
    assert k.group_scale[...].sharding.spec == P(None, "model")
    assert rb.model.norm.weight[...].dtype == jnp.bfloat16
    # an int4 directory asked for int8 is refused, naming both
    with pytest.raises(WeightsError, match="weights='int8': the model's kernels are already int4"):
        load_model(out, progress=False, weights="int8")


def test_bad_int4_input_is_one_clear_error(tmp_path):
    """A model whose projections' inputs are not multiples of 32 is refused naming the first such
    kernel, before any layer is converted."""
    root = tmp_path / "odd"
    make_hf_model(root, "llama", layers=2, vocab_size=VOCAB)  # hidden 48: not a multiple of 32
    fp = load_model(root, progress=False)
    with pytest.raises(WeightsError, match=r"^weights='int4': model\.layers\.0\.self_attn\.q_proj"
                                           r"\.kernel has \d+ inputs, not a multiple of the group "
                                           r"size 32$"):
        quantize_model(fp, "int4")
    assert quant.model_weights(fp) is None  # nothing converted
    # load_model checks the config before reading any weight (the weights file is gone here)
    (root / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"^weights='int4': q_proj has 48 inputs, not a "
                                           r"multiple of the group size 32$"):
        load_model(root, progress=False, weights="int4")
    with pytest.raises(WeightsError, match="choose one of int8, int4"):
        load_model(root, weights="int5")


def test_int4_decode_step_reads_less_on_tpu():
    """The split path as XLA:TPU compiles it (libtpu on this CPU host, v5e-1): a decode step of a
    [4096, 11008] int4 kernel moves the codes and pairs only (5 bits per weight), well below the
    int8 kernel's bytes, and does less elementwise work than dequantising the kernel first (one
    convert per weight; the scale and min apply to the per-group partial sums)."""
    from hilora_jax.aot import hbm_traffic, topology_devices

    devices, _ = topology_devices("v5e-1")
    sh = jax.sharding.SingleDeviceSharding(devices[0])
    d, f = 4096, 11008

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sh)

    x = sds((1, 1, d), jnp.bfloat16)
    q4 = (sds((d // GROUP, GROUP, f), jnp.uint4), sds((d // GROUP, f), jnp.float16),
          sds((d // GROUP, f), jnp.float16))

    def compiled(fn, *args):
        c = jax.jit(fn).lower(*args).compile()
        return hbm_traffic(c.as_text())[0], c.cost_analysis()["flops"]

    int4, int4_flops = compiled(lambda x, q, s, m: Int4Linear(q, s, m)(x), x, *q4)
    int8, _ = compiled(lambda x, q, s: quant.Int8Linear(q, s)(x), x, sds((d, f), jnp.int8),
                       sds((f,), jnp.float32))
    _, deq_flops = compiled(lambda x, q, s, m: x @ dequantize_int4(q, s, m, jnp.bfloat16), x, *q4)
    ideal = d * f * (0.5 + 2 * 2 / GROUP)
    assert ideal <= int4 <= 1.05 * ideal, (int4, ideal)
    assert int4 < 0.65 * int8, (int4, int8)
    assert int4_flops < 0.5 * deq_flops, (int4_flops, deq_flops)

"""T5 LoRA pools and routers: the Llama pool layout and hooks on the T5 model.

Parity in fp32 on tiny random T5 configs with PEFT adapters (`init_lora_weights=False`): oracle on a
heterogeneous 3-adapter pool == `PeftModel` with each row's adapter; Arrow == PEFT's
`create_arrow_model` on T5; HiLoRA's token stage == the float64 NumPy reference of the Llama tests
(on encoder, decoder self-attention, cross-attention and FFN rows), and its strategies agree on a
routed T5 forward and on cached generation; sharded (2x4 fake devices) == unsharded; a T5 adapter
on a Llama pool and a Llama adapter on a T5 pool are one-line errors.
"""

import zlib

import jax
import numpy as np
import pytest
import reference_hilora as ref
import torch
import transformers as tf
from routing_utils import reference_delta
from t5_utils import hf_logits, make_hf_t5, padded

from hilora_jax.embed import PrecomputedEmbedder
from hilora_jax.io.peft import AdapterError
from hilora_jax.lora import load_pool
from hilora_jax.lora.pool import GatedHook
from hilora_jax.model import sharding as shd
from hilora_jax.routing import build_router
from hilora_jax.t5.generate import T5Engine
from hilora_jax.t5.load import load_t5

TOL = 1e-4

# heterogeneous: ranks, targets (attention of all three blocks, FFN), alphas, patterns, rslora,
# layers_to_transform (block indices of both stacks)
ADAPTERS = {
    "a0": dict(r=4, lora_alpha=8, target_modules=["q", "v"]),
    "a1": dict(r=2, lora_alpha=4, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
               layers_to_transform=[0, 2]),
    "a2": dict(r=6, lora_alpha=3, use_rslora=True, rank_pattern={"wo": 3},
               alpha_pattern={"EncDecAttention.k": 5.0},
               target_modules=["EncDecAttention.k", "EncDecAttention.v", "SelfAttention.o", "wo"]),
}
EMB_DIM = 6


def _base(d):
    return tf.T5ForConditionalGeneration.from_pretrained(str(d)).eval()


def _peft_adapter(base_dir, out, seed, **lcfg):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(_base(base_dir), LoraConfig(task_type="SEQ_2_SEQ_LM",
                                                    init_lora_weights=False, **lcfg))
    pm.save_pretrained(str(out))
    return str(out)


class _Embed:
    """Texts `task{i} ...` embed near `means[i]`; anything else far away (deterministic)."""

    def __init__(self, n, seed=0):
        self.means = np.random.default_rng(seed).standard_normal((n, EMB_DIM)) * 6.0
        self.seed = seed

    def __call__(self, text):
        rng = np.random.default_rng([self.seed + 1, zlib.crc32(text.encode())])
        if text.startswith("task"):
            return self.means[int(text.split()[0][4:])] + rng.standard_normal(EMB_DIM)
        return rng.standard_normal(EMB_DIM) * 3 + 40.0


@pytest.fixture(scope="module")
def t5pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    make_hf_t5(d / "base", "v1.1")
    dirs = {n: _peft_adapter(d / "base", d / n, seed=7 * i + 1, **kw)
            for i, (n, kw) in enumerate(ADAPTERS.items())}
    model = load_t5(d / "base")
    samples = {n: [f"task{i} s{j}" for j in range(12)] for i, n in enumerate(ADAPTERS)}
    manifest = {"adapters": {n: {"path": p, "samples": samples[n]} for n, p in dirs.items()}}
    pool = load_pool(manifest, model=model, progress=False)
    emb = PrecomputedEmbedder(_Embed(len(ADAPTERS)), dim=EMB_DIM)
    return d, dirs, model, pool, emb


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = padded(rng, (13, 7, 10, 5), 13)
    dids, dmask = padded(rng, (6, 4, 6, 3), 6)
    return ids, mask, dids, dmask


def test_t5_pool_layout_follows_the_projection_rows(t5pool):
    """Rows keyed like the T5 hook, `[L, A, R, D]` / `[L, A, R, E]` with L per stack; ranks,
    rank patterns and untransformed blocks are masked ROCs."""
    _, _, model, pool, _ = t5pool
    cfg, a = model.config, pool.arrays
    assert a.modules == (
        "encoder.SelfAttention.q", "encoder.SelfAttention.k", "encoder.SelfAttention.v",
        "encoder.SelfAttention.o", "decoder.SelfAttention.q", "decoder.SelfAttention.k",
        "decoder.SelfAttention.v", "decoder.SelfAttention.o", "decoder.EncDecAttention.q",
        "decoder.EncDecAttention.k", "decoder.EncDecAttention.v", "decoder.EncDecAttention.o",
        "encoder.DenseReluDense.wi_0", "encoder.DenseReluDense.wi_1", "encoder.DenseReluDense.wo",
        "decoder.DenseReluDense.wi_0", "decoder.DenseReluDense.wi_1", "decoder.DenseReluDense.wo")
    assert a.A["encoder.SelfAttention.q"].shape == (cfg.num_layers, 3, 4, cfg.d_model)
    assert a.B["decoder.SelfAttention.o"].shape == (cfg.num_decoder_layers, 3, 6, cfg.d_model)
    assert a.B["decoder.EncDecAttention.o"].shape == (cfg.num_decoder_layers, 3, 2, cfg.d_model)
    assert a.A["decoder.DenseReluDense.wo"].shape == (cfg.num_decoder_layers, 3, 3, cfg.d_ff)
    rank = pool.module_rank("decoder.SelfAttention.q")  # L A: a0 r=4 everywhere, a1 blocks 0, 2
    np.testing.assert_array_equal(rank, [[4, 2, 0], [4, 0, 0], [4, 2, 0]])
    np.testing.assert_array_equal(pool.module_rank("decoder.DenseReluDense.wo"),
                                  [[0, 2, 3], [0, 0, 3], [0, 2, 3]])
    np.testing.assert_array_equal(np.asarray(a.ranks), [4, 2, 6])
    s = np.asarray(a.scale["decoder.EncDecAttention.k"])[0, 2, 0]
    assert abs(s - 5.0 / np.sqrt(6)) < 1e-6  # alpha_pattern + rslora


def test_oracle_equals_peftmodel_per_row(t5pool):
    """Each row routed to its adapter (or none) == PeftModel with that adapter (<= 1e-4)."""
    from peft import PeftModel

    d, dirs, model, pool, _ = t5pool
    ids, mask, dids, dmask = _batch()
    names = ["a1", "a2", None, "a0"]
    routing = build_router("oracle", pool).route(["x"] * 4, adapter_names=names)
    eng = T5Engine(model)
    out = np.asarray(eng.forward(ids, mask, dids, dmask, lora=routing.hook))
    base = hf_logits(_base(d / "base"), ids, mask, dids, dmask)
    for i, n in enumerate(names):
        want = base if n is None else hf_logits(PeftModel.from_pretrained(_base(d / "base"),
                                                                          dirs[n]).eval(),
                                                ids, mask, dids, dmask)
        valid = dmask[i].astype(bool)
        if n is not None:  # the adapter matters
            assert np.abs(want[i] - base[i])[valid].max() > 1e-2
        err = np.abs(out[i] - want[i])[valid].max()
        assert err <= TOL, (n, err)
    # routed choice scoring (each choice decoded for the same rows) == PeftModel's loss
    prompts = [list(ids[i, :k]) for i, k in enumerate(mask.sum(1))]
    choices = [[[5, 9, 1], [7, 1]], [[3, 1], [12, 4, 1]], [[8, 1], [6, 6, 1]], [[2, 1], [9, 1]]]
    got = eng.score_choices(prompts, choices, lora=routing.hook)
    for i, n in enumerate(names):
        pm = _base(d / "base") if n is None else PeftModel.from_pretrained(_base(d / "base"),
                                                                           dirs[n]).eval()
        for j, ch in enumerate(choices[i]):
            with torch.no_grad():
                loss = pm(input_ids=torch.as_tensor([prompts[i]]),
                          labels=torch.as_tensor([ch])).loss.item()
            assert abs(got[i, j] + loss * len(ch)) <= TOL, (n, j)
    # the pool's one-hot GatedHook is the same adapter (dense path)
    w = np.eye(3, dtype=np.float32)[[1, 2, 0, 0]]
    w[2] = 0
    dense = np.asarray(eng.forward(ids, mask, dids, dmask, lora=GatedHook(pool.arrays, w)))
    np.testing.assert_allclose(dense[dmask.astype(bool)], out[dmask.astype(bool)], atol=1e-5)


@pytest.mark.parametrize("top_k,temp", [(2, 1.0), (1, 0.5)])
def test_arrow_equals_peft_create_arrow_model(tmp_path, top_k, temp):
    from peft import ArrowConfig, create_arrow_model

    make_hf_t5(tmp_path / "base", "v1.1")
    targets = ["q", "v", "o", "wi_0", "wo"]  # encoder, decoder and cross-attention rows
    names = [f"t{i}" for i in range(4)]
    dirs = [_peft_adapter(tmp_path / "base", tmp_path / n, seed=11 * i + 3, r=4, lora_alpha=8,
                          target_modules=targets) for i, n in enumerate(names)]
    cfg = ArrowConfig(top_k=top_k, router_temperature=temp, rng_seed=0)
    pm = create_arrow_model(_base(tmp_path / "base"), task_specific_adapter_paths=dirs,
                            arrow_config=cfg).eval()
    model = load_t5(tmp_path / "base")
    pool = load_pool({"adapters": {n: {"path": p} for n, p in zip(names, dirs, strict=True)}},
                     model=model, progress=False)
    hook = build_router("arrow", pool, options=dict(top_k=top_k, temperature=temp)
                        ).route(["x"] * 4).hook
    ids, mask, dids, dmask = _batch(1)
    want = hf_logits(pm, ids, mask, dids, dmask)
    base = hf_logits(_base(tmp_path / "base"), ids, mask, dids, dmask)
    valid = dmask.astype(bool)
    assert np.abs(want - base)[valid].max() > 1e-2
    got = np.asarray(T5Engine(model).forward(ids, mask, dids, dmask, lora=hook))
    err = np.abs(got - want)[valid].max()
    assert err <= TOL, err


TEXTS = ["task0 q1", "task2 q0", "task1 q3", "far away text"]


def _reference_decisions(pool, emb, texts, k=2, gamma=0.5) -> list[dict]:
    """HiLoRA's sequence stage in float64 (`reference_hilora`): candidates and ROC counts."""
    fits = ref.fit([emb(list(pool.samples[n])) for n in pool.names])
    z = emb(texts)
    return [ref.sequence_decision(ref.log_likelihood(fits, z[b:b + 1])[0] / z.shape[1],
                                  np.asarray(pool.arrays.ranks), np.ones(len(pool), bool),
                                  k=k, gamma=gamma) for b in range(len(texts))]


@pytest.mark.parametrize("strategy", ["dense", "gathered"])
def test_hilora_token_stage_equals_numpy_reference(t5pool, strategy):
    """Sequence stage from the encoder input text == reference; every T5 row's token stage
    (under jit) == the float64 loops, at every block of its stack."""
    _, _, model, pool, emb = t5pool
    router = build_router("hilora", pool, options=dict(embedder=emb, strategy=strategy,
                                                       kappa="sqrt", k=2, gamma=0.5))
    routing = router.route(TEXTS)
    dec = _reference_decisions(pool, emb, TEXTS)
    for b, d in enumerate(dec):
        c = len(d["cand"])
        np.testing.assert_array_equal(routing.info["cand_idx"][b][:c], d["cand"])
        np.testing.assert_array_equal(routing.info["n_rocs"][b][:c], d["n"])
    assert len({tuple(d["cand"]) for d in dec}) > 2, "inputs should route differently"
    rng = np.random.default_rng(0)
    for name in pool.arrays.modules:
        d_in = pool.arrays.A[name].shape[-1]
        x = rng.standard_normal((len(TEXTS), 3, d_in)).astype(np.float32)
        for layer in range(pool.arrays.A[name].shape[0]):
            got = np.asarray(jax.jit(lambda h, x, layer=layer, name=name: h(layer, name, x))(
                routing.hook, x))
            want = reference_delta(pool, x.astype(np.float64), name, layer, dec, "sqrt")
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_t5_forward_trace_counts_equal_reference(t5pool):
    """`T5Engine.forward(..., trace=True)` with HiLoRA: one entry per encoder and decoder row
    (`"<block>.<row>"`, as `Engine.forward`) plus both masks; on every real token the ROCs fired
    per candidate equal the reference's gate count (top-n_i(module) of the row's valid ROCs) and
    `n_module` the reference's per-module counts."""
    _, _, model, pool, emb = t5pool
    eng, cfg = T5Engine(model), model.config
    ids, mask, dids, dmask = _batch(6)
    hook = build_router("hilora", pool, options=dict(embedder=emb, k=2, gamma=0.5)
                        ).route(TEXTS).hook
    logits, trace = eng.forward(ids, mask, dids, dmask, lora=hook, trace=True)
    assert np.asarray(logits).shape == dids.shape + (cfg.vocab_size,)
    depth = {"encoder": cfg.num_layers, "decoder": cfg.num_decoder_layers}
    rows = {f"{b}.{m}" for m in pool.arrays.modules for b in range(depth[m.split(".")[0]])}
    assert set(trace) == rows | {"attention_mask", "decoder_attention_mask"}
    np.testing.assert_array_equal(trace["attention_mask"], mask.astype(bool))
    np.testing.assert_array_equal(trace["decoder_attention_mask"], dmask.astype(bool))
    dec = _reference_decisions(pool, emb, TEXTS)
    ranks = np.asarray(pool.arrays.ranks)
    n_checked = 0
    for key in sorted(rows):
        block, name = key.split(".", 1)
        mod_mask = np.asarray(pool.arrays.mask[name][int(block)])  # A R
        fired = np.asarray(trace[key]["fired"])  # B T C
        n_module = np.asarray(trace[key]["n_module"])  # B C
        # encoder rows and cross-attention k/v read the encoder states, the rest the decoder's
        real = mask if (name.startswith("encoder.") or name in ("decoder.EncDecAttention.k",
                                                                "decoder.EncDecAttention.v")) else dmask
        assert fired.shape[:2] == real.shape, key
        for b, d in enumerate(dec):
            # the router trims trailing candidate slots that get no ROCs in the whole batch
            assert all(n == 0 for n in d["n"][n_module.shape[1]:]), (key, b)
            for c, (i, n) in enumerate(zip(d["cand"][:n_module.shape[1]],
                                           d["n"][:n_module.shape[1]], strict=True)):
                n_mod = ref.per_module_count(n, int(ranks[i]), int(mod_mask[i].sum()))
                gates = ref.topn_keep(np.zeros(mod_mask.shape[1]), n_mod, mod_mask[i])
                assert n_module[b, c] == n_mod, (key, b, c)
                np.testing.assert_array_equal(fired[b, real[b].astype(bool), c], len(gates),
                                              err_msg=f"{key} row {b} candidate {c}")
                n_checked += len(gates) > 0
    assert n_checked > 50  # most (row, candidate, module) cells fire ROCs


def test_hilora_on_t5_forward_and_generation(t5pool):
    """Routed T5 forward under jit: dense == gathered == packed; the token stage runs on encoder
    tokens and on each decoded token (cached greedy generation == argmax of the teacher-forced
    routed logits on the generated tokens); routing changes the output."""
    _, _, model, pool, emb = t5pool
    eng = T5Engine(model)
    ids, mask, dids, dmask = _batch(2)
    outs = {}
    for strategy in ("dense", "gathered", "packed"):
        r = build_router("hilora", pool, options=dict(embedder=emb, strategy=strategy, k=2))
        outs[strategy] = np.asarray(eng.forward(ids, mask, dids, dmask, lora=r.route(TEXTS).hook))
    valid = dmask.astype(bool)
    # fp32 summation order differs between strategies (measured max 2e-5); a ROC chosen
    # differently would move logits by ~1e-1
    np.testing.assert_allclose(outs["gathered"][valid], outs["dense"][valid], atol=TOL)
    np.testing.assert_allclose(outs["packed"][valid], outs["dense"][valid], atol=TOL)
    base = np.asarray(eng.forward(ids, mask, dids, dmask))
    assert np.abs(outs["dense"] - base)[valid].max() > 1e-2
    hook = build_router("hilora", pool, options=dict(embedder=emb, k=2)).route(TEXTS).hook
    prompts = [list(ids[i, :n]) for i, n in enumerate(mask.sum(1))]
    gen = eng.generate(prompts, max_new_tokens=6, stop_tokens=[-1], lora=hook).tokens  # B 6
    dec_in = np.concatenate([np.zeros((len(prompts), 1), gen.dtype), gen[:, :-1]], axis=1)
    tf_logits = np.asarray(eng.forward(ids, mask, dec_in, np.ones_like(dec_in), lora=hook))
    np.testing.assert_array_equal(tf_logits.argmax(-1), gen)
    plain = eng.generate(prompts, max_new_tokens=6, stop_tokens=[-1]).tokens
    assert (plain != gen).any()


def test_routed_t5_sharded_equals_unsharded(t5pool):
    d, _, model, pool, emb = t5pool
    mesh = shd.make_mesh(data=2, model=4)
    sharded = T5Engine(load_t5(d / "base", mesh=mesh), mesh=mesh)
    spool = pool.shard(mesh)
    ff = spool.arrays.A["encoder.DenseReluDense.wo"]  # [L, A, R, d_ff]: d_ff over model
    assert ff.sharding.spec[-1] == "model"
    ids, mask, dids, dmask = _batch(3)
    for name, opts in (("hilora", dict(embedder=emb, k=2)), ("arrow", {})):
        a = np.asarray(T5Engine(model).forward(
            ids, mask, dids, dmask, lora=build_router(name, pool, options=opts).route(TEXTS).hook))
        b = np.asarray(sharded.forward(
            ids, mask, dids, dmask, lora=build_router(name, spool, options=opts).route(TEXTS).hook))
        np.testing.assert_allclose(a, b, atol=TOL)  # fp32 reduction order (measured <= 4e-5)


def test_adapter_of_the_other_family_is_one_line(t5pool, tmp_path):
    from hf_utils import make_hf_model
    from peft_utils import make_peft_adapter

    from hilora_jax.io.loading import load_model

    d, dirs, model, _, _ = t5pool
    llama_dir = tmp_path / "llama"
    make_hf_model(llama_dir, "llama")
    llama = load_model(llama_dir, progress=False)
    lad = make_peft_adapter(llama_dir, tmp_path / "lad", seed=1, r=2, lora_alpha=4,
                            target_modules=["q_proj", "v_proj"])
    # a T5 adapter on a Llama pool: by its targets, and (regex targets) by its tensor keys
    with pytest.raises(AdapterError) as e:
        load_pool({"adapters": {"t": {"path": dirs["a0"]}}}, model=llama, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "adapter_config.json" in msg and "T5" in msg and "'q'" in msg
    import json
    import shutil

    shutil.copytree(dirs["a0"], tmp_path / "t5regex")
    cfg_path = tmp_path / "t5regex" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = r".*\.(q|v)"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError) as e:
        load_pool({"adapters": {"t": {"path": str(tmp_path / "t5regex")}}}, model=llama,
                  progress=False)
    msg = str(e.value)
    assert ("\n" not in msg and "adapter_model.safetensors" in msg and "is a T5 module" in msg
            and "SelfAttention" in msg)
    # a Llama adapter on a T5 pool
    with pytest.raises(AdapterError) as e:
        load_pool({"adapters": {"l": {"path": str(lad)}}}, model=model, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "'l'" in msg and "Llama-family" in msg and "q_proj" in msg


def test_t5_pool_saves_restores_and_exports_to_peft(t5pool, tmp_path):
    """orbax round trip onto the T5 model; `export_peft` of one member (rslora, rank and alpha
    patterns folded in) loads in PEFT as the original adapter does (<= 1e-4)."""
    from peft import PeftModel

    from hilora_jax.lora import export_peft, save_pool

    d, dirs, model, pool, _ = t5pool
    save_pool(pool, tmp_path / "pool")
    back = load_pool(tmp_path / "pool", model=model)
    assert back.names == pool.names and back.arrays.modules == pool.arrays.modules
    for m in pool.arrays.modules:
        np.testing.assert_array_equal(np.asarray(back.arrays.B[m]), np.asarray(pool.arrays.B[m]))
    out = export_peft(pool, "a2", tmp_path / "a2x")
    ids, mask, dids, dmask = _batch(4)
    want = hf_logits(PeftModel.from_pretrained(_base(d / "base"), dirs["a2"]).eval(),
                     ids, mask, dids, dmask)
    got = hf_logits(PeftModel.from_pretrained(_base(d / "base"), str(out)).eval(),
                    ids, mask, dids, dmask)
    valid = dmask.astype(bool)
    assert np.abs(got - want)[valid].max() <= TOL
    # and a Llama-family model refuses the saved T5 pool in one line
    from hf_utils import make_hf_model

    from hilora_jax.io.loading import load_model

    make_hf_model(tmp_path / "llama", "llama")
    with pytest.raises(AdapterError) as e:
        load_pool(tmp_path / "pool", model=load_model(tmp_path / "llama", progress=False))
    assert "\n" not in str(e.value) and "encoder.SelfAttention.q" in str(e.value)


def test_every_router_runs_on_t5(t5pool):
    """Every router of `routing.ROUTERS` routes T5 inputs; base == no hook; retrieval with k=1
    (mixture and fusion) picks each text's adapter and equals the oracle; the others change the
    output (uniform and roc-fixed also generate under jit)."""
    from hilora_jax.routing import ROUTERS

    _, _, model, pool, emb = t5pool
    eng = T5Engine(model)
    ids, mask, dids, dmask = _batch(5)
    valid = dmask.astype(bool)
    base = np.asarray(eng.forward(ids, mask, dids, dmask))
    texts = ["task0 a", "task2 b", "task1 c", "task0 d"]
    oracle = np.asarray(eng.forward(ids, mask, dids, dmask, lora=build_router("oracle", pool).route(
        texts, adapter_names=["a0", "a2", "a1", "a0"]).hook))
    opts = {"retrieval": dict(embedder=emb, k=1), "hilora": dict(embedder=emb, k=2)}
    prompts = [list(ids[i, :k]) for i, k in enumerate(mask.sum(1))]
    for name in ROUTERS:
        router = build_router(name, pool, options=opts.get(name, {}))
        kw = {"adapter_names": ["a0", "a2", "a1", "a0"]} if router.needs_task_labels else {}
        hook = router.route(texts, **kw).hook
        out = np.asarray(eng.forward(ids, mask, dids, dmask, lora=hook))
        if name == "base":
            np.testing.assert_array_equal(out, base)
            continue
        assert np.abs(out - base)[valid].max() > 1e-2, name
        if name == "retrieval":
            np.testing.assert_allclose(out[valid], oracle[valid], atol=TOL)
            fused = build_router(name, pool, options=dict(embedder=emb, k=1, combine="fusion"))
            out_f = np.asarray(eng.forward(ids, mask, dids, dmask, lora=fused.route(texts).hook))
            np.testing.assert_allclose(out_f[valid], oracle[valid], atol=TOL)
        if name in ("uniform", "roc-fixed"):  # hooks not generated with elsewhere in this file
            gen = eng.generate(prompts, max_new_tokens=4, stop_tokens=[-1], lora=hook)
            assert gen.tokens.shape == (4, 4) and (gen.lengths == 4).all(), name

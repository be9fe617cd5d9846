"""LoRA pool parity with PEFT: gated hook, merge, export, orbax round trip, sharding, subsets.

One heterogeneous pool per family (tests/peft_utils.py::POOL_SPECS: r = 4/8/16, rsLoRA,
rank_pattern + alpha_pattern, q/v-only, all-linear, regex + exclude_modules, layers_to_transform)
on a tiny random 3-layer model. fp32 logits, max |diff| <= 1e-4 on valid tokens.
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import hf_logits, make_hf_model, padded_batch
from jax.sharding import PartitionSpec as P
from peft_utils import POOL_SPECS, load_base, make_pool_dirs, peft_model

from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.io.peft import read_adapter
from hilora_jax.lora import (
    convert_pool,
    export_peft,
    load_pool,
    load_pool_dir,
    lora_delta,
    merge_into,
    save_pool,
)
from hilora_jax.model.sharding import make_mesh

TOL = 1e-4
NAMES = list(POOL_SPECS)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"pool_{family}")
    make_hf_model(root / "base", family, layers=3)
    dirs = make_pool_dirs(root / "base", root / "adapters")
    manifest = {"base": str(root / "base"),
                "adapters": {n: {"path": dirs[n], "cluster": f"c{i % 2}"}
                             for i, n in enumerate(NAMES)}}
    model = load_model(root / "base", progress=False)
    pool = load_pool(manifest, model=model, progress=False)
    ids, mask = padded_batch(np.random.default_rng(0), (9, 4, 7), 9, side="left")
    return dict(family=family, root=root, dirs=dirs, manifest=manifest, model=model, pool=pool,
                eng=Engine(model), ids=ids, mask=mask, valid=mask.astype(bool))


def _err(a, b, valid):
    return float(np.abs(np.asarray(a) - np.asarray(b))[valid].max())


def _onehot(n, i, b):
    w = np.zeros((b, n), np.float32)
    w[:, i] = 1.0
    return w


def test_pool_layout(setup):
    pool = setup["pool"]
    assert pool.names == tuple(NAMES)
    np.testing.assert_array_equal(np.asarray(pool.arrays.ranks), [4, 8, 16, 8, 4])
    assert pool.arrays.A["q_proj"].shape == (3, 5, 16, 48)  # R = max rank over adapters
    assert pool.arrays.B["k_proj"].shape == (3, 5, 16, 16)  # kv_size = 2 heads x 8
    assert pool.arrays.A["down_proj"].shape == (3, 5, 8, 40)  # rank_pattern down_proj: 4
    # per-module rank [L, A]: pattern ranks, untargeted modules and layers are 0
    np.testing.assert_array_equal(pool.module_rank("q_proj"),
                                  [[4, 8, 16, 8, 0], [4, 8, 6, 0, 0], [4, 8, 16, 8, 0]])
    np.testing.assert_array_equal(pool.module_rank("gate_proj"),
                                  [[0, 8, 16, 0, 0], [0, 8, 16, 0, 4], [0, 8, 16, 0, 4]])
    # scales: alpha/r, rsLoRA alpha/sqrt(r), alpha_pattern
    s = {m: np.asarray(pool.arrays.scale[m]) for m in pool.arrays.modules}
    assert s["q_proj"][0, 0, 0] == pytest.approx(8 / 4)
    assert s["q_proj"][0, 1, 0] == pytest.approx(6 / np.sqrt(8))
    assert s["v_proj"][0, 2, 0] == pytest.approx(3 / 16)
    assert s["up_proj"][2, 2, 0] == pytest.approx(40 / 16)
    assert s["up_proj"][1, 2, 0] == pytest.approx(32 / 16)
    assert s["q_proj"][1, 2, 0] == pytest.approx(32 / 6)
    # masked-out ROCs are inert zeros
    for m in pool.arrays.modules:
        mk = np.asarray(pool.arrays.mask[m])
        assert not np.asarray(pool.arrays.A[m])[~mk].any()
        assert not np.asarray(pool.arrays.B[m])[~mk].any()
        assert not s[m][~mk].any()
    assert pool.clusters["qv_r4"] == "c0" and pool.clusters["all_r8_rslora"] == "c1"


def test_one_hot_gate_equals_peft_adapter(setup):
    """Every adapter of the pool, one-hot gated, equals PeftModel with that adapter active."""
    pool, eng, ids, mask, valid = (setup[k] for k in ("pool", "eng", "ids", "mask", "valid"))
    base = np.asarray(eng.forward(ids, mask))
    errs = {}
    for i, name in enumerate(NAMES):
        ref = hf_logits(peft_model(setup["root"] / "base", setup["dirs"][name]), ids, mask)
        assert _err(ref, base, valid) > 1e-2, f"{name}: adapter has no visible effect"
        out = eng.forward(ids, mask, lora=pool.hook(_onehot(len(pool), i, len(ids))))
        errs[name] = _err(out, ref, valid)
    print(setup["family"], "one-hot vs PEFT max|diff|:", errs)
    assert max(errs.values()) <= TOL, errs


def test_gate_shapes_agree(setup):
    """Per-adapter [B,A], per-sequence ROC [B,A,R] and per-token [B,T,A,R] gates agree."""
    pool, eng, ids, mask, valid = (setup[k] for k in ("pool", "eng", "ids", "mask", "valid"))
    n, b, t = len(pool), *ids.shape
    w = np.asarray([0.5, -1.0, 0.25, 2.0, 1.0], np.float32)
    out_a = eng.forward(ids, mask, lora=pool.adapter_hook(w, b))
    # ROC gates over the pool-wide R_max; each module reads its first R_m entries
    r = pool.arrays.max_rank
    seq = np.broadcast_to(w[None, :, None], (b, n, r)).copy()
    tok = np.broadcast_to(seq[:, None], (b, t, n, r)).copy()
    out_s = eng.forward(ids, mask, lora=pool.hook(seq))
    out_t = eng.forward(ids, mask, lora=pool.hook(tok))
    tok[0, 3:] = 0.0  # per-token gates really act per token: row 0 differs from token 3 on
    out_z = np.asarray(eng.forward(ids, mask, lora=pool.hook(tok)))
    assert _err(out_z[0, :3], np.asarray(out_a)[0, :3], valid[0, :3]) <= 1e-5
    assert _err(out_z[0, 3:], np.asarray(out_a)[0, 3:], valid[0, 3:]) > 1e-3
    assert _err(out_a, out_s, valid) <= 1e-5 and _err(out_a, out_t, valid) <= 1e-5


def test_lora_delta_properties():
    """One-hot = that adapter's s B^T A x; all-ones = the sum; masked ROCs never contribute."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)  # A R D
    b = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)  # A R E
    s = jnp.asarray([[2.0] * 5, [0.5] * 5, [1.5] * 5])
    m = jnp.asarray(np.arange(5)[None, :] < np.asarray([[5], [3], [2]]))
    x = jnp.asarray(rng.normal(size=(2, 6, 7)), jnp.float32)
    ones = jnp.ones((2, 3, 5))
    each = [lora_delta(a, b, s, m, x, ones.at[:, [j for j in range(3) if j != i]].set(0))
            for i in range(3)]
    for i in range(3):
        r = int(m[i].sum())
        ref = s[i, 0] * jnp.einsum("BTD,RD,RE->BTE", x, a[i, :r], b[i, :r])
        np.testing.assert_allclose(each[i], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora_delta(a, b, s, m, x, ones), sum(each), rtol=1e-5, atol=1e-5)
    garbage = a.at[1, 3:].set(1e6)  # weights behind the mask must be ignored
    np.testing.assert_allclose(lora_delta(garbage, b, s, m, x, ones), sum(each), rtol=1e-5)


def test_merge_equals_merge_and_unload(setup):
    pool, ids, mask, valid = (setup[k] for k in ("pool", "ids", "mask", "valid"))
    for name in ("r16_patterns", "regex_excl"):
        i = pool.index(name)
        ref = hf_logits(peft_model(setup["root"] / "base", setup["dirs"][name]).merge_and_unload(),
                        ids, mask)
        w = np.zeros(len(pool))
        w[i] = 1.0
        merged = merge_into(setup["model"], pool, w)
        err = _err(Engine(merged).forward(ids, mask), ref, valid)
        print(setup["family"], name, "merge vs merge_and_unload:", err)
        assert err <= TOL
    # the input model is untouched
    base = hf_logits(load_base(setup["root"] / "base"), ids, mask)
    assert _err(setup["eng"].forward(ids, mask), base, valid) <= TOL


def test_export_roundtrip_through_peft(setup, tmp_path):
    pool, eng, ids, mask, valid = (setup[k] for k in ("pool", "eng", "ids", "mask", "valid"))
    b = len(ids)
    # single adapter
    i = pool.index("r16_patterns")
    export_peft(pool, "r16_patterns", tmp_path / "single")
    ref = hf_logits(peft_model(setup["root"] / "base", tmp_path / "single"), ids, mask)
    err1 = _err(eng.forward(ids, mask, lora=pool.hook(_onehot(len(pool), i, b))), ref, valid)
    # weighted combination of two (different modules, ranks and layers)
    combo = {"all_r8_rslora": 0.7, "layers_0_2": -0.4}
    export_peft(pool, combo, tmp_path / "combo")
    w = np.zeros(len(pool), np.float32)
    for k, v in combo.items():
        w[pool.index(k)] = v
    ref2 = hf_logits(peft_model(setup["root"] / "base", tmp_path / "combo"), ids, mask)
    err2 = _err(eng.forward(ids, mask, lora=pool.adapter_hook(w, b)), ref2, valid)
    print(setup["family"], "export single / combo vs JAX:", err1, err2)
    assert err1 <= TOL and err2 <= TOL
    cfg = json.loads((tmp_path / "combo" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 8  # most modules: only all_r8_rslora's 8 ROCs
    assert cfg["rank_pattern"][r"model\.layers\.0\.self_attn\.q_proj"] == 8 + 8  # concatenated
    # the exported adapter reads back through our own strict reader
    back = read_adapter(tmp_path / "combo", setup["model"].config)
    assert back.modules[(1, "q_proj")][0].shape == (8, 48)  # layers_0_2 skips layer 1
    assert back.modules[(0, "q_proj")][0].shape == (16, 48)
    assert not list(tmp_path.glob(".*tmp"))


def test_orbax_roundtrip_exact(setup, tmp_path):
    pool = setup["pool"]
    out = save_pool(pool, tmp_path / "pool")
    back = load_pool_dir(out)
    for x, y in zip(jax.tree.leaves(pool.arrays), jax.tree.leaves(back.arrays), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert back.names == pool.names and back.clusters == pool.clusters
    assert back.configs == pool.configs and back.sources == pool.sources
    # convert_pool (CLI entry) writes the same pool; load_pool accepts a saved dir
    convert_pool(setup["manifest"], setup["root"] / "base", tmp_path / "cli", progress=False)
    cli = load_pool(tmp_path / "cli", model=setup["model"].config)
    for x, y in zip(jax.tree.leaves(pool.arrays), jax.tree.leaves(cli.arrays), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_pool_matches(setup, tmp_path):
    mesh = make_mesh(2, 4)
    pool, ids, mask, valid = (setup[k] for k in ("pool", "ids", "mask", "valid"))
    sp = pool.shard(mesh)
    # documented specs: A inherits the input side, B the output side, L/A/R replicated
    assert sp.arrays.A["q_proj"].sharding.spec == P(None, None, None, None)
    assert sp.arrays.B["q_proj"].sharding.spec == P(None, None, None, "model")
    assert sp.arrays.B["k_proj"].sharding.spec == P(None, None, None, "model")
    assert sp.arrays.A["o_proj"].sharding.spec == P(None, None, None, "model")
    assert sp.arrays.B["up_proj"].sharding.spec == P(None, None, None, "model")
    assert sp.arrays.A["down_proj"].sharding.spec == P(None, None, None, "model")
    assert sp.arrays.B["down_proj"].sharding.spec == P(None, None, None, None)
    ids4, mask4 = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])
    valid4 = mask4.astype(bool)
    w = np.asarray([0.5, -1.0, 0.25, 2.0, 1.0], np.float32)
    ref = setup["eng"].forward(ids4, mask4, lora=pool.adapter_hook(w, 4))
    seng = Engine(load_model(setup["root"] / "base", mesh=mesh, progress=False), mesh=mesh)
    out = seng.forward(ids4, mask4, lora=sp.adapter_hook(w, 4))
    assert _err(out, ref, valid4) <= TOL  # sharded reductions reorder fp32 sums
    # restore straight into shardings
    save_pool(pool, tmp_path / "p")
    rp = load_pool_dir(tmp_path / "p", mesh=mesh)
    assert rp.arrays.B["q_proj"].sharding.spec == P(None, None, None, "model")
    assert _err(seng.forward(ids4, mask4, lora=rp.adapter_hook(w, 4)), ref, valid4) <= TOL


def test_subset_and_select(setup):
    pool, eng, ids, mask, valid = (setup[k] for k in ("pool", "eng", "ids", "mask", "valid"))
    keep = ["qv_r4", "layers_0_2"]
    sub = pool.subset(keep)
    assert sub.arrays.A["q_proj"].shape == pool.arrays.A["q_proj"].shape  # a view: same shapes
    np.testing.assert_array_equal(np.asarray(sub.arrays.active), [1, 0, 0, 1, 0])
    ones = np.ones((len(ids), len(pool)), np.float32)
    out_sub = eng.forward(ids, mask, lora=sub.hook(ones))
    sel = pool.select(keep)
    assert sel.names == tuple(keep) and sel.arrays.A["q_proj"].shape == (3, 2, 8, 48)
    assert "gate_proj" not in sel.arrays.A  # neither adapter targets it
    out_sel = eng.forward(ids, mask, lora=sel.hook(np.ones((len(ids), 2), np.float32)))
    w = np.asarray([1, 0, 0, 1, 0], np.float32)
    out_ref = eng.forward(ids, mask, lora=pool.adapter_hook(w, len(ids)))
    assert _err(out_sub, out_ref, valid) <= 1e-5 and _err(out_sel, out_ref, valid) <= 1e-5
    assert _err(merge_into(setup["model"], sub, np.ones(5)).__call__(
        jnp.asarray(ids), jnp.asarray(mask, bool))[0], out_ref, valid) <= TOL


def test_manifest_yaml_samples_and_require(setup, tmp_path):
    import yaml

    (tmp_path / "s.jsonl").write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    m = {"base": str(setup["root"] / "base"),
         "adapters": {"a": {"path": setup["dirs"]["qv_r4"], "samples": ["x", "y"], "cluster": "k"},
                      "b": {"path": setup["dirs"]["regex_excl"], "samples_file": "s.jsonl"},
                      "c": {"path": setup["dirs"]["layers_0_2"]}}}
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(m))
    pool = load_pool(tmp_path / "pool.yaml", progress=False)  # model from 'base'
    assert pool.samples == {"a": ("x", "y"), "b": ("hello", "world"), "c": None}
    assert pool.clusters == {"a": "k", "b": None, "c": None}
    with pytest.raises(ValueError, match=r"hilora.*\['c'\]"):
        pool.require_samples("hilora")
    pool.subset(["a", "b"]).require_samples("hilora")  # inactive adapters are not needed


def test_bin_adapter_and_base_mismatch_warning(setup, tmp_path):
    """Older adapter_model.bin is read through torch; a different declared base warns."""
    import shutil

    from hilora_jax.io.safetensors import SafetensorsFile

    src = setup["dirs"]["qv_r4"]
    d = tmp_path / "old"
    d.mkdir()
    cfg = json.loads(open(f"{src}/adapter_config.json").read())
    cfg["base_model_name_or_path"] = "someone/other-model"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in
          SafetensorsFile(f"{src}/adapter_model.safetensors").items()}
    torch.save(sd, d / "adapter_model.bin")
    with pytest.warns(UserWarning, match="someone/other-model"):
        ad = read_adapter(d, setup["model"].config, base=str(setup["root"] / "base"))
    ref = read_adapter(src, setup["model"].config)
    for k in ref.modules:
        np.testing.assert_array_equal(ad.modules[k][0], ref.modules[k][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_adapter(src, setup["model"].config, base=str(setup["root"] / "base"))
    shutil.rmtree(d)

"""LoRA training on a tiny random HF Llama: loss goes down, base frozen, PEFT export parity,
and the tail-logit MC scorer equals `Engine.score`."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hf_utils import make_hf_model
from test_eval_metrics import CharTok

from hilora_jax.eval.tasks import ChoiceScorer, MCExample, mc_batches
from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.io.peft import peft_tensors
from hilora_jax.lora.train import TrainableLora, init_lora, peft_modules, save_peft, train_lora

WORDS = ["cat", "dog", "sun", "tree", "fish", "bird", "rock", "leaf"]


def toy_examples():
    """Answer = the word's first letter, among 3 choices: learnable from the prompt."""
    exs = []
    for w in WORDS:
        letters = sorted({w[0], "q", "z"})  # the answer's position varies with the word
        exs.append(MCExample(f"Q: first letter of {w}?\nA:", tuple(letters), letters.index(w[0]),
                             "letters", "toy"))
    return exs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = make_hf_model(path, "llama", kv_heads=2)
    return path, hf, load_model(path, progress=False)


def test_init_matches_peft_default(tiny):
    _, _, model = tiny
    ad = init_lora(model, r=4, alpha=8, targets=("q_proj", "down_proj"), seed=1)
    d_in = model.config.module_shapes()["down_proj"][0]
    a = np.asarray(ad.a["down_proj"])
    assert a.shape == (model.config.num_layers, 4, d_in)  # ROC rows [L, R, D]
    assert np.abs(a).max() <= 1 / np.sqrt(d_in) and np.abs(a).max() > 0.5 / np.sqrt(d_in)
    assert not np.asarray(ad.b["q_proj"]).any() and ad.scale == 2.0
    with pytest.raises(ValueError, match="unknown target"):
        init_lora(model, targets=("qproj",))


def test_training_reduces_loss_and_freezes_base(tiny):
    _, _, model = tiny
    before = jax.tree.map(np.asarray, nnx.state(model))
    tr = train_lora(model, CharTok(), toy_examples(), r=4, alpha=8, steps=40, lr=3e-2,
                    batch_size=4, seed=0, progress=False)
    assert len(tr.losses) == 40 and all(np.isfinite(tr.losses))
    first, last = np.mean(tr.losses[:3]), np.mean(tr.losses[-5:])
    assert last < 0.5 * first, (first, last)
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # base model untouched
    assert np.abs(np.asarray(tr.adapter.b["v_proj"])).max() > 0  # B actually trained


def test_trained_adapter_improves_mc_accuracy(tiny):
    _, _, model = tiny
    exs, tok = toy_examples(), CharTok()
    scorer = ChoiceScorer(Engine(model))
    tr = train_lora(model, tok, exs, r=4, alpha=8, steps=40, lr=3e-2, batch_size=4,
                    progress=False)
    base = np.mean([s.pred == e.answer for s, e in zip(scorer(exs, tok), exs, strict=True)])
    tuned = np.mean([s.pred == e.answer
                     for s, e in zip(scorer(exs, tok, lora=tr.adapter), exs, strict=True)])
    assert tuned == 1.0 and tuned > base


def test_choice_scorer_equals_engine_score(tiny):
    _, _, model = tiny
    eng = Engine(model)
    exs, tok = toy_examples(), CharTok()
    ad = init_lora(model, r=4, targets=("q_proj", "up_proj"), seed=2)
    ad = ad.replace(b={k: jax.random.normal(jax.random.key(i), v.shape) * 0.1
                       for i, (k, v) in enumerate(ad.b.items())})
    scorer = ChoiceScorer(eng)
    for lora in (None, ad):
        for b in mc_batches(exs, tok, batch_size=8):
            ref, _ = eng.score(b.input_ids, b.attention_mask, b.target_mask, lora=lora)
            np.testing.assert_allclose(scorer.batch(b, lora), np.asarray(ref), rtol=1e-5, atol=1e-4)


def test_save_peft_loads_in_peft_with_equal_logits(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    path, hf, model = tiny
    targets = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
    tr = train_lora(model, CharTok(), toy_examples(), r=4, alpha=8, targets=targets, steps=8,
                    lr=5e-2, batch_size=4, progress=False)
    out = save_peft(tr, tmp_path / "adapter", str(path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"], cfg["task_type"]) == (4, 8.0, "LORA", "CAUSAL_LM")
    assert sorted(cfg["target_modules"]) == sorted(targets)
    sd = peft_tensors(peft_modules(tr))
    assert sd["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 48)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (48, 4)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 61, size=(3, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    with torch.no_grad():  # before PEFT injects its layers into `hf`
        base = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    pm = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    loaded = {k: v for k, v in pm.state_dict().items() if "lora_B" in k}
    assert len(loaded) == 2 * len(targets) and all(v.abs().max() > 0 for v in loaded.values())
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    got = np.asarray(Engine(model).forward(ids, mask, lora=tr.adapter))
    valid = mask.astype(bool)
    assert np.abs(ref - base)[valid].max() > 1e-2  # the adapter changes the logits
    err = np.abs(got - ref)[valid].max()
    assert err <= 1e-4, err


def test_save_peft_is_atomic_and_refuses_overwrite(tiny, tmp_path):
    _, _, model = tiny
    ad = init_lora(model, r=2)
    from hilora_jax.lora.train import TrainedLora

    tr = TrainedLora(ad, 2, 4.0, ("q_proj", "v_proj"), [1.0], 0.0, "t")
    save_peft(tr, tmp_path / "a", "m")
    with pytest.raises(FileExistsError):
        save_peft(tr, tmp_path / "a", "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert isinstance(ad, TrainableLora)


def test_train_lora_cli(tiny, tmp_path, monkeypatch, capsys):
    import argparse

    import hilora_jax.io.loading as loading
    from hilora_jax.eval.tasks import write_jsonl
    from hilora_jax.lora.train import add_train_lora_args, train_lora_cli

    path, _, _ = tiny
    monkeypatch.setattr(loading, "load_tokenizer", lambda src: CharTok())
    other = MCExample("Q: other\nA:", ("x", "y"), 0, "other", "toy")
    write_jsonl(toy_examples() + [other], tmp_path / "t.jsonl")
    p = argparse.ArgumentParser()
    add_train_lora_args(p)
    args = p.parse_args(["--model", str(path), "--tasks", str(tmp_path / "t.jsonl"), "--task",
                         "letters", "--r", "2", "--alpha", "4", "--targets", "q_proj,k_proj",
                         "--steps", "3", "--batch-size", "2", "--out", str(tmp_path / "ad")])
    assert train_lora_cli(args) == 0
    assert "trained 8 examples, 3 steps" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["k_proj", "q_proj"]
    from hilora_jax.errors import OutputExistsError, UsageError

    with pytest.raises(OutputExistsError, match="already exists"):
        train_lora_cli(args)
    args.task, args.out = "missing", str(tmp_path / "ad2")
    with pytest.raises(UsageError, match="--task 'missing': no examples"):
        train_lora_cli(args)
    assert not (tmp_path / "ad2").exists()


def test_choice_scorer_sharded_equals_unsharded(tiny):
    from hilora_jax.model.sharding import make_mesh

    path, _, model = tiny
    exs, tok = toy_examples(), CharTok()
    ad = init_lora(model, r=4, seed=5)
    ad = ad.replace(b={k: jax.random.normal(jax.random.key(1), v.shape) * 0.1 for k, v in ad.b.items()})
    ref = ChoiceScorer(Engine(model))(exs, tok, lora=ad, batch_size=8)
    mesh = make_mesh(data=4, model=2)
    sharded = ChoiceScorer(Engine(load_model(path, mesh=mesh, progress=False), mesh=mesh))
    got = sharded(exs, tok, lora=ad, batch_size=8)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(a.logprob, b.logprob, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(a.n_tokens, b.n_tokens)


def test_top_layer_training_with_cached_prefix(tiny, tmp_path):
    """`layers=[1]`: only layer 1 is adapted, steps resume from cached layer-1 hidden states
    (equal to the full forward), and the PEFT export (layers_to_transform) matches PEFT."""
    from hilora_jax.inference import tail_logprobs

    peft = pytest.importorskip("peft")
    path, hf, model = tiny
    exs, tok = toy_examples(), CharTok()
    tr = train_lora(model, tok, exs, r=4, alpha=8, steps=40, lr=3e-2, batch_size=4,
                    layers=[1], progress=False)
    assert tr.adapter.layers == (1,)
    assert np.mean(tr.losses[-5:]) < 0.5 * np.mean(tr.losses[:3])
    assert not np.asarray(tr.adapter.b["q_proj"][0]).any()  # layer 0 never trained
    # resuming from the cached prefix equals the full forward
    b = next(mc_batches(exs, tok, batch_size=8))
    ids, mask = b.input_ids, b.attention_mask
    full = tail_logprobs(model, ids, mask, b.tail, tr.adapter)
    h = model.hidden(ids, mask, layer=1)
    part = tail_logprobs(model, ids, mask, b.tail, tr.adapter, start_layer=1, hidden_in=h)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full), atol=1e-5)
    scorer = ChoiceScorer(Engine(model))
    tuned = np.mean([s.pred == e.answer for s, e in zip(scorer(exs, tok, lora=tr.adapter), exs, strict=True)])
    assert tuned >= 0.75
    out = save_peft(tr, tmp_path / "top", str(path))
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    assert not any(".layers.0." in k for k in peft_tensors(peft_modules(tr)))
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 61, size=(2, 9))
    m = np.ones_like(ids)
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")  # not the
    pm = peft.PeftModel.from_pretrained(fresh, str(out)).eval()  # fixture's (PEFT edits in place)
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(m)).logits.numpy()
    got = np.asarray(Engine(model).forward(ids, m, lora=tr.adapter))
    assert np.abs(got - ref).max() <= 1e-4


def test_build_task_pool_trains_once_and_reuses(tiny, tmp_path):
    """`lora.build.build_task_pool`: one adapter per task, samples + clusters in the pool; a second
    call reuses the cached adapters (same pool arrays) and keeps their training records."""
    from hilora_jax.lora import load_pool
    from hilora_jax.lora.build import build_task_pool

    path, _, model = tiny
    tok = CharTok()
    first = toy_examples()
    second = [MCExample(e.prompt.replace("first", "last"), e.choices, e.answer, "last", "toy2")
              for e in first]
    train, samples = first + second, first[:3] + second[:3]
    pdir = build_task_pool(model, tok, train, samples, tmp_path / "pool", base_name=str(path),
                           r=4, alpha=8, steps=6, lr=1e-2, batch_size=4, progress=False)
    pool = load_pool(pdir, model=model, progress=False)
    assert pool.names == ("last", "letters")
    assert pool.clusters == {"last": "toy2", "letters": "toy"}
    assert [len(pool.samples[n]) for n in pool.names] == [3, 3]
    rec = json.loads((tmp_path / "pool" / "training.json").read_text())
    assert rec["letters"]["steps"] == 6 and "reused" not in rec["letters"]
    a0 = np.asarray(pool.arrays.A["q_proj"])
    with pytest.raises(ValueError, match="without example inputs"):
        build_task_pool(model, tok, train, first[:3], tmp_path / "other", base_name=str(path),
                        steps=1, progress=False)
    pdir2 = build_task_pool(model, tok, train, samples, tmp_path / "pool", base_name=str(path),
                            r=4, alpha=8, steps=6, lr=1e-2, batch_size=4, progress=False)
    rec2 = json.loads((tmp_path / "pool" / "training.json").read_text())
    assert rec2["letters"] == {**rec["letters"], "reused": True}
    np.testing.assert_array_equal(
        np.asarray(load_pool(pdir2, model=model, progress=False).arrays.A["q_proj"]), a0)


def test_parse_layers():
    from hilora_jax.lora.train import parse_layers

    assert parse_layers("26-29") == [26, 27, 28, 29]
    assert parse_layers("0, 5,9") == [0, 5, 9]
    assert parse_layers(None) is None
    with pytest.raises(ValueError, match="--layers: 'x-2'"):
        parse_layers("x-2")


@pytest.mark.parametrize("recipe", [
    {"targets": "all-linear", "r": 4, "alpha": 8},
    {"targets": ("q_proj", "v_proj"), "r": 4, "alpha": 16, "use_rslora": True},
    {"targets": "all-linear", "r": 4, "alpha": 8, "use_rslora": True,
     "rank_pattern": {"down_proj": 2, "q_proj": 6}, "alpha_pattern": {"q_proj": 3.0}},
])
def test_heterogeneous_recipes_load_in_peft_with_equal_logits(tiny, tmp_path, recipe):
    """all-linear / rsLoRA / rank_pattern + alpha_pattern: the saved config says so, PEFT loads the
    adapter with those ranks and scales, and its logits equal ours (fp32, <= 1e-4); our own PEFT
    reader (`load_pool`) rebuilds the same per-module scales."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from hilora_jax.io.peft import module_rank_alpha as peft_rank_alpha
    from hilora_jax.model.projections import MODULES, projection

    path, _, model = tiny
    tr = train_lora(model, CharTok(), toy_examples(), steps=6, lr=5e-2, batch_size=4,
                    progress=False, **recipe)
    all_mods = MODULES
    assert all_mods == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert tr.targets == (all_mods if recipe["targets"] == "all-linear" else recipe["targets"])
    out = save_peft(tr, tmp_path / "ad", str(path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ("all-linear" if recipe["targets"] == "all-linear"
                                     else sorted(recipe["targets"]))
    assert cfg["use_rslora"] is bool(recipe.get("use_rslora"))
    assert cfg.get("rank_pattern") == recipe.get("rank_pattern")
    for name in tr.targets:  # our scale per module == PEFT's rule read back from the config
        r_m, _, s_m = peft_rank_alpha(cfg, projection(name).module_key(0))
        assert tr.adapter.a[name].shape[1] == r_m
        assert tr.adapter.scale_of(name) == pytest.approx(s_m)
    fresh = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    lora_a = {k: v for k, v in pm.state_dict().items() if "lora_A" in k}
    assert len(lora_a) == len(tr.targets) * model.config.num_layers
    for name, r_m in (recipe.get("rank_pattern") or {}).items():
        assert all(v.shape[0] == r_m for k, v in lora_a.items() if f".{name}." in k)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 61, size=(3, 10))
    mask = np.ones_like(ids)
    mask[2, :3] = 0
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
        with pm.disable_adapter():
            base = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    got = np.asarray(Engine(model).forward(ids, mask, lora=tr.adapter))
    valid = mask.astype(bool)
    assert np.abs(ref - base)[valid].max() > 1e-2  # the adapter changes the logits
    assert np.abs(got - ref)[valid].max() <= 1e-4
    # the project's own PEFT reader reads back our arrays and per-module scales
    from hilora_jax.io.peft import read_adapter

    ad = read_adapter(out, model.config)
    assert {m for _, m in ad.modules} == set(tr.targets)
    for (layer, name), (a, b, s) in ad.modules.items():
        assert s == pytest.approx(tr.adapter.scale_of(name))
        np.testing.assert_array_equal(a, np.asarray(tr.adapter.a[name][layer]))  # one layout:
        np.testing.assert_array_equal(b, np.asarray(tr.adapter.b[name][layer]))  # ROC rows


def test_recipe_options_are_checked(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match="must be 'all-linear'"):
        init_lora(model, targets="all_linear")
    with pytest.raises(ValueError, match=r"rank_pattern names module\(s\) \['down_proj'\]"):
        init_lora(model, targets=("q_proj",), rank_pattern={"down_proj": 2})
    ad = init_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True)
    assert ad.scale == pytest.approx(8 / 2)
    ad = init_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj"), rank_pattern={"v_proj": 2})
    assert ad.scale_of("q_proj") == 2.0 and ad.scale_of("v_proj") == 4.0
    assert ad.a["v_proj"].shape[1] == 2 and ad.b["v_proj"].shape[1] == 2

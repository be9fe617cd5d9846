"""T5 LoRA training (`lora.train.train_lora` with `t5.train.Seq2SeqObjective`) on a tiny random
FLAN-T5-layout model: the loss goes down with the base frozen; the saved adapter is a standard
PEFT T5 adapter (`PeftModel.from_pretrained` on the same weights gives our `T5Engine` logits,
fp32 <= 1e-4, and our own reader reads back the trained arrays); `hilora train-lora` through the
installed entry point writes an adapter that `hilora convert-pool` stacks; bad input is one line."""

import json
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from eval_utils import word_tokenizer
from flax import nnx
from t5_utils import make_hf_t5, padded
from test_cli import hilora, ok, user_env

from hilora_jax.eval.tasks import MCExample, choice_text, encode, write_jsonl
from hilora_jax.lora.train import init_lora, save_peft, train_lora
from hilora_jax.t5 import T5Engine, load_t5, read_t5_adapter
from hilora_jax.t5.model import split_module_key

ALL_ROWS = {f"{s}.{b}.{p}" for s, b in (("encoder", "SelfAttention"), ("decoder", "SelfAttention"),
                                        ("decoder", "EncDecAttention")) for p in "qkvo"} | {
    f"{s}.DenseReluDense.{p}" for s in ("encoder", "decoder") for p in ("wi_0", "wi_1", "wo")}


RECIPE = dict(use_rslora=True, rank_pattern={"wo": 2}, alpha_pattern={"q": 5.0})


def toy_examples(n: int = 8) -> list[MCExample]:
    """The answer is the prompt's 2nd and 3rd words (3 choices of two tokens: decoder
    self-attention matters): learnable through cross-attention."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w = [f"w{k}" for k in rng.integers(4, 60, size=4)]
        choices = ["w62 w63", "w63 w62"]
        choices.insert(i % 3, f"{w[1]} {w[2]}")  # the answer's position varies
        out.append(MCExample(f"find {' '.join(w)}", tuple(choices), i % 3, "second", "toy"))
    return out


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5train") / "t5"
    make_hf_t5(path, "v1.1")  # gated FFN (wi_0 / wi_1), untied head: the FLAN-T5 layout
    tok = word_tokenizer(64)
    tok.save_pretrained(str(path))
    return path, tok, load_t5(path)


@pytest.fixture(scope="module")
def trained(t5):
    """Every T5 projection (`all-linear`) trained 30 steps, rsLoRA with a per-module rank and
    alpha (PEFT's patterns, keyed by T5 target name); the base state before training."""
    _, tok, model = t5
    before = jax.tree.map(np.asarray, nnx.state(model))
    tr = train_lora(model, tok, toy_examples(), r=4, alpha=8, targets="all-linear", steps=30,
                    lr=3e-2, batch_size=4, progress=False, **RECIPE)
    return tr, before


def test_training_lowers_the_loss_and_freezes_the_base(t5, trained):
    _, tok, model = t5
    tr, before = trained
    assert set(tr.targets) == ALL_ROWS and tr.task_type == "SEQ_2_SEQ_LM"
    assert len(tr.losses) == 30 and all(np.isfinite(tr.losses))
    # from ln(67) = 4.2: the fixture's small random head (std 0.05) after the final RMS norm
    # bounds every logit near 2, so ~2.3 nats is about the floor of any adapter here
    first, last = np.mean(tr.losses[:3]), np.mean(tr.losses[-5:])
    assert last < 0.75 * first, (first, last)
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, nnx.state(model)))  # base model untouched
    # every row trained, with its stack's depth (2 encoder, 3 decoder blocks)
    for row, b in tr.adapter.b.items():
        assert b.shape[0] == (2 if row.startswith("encoder") else 3), row
        assert np.abs(np.asarray(b)).max() > 0, row
    # the trained adapter picks every answer (choices scored as decoder targets)
    exs, eng = toy_examples(), T5Engine(model)
    prompts = [encode(tok, e.prompt, special=True) for e in exs]
    choices = [[encode(tok, choice_text(c), special=False) for c in e.choices] for e in exs]
    tuned = np.argmax(eng.score_choices(prompts, choices, lora=tr.adapter), axis=1)
    assert list(tuned) == [e.answer for e in exs]


def test_saved_adapter_loads_in_peft_with_equal_logits(t5, trained, tmp_path):
    from peft import PeftModel

    path, tok, model = t5
    tr = trained[0]
    out = save_peft(tr, tmp_path / "ad", str(path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["target_modules"]) == ("SEQ_2_SEQ_LM", "all-linear")
    assert (cfg["use_rslora"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (
        True, RECIPE["rank_pattern"], RECIPE["alpha_pattern"])
    hf = tf.T5ForConditionalGeneration.from_pretrained(str(path)).eval()
    pm = PeftModel.from_pretrained(hf, str(out)).eval()
    lora_a = {k: v for k, v in pm.state_dict().items() if "lora_A" in k}
    # one module per block of each row (2 encoder, 3 decoder blocks), wo at rank 2
    assert len(lora_a) == sum((2 if r.startswith("encoder") else 3) for r in ALL_ROWS)
    assert all(v.shape[0] == (2 if k.split(".lora_A")[0].endswith(".wo") else 4)
               for k, v in lora_a.items())
    scales = {m.scaling["default"] for n, m in pm.named_modules()
              if n.endswith((".q", ".wo")) and hasattr(m, "scaling")}
    assert scales == {5.0 / 2.0, 8.0 / np.sqrt(2.0)}  # alpha / sqrt(r) per module
    rng = np.random.default_rng(3)
    ids, mask = padded(rng, (9, 6, 4), 9)
    dec, dmask = padded(rng, (5, 3, 5), 5)
    args = {k: torch.as_tensor(v) for k, v in (("input_ids", ids), ("attention_mask", mask),
                                               ("decoder_input_ids", dec),
                                               ("decoder_attention_mask", dmask))}
    with torch.no_grad():
        ref = pm(**args).logits.numpy()
        with pm.disable_adapter():
            base = pm(**args).logits.numpy()
    got = np.asarray(T5Engine(model).forward(ids, mask, dec, dmask, lora=tr.adapter))
    valid = dmask.astype(bool)
    assert np.abs(ref - base)[valid].max() > 1e-2  # the adapter changes the logits
    err = np.abs(got - ref)[valid].max()
    assert err <= 1e-4, err
    # our PEFT T5 reader reads back the trained arrays (ROC rows) and per-module scales
    ad = read_t5_adapter(out, model.config)
    assert len(ad.modules) == len(lora_a)
    for key, (a, b, scale) in ad.modules.items():
        block, row = split_module_key(key)
        np.testing.assert_array_equal(a, np.asarray(tr.adapter.a[row][block]))
        np.testing.assert_array_equal(b.T, np.asarray(tr.adapter.b[row][block]))
        assert scale == pytest.approx(tr.adapter.scale_of(row))


def test_t5_targets_are_checked(t5):
    _, _, model = t5
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['q_proj'\]"):
        init_lora(model, targets=("q_proj",))
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['wi'\]"):
        init_lora(model, targets=("wi",))  # v1.1 has wi_0 / wi_1
    with pytest.raises(ValueError, match="layers_to_transform.*Llama-family models only"):
        init_lora(model, targets=("q",), layers=[0])
    ad = init_lora(model, r=3, targets=("v",))
    assert sorted(ad.a) == ["decoder.EncDecAttention.v", "decoder.SelfAttention.v",
                            "encoder.SelfAttention.v"]


def test_train_lora_cli_on_t5_then_convert_pool(t5, tmp_path):
    import argparse

    from hilora_jax.errors import UsageError
    from hilora_jax.lora.train import add_train_lora_args, train_lora_cli

    path, _, model = t5
    root = tmp_path
    (root / "t5").symlink_to(path)
    write_jsonl(toy_examples(), root / "tasks.jsonl")
    train = ["train-lora", "--model", "t5", "--tasks", "tasks.jsonl"]
    with ThreadPoolExecutor(max_workers=2) as ex:  # a good run and a bad one, as a user types them
        good = ex.submit(hilora, root, *train, "--r", 2, "--alpha", 4, "--targets", "q,v,wi_1",
                         "--steps", 3, "--batch-size", 2, "--out", "ad", env=user_env())
        bad = ex.submit(hilora, root, *train, "--targets", "gate_proj", "--out", "bad",
                        env=user_env())
        ok(good.result())
        bad = bad.result()
    # a Llama target name on a T5: one line naming the flag, nothing written, exit 2
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [
        "hilora: error: --targets 'gate_proj': unknown module(s) of this T5 model ['gate_proj']; "
        "choose from q, k, v, o, wi_0, wi_1, wo"]
    assert not (root / "bad").exists()
    cfg = json.loads((root / "ad/adapter_config.json").read_text())
    assert (cfg["task_type"], cfg["r"], cfg["target_modules"]) == ("SEQ_2_SEQ_LM", 2,
                                                                    ["q", "v", "wi_1"])
    assert json.loads((root / "ad/hilora_train.json").read_text())["steps"] == 3
    # `hilora` reads it back: a pool of the trained adapter
    (root / "manifest.json").write_text(json.dumps({"adapters": {"ad": {"path": "ad"}}}))
    ok(hilora(root, "convert-pool", "manifest.json", "--model", "t5", "--out", "pool",
              env=user_env()))
    meta = json.loads((root / "pool/pool.json").read_text())
    assert meta["names"] == ["ad"]
    assert meta["arrays"]["A.decoder.EncDecAttention.q"]["shape"] == [3, 1, 2, 40]
    assert meta["arrays"]["B.encoder.DenseReluDense.wi_1"]["shape"] == [2, 1, 2, 52]
    assert not any(k.endswith("DenseReluDense.wo") for k in meta["arrays"])
    # --layers is Llama-only: refused before the model loads
    p = argparse.ArgumentParser()
    add_train_lora_args(p)
    args = p.parse_args([*train[1:], "--layers", "0", "--out", str(root / "bad2")])
    args.model, args.tasks = str(root / "t5"), [str(root / "tasks.jsonl")]
    with pytest.raises(UsageError, match="^--layers '0': Llama-family models only; a T5 LoRA "
                       "adapts every block$"):
        train_lora_cli(args)
    assert not (root / "bad2").exists()

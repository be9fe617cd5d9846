"""Loose ends of the T5 work (issue 16): generation with any number of stop tokens equals
transformers and reuses the compiled decode loop (Llama `Engine` and `T5Engine`, one shared
`inference.stop_id_array`); `t5.config.is_t5_dir`."""

import numpy as np
import torch
from hf_utils import make_hf_model
from t5_utils import VOCAB, make_hf_t5, padded

from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.t5.config import is_t5_dir
from hilora_jax.t5.generate import T5Engine
from hilora_jax.t5.load import load_t5

MAX_NEW = 12


def _stops_from(tokens) -> tuple[list[int], list[int]]:
    """One stop id (row 0's third token) and three (plus tokens of rows 1 and 2), taken from a
    run without stops so every row really stops somewhere."""
    one = [int(tokens[0, 2])]
    return one, one + [int(tokens[1, 4]), int(tokens[2, 1])]


def _pad_to(ref: np.ndarray, n: int) -> np.ndarray:
    return np.pad(ref, ((0, 0), (0, n - ref.shape[1])))  # HF stops once every row did


def test_llama_generate_stop_counts_match_transformers_without_recompiling(tmp_path):
    hf = make_hf_model(tmp_path, "llama", eos_token_id=2)
    eng = Engine(load_model(tmp_path, progress=False))
    prompts = [[5, 9, 13, 7, 30], [22, 3], [40, 41, 8]]
    t = 16
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):], mask[i, t - len(p):] = p, 1

    def ref(stops):
        with torch.no_grad():
            out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0,
                              eos_token_id=stops).numpy()[:, t:]
        return _pad_to(out, MAX_NEW)

    free = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=[-1])
    np.testing.assert_array_equal(free.tokens, ref([-1]))
    one, three = _stops_from(free.tokens)
    n_compiled = eng._generate._cache_size()
    for stops in (one, three):
        out = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=stops)
        np.testing.assert_array_equal(out.tokens, ref(stops))
        assert (out.lengths < MAX_NEW).any()  # the stops really ended rows
    assert eng._generate._cache_size() == n_compiled  # 1, 1 and 3 stop ids: one compiled loop


def test_t5_generate_stop_counts_match_transformers_without_recompiling(tmp_path):
    hf = make_hf_t5(tmp_path, "v1.1")
    eng = T5Engine(load_t5(tmp_path))
    lengths = (9, 5, 7)
    ids, mask = padded(np.random.default_rng(2), lengths, 9)
    prompts = [list(ids[i, :n]) for i, n in enumerate(lengths)]

    def ref(stops):
        hf.generation_config.eos_token_id = stops
        with torch.no_grad():  # use_cache=False: see test_t5._hf_greedy
            out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=MAX_NEW, min_new_tokens=0, do_sample=False,
                              num_beams=1, use_cache=False).numpy()[:, 1:]
        return _pad_to(out, MAX_NEW)

    free = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=[VOCAB + 5])
    np.testing.assert_array_equal(free.tokens, ref(None))
    one, three = _stops_from(free.tokens)
    n_compiled = eng._generate._cache_size()
    for stops in (one, three):
        out = eng.generate(prompts, max_new_tokens=MAX_NEW, stop_tokens=stops)
        np.testing.assert_array_equal(out.tokens, ref(stops))
        assert (out.lengths < MAX_NEW).any()
    assert eng._generate._cache_size() == n_compiled


def test_is_t5_dir(tmp_path):
    """`t5.config.is_t5_dir` (the CLI's, the trainer's and lm-eval's T5 switch): only a directory
    whose config.json says `model_type: t5`."""
    cases = {"t5": '{"model_type": "t5"}', "llama": '{"model_type": "llama"}',
             "bad_json": "{model_type: t5", "list": '["t5"]'}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    assert is_t5_dir(tmp_path / "t5") and is_t5_dir(str(tmp_path / "t5"))
    for name in ("llama", "bad_json", "list", "missing"):
        assert not is_t5_dir(tmp_path / name), name
    assert not is_t5_dir("google/flan-t5-small")  # a hub id is not a local T5 directory

"""Tests for the torch-free GGUF reader (hilora_jax.io.gguf).

Hermetic part: a tiny random ``LlamaForCausalLM`` is written as GGUF the way llama.cpp's
``convert_hf_to_gguf.py`` does (metadata keys, q/k row permutation, F32 norms, quantised 2-D
weights, a tiny byte-level BPE tokenizer), then read back and compared with (a) the original HF
state dict and (b) transformers' own GGUF loader on the same file.
Real part (``-m real``): SmolLM2-135M-Instruct Q4_1 against transformers' GGUF loader.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from hilora_jax.io.gguf import (
    GGUFError,
    GGUFModel,
    _permute_qk,
    _unpermute_qk,
    load_gguf_tokenizer,
    read_gguf,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------------------- fixtures: model

# Distinct small dims so a swapped axis fails. Quantised types need every row length (the
# input dim of each [out, in] weight) to be a multiple of 32: hidden 64, heads*head_dim 32,
# intermediate 96; head_dim 8 != hidden/heads 16 also exercises attention.key_length.
DIMS_F = dict(
    hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=40
)
DIMS_Q = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=96
)


def _tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """A 61-token byte-level BPE vocabulary: 3 control tokens, letters/punctuation, merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    base = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", ".", ",", "?", "Ċ"]
    pairs = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("a", "t"), ("Ġ", "c"), ("Ġc", "at"), ("i", "s"),
             ("Ġ", "is"), ("o", "n"), ("Ġ", "on"), ("Ġ", "m"), ("Ġm", "at"), ("e", "r"), ("i", "n"),
             ("Ġ", "a"), ("o", "r"), ("Ġ", "f"), ("Ġf", "or"), ("a", "n"), ("Ġ", "an"), ("e", "n"),
             ("Ġ", "s"), ("Ġs", "at"), ("r", "e"), ("Ġ", "re"), ("e", "d"), ("Ġre", "d")]  # fmt: skip
    tokens = specials + base + ["".join(p) for p in pairs]
    assert len(tokens) == len(set(tokens)) == 61, len(tokens)
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))  # 3 CONTROL, 1 NORMAL
    return tokens, types, [" ".join(p) for p in pairs]


TOKENS, TOKEN_TYPES, MERGES = _tiny_vocab()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def _hf_model(dims: dict, *, tied: bool, seed: int = 0, layers: int = 2, rope_scaling=None):
    cfg = transformers.LlamaConfig(
        vocab_size=len(TOKENS),
        num_hidden_layers=layers,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_scaling=rope_scaling,
        **dims,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # every parameter random, norms included, so a mis-mapped one shows
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight", None)
    return model, sd


_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    _, _, i, *mod, leaf = hf.split(".")
    return f"blk.{i}.{_HF_TO_GGUF['.'.join(mod)]}.{leaf}"


def _write_gguf(
    path,
    model,
    sd: dict[str, np.ndarray],
    *,
    qtype: QT = QT.F32,
    arch: str = "llama",
    extra_kv=None,
    tensor_edit=None,
):
    """Write ``sd`` as llama.cpp's converter would (metadata, q/k permutation, F32 1-D tensors)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    rp = cfg.rope_parameters
    if rp.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    w.add_file_type({QT.F32: 0, QT.F16: 1, QT.Q4_0: 2, QT.Q4_1: 3, QT.Q8_0: 7, QT.BF16: 32}[qtype])
    for key, value in (extra_kv or {}).items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tensors = {}
    for hf, arr in sd.items():
        arr = arr.astype(np.float32)
        if hf.endswith("q_proj.weight"):
            arr = _permute_qk(arr, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            arr = _permute_qk(arr, cfg.num_key_value_heads)
        tensors[_gguf_name(hf)] = arr
    if tensor_edit is not None:
        tensor_edit(tensors)
    for name, arr in tensors.items():
        if arr.ndim == 1 or qtype == QT.F32 or arr.dtype != np.float32:
            w.add_tensor(name, arr)  # llama.cpp keeps 1-D tensors (norms) in F32
        elif qtype == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _roundtrip(arr: np.ndarray, qtype: QT) -> np.ndarray:
    """What a faithful reader must return for ``arr`` written as ``qtype`` (1-D stays F32)."""
    if arr.ndim == 1 or qtype == QT.F32:
        return arr
    if qtype == QT.F16:
        return arr.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).reshape(arr.shape)


def _expected_config(model, *, tied: bool) -> dict:
    cfg = model.config
    return dict(
        model_type="llama",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_parameters["rope_theta"],
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=tied,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        rope_scaling=None,
    )


def _transformers_state_dict(path) -> dict[str, np.ndarray]:
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    if m.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


# ---------------------------------------------------------------------------- permutation


def test_permutation_roundtrip_and_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    p = _permute_qk(w, 6)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(_unpermute_qk(p, 6), w)
    ref = LlamaTensorProcessor()._reverse_permute_weights(p, 6, 6)
    np.testing.assert_array_equal(_unpermute_qk(p, 6), ref)
    # HF rotate-half pairs row j with row j + head_dim/2 of the same head; llama.cpp interleaves.
    np.testing.assert_array_equal(p[1], w[4])


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "dims,tied,kv",
    [(DIMS_F, False, 2), (DIMS_F, True, 2), (DIMS_F, False, 6), (DIMS_F, True, 1)],
    ids=["untied-gqa", "tied-gqa", "untied-mha", "tied-mqa"],
)
def test_f32_exact_and_config(tmp_path, dims, tied, kv):
    model, sd = _hf_model(dims | {"num_key_value_heads": kv}, tied=tied)
    path = _write_gguf(tmp_path / "tiny.gguf", model, sd)
    out = read_gguf(path)
    assert isinstance(out, GGUFModel) and out.path == path
    assert sorted(out.tensors) == sorted(sd)
    assert ("lm_head.weight" in out.tensors) == (not tied)
    for k, v in sd.items():
        assert out.tensors[k].dtype == np.float32 and out.tensors[k].flags.c_contiguous
        np.testing.assert_array_equal(out.tensors[k], v, err_msg=k)
    got = {k: out.config[k] for k in _expected_config(model, tied=tied)}
    assert got == _expected_config(model, tied=tied)
    assert out.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize(
    "qtype", [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name
)
def test_quantised_matches_roundtrip(tmp_path, qtype):
    model, sd = _hf_model(DIMS_Q, tied=qtype in (QT.Q8_0, QT.Q4_1))
    path = _write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", model, sd, qtype=qtype)
    out = read_gguf(path)
    assert sorted(out.tensors) == sorted(sd)
    for k, v in sd.items():
        # q/k permutation only moves rows and blocks run along rows, so it commutes with
        # quantisation: the reader must return exactly dequantize(quantize(original)).
        np.testing.assert_array_equal(out.tensors[k], _roundtrip(v, qtype), err_msg=k)
    # and that is close to the original (sanity bound on the quantisation error itself)
    rel = {QT.F16: 1e-3, QT.BF16: 8e-3, QT.Q8_0: 1e-2, QT.Q4_0: 0.15, QT.Q4_1: 0.1}[qtype]
    for k, v in sd.items():
        assert np.max(np.abs(out.tensors[k] - v)) <= rel * np.max(np.abs(v)), k
    assert out.config["head_dim"] == 8 and out.config["hidden_size"] == 64


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_argument(tmp_path, dtype):
    dtype = np.dtype(getattr(pytest.importorskip("ml_dtypes"), dtype, dtype))
    model, sd = _hf_model(DIMS_F, tied=True)
    path = _write_gguf(tmp_path / "tiny.gguf", model, sd)
    out = read_gguf(path, dtype=dtype)
    for k, v in sd.items():
        assert out.tensors[k].dtype == dtype
        np.testing.assert_array_equal(out.tensors[k], v.astype(dtype), err_msg=k)


def test_linear_rope_scaling(tmp_path):
    scaling = {"rope_type": "linear", "factor": 4.0}
    model, sd = _hf_model(DIMS_F, tied=True, rope_scaling=dict(scaling))  # HF mutates it
    path = _write_gguf(tmp_path / "tiny.gguf", model, sd)
    assert read_gguf(path).config["rope_scaling"] == scaling


# ---------------------------------------------------------------------------- transformers parity


@pytest.mark.parametrize(
    "dims,tied,qtype",
    [(DIMS_F, False, QT.F32), (DIMS_Q, True, QT.Q8_0)],
    ids=["f32-untied-gqa", "q8_0-tied-gqa"],
)
def test_matches_transformers_gguf_loader(tmp_path, dims, tied, qtype):
    model, sd = _hf_model(dims, tied=tied, seed=1)
    path = _write_gguf(tmp_path / "tiny.gguf", model, sd, qtype=qtype)
    ours = read_gguf(path)
    theirs = _transformers_state_dict(path)
    assert _max_diff(ours.tensors, theirs) == 0.0
    if qtype == QT.F32:  # and transformers' loader recovers the original model too
        assert _max_diff(theirs, sd) == 0.0
    hf_cfg = transformers.AutoConfig.from_pretrained(
        str(tmp_path), gguf_file=path.name, local_files_only=True
    )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert ours.config[key] == getattr(hf_cfg, key), key
    assert np.float32(ours.config["rms_norm_eps"]) == np.float32(hf_cfg.rms_norm_eps)
    assert ours.config["rope_theta"] == hf_cfg.rope_parameters["rope_theta"]


def test_tokenizer_from_metadata(tmp_path):
    model, sd = _hf_model(DIMS_F, tied=True)
    path = _write_gguf(tmp_path / "tiny.gguf", model, sd)
    tok = load_gguf_tokenizer(path)
    ids = tok("the cat sat on the mat.", add_special_tokens=False).input_ids
    assert [TOKENS[i] for i in ids] == ["the", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "."]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "is the cat on"}], tokenize=False)
    assert text == "<|im_start|>user\nis the cat on<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


# ---------------------------------------------------------------------------- errors


def test_non_llama_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"gpt\.gguf.*'gpt2'"):
        read_gguf(tmp_path / "gpt.gguf")


@pytest.mark.parametrize(
    "keep", [10, 200, 0.5, -3], ids=["magic", "metadata", "half", "last-bytes"]
)
def test_truncated_file(tmp_path, keep):
    model, sd = _hf_model(DIMS_F, tied=True)
    path = _write_gguf(tmp_path / "trunc.gguf", model, sd)
    data = path.read_bytes()
    n = (
        int(len(data) * keep)
        if isinstance(keep, float)
        else (keep if keep > 0 else len(data) + keep)
    )
    path.write_bytes(data[:n])
    with pytest.raises(GGUFError, match=r"trunc\.gguf.*(truncated|corrupt)"):
        read_gguf(path)


def test_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def _bad(tmp_path, **kw):
    model, sd = _hf_model(DIMS_F, tied=False)
    return _write_gguf(tmp_path / "bad.gguf", model, sd, **kw)


def test_unknown_and_missing_tensors_listed_together(tmp_path):
    def edit(t):
        t["blk.0.attn_q.bias"] = np.zeros(48, np.float32)
        t["blk.7.ffn_up.weight"] = t.pop("blk.1.ffn_up.weight")  # layer out of range + missing
        t["rope_freqs.weight"] = np.ones(4, np.float32)

    path = _bad(tmp_path, tensor_edit=edit)
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    msg = str(e.value)
    for needle in ("bad.gguf", "'blk.0.attn_q.bias'", "'blk.7.ffn_up.weight'",
                   "model.layers.1.mlp.up_proj.weight", "rope_freqs"):  # fmt: skip
        assert needle in msg, (needle, msg)


def test_wrong_shape(tmp_path):
    path = _bad(
        tmp_path,
        tensor_edit=lambda t: t.__setitem__(
            "blk.1.ffn_down.weight", np.zeros((48, 41), np.float32)
        ),
    )
    with pytest.raises(
        GGUFError, match=r"bad\.gguf[\s\S]*blk\.1\.ffn_down\.weight.*\(48, 41\).*\(48, 40\)"
    ):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = _bad(
        tmp_path, tensor_edit=lambda t: t.__setitem__("output_norm.weight", np.ones(48, np.int32))
    )
    with pytest.raises(GGUFError, match=r"bad\.gguf.*'output_norm\.weight'.*I32"):
        read_gguf(path)


def test_unhandled_metadata(tmp_path):
    path = _bad(tmp_path, extra_kv={"llama.expert_count": 4})
    with pytest.raises(GGUFError, match=r"bad\.gguf.*llama\.expert_count=4"):
        read_gguf(path)
    path = _bad(tmp_path, extra_kv={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(GGUFError, match=r"bad\.gguf.*'yarn'"):
        read_gguf(path)


# ---------------------------------------------------------------------------- real model


@pytest.mark.real
def test_smollm2_q4_1_matches_transformers():
    from hilora_jax.io.assets import smollm2_gguf

    path = smollm2_gguf()
    ours = read_gguf(path)
    cfg = ours.config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (30, 576, 9, 3, 64, 49152)  # fmt: skip
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ours.tensors
    theirs = _transformers_state_dict(path)
    diff = _max_diff(ours.tensors, theirs)
    print(f"SmolLM2 Q4_1: {len(theirs)} tensors, max |ours - transformers| = {diff:.3g}")
    assert diff <= 1e-6

    tok = load_gguf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    text = "What is the capital of France?"
    assert tok(text).input_ids == ref(text).input_ids
    assert tok.decode(tok(text).input_ids) == text
    assert tok.chat_template == ours.chat_template and "<|im_start|>" in tok.chat_template

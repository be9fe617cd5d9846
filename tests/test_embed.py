"""Tests for hilora_jax.embed: parity with transformers / sentence-transformers, strictness, bucketing.

The hermetic model has distinct small dims (vocab 32, hidden 48, heads 6, head dim 8, mlp 40, 2 layers,
3 token types, 37 positions) and every parameter perturbed away from its init (HF initialises biases to 0
and LayerNorm to 1, which would hide a dropped bias or LayerNorm mapping).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hilora_jax.embed import Embedder, PrecomputedEmbedder, SentenceEmbedder, load_embedder
from hilora_jax.embed.bert import load_bert
from hilora_jax.embed.sentence import bucket_lengths

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st_lib = pytest.importorskip("sentence_transformers")

WORDS = (
    "the a cat dog sat on mat quick brown fox jump ##s ##ing ##ed over lazy hello world run "
    "model router lora adapter , . ! ?"
).split()
MAX_SEQ = 12
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog!",  # upper case: tokenizer lower-cases
    "cat",
    "",
    "the router sat on the lora adapter, the dog sat on the mat, the cat jumped over the model.",
    "Dog running?",
]


def _write_hf(out: Path, hidden_act: str = "gelu", seed: int = 0) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=48,
        num_attention_heads=6,
        intermediate_size=40,
        num_hidden_layers=2,
        max_position_embeddings=37,
        type_vocab_size=3,
        hidden_act=hidden_act,
    )
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg).eval()  # keeps the pooler: the loader must ignore it
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_hf(tmp_path_factory.mktemp("tiny_hf"))


def _save_st(hf_dir: Path, out: Path, modes: str | tuple[str, ...], normalize: bool) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    modules = [Transformer(str(hf_dir), max_seq_length=MAX_SEQ), Pooling(48, pooling_mode=modes)]
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def _reference(path: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_encoder_matches_transformers(tmp_path: Path, hidden_act: str) -> None:
    hf_dir = _write_hf(tmp_path / "hf", hidden_act=hidden_act, seed=1)
    ref_model = transformers.BertModel.from_pretrained(hf_dir).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(5, ref_model.config.vocab_size, size=(3, 9))
    types = rng.integers(0, 3, size=(3, 9))
    mask = (np.arange(9)[None] < np.array([[9], [4], [1]])).astype(np.int64)
    with torch.no_grad():
        ref = ref_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        ).last_hidden_state.numpy()
    ours = np.asarray(load_bert(hf_dir)(ids, mask, types))
    real = mask.astype(bool)  # padded query rows are unspecified in both implementations
    assert np.abs(ours[real] - ref[real]).max() <= 1e-5


@pytest.mark.parametrize(
    ("modes", "normalize"),
    [
        ("mean", True),
        ("mean", False),
        ("cls", True),
        ("cls", False),
        ("max", False),
        ("lasttoken", False),
        (("mean_sqrt_len_tokens", "weightedmean"), True),
    ],
)
def test_sentence_parity(tiny_hf: Path, tmp_path: Path, modes, normalize: bool) -> None:
    path = _save_st(tiny_hf, tmp_path / "st", modes, normalize)
    emb = SentenceEmbedder.from_pretrained(path)
    assert emb.max_seq_length == MAX_SEQ
    lengths = [len(ids) for ids in emb.tokenize(TEXTS)["input_ids"]]
    assert max(lengths) == MAX_SEQ  # the long text was truncated
    ours = emb.embed(TEXTS, batch_size=4)  # two batches, the second padded to 2 rows
    ref = _reference(path, TEXTS)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(TEXTS), emb.dim)
    assert np.abs(ours - ref).max() <= 1e-5
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_legacy_sentence_transformers_format(tiny_hf: Path, tmp_path: Path) -> None:
    """Pre-v5 layout: max_seq_length/do_lower_case in sentence_bert_config, boolean pooling keys."""
    path = _save_st(tiny_hf, tmp_path / "st", "mean", True)
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 7, "do_lower_case": True})
    )
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 48,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": True,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    # A cased tokenizer, so upper-case words only match the vocab if do_lower_case is honoured.
    tok_json = json.loads((path / "tokenizer.json").read_text())
    tok_json["normalizer"]["lowercase"] = False
    (path / "tokenizer.json").write_text(json.dumps(tok_json))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "do_lower_case": False}))
    emb = SentenceEmbedder.from_pretrained(path)
    assert emb.max_seq_length == 7 and emb.config.pooling_modes == ("cls", "max")
    assert emb.tokenize(["Hello"]) == emb.tokenize(["hello"])
    assert emb.tokenizer("Hello")["input_ids"] != emb.tokenizer("hello")["input_ids"]
    assert np.abs(emb.embed(TEXTS) - _reference(path, TEXTS)).max() <= 1e-5


@pytest.mark.real
def test_minilm_matches_sentence_transformers() -> None:
    from hilora_jax.io.assets import minilm_dir

    texts = [
        "A man is eating food.",
        "Translate the following sentence into French: the weather is nice today.",
        "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
        "Which of these is a prime number: 21, 33, 37, or 39?",
        "Ünïcödé, émojis 🙂 and CAPITALS",
        "",
        "Summarize: "
        + "The committee met to discuss the annual budget and postponed the vote. " * 40,
        "ok",
    ]
    emb = load_embedder("minilm")
    assert isinstance(emb, SentenceEmbedder) and emb.dim == 384
    ours = emb(texts)
    ref = _reference(minilm_dir(), texts)
    diff = float(np.abs(ours - ref).max())
    print(f"MiniLM max abs diff vs sentence-transformers: {diff:.3g}")
    assert diff <= 1e-5


# ------------------------------------------------------------------------------------------------
# Bucketing
# ------------------------------------------------------------------------------------------------


def test_bucketing_is_invariant_and_bounds_compiles(tiny_hf: Path, tmp_path: Path) -> None:
    emb = SentenceEmbedder.from_pretrained(_save_st(tiny_hf, tmp_path / "st", "mean", False))
    assert bucket_lengths(MAX_SEQ) == (8, 12) and bucket_lengths(256) == (8, 16, 32, 64, 128, 256)
    short = "hello world"
    longs = [TEXTS[4], "the quick brown fox jumps over the lazy dog"]
    alone = emb.embed([short])[0]
    in_batch = emb.embed([longs[0], short, longs[1]])[1]  # padded to 12 tokens, 4 rows
    assert len(emb.tokenize([short])["input_ids"][0]) <= 8 < MAX_SEQ
    assert np.abs(alone - in_batch).max() <= 1e-6
    assert np.abs(alone).max() > 1e-3  # not vacuous

    fresh = SentenceEmbedder(emb.model, emb.tokenizer, emb.config)
    for texts in (["cat"], ["the cat"], ["the cat sat on"]):  # 3..6 tokens: one (1, 8) program
        fresh.embed(texts)
    assert fresh._fn._cache_size() == 1
    fresh.embed(["cat", "dog", "the cat"])  # 3 rows -> 4-row bucket: a second program
    fresh.embed([TEXTS[4]])  # 12 tokens: a third
    assert fresh._fn._cache_size() == 3


# ------------------------------------------------------------------------------------------------
# Strictness
# ------------------------------------------------------------------------------------------------


def _edit_tensors(src: Path, dst: Path, edit) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_loader_ignores_pooler_and_buffers(tiny_hf: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    assert "pooler.dense.weight" in load_file(str(tiny_hf / "model.safetensors"))
    d = _edit_tensors(
        tiny_hf,
        tmp_path / "m",
        lambda t: t.update({"embeddings.position_ids": np.arange(37, dtype=np.int64)[None]}),
    )
    load_bert(d)  # no error: pooler and the position_ids buffer are consumed deliberately


def test_loader_lists_all_offenders(tiny_hf: Path, tmp_path: Path) -> None:
    def edit(t: dict[str, np.ndarray]) -> None:
        del t["encoder.layer.1.output.dense.bias"]
        del t["embeddings.LayerNorm.weight"]
        t["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((4,), np.float32)
        t["encoder.layer.2.output.dense.bias"] = np.zeros((48,), np.float32)  # 3rd layer of 2
        t["encoder.layer.0.intermediate.dense.weight"] = t[
            "encoder.layer.0.intermediate.dense.weight"
        ].T.copy()  # [48, 40] instead of [40, 48]

    d = _edit_tensors(tiny_hf, tmp_path / "m", edit)
    with pytest.raises(ValueError) as err:
        load_bert(d)
    msg = str(err.value)
    for needle in (
        "model.safetensors",
        "encoder.layer.1.output.dense.bias",
        "embeddings.LayerNorm.weight",
        "encoder.layer.0.attention.self.rotary.weight",
        "encoder.layer.2.output.dense.bias",
        "encoder.layer.0.intermediate.dense.weight",
        "(48, 40)",
    ):
        assert needle in msg, needle


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("position_embedding_type", "relative_key"),
        ("is_decoder", True),
        ("add_cross_attention", True),
        ("hidden_act", "relu"),
        ("model_type", "roberta"),
        ("embedding_size", 16),  # unknown field
    ],
)
def test_loader_rejects_config_fields(tiny_hf: Path, tmp_path: Path, field: str, value) -> None:
    d = shutil.copytree(tiny_hf, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"(?s)config\.json.*{field}"):
        load_bert(d)


def test_sentence_config_errors(tiny_hf: Path, tmp_path: Path) -> None:
    path = _save_st(tiny_hf, tmp_path / "st", "mean", True)
    pool_cfg = path / "1_Pooling" / "config.json"
    good = pool_cfg.read_text()

    pool_cfg.write_text(json.dumps({"embedding_dimension": 48, "pooling_mode": "median"}))
    with pytest.raises(ValueError, match=r"(?s)'pooling_mode'.*median.*1_Pooling"):
        SentenceEmbedder.from_pretrained(path)
    pool_cfg.write_text(json.dumps({"embedding_dimension": 48, "pooling_mode_median": True}))
    with pytest.raises(ValueError, match="pooling_mode_median"):
        SentenceEmbedder.from_pretrained(path)
    pool_cfg.write_text(json.dumps({"embedding_dimension": 64, "pooling_mode": "mean"}))
    with pytest.raises(ValueError, match="embedding_dimension"):
        SentenceEmbedder.from_pretrained(path)
    pool_cfg.write_text(good)

    sbert = path / "sentence_bert_config.json"
    sbert.write_text(json.dumps({"max_seq_length": 64}))  # > max_position_embeddings = 37
    with pytest.raises(ValueError, match="max_seq_length"):
        SentenceEmbedder.from_pretrained(path)
    sbert.write_text(json.dumps({"transformer_task": "text-generation"}))
    with pytest.raises(ValueError, match=r"(?s)sentence_bert_config\.json.*transformer_task"):
        SentenceEmbedder.from_pretrained(path)
    sbert.write_text("{}")

    modules = json.loads((path / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    modules[-1]["idx"] = 3
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"(?s)modules\.json.*Dense"):
        SentenceEmbedder.from_pretrained(path)


def test_offline_hub_id_is_a_clear_error() -> None:
    with pytest.raises(OSError, match="offline"):
        SentenceEmbedder.from_pretrained("nobody-hilora/not-a-cached-model")


# ------------------------------------------------------------------------------------------------
# Protocol and PrecomputedEmbedder
# ------------------------------------------------------------------------------------------------


def test_precomputed_embedder() -> None:
    table = {"a": [1.0, 2.0, 3.0], "b": np.array([0.0, -1.0, 0.5])}
    emb = PrecomputedEmbedder(table)
    assert isinstance(emb, Embedder) and emb.dim == 3
    assert load_embedder(emb) is emb
    out = emb(["b", "a", "b"])
    assert out.dtype == np.float32 and out.shape == (3, 3)
    np.testing.assert_array_equal(out[1], [1.0, 2.0, 3.0])

    with pytest.raises(KeyError, match="'missing text'"):
        emb(["a", "missing text"])
    bad = PrecomputedEmbedder({"ok": [1.0, 2.0], "nan": [0.0, float("nan")], "inf": [np.inf, 0]})
    with pytest.raises(ValueError, match=r"row 1 .*'nan'"):
        bad(["ok", "nan"])
    with pytest.raises(ValueError, match=r"row 0 .*'inf'"):
        bad(["inf"])
    with pytest.raises(ValueError, match="shape"):
        PrecomputedEmbedder({"a": [1.0, 2.0], "b": [1.0]})(["a", "b"])

    fn = PrecomputedEmbedder(lambda t: None if t == "?" else np.full(4, len(t), np.float32), dim=4)
    np.testing.assert_array_equal(fn(["xy"]), [[2, 2, 2, 2]])
    with pytest.raises(KeyError, match=r"'\?'"):
        fn(["?"])
    with pytest.raises(ValueError, match="dim"):
        PrecomputedEmbedder(lambda t: [0.0])
    with pytest.raises(TypeError):
        load_embedder(42)  # type: ignore[arg-type]

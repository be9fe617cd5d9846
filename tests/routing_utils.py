"""Synthetic pools and embeddings for router tests (shaped for the tiny HF models)."""

from __future__ import annotations

import zlib

import numpy as np
import reference_hilora as ref

from hilora_jax.embed import PrecomputedEmbedder
from hilora_jax.lora.pool import LoraPool, PoolArrays
from hilora_jax.model.config import ModelConfig


def random_pool(cfg: ModelConfig, ranks=(4, 8, 6, 8, 2), *, modules=("q_proj", "v_proj", "down_proj"),
                seed: int = 0, emb_dim: int = 12, m: int = 20, spread: float = 6.0,
                skip_layer_for=(2, 1)) -> tuple[LoraPool, PrecomputedEmbedder, np.ndarray]:
    """A heterogeneous pool with random ROCs, per-adapter samples and a matching embedder.

    Adapter `skip_layer_for[0]` has no ROCs at layer `skip_layer_for[1]` of the first module (an
    untransformed layer); ranks differ. Samples of adapter i are `"task{i} s{j}"`, embedded near a
    cluster mean `means[i]`; any text `"task{i} q{j}"` embeds near the same mean (fresh noise).
    Returns `(pool, embedder, means)`.
    """
    rng = np.random.default_rng(seed)
    L, N = cfg.num_layers, len(ranks)
    shapes = cfg.module_shapes()
    R = max(ranks)
    A, B, S, M = {}, {}, {}, {}
    for mi, name in enumerate(modules):
        d_in, d_out = shapes[name]
        A[name] = (rng.standard_normal((L, N, R, d_in)) * 0.3).astype(np.float32)
        B[name] = (rng.standard_normal((L, N, R, d_out)) * 0.3).astype(np.float32)
        mask = np.zeros((L, N, R), bool)
        for i, r in enumerate(ranks):
            mask[:, i, :r] = True
        if mi == 0 and skip_layer_for is not None:
            mask[skip_layer_for[1], skip_layer_for[0]] = False
        A[name] *= mask[..., None]
        B[name] *= mask[..., None]
        scale = np.broadcast_to((2.0 * 8 / np.asarray(ranks, np.float32))[None, :, None],
                                (L, N, R)) * mask
        S[name], M[name] = scale.astype(np.float32), mask
    arrays = PoolArrays(A=A, B=B, scale=S, mask=M, ranks=np.asarray(ranks, np.int32),
                        active=np.ones(N, bool))
    from hilora_jax.lora.pool import _to_device

    means = rng.standard_normal((N, emb_dim)) * spread
    table = {}
    samples = {}
    for i in range(N):
        names = [f"task{i} s{j}" for j in range(m)]
        for t in names:
            table[t] = means[i] + rng.standard_normal(emb_dim)
        samples[f"lora{i}"] = tuple(names)
    def embed(text: str):
        if text in table:
            return table[text]
        # fresh noise, but a deterministic function of the text (independent of call order)
        emb_rng = np.random.default_rng([seed + 1, zlib.crc32(text.encode())])
        if text.startswith("task"):
            i = int(text.split()[0][4:])
            v = means[i] + emb_rng.standard_normal(emb_dim)
        else:  # out-of-distribution text: far from every cluster
            v = emb_rng.standard_normal(emb_dim) * 3 + 40.0
        table[text] = v
        return v

    pool = LoraPool(_to_device(arrays, np.float32, None), [f"lora{i}" for i in range(N)],
                    clusters={f"lora{i}": f"c{i % 2}" for i in range(N)}, samples=samples)
    return pool, PrecomputedEmbedder(embed, dim=emb_dim), means


def reference_delta(pool: LoraPool, x: np.ndarray, name: str, layer: int, dec: list[dict],
                    kappa_mode: str) -> np.ndarray:
    """HiLoRA's token stage in float64 loops: `kappa * sum_i s_i sum_{j in top-n_i(module)}
    (a_ij . x) b_ij` for `x [B, T, D]` at `layer` of module `name`, given each row's sequence
    decision `dec[b]` (`reference_hilora.sequence_decision`)."""
    A = np.asarray(pool.arrays.A[name][layer], np.float64)
    B = np.asarray(pool.arrays.B[name][layer], np.float64)
    S = np.asarray(pool.arrays.scale[name][layer], np.float64)
    M = np.asarray(pool.arrays.mask[name][layer])
    ranks = np.asarray(pool.arrays.ranks)
    out = np.zeros(x.shape[:2] + (B.shape[-1],))
    for b in range(x.shape[0]):
        d = dec[b]
        kap = ref.kappa(d["n"], kappa_mode)
        for t in range(x.shape[1]):
            for i, n in zip(d["cand"], d["n"], strict=True):
                n_mod = ref.per_module_count(n, int(ranks[i]), int(M[i].sum()))
                u = A[i] @ x[b, t]
                for j in ref.topn_keep(u, n_mod, M[i]):
                    out[b, t] += kap * S[i, j] * u[j] * B[i, j]
    return out

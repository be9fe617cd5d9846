"""Streaming load (issue 14 item 5): a sharded bf16 safetensors checkpoint goes tensor by tensor
onto its NamedShardings, within the host-memory bound, with exactly the checkpoint's values.

The checkpoint is `benchmarks/load_rss.py`'s synthetic Llama at size "ci" (~55M params, 110 MB
bf16, 3 shards + index). The RSS test loads it onto 8 fake CPU devices (mesh 1x8) in a fresh
subprocess that reports its own peak RSS: `VmHWM` from /proc/self/status (`ru_maxrss` is wrong
here: Linux carries the parent's high-water mark into a child across fork + exec, and this
parent is pytest with torch loaded). Bounds:
  * the issue's goal: peak <= 1.3 x checkpoint bytes + 1 GB;
  * the load itself (peak minus the RSS just before `load_model`, i.e. without the Python / JAX
    runtime that the goal's 1 GB is for): <= 1.4 x checkpoint bytes. On CPU the device buffers
    live in host memory (1.0 x); streaming adds the largest host tensor and one shard of it
    (~0.15 x here) and the allocator keeps ~0.05 x of freed host buffers (measured 1.19-1.21 x
    in all). The previous loader (memory-mapped shard files whose touched pages stayed
    resident, a float32 copy per tensor, every shard materialised before `device_put`) measured
    1.60 x on this checkpoint, so this bound fails for it.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from hilora_jax.io.hf import map_key
from hilora_jax.io.loading import load_model
from hilora_jax.model import sharding as shd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load_rss  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("rss") / "llama-ci"
    nbytes = load_rss.write_checkpoint(d, load_rss.llama_config("ci"), shards=3)
    assert len(list(d.glob("*.safetensors"))) == 3
    return d, nbytes


def test_streamed_load_peak_rss_within_bound(ckpt):
    d, nbytes = ckpt
    r = load_rss.measure(d, mesh="1x8", dtype="bfloat16", timeout=600)
    assert r["devices"] == 8
    assert r["params"] * 2 == nbytes  # every parameter loaded, in bf16
    assert r["device_bytes"] >= nbytes  # (norms are replicated on the 8 devices)
    assert r["peak_rss"] <= 1.3 * nbytes + 1e9, r
    growth = r["peak_rss"] - r["rss_before_load"]
    # 1.4x, not 1.3x: a margin for allocator noise (streamed 1.19-1.21x, the old loader 1.60x)
    assert growth <= 1.4 * nbytes, f"load grew RSS by {growth / nbytes:.2f} x the checkpoint: {r}"


def _reference(d: Path) -> dict[str, np.ndarray]:
    """Target path -> array in our layout, read with the `safetensors` package (not our reader)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                t = st.get_tensor(k)
                assert t.dtype == torch.bfloat16
                a = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                target, fn = map_key(k)
                out[target] = fn(a)
    return out


def test_streamed_params_equal_checkpoint_exactly(ckpt):
    d, _ = ckpt
    ref = _reference(d)
    mesh = shd.make_mesh(1, 8)
    sharded = load_model(d, dtype=jnp.bfloat16, mesh=mesh, progress=False)
    plain = load_model(d, dtype=jnp.float32, progress=False)  # bf16 -> fp32 is exact
    got_s = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(sharded))}
    got_p = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(plain))}
    assert set(got_s) == set(ref) == set(got_p)
    for name, want in ref.items():
        s = got_s[name]
        assert s.dtype == jnp.bfloat16 and s.shape == want.shape, name
        assert s.sharding.is_equivalent_to(shd.param_sharding(name, want.shape, mesh), s.ndim), name
        np.testing.assert_array_equal(np.asarray(s).view(np.int16), want.view(np.int16), err_msg=name)
        for shard in s.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data).view(np.int16),
                                          want[shard.index].view(np.int16), err_msg=name)
        p = got_p[name]
        assert p.dtype == jnp.float32 and len(p.devices()) == 1
        np.testing.assert_array_equal(np.asarray(p), want.astype(np.float32), err_msg=name)
    q = got_s["model.layers.0.self_attn.q_proj.kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model")  # really sharded

"""benchmarks/accelerator.py: the smoke run end to end (subprocess, CPU), the GPU peak table's
lookup, the analytic roofline on the published Llama-2-7B shapes, and the time-budget guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator  # noqa: E402

from hilora_jax import aot  # noqa: E402
from hilora_jax.model import sharding as shd  # noqa: E402


def test_smoke_run_writes_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--smoke",
                           "--batches", "2", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "accelerator.json").read_text())
    assert data["complete"] is True and data["skipped"] == []
    assert (tmp_path / "accelerator.md").read_text() == data["markdown"]
    rows = {(r["batch"], r["router"]): r for r in data["rows"]}
    assert set(rows) == {(2, r) for r in accelerator.ROUTERS}
    base = rows[(2, "base")]
    for r in rows.values():
        assert r["status"] == "ok" and r["repeats"] == 1
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["compile_s"] > 0
        # rates and ratios come from the recorded times of this run
        assert r["prefill_tok_s"] == pytest.approx(2 * 16 / r["prefill_s"])
        assert r["decode_tok_s"] == pytest.approx(2 * 3 / r["decode_s"])
        assert r["prefill_vs_base"] == pytest.approx(r["prefill_tok_s"] / base["prefill_tok_s"])
        assert r["decode_vs_base"] == pytest.approx(r["decode_tok_s"] / base["decode_tok_s"])
        # CPU: no peak figures, so no roofline time and no MFU are invented
        assert "prefill_roofline_s" not in r["roofline"] and "mfu_prefill" not in r
    dec = rows[(2, "hilora")]["decision"]
    assert all(2 <= c <= 4 for c in dec["candidates_per_row"])
    assert data["device"]["peak"]["status"] == "unknown"
    assert "not in the peak table" in data["markdown"]


@pytest.mark.parametrize("kind", ["NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA L40S",
                                  "NVIDIA A100-SXM4-40GB", "Some Future GPU", "cpu"])
def test_unknown_gpu_is_reported_unknown(kind):
    p = accelerator.lookup_gpu(kind)
    assert p["status"] == "unknown" and p["name"] == "unknown"
    assert p["bf16_flops"] is None and p["hbm_bw"] is None and p["mem_bytes"] is None
    rl = accelerator.roofline(aot.PRESETS["smollm2-135m"], {"layer_matmul": 10, "lm_head": 0,
                                                          "embed": 5, "other": 1},
                              batch=1, prompt=4, new=2, lora_bytes=0, peak=p)
    assert "prefill_roofline_s" not in rl and "decode_step_roofline_s" not in rl


@pytest.mark.parametrize("kind,name,tflops,gbs", [
    ("NVIDIA H200", "H200 SXM", 989.5, 4800), ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5, 3350),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 312, 2039),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 312, 1935), ("NVIDIA L4", "L4", 121, 300),
    ("Tesla T4", "T4", None, 320)])
def test_known_gpus(kind, name, tflops, gbs):
    p = accelerator.lookup_gpu(kind)
    assert p["status"] == "known" and p["name"] == name and p["source"]
    assert p["hbm_bw"] == pytest.approx(gbs * 1e9)
    assert p["bf16_flops"] == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_llama2_7b_counts_and_decode_roofline():
    """Parameter count of the preset = Llama-2-7B's published 6,738,415,616; batch-1 decode on an
    H200 is memory bound at (weights + KV) / 4.8 TB/s."""
    cfg = aot.PRESETS["llama-2-7b"]
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    _, abstract = aot.abstract_params(cfg, jnp.bfloat16, mesh)
    c = accelerator.model_counts(cfg, abstract)
    assert c["layer_matmul"] + c["lm_head"] + c["embed"] + c["other"] == 6_738_415_616
    assert c["lm_head"] == c["embed"] == 32000 * 4096 and not c["tied"]
    peak = accelerator.lookup_gpu("NVIDIA H200")
    rl = accelerator.roofline(cfg, c, batch=1, prompt=512, new=128, lora_bytes=0, peak=peak)
    weights = (c["layer_matmul"] + c["other"] + c["lm_head"]) * 2
    kv = (512 + 64) * 32 * 2 * 4096 * 2
    assert rl["decode_step_min_bytes"] == pytest.approx(weights + 4096 * 2 + kv)
    assert rl["decode_bound"] == "memory" and rl["prefill_bound"] == "compute"
    assert rl["decode_step_roofline_s"] == pytest.approx(rl["decode_step_min_bytes"] / 4.8e12)
    # prefill FLOPs: 2 x matmul params per token + causal attention + the head at the last token
    f = 512 * 2 * c["layer_matmul"] + 32 * 4 * 4096 * 512 * 256 + 2 * c["lm_head"]
    assert rl["prefill_flops"] == pytest.approx(f)
    lb = accelerator.lora_read_bytes("hilora", 5, cfg, 8, ("q_proj", "v_proj"), 50)
    assert lb == 5 * 32 * 8 * (2 * 4096 + 2 * 4096) * 2


def test_budget_guard_skips_and_says_so(tmp_path, capsys):
    assert accelerator.main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "accelerator.json").read_text())
    assert data["complete"] is True
    assert [r["status"] for r in data["rows"]] == ["skipped (budget)"] * 8
    assert data["skipped"] == ["batch 1: all rows (budget)", "batch 2: all rows (budget)"]
    assert "Skipped (budget)" in capsys.readouterr().out


def test_precision_paired_difference():
    """benchmarks/precision.py's paired statistic: mean of per-item differences and its SE."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks" / "bigbench_dg"))
    import precision

    a = {f"t:{i}": v for i, v in enumerate([1, 0, 1, 1, 0, 0, 1, 0])}
    b = {f"t:{i}": v for i, v in enumerate([1, 1, 0, 1, 0, 1, 1, 0])}
    p = precision.paired(a, b)
    d = np.array([b[k] - a[k] for k in a], float)
    assert p["n"] == 8 and p["diff"] == pytest.approx(d.mean()) and p["diff"] == 0.125
    assert p["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(8))
    assert (p["gained"], p["lost"]) == (2, 1)
    assert p["acc_a"] == 0.5 and p["acc_b"] == 0.625
    with pytest.raises(ValueError, match="item sets differ"):
        precision.paired(a, {**b, "t:99": 1})
    assert len(precision.calib_pool_tasks()) == 13

"""PEFT adapters on the tiny HF models (tests/hf_utils.py), written to temp dirs.

Every adapter uses `init_lora_weights=False`, so both A and B are random (PEFT's default init sets
B = 0, which would make any parity test pass trivially); weights are reseeded per adapter.
"""

from __future__ import annotations

import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

# One heterogeneous pool: ranks 4/8/16, rsLoRA, rank/alpha patterns, q/v-only, all-linear,
# regex targets with exclusions, and layers_to_transform (the tiny models have 3 layers here).
POOL_SPECS = {
    "qv_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all_r8_rslora": dict(r=8, lora_alpha=6, target_modules="all-linear", use_rslora=True),
    "r16_patterns": dict(
        r=16, lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"v_proj": 3, "model.layers.2.mlp.up_proj": 40}),
    "layers_0_2": dict(r=8, lora_alpha=5, target_modules=["q_proj", "o_proj", "up_proj"],
                       layers_to_transform=[0, 2]),
    "regex_excl": dict(r=4, lora_alpha=4, target_modules=r".*\.(k_proj|gate_proj|down_proj)",
                       exclude_modules=r"model\.layers\.0\.mlp\.gate_proj"),
}


def load_base(model_dir) -> torch.nn.Module:
    m = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager",
                                                dtype=torch.float32)
    return m.eval()


def make_peft_adapter(model_dir, out, *, seed: int = 0, b_scale: float = 0.5, **lora_kw):
    """Save a random PEFT LoRA adapter for the HF model in `model_dir` to `out`; returns `out`."""
    torch.manual_seed(seed)
    base = load_base(model_dir)
    cfg = LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora_kw)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "lora_B" in n:
                p.copy_(b_scale * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    pm.save_pretrained(str(out))
    return out


def make_pool_dirs(model_dir, root, specs=None, *, seed: int = 0) -> dict[str, str]:
    """Write every adapter of `specs` under `root/<name>`; returns `{name: path}`."""
    out = {}
    for i, (name, kw) in enumerate((specs or POOL_SPECS).items()):
        out[name] = str(make_peft_adapter(model_dir, root / name, seed=seed + 17 * i, **kw))
    return out


def peft_model(model_dir, adapter_dir) -> PeftModel:
    return PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).eval()

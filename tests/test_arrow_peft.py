"""Arrow: our *default* Arrow router reproduces peft's `create_arrow_model` (fp32 logits <= 1e-4).

PEFT finds each prototype by 15 power iterations from `torch.randn(D)` seeded with `rng_seed`;
our defaults (`prototypes="power"`, 15 iterations, `seed=0`, start vector drawn by
`torch_randn`, a NumPy copy of torch's generator) compute the same prototypes, compared here with
only top_k / temperature / general passed. The exact `"svd"` option is checked against PEFT's
prototypes up to sign where its 15 iterations have converged.
"""

import numpy as np
import pytest
import torch
from hf_utils import make_hf_model, padded_batch
from peft import ArrowConfig, create_arrow_model
from peft_utils import load_base, make_peft_adapter

from hilora_jax.inference import Engine
from hilora_jax.io.loading import load_model
from hilora_jax.lora import load_pool
from hilora_jax.routing import build_router
from hilora_jax.routing.hooks import torch_randn

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _arrow_layers(pm):
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_arrow") and "arrow_router" in mod.lora_arrow:
            parts = name.split(".")
            yield int(parts[parts.index("layers") + 1]), parts[-1], mod.lora_arrow["arrow_router"]


# the first case passes no option at all: ArrowConfig's defaults with rng_seed=0 vs ours
@pytest.mark.parametrize("top_k,temp,gks", [(3, 1.0, False), (2, 0.5, False), (2, 1.0, True)])
def test_arrow_matches_peft(tmp_path, top_k, temp, gks):
    md = tmp_path / "base"
    make_hf_model(md, "llama")
    names = [f"t{i}" for i in range(4)]
    dirs = [str(make_peft_adapter(md, tmp_path / n, seed=11 * i, r=4, lora_alpha=8,
                                  target_modules=TARGETS)) for i, n in enumerate(names)]
    gen_dirs = []
    if gks:
        gen_dirs = [str(make_peft_adapter(md, tmp_path / f"g{i}", seed=100 + i, r=4, lora_alpha=8,
                                          target_modules=TARGETS)) for i in range(2)]
    cfg = ArrowConfig(top_k=top_k, router_temperature=temp, use_gks=gks, rng_seed=0)
    pm = create_arrow_model(load_base(md), task_specific_adapter_paths=dirs, arrow_config=cfg,
                            general_adapter_paths=gen_dirs or None).eval()

    model = load_model(md, progress=False)
    manifest = {"adapters": {n: {"path": d} for n, d in zip(names, dirs, strict=True)}}
    general = []
    if gks:
        for i, d in enumerate(gen_dirs):
            manifest["adapters"][f"g{i}"] = {"path": d}
            general.append(f"g{i}")
    pool = load_pool(manifest, model=model, progress=False)
    opts = {k: v for k, v in dict(top_k=top_k, temperature=temp, general=",".join(general)).items()
            if v != dict(top_k=3, temperature=1.0, general="")[k]}
    hook = build_router("arrow", pool, options=opts).route(["x"]).hook  # defaults = PEFT's
    exact = build_router("arrow", pool, options={**opts, "prototypes": "svd"}).route(["x"]).hook
    long = build_router("arrow", pool, options={**opts, "power_iters": 500}).route(["x"]).hook

    ids, mask = padded_batch(np.random.default_rng(0), (9, 6), 9, side="right")
    with torch.no_grad():  # first call builds PEFT's prototypes (after GenKnowSub)
        pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    converged = 0
    for layer, mod, arrow in _arrow_layers(pm):
        theirs = arrow.prototypes.numpy()  # [E, D]
        ours = np.asarray(hook.protos[mod][layer])[: len(names)]
        np.testing.assert_allclose(ours, theirs, atol=1e-5)  # same computation, same signs
        # where 15 iterations had converged (they agree with 500), the exact SVD agrees too
        done = np.abs((theirs * np.asarray(long.protos[mod][layer])[: len(names)]).sum(-1)) > 0.99999
        svd = np.asarray(exact.protos[mod][layer])[: len(names)]
        assert (np.abs((theirs * svd).sum(-1))[done] > 0.9999).all()
        converged += int(done.sum())
    assert converged >= 6
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    out = np.asarray(Engine(model).forward(ids, mask, lora=hook))
    valid = mask.astype(bool)
    base = np.asarray(Engine(model).forward(ids, mask))
    assert np.abs(out - base)[valid].max() > 1e-2  # arrow changes the logits
    assert np.abs(out - ref)[valid].max() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_torch_randn_matches_torch(seed):
    """The start vector of PEFT's power iteration, drawn without torch: equal to torch.randn to a
    few float32 ulps (torch's SIMD log/sin/cos) on the Box-Muller path (n >= 16, with and without
    the recomputed tail block) and exactly on the double path (n < 16)."""
    for n in [*range(1, 40), 48, 576, 2048, 5632]:
        theirs = torch.randn(n, generator=torch.Generator().manual_seed(seed)).numpy()
        ours = torch_randn(n, seed)
        assert ours.dtype == np.float32 and ours.shape == (n,)
        ulps = np.abs(ours - theirs) / np.spacing(np.abs(theirs).astype(np.float32))
        assert ulps.max() <= (0 if n < 16 else 4), (n, ulps.max())

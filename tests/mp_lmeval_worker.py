"""Worker for the multi-process lm-eval test: `python mp_lmeval_worker.py CONFIG.json NPROC PID PORT`.

Runs `lm_eval.simple_evaluate` with the `hilora` backend (hilora router over `routing_utils.random_pool`
saved at `pool_dir`, its synthetic embedder rebuilt from the same seed) on local tasks. With NPROC > 1
the HILORA_* variables are set, so `HiLoRALM` starts `jax.distributed` itself; rank 0 writes the
results and samples to `out` (and the merged routing trace to `trace`).
"""

import json
import os
import sys

cfg_path, nproc, pid, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
if nproc > 1:
    os.environ.update(HILORA_COORDINATOR=f"127.0.0.1:{port}", HILORA_NUM_PROCESSES=str(nproc),
                      HILORA_PROCESS_ID=str(pid))
sys.path.insert(0, os.path.dirname(__file__))
cfg = json.loads(open(cfg_path).read())

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from routing_utils import random_pool  # noqa: E402

from hilora_jax.embed.base import PrecomputedEmbedder  # noqa: E402
from hilora_jax.lmeval import HiLoRALM  # noqa: E402
from hilora_jax.model.config import ModelConfig  # noqa: E402

mcfg = ModelConfig.from_hf_config(json.loads(open(os.path.join(cfg["model_dir"], "config.json")).read()))
_made = []


def _embed(text):
    # built on first use, i.e. after HiLoRALM started jax.distributed (random_pool makes arrays)
    if not _made:
        _made.append(random_pool(mcfg, seed=cfg["seed"])[1])
    return _made[0]([text])[0]


emb = PrecomputedEmbedder(_embed, dim=12)
lm = HiLoRALM.create_from_arg_obj(
    {"model": cfg["model_dir"], "pool": cfg["pool_dir"], "router": "hilora",
     "router_options": {"embedder": emb}, "max_length": cfg["max_length"],
     "trace_path": cfg["trace"], "mesh": cfg.get("mesh")}, {"batch_size": 4})
assert (lm.rank, lm.world_size) == (pid, nproc), (lm.rank, lm.world_size)
res = lm_eval.simple_evaluate(model=lm, tasks=cfg["tasks"], log_samples=True,
                              task_manager=TaskManager(include_path=cfg["tasks_dir"]))
if pid == 0:
    out = {"results": {t: {k: v for k, v in r.items() if k != "alias"}
                       for t, r in res["results"].items()},
           "samples": {t: sorted(([s["doc_id"], s["resps"]] for s in ss), key=lambda x: x[0])
                       for t, ss in res["samples"].items()},
           "n_requests": {t: len(ss) for t, ss in res["samples"].items()}}
    with open(cfg["out"], "w") as f:
        json.dump(out, f, default=str)
else:
    assert res is None
print("done", pid, flush=True)

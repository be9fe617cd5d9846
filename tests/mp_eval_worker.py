"""Worker for the multi-process evaluation test: `python mp_eval_worker.py MODEL_DIR OUT NPROC PID PORT`.

Builds the same tiny setup as the single-process run and evaluates hilora under `unseen-within`.
"""

import os
import sys

model_dir, out, nproc, pid, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
from hilora_jax import distributed as dist  # noqa: E402

if nproc > 1:
    dist.initialize(f"127.0.0.1:{port}", nproc, pid)

from eval_utils import mc_examples, word_tokenizer  # noqa: E402
from routing_utils import random_pool  # noqa: E402

from hilora_jax.eval.runner import evaluate  # noqa: E402
from hilora_jax.inference import Engine  # noqa: E402
from hilora_jax.io.loading import load_model  # noqa: E402
from hilora_jax.routing import build_router  # noqa: E402

model = load_model(model_dir, progress=False)
pool, emb, _ = random_pool(model.config, seed=21)
router = build_router("hilora", pool, options=dict(embedder=emb))
evaluate(Engine(model), word_tokenizer(), pool, router, mc_examples(), protocol="unseen-within",
         out=out, batch_size=8, progress=False)
print("done", pid)

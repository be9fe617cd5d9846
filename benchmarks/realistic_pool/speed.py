"""Full-depth LoRA training speed of `hilora_jax.lora.train.train_lora` on SmolLM2-135M-Instruct.

`python benchmarks/realistic_pool/speed.py [TOKENS] [BATCH] [STEPS]` trains two recipes (r=8 q/v
and r=16 all-linear, all 30 layers) on synthetic items of TOKENS tokens, once for 2 steps and once
for STEPS + 2 steps: the difference / STEPS is the time per step without compilation. Prints one
line per run (wall seconds, and the trainer's own loop time).
"""

import os
import sys
import time

import numpy as np

os.environ.setdefault("HILORA_QUIET", "1")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    T, B, steps = (int(x) for x in (argv + ["96", "8", "6"][len(argv):]))
    from hilora_jax.eval.tasks import MCExample
    from hilora_jax.io.loading import load_model, load_tokenizer
    from hilora_jax.lora.train import train_lora

    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    words = "the quick brown fox jumps over the lazy dog and then runs away".split()
    rng = np.random.default_rng(0)
    exs = [MCExample(" ".join(rng.choice(words, size=T - 4)), ("yes", "no"), i % 2, "speed", "x")
           for i in range(64)]
    for name, r, tg in [("r8-qv", 8, ("q_proj", "v_proj")), ("r16-all-linear", 16, "all-linear")]:
        loops = {}
        for n in (2, steps + 2):
            t0 = time.time()
            tr = train_lora(model, tok, exs, r=r, alpha=16, targets=tg, steps=n, batch_size=B,
                            max_len=512, progress=False)
            loops[n] = tr.seconds
            print(f"{name} T={T} B={B} steps={n} wall {time.time() - t0:.1f}s loop {tr.seconds:.1f}s",
                  flush=True)
        print(f"{name}: {(loops[steps + 2] - loops[2]) / steps:.1f} s/step after compilation",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`hilora eval` on a T5 model, as a user runs it: the installed entry point in a subprocess on a
tiny saved T5 (+ word tokenizer), a 2-adapter PEFT T5 pool manifest and a tiny task JSONL.
Multiple-choice scoring puts the choice in the decoder; the per-example log-probs equal each
task's adapter alone (`SingleLoraHook`, itself equal to `PeftModel`) on `T5Engine.score_choices`."""

import json

import numpy as np
import torch
import transformers as tf
from eval_utils import mc_examples, word_tokenizer
from t5_utils import make_hf_t5
from test_cli import hilora, ok, user_env

from hilora_jax.eval.tasks import choice_text, encode
from hilora_jax.t5 import SingleLoraHook, T5Engine, load_t5, read_t5_adapter


def test_hilora_eval_on_t5_subprocess(tmp_path):
    from peft import LoraConfig, get_peft_model

    root = tmp_path
    make_hf_t5(root / "t5", "v1.1")
    tok = word_tokenizer(64)
    tok.save_pretrained(str(root / "t5"))
    names = ["lora0", "lora1"]
    for i, n in enumerate(names):
        torch.manual_seed(5 + i)
        base = tf.T5ForConditionalGeneration.from_pretrained(str(root / "t5")).eval()
        pm = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", init_lora_weights=False,
                                             r=2 + 2 * i, lora_alpha=8,
                                             target_modules=["q", "v", "wo"]))
        pm.save_pretrained(str(root / n))
    (root / "manifest.json").write_text(json.dumps(
        {"adapters": {n: {"path": n, "cluster": f"c{i}"} for i, n in enumerate(names)}}))
    examples = mc_examples(n_tasks=2, per_task=3, seed=1)
    with open(root / "tasks.jsonl", "w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "choices": list(ex.choices),
                                "answer": ex.answer, "task": ex.task, "cluster": ex.cluster})
                    + "\n")
    r = ok(hilora(root, "eval", "--model", "t5", "--pool", "manifest.json", "--router", "oracle",
                  "--tasks", "tasks.jsonl", "--protocol", "seen", "--out", "results/t5.json",
                  "--batch-size", 4, env=user_env()))
    res = json.loads((root / "results/t5.json").read_text())
    assert r.stdout.startswith(f"oracle / seen: acc {res['mean']['acc']:.4f}")
    assert res["mean"]["examples"] == len(examples)
    records = {json.loads(line)["key"]: json.loads(line)
               for line in (root / "results/t5.json.partial.jsonl").read_text().splitlines()}
    # reference: each task's adapter alone, choices scored as decoder targets
    model = load_t5(root / "t5")
    eng = T5Engine(model)
    seen = {n: 0 for n in names}
    for ex in examples:
        hook = SingleLoraHook.from_adapter(read_t5_adapter(root / ex.task, model.config))
        want = eng.score_choices([encode(tok, ex.prompt, special=True)],
                                 [[encode(tok, choice_text(c), special=False)
                                   for c in ex.choices]], lora=hook)[0]
        got = np.asarray(records[f"{ex.task}:{seen[ex.task]}"]["logprob"])
        seen[ex.task] += 1
        np.testing.assert_allclose(got, want, atol=1e-4)
    base = eng.score_choices([encode(tok, examples[0].prompt, special=True)],
                             [[encode(tok, choice_text(c), special=False)
                               for c in examples[0].choices]])[0]
    first = np.asarray(records[f"{examples[0].task}:0"]["logprob"])
    assert np.abs(first - base).max() > 1e-3  # the routed adapter was applied

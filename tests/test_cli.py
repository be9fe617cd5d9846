"""`hilora` end to end, as a user runs it: the installed entry point in a subprocess, in a fresh
temp dir laid out like a checkout after `make demo`, with no `HILORA_*` or `XLA_FLAGS` variables
(one plain CPU device), on a tiny llama + tiny PEFT pool.

Every command's output is checked against the library run in this process (same weights, same
pool arrays, same generated text, same evaluation), and every user error is one line
`hilora: error: ...` naming the thing, exit code 2, no traceback, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from eval_utils import mc_examples, word_tokenizer
from hf_utils import make_hf_model
from peft_utils import make_peft_adapter

REPO = Path(__file__).resolve().parents[1]
MODEL = "artifacts/smollm2-135m-instruct"  # where `make demo` converts the model
POOL = "artifacts/demo/pool"  # where the demo's pool is (hilora_jax.demo.demo_paths)
N_ADAPTERS, PER_TASK = 4, 3


def _entry_point() -> str:
    exe = shutil.which("hilora", path=str(Path(sys.executable).parent)) or shutil.which("hilora")
    assert exe, (f"the `hilora` entry point is not installed next to {sys.executable} "
                 "(pip install -e .)")
    return exe


def user_env(**extra) -> dict[str, str]:
    """A user's environment: no HILORA_* variables, no fake devices; this checkout first."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HILORA_") and k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def hilora(cwd, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([_entry_point(), *map(str, args)], cwd=cwd, env=env or user_env(),
                          capture_output=True, text=True, timeout=600)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{r.args}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The user's directory: sources under src/, the model and pool converted by the CLI."""
    root = tmp_path_factory.mktemp("user")
    src = root / "src"
    make_hf_model(src / "hf", "llama", vocab_size=64, intermediate_size=64)
    word_tokenizer(64).save_pretrained(src / "hf")
    adapters = {}
    for i in range(N_ADAPTERS):
        make_peft_adapter(src / "hf", src / "adapters" / f"lora{i}", seed=3 * i, r=4,
                          lora_alpha=8, target_modules=["q_proj", "v_proj"])
        adapters[f"lora{i}"] = {
            "path": f"adapters/lora{i}", "cluster": f"c{i % 2}",
            "samples": [f"task{i} w{5 + i} w{9 + i} w{13 + i}", f"task{i} w{20 + i} w{30 + i}",
                        f"w{40 + i} w{50 - i} task{i}"]}
    (src / "manifest.json").write_text(json.dumps({"adapters": adapters}, indent=1))
    from hilora_jax.eval.tasks import write_jsonl

    write_jsonl(mc_examples(n_tasks=N_ADAPTERS, per_task=PER_TASK), src / "tasks.jsonl")
    runs = {
        "convert-model": hilora(root, "convert-model", "src/hf", MODEL),
        "convert-pool": hilora(root, "convert-pool", "src/manifest.json", "--model", MODEL,
                               "--out", POOL),
    }
    return root, runs


def test_convert_model(ws):
    from hilora_jax.io.checkpoint import flat_params
    from hilora_jax.io.loading import load_model, load_tokenizer

    root, runs = ws
    r = ok(runs["convert-model"])
    assert f"-> {root / MODEL}" in r.stdout
    conv, ref = load_model(root / MODEL), load_model(root / "src/hf", progress=False)
    assert conv.config == ref.config
    a, b = flat_params(conv), flat_params(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    assert load_tokenizer(root / MODEL)("w5 w7")["input_ids"] == [5, 7]


def test_convert_pool(ws):
    import jax

    from hilora_jax.lora import load_pool

    root, runs = ws
    ok(runs["convert-pool"])
    meta = json.loads((root / POOL / "pool.json").read_text())
    assert meta["names"] == [f"lora{i}" for i in range(N_ADAPTERS)]
    assert meta["clusters"] == {f"lora{i}": f"c{i % 2}" for i in range(N_ADAPTERS)}
    ref = load_pool(root / "src/manifest.json", model=root / "src/hf", progress=False)
    got = load_pool(root / POOL)
    for x, y in zip(jax.tree.leaves(ref.arrays), jax.tree.leaves(got.arrays), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _deltas(adapter_dir: Path) -> dict[str, np.ndarray]:
    """PEFT delta W = scale * B @ A per module, from an adapter directory."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    return {k.replace(".lora_A.weight", ""): scale * t[k.replace("lora_A", "lora_B")] @ t[k]
            for k in t if ".lora_A." in k}


def test_export_adapter(ws):
    root, _ = ws
    r = ok(hilora(root, "export-adapter", POOL, "lora1", "--out", "exported/lora1"))
    assert "wrote PEFT adapter 'lora1'" in r.stdout
    got, ref = _deltas(root / "exported/lora1"), _deltas(root / "src/adapters/lora1")
    assert got.keys() == ref.keys() and len(got) == 4  # q, v on 2 layers
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def inproc(ws):
    """The same model, tokenizer and engine in this process (the reference for the CLI)."""
    from hilora_jax.inference import Engine
    from hilora_jax.io.loading import load_model, load_tokenizer

    root, runs = ws
    ok(runs["convert-model"])
    model = load_model(root / MODEL)
    return model, load_tokenizer(root / MODEL), Engine(model)


def _generate_ref(inproc, prompt, lora=None) -> str:
    model, tok, eng = inproc
    stops = sorted({*model.config.eos_token_id, tok.eos_token_id})
    out = eng.generate([tok(prompt)["input_ids"]], max_new_tokens=6, stop_tokens=stops,
                       pad_id=tok.pad_token_id or 0, lora=lora)
    return tok.decode(out.tokens[0, : out.lengths[0]], skip_special_tokens=True).strip()


def _talkative_prompt(inproc) -> str:
    """A prompt the tiny random model answers with a few tokens (not an immediate EOS)."""
    for i in range(4, 60):
        prompt = f"w{i} w{(7 * i) % 60 + 4} w{(13 * i) % 60 + 4}"
        if len(_generate_ref(inproc, prompt).split()) >= 3:
            return prompt
    raise AssertionError("every prompt ends at once; the tiny model is degenerate")


def test_generate_without_pool(ws, inproc):
    root, _ = ws
    prompt = _talkative_prompt(inproc)
    r = ok(hilora(root, "generate", "--model", MODEL, "--prompt", prompt, "--max-new-tokens", 6))
    want = _generate_ref(inproc, prompt)
    assert want and r.stdout.splitlines()[:2] == [f"### prompt: {prompt}", want]


def test_generate_with_pool(ws, inproc):
    from hilora_jax.lora import load_pool
    from hilora_jax.routing import build_router

    root, runs = ws
    ok(runs["convert-pool"])
    model, tok, eng = inproc
    router = build_router("hilora", load_pool(root / POOL, model=model),
                          options={"embedder": "llm"}, engine=eng, tokenizer=tok)
    for i in range(4, 60):  # a prompt whose routed answer is a few tokens long
        prompt = f"task{i % N_ADAPTERS} w{i} w{(7 * i) % 60 + 4} w{(13 * i) % 60 + 4}"
        routing = router.route([prompt])
        if len(_generate_ref(inproc, prompt, routing.hook).split()) >= 3:
            break
    else:
        raise AssertionError("every routed prompt ends at once; the tiny model is degenerate")
    r = ok(hilora(root, "generate", "--model", MODEL, "--prompt", prompt, "--max-new-tokens", 6,
                  "--pool", POOL, "--router", "hilora", "--router-option", "embedder=llm"))
    lines = r.stdout.splitlines()
    assert lines[:3] == [f"### prompt: {prompt}", _generate_ref(inproc, prompt, routing.hook),
                         routing.describe(0)]
    assert lines[2].startswith("[hilora] budget") and "lora" in lines[2]


def test_train_lora(ws):
    from safetensors.numpy import load_file

    root, _ = ws
    r = ok(hilora(root, "train-lora", "--model", MODEL, "--tasks", "src/tasks.jsonl",
                  "--task", "lora2", "--r", 2, "--alpha", 4, "--targets", "q_proj,o_proj",
                  "--steps", 3, "--batch-size", 2, "--layers", "1", "--out", "trained/lora2"))
    assert re.search(rf"trained {PER_TASK} examples, 3 steps .*; saved .*trained/lora2", r.stdout)
    cfg = json.loads((root / "trained/lora2/adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["layers_to_transform"]) == (
        2, 4, ["o_proj", "q_proj"], [1])
    t = load_file(root / "trained/lora2/adapter_model.safetensors")
    assert sorted(t) == sorted(f"base_model.model.model.layers.1.self_attn.{m}.lora_{ab}.weight"
                               for m in ("q_proj", "o_proj") for ab in "AB")
    # B starts at zero (PEFT init); three optimiser steps moved it
    assert all(np.abs(v).max() > 0 for k, v in t.items() if "lora_B" in k)


EVALS = {  # protocol -> router and options
    "seen": ("oracle", []),
    "unseen-within": ("hilora", ["--router-option", "embedder=llm"]),
    "unseen-cross": ("retrieval", ["--router-option", "embedder=llm", "--router-option", "k=2"]),
}


@pytest.mark.parametrize("protocol", list(EVALS))
def test_eval_on_one_plain_machine(ws, inproc, protocol):
    from hilora_jax.eval.runner import evaluate
    from hilora_jax.eval.tasks import load_tasks
    from hilora_jax.lora import load_pool
    from hilora_jax.routing import build_router

    root, runs = ws
    ok(runs["convert-pool"])
    router, opts = EVALS[protocol]
    out = f"results/{protocol}.json"
    env = user_env()
    assert not any(k.startswith("HILORA_") for k in env) and "XLA_FLAGS" not in env
    r = ok(hilora(root, "eval", "--model", MODEL, "--pool", POOL, "--router", router, *opts,
                  "--tasks", "src/tasks.jsonl", "--protocol", protocol, "--out", out,
                  "--batch-size", 8, env=env))
    res = json.loads((root / out).read_text())
    n = N_ADAPTERS * PER_TASK
    assert r.stdout.startswith(f"{router} / {protocol}: acc {res['mean']['acc']:.4f}")
    assert res["config"]["protocol"] == protocol and res["config"]["router"] == router
    assert res["mean"]["examples"] == n and res["timing"]["processes"] == 1
    if protocol == "seen":
        assert res["routing"]["own_first"] == 1.0
    else:  # the task's own LoRA (and, across clusters, its cluster's) is never used
        assert res["routing"]["own_in_candidates"] == 0.0
    model, tok, eng = inproc
    pool = load_pool(root / POOL, model=model)
    options = dict(kv.split("=") for kv in opts[1::2])
    ref = evaluate(eng, tok, pool, build_router(router, pool, options=options, engine=eng,
                                                tokenizer=tok),
                   load_tasks(root / "src/tasks.jsonl"), protocol=protocol, batch_size=8,
                   progress=False)
    for k in ("mean", "tasks", "clusters", "routing", "correct"):
        assert res[k] == json.loads(json.dumps(ref[k])), k


# -- user errors: one line, exit 2, nothing written -------------------------------------------
def _bad_manifest(root: Path, name: str, edit) -> str:
    d = json.loads((root / "src/manifest.json").read_text())
    edit(d)
    p = root / "src" / name
    p.write_text(json.dumps(d))
    return f"src/{name}"


def _bad_tasks(root: Path) -> str:
    lines = (root / "src/tasks.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"answer"', '"anwser"')
    (root / "src/bad_tasks.jsonl").write_text("\n".join(lines) + "\n")
    return "src/bad_tasks.jsonl"


def _bad_config(root: Path) -> str:
    d = root / "src/hf_relu"
    if not d.exists():
        shutil.copytree(root / "src/hf", d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    return "src/hf_relu"


EV = ["eval", "--model", MODEL, "--pool", POOL, "--tasks", "src/tasks.jsonl"]
GEN = ["generate", "--model", MODEL, "--prompt", "w5 w6"]
TR = ["train-lora", "--model", MODEL, "--tasks", "src/tasks.jsonl"]

# id -> (arguments (callables get the workspace root), words the message must contain,
#        output that must not appear, extra environment)
ERRORS = {
    "model-typo-local-path": (["convert-model", "artifacts/smollm2", "out"],
                              ["'artifacts/smollm2'", "no such file", "not looked up on the hub"],
                              "out", {}),
    "model-dot-path": (["convert-model", "./models/llama", "out"], ["'./models/llama'", "local path"],
                       "out", {}),
    "model-unknown-name": (["convert-model", "smollm3", "out"], ["'smollm3'", "built-in"], "out", {}),
    "model-hub-offline": (["convert-model", "nosuch-org/nosuch-model", "out"],
                          ["'nosuch-org/nosuch-model'", "hub", "HF_HUB_OFFLINE"], "out", {}),
    "model-not-a-model-dir": (["convert-model", "src/adapters", "out"],
                              ["src/adapters", "not a model directory"], "out", {}),
    "convert-model-output-exists": (["convert-model", "src/hf", POOL], [POOL, "already exists",
                                                                       "--overwrite"], None, {}),
    "unsupported-config-field": (lambda root: ["convert-model", _bad_config(root), "out"],
                                 ["hidden_act", "relu"], "out", {}),
    "pool-manifest-missing": (["convert-pool", "src/manifest.jsn", "--model", MODEL, "--out",
                               "out"], ["src/manifest.jsn", "no such file"], "out", {}),
    "manifest-top-level-typo": (lambda root: ["convert-pool", _bad_manifest(
        root, "m1.json", lambda d: d.update(adaptors=d.pop("adapters"))), "--model", MODEL,
        "--out", "out"], ["m1.json", "'adaptors'"], "out", {}),
    "manifest-entry-typo": (lambda root: ["convert-pool", _bad_manifest(
        root, "m2.json", lambda d: d["adapters"]["lora1"].update(smaples=[])), "--model", MODEL,
        "--out", "out"], ["m2.json", "'lora1'", "'smaples'"], "out", {}),
    "manifest-not-json": (lambda root: ["convert-pool", _bad_text(root, "m3.json", "{adapters:"),
                                        "--model", MODEL, "--out", "out"],
                          ["m3.json", "malformed manifest"], "out", {}),
    "convert-pool-output-exists": (["convert-pool", "src/manifest.json", "--model", MODEL,
                                    "--out", POOL], [POOL, "already exists"], None, {}),
    "export-unknown-adapter": (["export-adapter", POOL, "lora9", "--out", "out"],
                               ["'lora9'", "not in the pool", "lora0"], "out", {}),
    "export-not-a-pool": (["export-adapter", "src/manifest.json", "lora1", "--out", "out"],
                          ["src/manifest.json", "not a converted pool"], "out", {}),
    "export-output-exists": (["export-adapter", POOL, "lora1", "--out", "src/adapters"],
                             ["src/adapters", "already exists"], None, {}),
    "empty-prompt-chat-template": (["generate", "--model", MODEL, "--prompt", ""],
                                   ["--prompt is empty"], None, {}),
    "blank-prompt-no-template": (["generate", "--model", MODEL, "--prompt", "w5", "--prompt", "  ",
                                  "--no-chat-template"], ["--prompt number 2 is empty"], None, {}),
    "unknown-router": ([*GEN, "--pool", POOL, "--router", "hilorra"],
                       ["'hilorra'", "unknown router", "hilora"], None, {}),
    "unknown-router-option": ([*GEN, "--pool", POOL, "--router-option", "gama=0.5"],
                              ["'hilora'", "no option 'gama'", "gamma"], None, {}),
    "router-option-not-kv": ([*GEN, "--pool", POOL, "--router-option", "gamma"],
                             ["--router-option", "K=V", "'gamma'"], None, {}),
    "router-option-bad-value": ([*GEN, "--pool", POOL, "--router-option", "kappa=bogus",
                                 "--router-option", "embedder=llm"],
                                ["router 'hilora'", "kappa", "'bogus'"], None, {}),
    "int4-weights-odd-model": (["generate", "--model", MODEL, "--prompt", "w5", "--weights", "int4"],
                               ["weights='int4'", "q_proj has 48 inputs", "group size 32"], None,
                               {}),
    "router-option-bad-pack": ([*EV, "--out", "out.json", "--router-option", "pack_weights=int4"],
                               ["pack_weights='int4'", "choose int8"], "out.json", {}),
    "router-needs-samples": ([*GEN, "--pool", "src/adapters", "--router", "retrieval"],
                             ["'retrieval'", "samples", "src/adapters"], None, {}),
    "embedder-path-missing": ([*GEN, "--pool", POOL, "--router-option", "embedder=src/minilm"],
                              ["embedder=src/minilm", "no such directory"], None, {}),
    "router-without-pool": ([*GEN, "--router", "arrow"], ["--pool"], None, {}),
    "pool-missing": ([*EV, "--out", "out.json", "--pool", "artifacts/demo/pol"],
                     ["artifacts/demo/pol", "no such file"], "out.json", {}),
    "tasks-missing": (["eval", "--model", MODEL, "--pool", POOL, "--tasks", "src/task.jsonl",
                       "--out", "out.json"], ["src/task.jsonl", "no such file"], "out.json", {}),
    "tasks-key-typo": (lambda root: ["eval", "--model", MODEL, "--pool", POOL, "--tasks",
                                     _bad_tasks(root), "--out", "out.json"],
                       ["bad_tasks.jsonl:5", "'anwser'"], "out.json", {}),
    "oracle-task-not-in-pool": (lambda root: ["eval", "--model", MODEL, "--pool", POOL,
                                              "--router", "oracle", "--tasks", _bad_text(
                                                  root, "t2.jsonl", json.dumps(
                                                      {"prompt": "w5", "choices": ["w6", "w7"],
                                                       "answer": 0, "task": "qa", "cluster": "c0"})),
                                              "--out", "out.json"],
                                ["'oracle'", "'qa'"], "out.json", {}),
    "bad-mesh": ([*EV, "--out", "out.json", "--mesh", "2by4"], ["--mesh", "'2by4'", "2x4"],
                 "out.json", {}),
    "mesh-too-big": ([*EV, "--out", "out.json", "--mesh", "2x4"],
                     ["--mesh 2x4", "1 local device"], "out.json", {}),
    "eval-out-is-dir": ([*EV, "--out", "src"], ["--out src", "directory"], None, {}),
    "multihost-vars-incomplete": ([*EV, "--out", "out.json"],
                                  ["HILORA_NUM_PROCESSES", "HILORA_PROCESS_ID", "--multihost"],
                                  "out.json", {"HILORA_COORDINATOR": "127.0.0.1:1"}),
    "train-unknown-task": ([*TR, "--task", "lora7", "--out", "out"],
                           ["--task 'lora7'", "lora0"], "out", {}),
    "train-unknown-target": ([*TR, "--targets", "q_prj", "--out", "out"],
                             ["--targets", "'q_prj'", "q_proj"], "out", {}),
    "train-bad-layers": ([*TR, "--layers", "1-x", "--out", "out"], ["--layers", "'1-x'"],
                         "out", {}),
    "train-layer-out-of-range": ([*TR, "--layers", "5", "--out", "out"],
                                 ["--layers '5'", "0..1"], "out", {}),
    "train-output-exists": ([*TR, "--out", "src/adapters/lora0"],
                            ["src/adapters/lora0", "already exists"], None, {}),
    "missing-argument": (["eval", "--model", MODEL], ["eval", "required", "--pool"], None, {}),
    "unknown-command": (["evaluate"], ["invalid choice", "'evaluate'"], None, {}),
}


def _bad_text(root: Path, name: str, text: str) -> str:
    (root / "src" / name).write_text(text + "\n")
    return f"src/{name}"


def _tree(p: Path) -> list:
    return sorted((str(q.relative_to(p)), q.stat().st_mtime_ns) for q in [p, *p.rglob("*")])


DEBUG = {  # the same user error with the traceback asked for, three ways
    "flag-before-command": (["--debug", "convert-model", "artifacts/smollm2", "out"], {}),
    "flag-after-command": (["convert-model", "artifacts/smollm2", "out", "--debug"], {}),
    "env": (["convert-model", "artifacts/smollm2", "out"], {"HILORA_DEBUG": "1"}),
}


@pytest.fixture(scope="module")
def error_runs(ws):
    """Every error case through the entry point, a few at a time (they only start up and fail);
    the workspace is snapshotted before and after (each case's bad inputs are written first)."""
    root, runs = ws
    ok(runs["convert-model"]), ok(runs["convert-pool"])
    jobs = {}
    for case, (args, _, _, extra) in ERRORS.items():
        jobs[case] = (args(root) if callable(args) else args, extra)
    for case, (args, extra) in DEBUG.items():
        jobs[f"debug:{case}"] = (args, extra)
    before = _tree(root)
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as ex:
        futures = {c: ex.submit(hilora, root, *a, env=user_env(**e)) for c, (a, e) in jobs.items()}
        results = {c: f.result() for c, f in futures.items()}
    return results, before, _tree(root)


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_error_is_one_line(ws, error_runs, case):
    root, _ = ws
    _, words, must_not_exist, _ = ERRORS[case]
    r = error_runs[0][case]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hilora: error: "), r.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    if must_not_exist:
        assert not (root / must_not_exist).exists()


def test_user_errors_write_nothing(error_runs):
    # no output, no temp dir, no partial file, nothing touched (mtimes included)
    _, before, after = error_runs
    assert after == before


@pytest.mark.parametrize("case", list(DEBUG))
def test_debug_shows_the_traceback(error_runs, case):
    r = error_runs[0][f"debug:{case}"]
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr and "MissingPathError" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("hilora: error: model 'artifacts/smollm2'")


# -- the README's Quickstart runs as written after `make demo` ----------------------------------
def quickstart_code() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart has one python block"
    return blocks[0]


def test_quickstart_paths_are_the_demos():
    from hilora_jax.demo import demo_paths

    code = quickstart_code()
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^ART \?= artifacts$", make, re.M)
    # `make demo` converts the model to $(ART)/smollm2-135m-instruct and runs the demo there
    assert f"$(ART)/{Path(MODEL).name}\n" in make
    assert re.search(r"hilora_jax\.demo --model \$\(ART\)/smollm2-135m-instruct --out \$\(ART\)/demo",
                     make)
    assert f'load_model("{MODEL}")' in code and f'load_tokenizer("{MODEL}")' in code
    assert str(demo_paths("artifacts/demo")["pool"]) == POOL
    assert f'load_pool("{POOL}"' in code


def test_quickstart_runs_verbatim(ws):
    root, runs = ws
    ok(runs["convert-model"]), ok(runs["convert-pool"])
    script = root / "quickstart.py"
    script.write_text(quickstart_code())
    r = subprocess.run([sys.executable, str(script)], cwd=root, env=user_env(), text=True,
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [ln for ln in r.stdout.splitlines() if "[hilora] budget" in ln]
    assert len(lines) == 2, r.stdout


# -- multi-host start-up: only when asked ------------------------------------------------------
def test_distributed_initialize_is_opt_in(monkeypatch):
    import jax

    from hilora_jax import distributed as dist
    from hilora_jax.errors import UsageError

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # keep this process's settings
    for k in dist.ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    assert dist.initialize() is False and calls == []  # a plain machine: nothing starts
    assert dist.initialize(auto=True) is True  # --multihost: JAX's cluster auto-detection
    assert calls == [((None,), {"num_processes": None, "process_id": None})]
    monkeypatch.setenv("HILORA_COORDINATOR", "10.0.0.1:1234")
    with pytest.raises(UsageError, match="HILORA_NUM_PROCESSES, HILORA_PROCESS_ID not set"):
        dist.initialize()
    monkeypatch.setenv("HILORA_NUM_PROCESSES", "2")
    monkeypatch.setenv("HILORA_PROCESS_ID", "x")
    with pytest.raises(UsageError, match="HILORA_PROCESS_ID='x' is not an integer"):
        dist.initialize()
    monkeypatch.setenv("HILORA_PROCESS_ID", "2")
    with pytest.raises(UsageError, match="not in 0..1"):
        dist.initialize()
    monkeypatch.setenv("HILORA_PROCESS_ID", "1")
    assert dist.initialize() is True
    assert calls[-1] == (("10.0.0.1:1234",), {"num_processes": 2, "process_id": 1})
    monkeypatch.setenv("HILORA_NUM_PROCESSES", "1")
    assert dist.initialize() is False and len(calls) == 2  # one process: a no-op

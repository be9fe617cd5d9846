"""Every notebook runs top to bottom on CPU, offline, with tiny local assets.

The test writes a tiny random HF Llama (+ word-level tokenizer), three random PEFT adapters
(`init_lora_weights=False`), samples and multiple-choice task files into `tmp_path`, then executes
each notebook with nbclient in a kernel running this interpreter (8 fake CPU devices,
`HF_HUB_OFFLINE=1`). A cell injected after the `parameters`-tagged cell overrides the Colab
defaults (papermill's convention). Any cell error fails the test; each notebook must also write its
PNG plots to `OUT_DIR` and show at least one `image/png` output.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from eval_utils import word_tokenizer
from hf_utils import make_hf_model
from peft_utils import make_peft_adapter

from hilora_jax.eval.tasks import MCExample, write_jsonl

nbclient = pytest.importorskip("nbclient")

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(p.name for p in NB_DIR.glob("*.ipynb"))
KERNEL = "hilora-notebook-tests"
ADAPTERS = {  # name -> (cluster, vocabulary region of its samples/prompts, PEFT kwargs)
    "lora0": ("c0", 4, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "lora1": ("c1", 24, dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"])),
    "lora2": ("c1", 44, dict(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"])),
}


def _text(rng, lo, n):
    return " ".join(f"w{k}" for k in rng.integers(lo, lo + 20, size=n))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb_assets")
    model_dir = root / "tiny_llama"
    make_hf_model(model_dir, "llama", vocab_size=64, intermediate_size=64)
    word_tokenizer().save_pretrained(str(model_dir))
    rng = np.random.default_rng(0)
    pool, examples = {"adapters": {}}, []
    for i, (name, (cluster, lo, kw)) in enumerate(ADAPTERS.items()):
        path = make_peft_adapter(model_dir, root / "adapters" / name, seed=11 * i, **kw)
        samples = [_text(rng, lo, int(rng.integers(4, 9))) for _ in range(8)]
        pool["adapters"][name] = {"path": str(path), "cluster": cluster, "samples": samples}
        for _ in range(4):
            choices = tuple(_text(rng, 4, int(rng.integers(1, 3))) + f" w{60 + j}" for j in range(3))
            examples.append(MCExample(_text(rng, lo, int(rng.integers(3, 8))), choices,
                                      int(rng.integers(0, 3)), name, cluster))
    tasks = write_jsonl(examples, root / "tasks.jsonl")
    train_tasks = write_jsonl([ex for ex in examples if ex.task != "lora2"], root / "train.jsonl")
    prompts = [_text(rng, lo, 5) for _, lo, _ in ADAPTERS.values()]
    return dict(root=root, model=str(model_dir), pool=pool, tasks=str(tasks),
                train_tasks=str(train_tasks), prompts=prompts)


def _overrides(name: str, a: dict, out_dir: Path) -> dict:
    common = dict(BASE_MODEL=a["model"], EMBEDDER="llm:1", OUT_DIR=str(out_dir))
    if name.startswith("01"):
        return dict(common, DTYPE="float32", POOL=a["pool"], PROMPTS=a["prompts"],
                    MAX_NEW_TOKENS=4, N_DEVICES=1)  # sharding is exercised by 02
    if name.startswith("02"):
        return dict(common, DTYPE="float32", POOL=a["pool"], TASKS_FILE=a["tasks"],
                    ROUTERS=["arrow", "hilora"], PROTOCOLS=["seen", "unseen-within"], MESH_DATA=2,
                    BATCH_SIZE=8, WORK_DIR=str(out_dir / "work"))
    if name.startswith("03"):
        extra = {"lora2": a["pool"]["adapters"]["lora2"]}
        return dict(common, TASKS_FILE=a["train_tasks"], STEPS=2, TRAIN_BATCH=4, N_SAMPLES=4,
                    HELD_OUT=2, EXTRA_ADAPTERS=extra)
    raise AssertionError(f"no test parameters for notebook {name}")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec running this interpreter, found through JUPYTER_PATH."""
    share = tmp_path_factory.mktemp("jupyter")
    spec = share / "kernels" / KERNEL
    spec.mkdir(parents=True)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HILORA_QUIET": "1", "PYTHONPATH": str(NB_DIR.parent)}
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hilora-jax tests", "language": "python", "env": env}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(share) + (os.pathsep + old if old else "")
    yield
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def test_notebooks_are_committed_clean():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_sharded_evaluation.ipynb",
                         "03_build_a_pool.ipynb"]
    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
        stem = name.removesuffix(".ipynb")
        assert ("https://colab.research.google.com/github/hilora-jax/hilora-jax/blob/main/"
                f"notebooks/{stem}.ipynb") in nb.cells[0].source
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and code.index(params[0]) <= 1, f"{name}: parameters cell"
        assert 'find_spec("hilora_jax") is None' in code[0].source  # guarded install cell


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, assets, kernel_env, tmp_path):
    nb = nbformat.read(NB_DIR / name, as_version=4)
    out_dir = tmp_path / "out"
    params = _overrides(name, assets, out_dir)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "# Injected by tests/test_notebooks.py\n" + "\n".join(
        f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=240, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    expected = {
        "01_quickstart.ipynb": {"routing_hilora.png", "routing_arrow.png",
                                "routing_hilora_prompt0.png"},
        "02_sharded_evaluation.ipynb": {"results_acc.png", "results_acc_norm.png",
                                        "task_lora_heatmap.png"},
        "03_build_a_pool.ipynb": {"training_loss.png", "held_out_routing.png",
                                  "held_out_accuracy.png"},
    }[name]
    assert expected <= set(pngs), pngs
    assert len(images) >= len(expected), f"{name}: {len(images)} inline images"
    for p in expected:
        assert (out_dir / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name.startswith("02"):
        res = json.loads((out_dir / "hilora_unseen-within.json").read_text())
        assert res["mean"]["examples"] == 12 and res["routing"]["own_in_candidates"] == 0.0
    if name.startswith("03"):
        pool = json.loads((out_dir / "pool" / "pool.json").read_text())
        assert pool["names"] == ["lora0", "lora1", "lora2"]
        # trained: the training prompts (4 per task - 2 held out); lora2: its manifest samples
        assert [len(pool["samples"][n]) for n in pool["names"]] == [2, 2, 8]

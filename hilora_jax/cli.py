"""`hilora` command line: convert models and pools, generate (optionally routed), evaluate.

Thin argument parsing over the library; every `--model` accepts a HF dir, a hub id, a .gguf file,
a converted directory, or the built-in name `smollm2`.

Errors: a user error (`hilora_jax.errors.HiloraUserError`, or a config field the library refuses)
prints one line `hilora: error: ...` and exits 2; `--debug` or `HILORA_DEBUG=1` also prints the
traceback. Anything else is a bug and keeps Python's traceback. The cheap checks (paths, outputs,
manifest, task files, router and its option names, protocol) run before any model is loaded.
One machine is the default; `hilora eval` starts multi-host only with the `HILORA_*` variables or
`--multihost`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

from hilora_jax.errors import (
    HiloraUserError,
    MissingPathError,
    OutputExistsError,
    UsageError,
)


def _setup_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- cheap checks, run before anything slow ----------------------------------------------------
def check_output(out: str | os.PathLike, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse an existing output unless `overwrite`."""
    p = Path(out).expanduser()
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{what} {p} already exists (pass --overwrite to replace it)")
    return p


def check_path(src: str | os.PathLike, what: str) -> Path:
    p = Path(src).expanduser()
    if not p.exists():
        raise MissingPathError(f"{what} {p}: no such file or directory")
    return p


def check_model_source(src: str) -> None:
    """Local sources must exist and be a model; hub ids and built-in names pass (fetched later)."""
    from hilora_jax.io.loading import BUILTIN, looks_like_hub_id, resolve_source

    if src in BUILTIN or (looks_like_hub_id(src) and not Path(src).exists()):
        return
    resolve_source(src)


def load_task_files(paths) -> list:
    """Read and validate every task file (one line per problem, naming file and line)."""
    from hilora_jax.eval.tasks import load_tasks

    for t in paths:
        p = check_path(t, "tasks file")
        if p.is_dir():
            raise UsageError(f"tasks file {p} is a directory (expected a JSONL file)")
    examples = load_tasks(list(paths))
    if not examples:
        raise UsageError(f"no examples in the tasks file(s) {', '.join(map(str, paths))}")
    return examples


def parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for kv in items:
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise UsageError(f"--router-option expects K=V, got {kv!r}")
        out[k.strip()] = v.strip()
    return out


def router_option_names(cls) -> set[str]:
    """Option names a router class accepts: the keyword parameters of its `__init__` chain."""
    names = set()
    for k in cls.__mro__:
        init = k.__dict__.get("__init__")
        if init is None or k is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "pool"):
                names.add(p.name)
    return names


def check_router(name: str, options: dict) -> None:
    """Router name and option names, without building the router."""
    from hilora_jax.routing import ROUTERS

    if name not in ROUTERS:
        raise UsageError(f"unknown router {name!r}; choose from {', '.join(sorted(ROUTERS))}")
    allowed = router_option_names(ROUTERS[name])
    bad = sorted(set(options) - allowed)
    if bad:
        have = ", ".join(sorted(allowed)) if allowed else "none"
        raise UsageError(f"router {name!r} has no option {', '.join(map(repr, bad))} "
                         f"(its options: {have})")
    pw = options.get("pack_weights")
    if pw is not None and pw not in ("int8", "none", ""):
        raise UsageError(f"--router-option pack_weights={pw!r}: unknown; choose int8 (or none "
                         "for the pool's dtype)")
    emb = options.get("embedder")
    if emb and emb != "minilm" and not emb.startswith("llm"):  # a checkpoint dir or a hub id
        from hilora_jax.io.loading import looks_like_hub_id

        if not Path(emb).expanduser().exists() and not looks_like_hub_id(emb):
            raise MissingPathError(f"--router-option embedder={emb}: no such directory (expected "
                                   "minilm, llm[:LAYER], a sentence-transformers folder or a hub id)")


class PoolInfo:
    """Names, clusters and samples of a pool dir or manifest, read without loading any arrays."""

    def __init__(self, src: str | os.PathLike):
        from hilora_jax.lora.io import POOL_META, is_pool_dir
        from hilora_jax.lora.manifest import read_manifest

        p = check_path(src, "pool")
        if is_pool_dir(p):
            try:
                meta = json.loads((p / POOL_META).read_text())
                self.names = tuple(meta["names"])
                self.clusters = dict(meta.get("clusters") or {})
                self.samples = {n: s for n, s in (meta.get("samples") or {}).items()}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"pool {p / POOL_META}: unreadable pool metadata "
                                 f"({type(e).__name__}: {e})") from e
            self.kind = "pool"
        else:
            man = read_manifest(p)  # ManifestError / AdapterError name the file and key
            self.names = tuple(e.name for e in man.adapters)
            self.clusters = {e.name: e.cluster for e in man.adapters}
            self.samples = {e.name: e.samples for e in man.adapters}
            self.kind = "manifest"
        self.src = p

    def check_router(self, name: str) -> None:
        from hilora_jax.routing import ROUTERS

        if ROUTERS[name].needs_samples:
            lacking = [n for n in self.names if not self.samples.get(n)]
            if lacking:
                raise UsageError(f"router {name!r} needs example inputs ('samples' or "
                                 f"'samples_file' in the pool manifest) for every adapter; "
                                 f"{self.src} has none for {lacking}")


def check_protocol(info: PoolInfo, examples, protocol: str, router: str) -> None:
    """Every task keeps at least one active adapter under `protocol` (the runner's own rule);
    the oracle needs an adapter named after every task."""
    import numpy as np

    from hilora_jax.eval.runner import protocol_active

    class _View:  # the part of a LoraPool that protocol_active reads
        names = info.names
        clusters = info.clusters
        arrays = type("A", (), {"active": np.ones(len(info.names), bool)})

        @staticmethod
        def index(n):
            return info.names.index(n)

    seen = set()
    for ex in examples:
        if (ex.task, ex.cluster) in seen:
            continue
        seen.add((ex.task, ex.cluster))
        if router == "oracle" and ex.task not in info.names:
            raise UsageError(f"router 'oracle' needs an adapter named after task {ex.task!r}; the "
                             f"pool has {list(info.names)}")
        try:
            protocol_active(_View, ex.task, ex.cluster, protocol)
        except ValueError as e:
            raise UsageError(f"{e} (pool {info.src})") from None


def build_router_checked(name: str, pool, options: dict, **kw):
    """`build_router`; a bad option value (the names were checked before) is a user error."""
    from hilora_jax.routing import build_router

    try:
        return build_router(name, pool, options=options, **kw)
    except ValueError as e:
        if isinstance(e, HiloraUserError):
            raise
        raise UsageError(f"router {name!r} with options {options}: {e}") from e


def _parse_mesh(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    parts = spec.lower().split("x")
    try:
        d, m = (int(v) for v in parts)
    except ValueError:
        raise UsageError(f"--mesh {spec!r}: expected DATAxMODEL, e.g. 2x4") from None
    if d < 1 or m < 1:
        raise UsageError(f"--mesh {spec!r}: both sizes must be >= 1")
    return d, m


def _positive(**values) -> None:
    for name, v in values.items():
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {v}")


# -- commands ----------------------------------------------------------------------------------
def cmd_convert_model(args) -> int:
    check_output(args.out, args.overwrite)
    check_model_source(args.src)
    from hilora_jax.io.checkpoint import save_model
    from hilora_jax.io.loading import load_model, load_tokenizer, resolve_source

    t0 = time.time()
    kind, path = resolve_source(args.src)
    model = load_model(args.src, dtype=args.dtype)
    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if kind == "hf" and not any((path / f).exists() for f in tok_files):
        print(f"note: {path} has no tokenizer files; the converted model will have none",
              file=sys.stderr)
        tok = None
    else:
        tok = load_tokenizer(args.src)
    out = save_model(model, args.out, tokenizer=tok, source=f"{kind}:{path}",
                     overwrite=args.overwrite)
    n = sum(v.size for v in __import__("jax").tree.leaves(
        __import__("flax").nnx.state(model, __import__("flax").nnx.Param)))
    print(f"converted {path} ({kind}, {n / 1e6:.1f}M params) -> {out} in {time.time() - t0:.1f}s")
    return 0


def _chat_prompt(tok, text: str, use_chat: bool) -> list[int]:
    if use_chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(text)["input_ids"]


def cmd_generate(args) -> int:
    prompts = args.prompt
    for i, p in enumerate(prompts):
        if not p.strip():
            which = f"--prompt number {i + 1}" if len(prompts) > 1 else "--prompt"
            raise UsageError(f"{which} is empty")
    _positive(max_new_tokens=args.max_new_tokens)
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    options = parse_options(args.router_option)
    router_name = args.router or "hilora"
    if args.pool:
        check_router(router_name, options)
        if router_name == "oracle":
            raise UsageError("router 'oracle' needs a task label per prompt; `generate` has none "
                             "(use `hilora eval`, or export the adapter and pick it by hand)")
        PoolInfo(args.pool).check_router(router_name)
    elif args.router or options:
        raise UsageError("--router and --router-option need --pool")
    from hilora_jax.model.quant import check_weights

    check_weights(args.weights)
    check_model_source(args.model)

    import jax

    from hilora_jax.inference import Engine
    from hilora_jax.io.loading import load_model, load_tokenizer

    model = load_model(args.model, dtype=args.dtype, weights=args.weights)
    tok = load_tokenizer(args.model)
    ids = [_chat_prompt(tok, p, not args.no_chat_template) for p in prompts]
    eng = Engine(model)
    stops = list(model.config.eos_token_id)
    if tok.eos_token_id is not None and tok.eos_token_id not in stops:
        stops.append(tok.eos_token_id)
    lora = None
    routing_report = None
    if args.pool:
        from hilora_jax.lora import load_pool

        pool = load_pool(args.pool, model=model)
        router = build_router_checked(router_name, pool, options, engine=eng, tokenizer=tok)
        routing = router.route(prompts)
        lora = routing.hook
        routing_report = [routing.describe(i) for i in range(len(prompts))]
    key = jax.random.key(args.seed) if args.temperature > 0 else None
    t0 = time.time()
    out = eng.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, key=key, stop_tokens=stops,
                       pad_id=tok.pad_token_id or 0, lora=lora)
    dt = time.time() - t0
    for i, p in enumerate(prompts):
        text = tok.decode(out.tokens[i, : out.lengths[i]], skip_special_tokens=True)
        print(f"### prompt: {p}\n{text.strip()}")
        if routing_report is not None:
            print(routing_report[i])
    print(f"({int(out.lengths.sum())} tokens in {dt:.2f}s)", file=sys.stderr)
    return 0


def cmd_convert_pool(args) -> int:
    check_output(args.out, args.overwrite)
    if Path(args.manifest).is_dir() and (Path(args.manifest) / "pool.json").exists():
        raise UsageError(f"{args.manifest} is already a converted pool (expected a manifest or a "
                         "folder of PEFT adapters)")
    PoolInfo(args.manifest)  # exists and parses
    check_model_source(args.model)
    from hilora_jax.lora.io import convert_pool

    convert_pool(args.manifest, args.model, args.out, progress=True, overwrite=args.overwrite)
    return 0


def cmd_export_adapter(args) -> int:
    check_output(args.out, args.overwrite)
    info = PoolInfo(args.pool)
    if info.kind != "pool":
        raise UsageError(f"{args.pool} is not a converted pool (no pool.json; run "
                         "`hilora convert-pool` first)")
    if args.name not in info.names:
        raise UsageError(f"adapter {args.name!r} is not in the pool {args.pool} "
                         f"(it has {', '.join(info.names)})")
    from hilora_jax.lora.io import export_adapter

    export_adapter(args.pool, args.name, args.out, overwrite=args.overwrite)
    print(f"wrote PEFT adapter {args.name!r} -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    # cheap checks first: nothing below loads a model or starts a backend
    options = parse_options(args.router_option)
    check_router(args.router, options)
    mesh_shape = _parse_mesh(args.mesh)
    _positive(batch_size=args.batch_size, max_len=args.max_len)
    out = Path(args.out).expanduser()
    if out.is_dir():  # an existing results file is rewritten; its .partial.jsonl resumes the run
        raise UsageError(f"--out {out} is a directory (expected a results .json file)")
    info = PoolInfo(args.pool)
    info.check_router(args.router)
    examples = load_task_files(args.tasks)
    check_protocol(info, examples, args.protocol, args.router)
    check_model_source(args.model)
    from hilora_jax.model.quant import check_weights

    check_weights(args.weights)

    from hilora_jax import distributed as dist

    dist.initialize(auto=args.multihost)
    import jax

    from hilora_jax.eval.runner import evaluate
    from hilora_jax.inference import Engine
    from hilora_jax.io.loading import load_model, load_tokenizer
    from hilora_jax.lora import load_pool
    from hilora_jax.model import sharding as shd
    from hilora_jax.t5.config import is_t5_dir

    mesh = None
    if mesh_shape:
        d, m = mesh_shape
        n = jax.local_device_count()
        if d * m != n:
            raise UsageError(f"--mesh {args.mesh}: {d}x{m} = {d * m} devices, but this process has "
                             f"{n} local device(s)")
        mesh = shd.make_mesh(d, m, devices=jax.local_devices())
    if is_t5_dir(args.model):  # encoder-decoder: the choice is the decoder target
        if args.weights:
            raise UsageError(f"--weights {args.weights}: Llama-family models only (not T5)")
        from hilora_jax.t5 import T5Engine, load_t5

        model = load_t5(args.model, dtype=args.dtype, mesh=mesh)
        eng = T5Engine(model, mesh=mesh)
    else:
        model = load_model(args.model, dtype=args.dtype, mesh=mesh, weights=args.weights)
        eng = Engine(model, mesh=mesh)
    tok = load_tokenizer(args.model)
    pool = load_pool(args.pool, model=model, mesh=mesh)
    router = build_router_checked(args.router, pool, options, engine=eng, tokenizer=tok)
    config = {"model": str(args.model), "pool_src": str(args.pool), "router_options": options,
              "tasks_files": [str(t) for t in args.tasks], "dtype": args.dtype,
              "weights": args.weights or "none", "mesh": args.mesh or "none"}
    res = evaluate(eng, tok, pool, router, examples, protocol=args.protocol, out=out,
                   batch_size=args.batch_size, max_len=args.max_len, config=config,
                   resume=not args.no_resume)
    if dist.process_index() == 0:
        m = res["mean"]
        print(f"{args.router} / {args.protocol}: acc {m['acc']:.4f}  acc_norm {m['acc_norm']:.4f} "
              f"over {m['tasks']} tasks, {m['examples']} examples -> {args.out}")
        for c, v in res["clusters"].items():
            print(f"  {c:<24} acc {v['acc']:.4f}  acc_norm {v['acc_norm']:.4f}  ({v['tasks']} tasks)")
    return 0


def cmd_aot(args) -> int:
    from hilora_jax.aot import cmd_aot as run

    return run(args)


def cmd_train_lora(args) -> int:
    from hilora_jax.lora.train import train_lora_cli

    return train_lora_cli(args)


# -- parser ------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other user error."""

    def error(self, message):
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"hilora: error: {sub}{_one_line(message)} (see `{self.prog} --help`)\n")


def _add_debug(p, default):
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the Python traceback of an error (also HILORA_DEBUG=1)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `hilora` parser; with `argv`, the train-lora flags are added only if it is used."""
    p = _Parser(prog="hilora", description=__doc__.splitlines()[0])
    _add_debug(p, False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name, fn, help):
        s = sub.add_parser(name, help=help, description=help)
        _add_debug(s, argparse.SUPPRESS)
        s.set_defaults(fn=fn)
        return s

    c = add("convert-model", cmd_convert_model,
            "convert a HF/GGUF/hub model to a hilora-jax (orbax) dir")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c.add_argument("--overwrite", action="store_true")

    g = add("generate", cmd_generate, "generate an answer, optionally routed over a LoRA pool")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--pool", default=None, help="pool dir or manifest")
    g.add_argument("--router", default=None, help="with --pool (default hilora)")
    g.add_argument("--router-option", action="append", default=[], metavar="K=V")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--weights", default=None, help="int8: weight-only int8 base kernels; "
                    "int4: 4-bit kernels, a scale and min per 32 inputs (activations in --dtype)")
    g.add_argument("--no-chat-template", action="store_true")

    cp = add("convert-pool", cmd_convert_pool,
             "convert PEFT adapters (manifest) into a stacked pool")
    cp.add_argument("manifest")
    cp.add_argument("--model", required=True)
    cp.add_argument("--out", required=True)
    cp.add_argument("--overwrite", action="store_true")

    ex = add("export-adapter", cmd_export_adapter,
             "write one pool member back as a PEFT adapter")
    ex.add_argument("pool")
    ex.add_argument("name")
    ex.add_argument("--out", required=True)
    ex.add_argument("--overwrite", action="store_true")

    ev = add("eval", cmd_eval, "evaluate a router on JSONL tasks under a protocol")
    ev.add_argument("--model", required=True)
    ev.add_argument("--pool", required=True)
    ev.add_argument("--router", default="hilora")
    ev.add_argument("--router-option", action="append", default=[], metavar="K=V")
    ev.add_argument("--tasks", nargs="+", required=True)
    ev.add_argument("--protocol", default="seen", choices=["seen", "unseen-within", "unseen-cross"])
    ev.add_argument("--out", required=True,
                    help="results .json (rewritten; an interrupted run resumes from OUT.partial.jsonl)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-len", type=int, default=256)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--weights", default=None, help="int8: weight-only int8 base kernels; "
                    "int4: 4-bit kernels, a scale and min per 32 inputs (activations in --dtype)")
    ev.add_argument("--mesh", default=None, help="DATAxMODEL over this process's devices, e.g. 2x4")
    ev.add_argument("--no-resume", action="store_true")
    ev.add_argument("--multihost", action="store_true",
                    help="start jax.distributed with JAX's cluster auto-detection (TPU pods, "
                         "SLURM); without it, multi-host needs HILORA_COORDINATOR, "
                         "HILORA_NUM_PROCESSES and HILORA_PROCESS_ID")

    ao = add("aot", cmd_aot, "compile prefill/decode ahead of time for a TPU slice or the "
                             "local backend: memory, flops, roofline, collectives")
    if argv is None or "aot" in argv:  # its flags live in aot.py (imports jax)
        from hilora_jax.aot import add_aot_args

        add_aot_args(ao)

    tr = add("train-lora", cmd_train_lora, "train one LoRA on a task with optax; writes PEFT")
    if argv is None or "train-lora" in argv:  # its flags live in train.py (heavy imports)
        from hilora_jax.lora.train import add_train_lora_args

        add_train_lora_args(tr)
    return p


def _one_line(msg) -> str:
    return " ".join(str(msg).split())


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"hilora: warning: {category.__name__}: {_one_line(message)}", file=sys.stderr)


def user_error_types() -> tuple[type[BaseException], ...]:
    """What the CLI reports as one line: `HiloraUserError` and the config-field refusals."""
    from hilora_jax.model.config import UnsupportedConfigError

    return (HiloraUserError, UnsupportedConfigError)


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    debug = args.debug or os.environ.get("HILORA_DEBUG", "") not in ("", "0")
    if not debug:  # a warning is one line too (the library's warnings name the file and field)
        warnings.showwarning = _warning_line
    try:
        return args.fn(args)
    except user_error_types() as e:
        if debug:
            traceback.print_exc()
        print(f"hilora: error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("hilora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

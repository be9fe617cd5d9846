"""`hilora` command line: convert models and pools, generate (optionally routed), evaluate.

Thin argument parsing over the library; every `--model` accepts a HF dir, a hub id, a .gguf file,
a converted directory, or the built-in name `smollm2`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _setup_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cmd_convert_model(args) -> int:
    from hilora_jax.checkpoint import save_model
    from hilora_jax.loading import load_model, load_tokenizer, resolve_source

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


def _parse_options(items: list[str]) -> dict[str, str]:
    out = {}
    for kv in items:
        if "=" not in kv:
            raise SystemExit(f"--router-option expects K=V, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_generate(args) -> int:
    import jax

    from hilora_jax.inference import Engine
    from hilora_jax.loading import load_model, load_tokenizer

    model = load_model(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    prompts = args.prompt
    ids = [_chat_prompt(tok, p, not args.no_chat_template) for p in prompts]
    eng = Engine(model)
    stops = list(model.config.eos_token_id)
    if tok.eos_token_id is not None and tok.eos_token_id not in stops:
        stops.append(tok.eos_token_id)
    lora = None
    routing_report = None
    if args.pool:
        from hilora_jax.routing import build_router

        router = build_router(args.router, args.pool, model=model, engine=eng, tokenizer=tok,
                              options=_parse_options(args.router_option))
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
    from hilora_jax.lora.io import convert_pool

    convert_pool(args.manifest, args.model, args.out, progress=True)
    return 0


def cmd_export_adapter(args) -> int:
    from hilora_jax.lora.io import export_adapter

    export_adapter(args.pool, args.name, args.out)
    print(f"wrote PEFT adapter {args.name!r} -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    from hilora_jax import distributed as dist

    dist.initialize()
    import jax

    from hilora_jax import sharding as shd
    from hilora_jax.eval.runner import evaluate
    from hilora_jax.eval.tasks import load_tasks
    from hilora_jax.inference import Engine
    from hilora_jax.loading import load_model, load_tokenizer
    from hilora_jax.lora import load_pool
    from hilora_jax.routing import build_router

    mesh = None
    if args.mesh:
        d, m = (int(v) for v in args.mesh.lower().split("x"))
        mesh = shd.make_mesh(d, m, devices=jax.local_devices())
    model = load_model(args.model, dtype=args.dtype, mesh=mesh)
    tok = load_tokenizer(args.model)
    eng = Engine(model, mesh=mesh)
    pool = load_pool(args.pool, model=model, mesh=mesh)
    examples = load_tasks(args.tasks)
    options = _parse_options(args.router_option)
    router = build_router(args.router, pool, options=options, engine=eng, tokenizer=tok)
    config = {"model": str(args.model), "pool_src": str(args.pool), "router_options": options,
              "tasks_files": [str(t) for t in args.tasks], "dtype": args.dtype,
              "mesh": args.mesh or "none"}
    res = evaluate(eng, tok, pool, router, examples, protocol=args.protocol, out=args.out,
                   batch_size=args.batch_size, max_len=args.max_len, config=config,
                   resume=not args.no_resume)
    if dist.process_index() == 0:
        m = res["mean"]
        print(f"{args.router} / {args.protocol}: acc {m['acc']:.4f}  acc_norm {m['acc_norm']:.4f} "
              f"over {m['tasks']} tasks, {m['examples']} examples -> {args.out}")
        for c, v in res["clusters"].items():
            print(f"  {c:<24} acc {v['acc']:.4f}  acc_norm {v['acc_norm']:.4f}  ({v['tasks']} tasks)")
    return 0


def cmd_train_lora(args) -> int:
    from hilora_jax.train import train_lora_cli

    return train_lora_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hilora", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert-model", help="convert a HF/GGUF/hub model to a hilora-jax (orbax) dir")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_convert_model)

    g = sub.add_parser("generate", help="generate an answer, optionally routed over a LoRA pool")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--pool", default=None, help="pool dir or manifest")
    g.add_argument("--router", default="hilora")
    g.add_argument("--router-option", action="append", default=[], metavar="K=V")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--no-chat-template", action="store_true")
    g.set_defaults(fn=cmd_generate)

    cp = sub.add_parser("convert-pool", help="convert PEFT adapters (manifest) into a stacked pool")
    cp.add_argument("manifest")
    cp.add_argument("--model", required=True)
    cp.add_argument("--out", required=True)
    cp.set_defaults(fn=cmd_convert_pool)

    ex = sub.add_parser("export-adapter", help="write one pool member back as a PEFT adapter")
    ex.add_argument("pool")
    ex.add_argument("name")
    ex.add_argument("--out", required=True)
    ex.set_defaults(fn=cmd_export_adapter)

    ev = sub.add_parser("eval", help="evaluate a router on JSONL tasks under a protocol")
    ev.add_argument("--model", required=True)
    ev.add_argument("--pool", required=True)
    ev.add_argument("--router", default="hilora")
    ev.add_argument("--router-option", action="append", default=[], metavar="K=V")
    ev.add_argument("--tasks", nargs="+", required=True)
    ev.add_argument("--protocol", default="seen", choices=["seen", "unseen-within", "unseen-cross"])
    ev.add_argument("--out", required=True)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-len", type=int, default=256)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--mesh", default=None, help="DATAxMODEL over this process's devices, e.g. 2x4")
    ev.add_argument("--no-resume", action="store_true")
    ev.set_defaults(fn=cmd_eval)

    from hilora_jax.aot import add_aot_args, cmd_aot

    ao = sub.add_parser("aot", help="compile prefill/decode ahead of time for a TPU slice: memory, roofline")
    add_aot_args(ao)
    ao.set_defaults(fn=cmd_aot)

    from hilora_jax.train import add_train_lora_args

    tr = sub.add_parser("train-lora", help="train one LoRA on a task with optax; writes PEFT")
    add_train_lora_args(tr)
    tr.set_defaults(fn=cmd_train_lora)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

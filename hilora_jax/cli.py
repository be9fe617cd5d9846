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
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

"""The README's accelerator table from `hilora aot`: Llama-2-7B + 50 r=8 q/v LoRAs, bf16 (and
weight-only int8 / int4 base kernels, `:int8` / `:int4` entries), 2048-token
prompts (+128 new tokens: 2176 cache slots), on TPU v5e-1 / v5e-8 / v6e-8 at batch 1 / 8 / 32.

Every cell comes from compiling `Engine`'s real prefill and decode step for that slice through
libtpu on this CPU host (`hilora_jax.aot.analyze`): nothing is allocated or run; times are roofline
estimates from XLA's cost analysis and the chips' published peaks (see `hilora_jax.aot.CHIPS`).

    python benchmarks/aot_table.py                       # every configuration (resumes)
    python benchmarks/aot_table.py --only v5e-8:8        # one configuration
    python benchmarks/aot_table.py --only v5e-1:1:int8   # the same with int8 base weights
    python benchmarks/aot_table.py --only v5e-1:8:int4   # 4-bit base weights
    python benchmarks/aot_table.py --only v5e-8:8:int8:pack8 --keep base   # + hilora's int8 pack
    python benchmarks/aot_table.py --before v5e-8:32     # + the prefill with unchunked attention
    python benchmarks/aot_table.py --redo --keep-prefill base hilora   # decode steps only

Results accumulate in benchmarks/results/aot.json (one entry per configuration, written after each,
so an interrupted run keeps what it finished) and benchmarks/results/aot.md (table + goals).
Compiling a 32-layer 7B program takes minutes on a small CPU: run it nice'd.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RESULTS_DIR,
    _git_commit,
    command_line,
    machine_info,
    markdown_table,
    write_json,
    write_text,
)

CONFIGS = [f"{t}:{b}{w}" for w in ("", ":int8") for t in ("v5e-8", "v6e-8", "v5e-1")
           for b in (8, 32, 1)]
MODEL, N, RANK, TARGETS, PROMPT, NEW = "llama-2-7b", 50, 8, ("q_proj", "v_proj"), 2048, 128


def run_one(topology: str, batch: int, routers, *, unchunked: bool = False,
            hlo_dir: str | None = None, weights: str | None = None, keep=None,
            pack_weights: str | None = None) -> dict:
    from hilora_jax import aot
    from hilora_jax.model import layers

    spec = aot.AotSpec(cfg=aot.PRESETS[MODEL], name=MODEL, topology=topology, dtype="bfloat16",
                       weights=weights, pack_weights=pack_weights,
                       pool=aot.PoolSpec(n=N, rank=RANK, targets=TARGETS), routers=routers,
                       batch=batch, prompt=PROMPT, new=NEW)
    old = layers.ATTN_SCORE_BUDGET
    if unchunked:  # the attention before issue 14: one [B, N, T, S] fp32 score tensor
        layers.ATTN_SCORE_BUDGET = 1 << 62
    try:
        t0 = time.perf_counter()
        rep = aot.analyze(spec, log=lambda s: print(s, flush=True), hlo_dir=hlo_dir, keep=keep)
        rep["wall_s"] = round(time.perf_counter() - t0, 1)
    finally:
        layers.ATTN_SCORE_BUDGET = old
    return rep


def _gib(x):
    return "-" if x is None else f"{x / 2**30:.2f}"


def _ms(x):
    return "-" if x is None else f"{x * 1e3:.2f}"


def _w(rep) -> str:
    w = rep["weights"] if rep.get("weights") in ("int8", "int4") else "bf16"
    return w + (" + int8 pack" if rep.get("pack_weights") == "int8" else "")


def render(results: dict) -> str:
    rows = []
    for rep in sorted(results["configs"].values(), key=lambda r: (
            r["topology"], r["batch"], _w(r))):
        v = rep["variants"]
        base, hil = v.get("base", {}), v.get("hilora", {})
        if not hil and base and "error" not in base:  # base only (e.g. an attention check)
            bp, bd = base["prefill"], base["decode_step"]
            rows.append([rep["topology"], rep["batch"], _w(rep), "(base only)",
                         f"{_ms(bp['roofline_hbm_s'])} ({bp['bound_hbm']})",
                         f"{bp['attention_share'] * 100:.1f}%",
                         f"{_ms(bd['roofline_hbm_s'])} ({bd['bound_hbm']})", "-", "-",
                         f"{bd['hbm_over_min']:.3f} / -", f"- / {bd['bytes_over_min']:.2f} / -",
                         ", ".join(f"{c['kind']} x{c['count']}" for c in bd["collectives"])
                         or "none", len(bd["weight_gathers"]) + len(bp["weight_gathers"])])
            continue
        if "error" in base or "error" in hil or not base:
            err = base.get("error") or hil.get("error")
            rows.append([rep["topology"], rep["batch"], _w(rep), f"NO ({err[:60]})", *["-"] * 9])
            continue
        bp, bd, hp, hd = base["prefill"], base["decode_step"], hil["prefill"], hil["decode_step"]
        r = rep["ratios"]["hilora"]
        colls = ", ".join(f"{c['kind']} x{c['count']}" for c in hd["collectives"]) or "none"
        gathers = len(hd["weight_gathers"]) + len(hp["weight_gathers"])
        rows.append([
            rep["topology"], rep["batch"], _w(rep),
            f"{'yes' if hil['fits'] else 'NO'} ({_gib(hil['margin_bytes'])} GiB)",
            f"{_ms(bp['roofline_hbm_s'])} ({bp['bound_hbm']})",
            f"{bp['attention_share'] * 100:.1f}%",
            f"{_ms(bd['roofline_hbm_s'])} ({bd['bound_hbm']})", f"{_ms(hd['roofline_hbm_s'])}",
            f"{r['decode_roofline_hbm']:.3f}x / {r['prefill_roofline_hbm']:.3f}x",
            f"{bd['hbm_over_min']:.3f} / {hd['hbm_over_min']:.3f}",
            f"{r['decode_roofline']:.3f}x / {bd['bytes_over_min']:.2f} / {hd['bytes_over_min']:.2f}",
            colls, gathers])
    table = markdown_table(
        ["slice", "batch", "weights", "hilora fits (margin)", "prefill ms (bound)", "attn flops",
         "decode ms base (bound)", "decode ms hilora", "hilora/base decode / prefill",
         "decode HBM bytes/min base / hilora",
         "XLA bytes: hilora/base decode, bytes/min base / hilora", "decode collectives",
         "weight/pool all-gathers"], rows)
    lines = [
        f"# `hilora aot`: {MODEL} + {N} r={RANK} {'/'.join(TARGETS)} LoRAs, bf16 (int8: weight-only "
        f"int8 base kernels, bf16 activations and LoRAs; int4: 4-bit base kernels with a float16 "
        f"scale and min per 32 inputs; + int8 pack: also the hilora router's "
        f"packed ROCs in int8, `pack_weights=int8`), prompt {PROMPT} + "
        f"{NEW} new tokens",
        "",
        "Compiled for each TPU slice through libtpu on a CPU host (`benchmarks/aot_table.py`); "
        "per-device figures, mesh 1xN (tensor parallel). Times are rooflines: max(XLA flops / "
        "peak bf16, HBM bytes / HBM bandwidth, collective bytes / ICI bandwidth), with HBM bytes "
        "estimated from the compiled HLO (`hilora_jax.aot.hbm_traffic`: kernels' HBM operands "
        "and results, in-place updates by their update, HBM<->on-chip copies once). XLA's own "
        "'bytes accessed' also counts the on-chip side of those copies; its ratios are given "
        "for reference. decode bytes/min = the decode step's bytes over weights + KV cache + "
        "the LoRA slots it uses, each read once.",
        "",
        table,
    ]
    before = results.get("before", {})
    if before:
        lines += ["", "## Attention before / after (query-chunked scores, issue 14 item 2)", ""]
        brow = []
        for key, rep in before.items():
            after = results["configs"].get(key)
            b = rep["variants"]["base"]
            a = after["variants"]["base"] if after else None
            if "error" in b:
                bdesc = "does not compile: " + b["error"][:60]
            else:
                bdesc = (f"temp {_gib(b['prefill']['memory']['temp'])} GiB, peak "
                         f"{_gib(b['peak_bytes'])} GiB, {_ms(b['prefill'].get('roofline_hbm_s'))} ms")
            adesc = "-" if a is None else (
                f"temp {_gib(a['prefill']['memory']['temp'])} GiB, peak {_gib(a['peak_bytes'])} "
                f"GiB, {_ms(a['prefill'].get('roofline_hbm_s'))} ms")
            brow.append([key, bdesc, adesc])
        lines.append(markdown_table(["slice:batch (base prefill)", "unchunked [B,N,T,S] fp32",
                                     "query-chunked (now)"], brow))
    g = results["configs"]
    goals = []
    for key in ("v5e-8:1", "v5e-8:8", "v5e-8:32", "v5e-8:1:int8", "v5e-8:8:int8", "v5e-8:32:int8",
                "v5e-8:1:int8:pack8", "v5e-8:8:int8:pack8", "v5e-8:32:int8:pack8"):
        rep = g.get(key)
        if not rep or "hilora" not in rep["ratios"]:
            continue
        r = rep["ratios"]["hilora"]
        hd = rep["variants"]["hilora"]["decode_step"]
        bd = rep["variants"]["base"]["decode_step"]
        bp = rep["variants"]["base"]["prefill"]
        goals.append([key, f"{r['decode_roofline_hbm']:.3f}x (<= 1.10)",
                      f"{r['decode_hbm_bytes']:.3f}x (<= 1.10)",
                      f"{bd['hbm_over_min']:.3f} / {hd['hbm_over_min']:.3f} (<= 1.25)",
                      f"{bp['bound_hbm']} (compute)",
                      f"{bp['attention_share'] * 100:.1f}% (< 25%)"])
    if goals:
        lines += ["", "## Goals on v5e-8 (N=50)", "", markdown_table(
            ["config", "hilora/base decode time", "hilora/base decode bytes",
             "decode bytes/min base / hilora", "prefill bound", "attention share of prefill flops"],
            goals)]
    cmds = [c for c in dict.fromkeys(results.get("commands", [results["command"]])) if c]
    lines += ["", "Commands:", "", *[f"    {c}" for c in cmds], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="slice:batch entries (default: all)")
    ap.add_argument("--routers", default="hilora", help="routers besides base (comma list)")
    ap.add_argument("--before", nargs="*", default=[], help="slice:batch to also compile with "
                    "the old unchunked attention (base only)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "aot"))
    ap.add_argument("--hlo-dir", default=None, help="also keep each compiled HLO text here")
    ap.add_argument("--merge", nargs="*", default=[], help="fold in other runs' JSON files")
    ap.add_argument("--refresh", action="store_true", help="only recompute the HLO-based "
                    "estimates from --hlo-dir and re-render")
    ap.add_argument("--redo", action="store_true", help="recompile entries already in the JSON")
    ap.add_argument("--keep-prefill", nargs="*", default=None, metavar="ROUTER",
                    help="with --redo: reuse these routers' prefill entries from the JSON (a "
                    "change that touched only the decode step; the entry records it)")
    ap.add_argument("--keep", nargs="*", default=None, metavar="ROUTER",
                    help="for a :pack8 entry: reuse these routers' programs (both) from the same "
                    "entry without :pack8 (base never reads the pack)")
    args = ap.parse_args(argv)
    import json

    out = Path(args.out)
    path_json, path_md = out.with_suffix(".json"), out.with_suffix(".md")
    results = (json.loads(path_json.read_text()) if path_json.exists()
               else {"configs": {}, "before": {}})
    for other in args.merge:  # results of runs made in parallel (separate --out files)
        extra = json.loads(Path(other).read_text())
        for section in ("configs", "before"):
            results.setdefault(section, {}).update(extra.get(section, {}))
        results.setdefault("commands", []).extend(extra.get("commands", [extra.get("command")]))
    results["command"] = command_line()
    results.setdefault("commands", []).append(results["command"])
    routers = ("base", *[r for r in args.routers.split(",") if r])
    todo = [("configs", k, False) for k in (args.only if args.only is not None else CONFIGS)]
    todo += [("before", k, True) for k in args.before]
    if args.refresh:  # recompute the HLO-based estimates from the kept HLO texts
        from hilora_jax import aot

        for section in ("configs", "before"):
            for key, rep in results.get(section, {}).items():
                d = Path(args.hlo_dir) / f"{section}_{key}"
                chip = aot.CHIPS[aot.TOPOLOGIES[rep["topology"]][2]]
                pd = rep["per_device"]
                if "embedding_not_read" not in pd:  # reports made before that correction
                    cfg = aot.PRESETS[MODEL]
                    emb = cfg.vocab_size * cfg.hidden_size * 2 // rep["mesh"]["model"]
                    pd["embedding_not_read"] = emb - rep["batch"] * cfg.hidden_size * 2
                    for v in rep["variants"].values():
                        if "decode_step" in v:
                            ds = v["decode_step"]
                            ds["min_bytes"] -= pd["embedding_not_read"]
                            ds["bytes_over_min"] = ds["bytes"] / ds["min_bytes"]
                for r, v in rep["variants"].items():
                    for prog in ("prefill", "decode_step"):
                        f = d / f"{r}_{prog}.hlo.txt"
                        if prog in v and f.exists():
                            aot.add_hbm_estimate(v[prog], f.read_text(), chip)
                rep["ratios"] = aot.compute_ratios(rep["variants"])
        write_json(path_json, results)
        write_text(path_md, render(results))
        todo = []
    for section, key, unchunked in todo:
        if key in results[section] and not args.redo:
            print(f"{section} {key}: already done")
            continue
        topo, batch, *w = key.split(":")
        if w not in ([], ["int8"], ["int4"], ["pack8"], ["int8", "pack8"], ["int4", "pack8"]):
            raise SystemExit(f"{key}: expected slice:batch[:int8|:int4][:pack8]")
        pack = "int8" if "pack8" in w else None
        w = [x for x in w if x != "pack8"]
        print(f"== {section} {key}", flush=True)
        hlo_dir = None if args.hlo_dir is None else str(Path(args.hlo_dir) / f"{section}_{key}")
        old = results[section].get(key, {}).get("variants", {})
        keep = {r: {"prefill": old[r]["prefill"]} for r in (args.keep_prefill or ())
                if "prefill" in old.get(r, {})}
        src = key.replace(":pack8", "")
        if pack and args.keep and src in results[section]:
            keep = {r: {p: results[section][src]["variants"][r][p] for p in ("prefill", "decode_step")}
                    for r in args.keep if r in results[section][src]["variants"]}
        rep = run_one(topo, int(batch), ("base",) if unchunked else routers, unchunked=unchunked,
                      hlo_dir=hlo_dir, weights=w[0] if w else None, keep=keep, pack_weights=pack)
        rep["commit"] = _git_commit()
        if keep and pack:
            rep["programs_kept"] = {"routers": sorted(keep), "from": src,
                                    "from_commit": results[section][src].get("commit")}
        elif keep:
            rep["prefill_kept"] = {"routers": sorted(keep),
                                   "from_commit": results[section][key].get("commit")}
        results[section][key] = rep
        results["machine"] = machine_info()
        write_json(path_json, results)
        write_text(path_md, render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

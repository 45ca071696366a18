#!/usr/bin/env python3
"""``workbench bench --peers`` on the card, and why HF's bfloat16 decode could be slower than its float32.

    python3 tests/tools/gpu/peers_bench.py [--out DIR] [--parts bench,diag] [--prompt-len 512] [--gen-len 256]

* bench: a random checkpoint of the Gemma 3 270M config (``workbench make-random``, bfloat16 weights), then
  ``wb.bench(..., backends=["torch:cuda"], dtypes=["float32", "bfloat16"], peers=True)`` — the workbench rows and
  every peer in the same call: ``hf`` (transformers generate, sdpa, no compile), ``hf-static-graphs`` (StaticCache +
  torch.compile(reduce-overhead, fullgraph) step in CUDA graphs), ``hf+static`` (transformers' own generate with
  that cache and a CompileConfig), and the rows of the peers that could not run (llama.cpp: an HF checkpoint is
  not a GGUF; its CUDA numbers come from tests/tools/gpu/llamacpp_cuda.sh). Prints the table, the ratios, each
  peer's route note (graphs compiled, recompiles, graph breaks, CUDA-graph skips). ``$WORKBENCH_PEERS`` limits it.
* diag: per dtype, in a child process with ``TORCH_LOGS=recompiles,graph_breaks,perf_hints``: the graphed decoder
  (short run: tok/s, dynamo counters, the log lines, the 12 CUDA kernels that take the most time in 16 profiled
  steps — an sdpa math fallback or a cast shows there), and transformers' own StaticCache layers traced by dynamo
  alone (backend="eager", cheap) for 13 steps to count the recompiles its sliding layers cause (their length is a
  Python int), then the same stock layers under inductor + CUDA graphs (24 tokens): the cost of that route per
  token. Run bench and diag as two device commands if one would pass 10 minutes (bench ~5 min, diag ~4 min).

Writes DIR/peers.md (default $OUT or ./out) as it goes; every number printed with the card's name.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
ROOT = pathlib.Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
T0 = time.perf_counter()


class Report:
    """Markdown lines printed as they come and rewritten to one file after each (a killed run keeps its lines)."""

    def __init__(self):
        self.lines: list[str] = []
        self.path: pathlib.Path | None = None

    def __call__(self, s: str = "") -> None:
        print(s, flush=True)
        self.lines.append(s)
        if self.path is not None:
            self.path.write_text("\n".join(self.lines) + "\n")


say = Report()


def elapsed() -> str:
    return f"[{time.perf_counter() - T0:.0f} s]"


def card() -> str:
    """The GPU's name (the numbers below are this card's), or why there is none."""
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        return "no torch"
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def make(out: pathlib.Path) -> pathlib.Path:
    if (out / "config.json").exists():
        return out
    t = time.perf_counter()
    from workbench import make_random
    make_random.make_random("gemma3-270m", out, seed=0, dtype="bfloat16", progress=False)
    say(f"made the random Gemma 3 270M checkpoint in {time.perf_counter() - t:.0f} s -> {out}")
    return out


def part_bench(ckpt, args, outdir):
    import workbench as wb
    say(f"\n## wb.bench(peers=True) on {card()}: pp{args.prompt_len} / tg{args.gen_len}, {args.repeats} repeats "
        f"{elapsed()}\n")
    import torch
    import transformers
    say(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"WORKBENCH_PEERS={os.environ.get('WORKBENCH_PEERS', '(all)')}")
    res = wb.bench(str(ckpt), backends=["torch:cuda"], dtypes=["float32", "bfloat16"], prompt_len=args.prompt_len,
                   gen_len=args.gen_len, repeats=args.repeats, peers=True, db=str(outdir / "runs.sqlite"))
    say("```")
    say(res.table())
    say("```")
    say(f"run id {res.run_id} (store {outdir / 'runs.sqlite'}) {elapsed()}")
    for r in res.rows:
        if r["impl"] != "workbench":
            say(f"- {r['impl']} {r['dtype']}: {r['status']}"
                + (f", tg {r['decode_tok_s']:.1f} tok/s, pp {r['prefill_tok_s']:.0f} tok/s" if r["status"] == "ok" else "")
                + f" — {r.get('reason') or r.get('route') or ''}")


DIAG_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from workbench.references.hf import HFReference
from workbench.references.hf_static import StaticGraphDecoder, _counters, _delta
from torch.profiler import profile, ProfilerActivity
ckpt, P, N, stock = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
dev = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a smoke test of this script only
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
tt = (lambda e: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))) if dev == "cuda" else \
    (lambda e: e.self_cpu_time_total)
for dtype in sys.argv[6:]:
    print(f"=== DTYPE {dtype}", file=sys.stderr, flush=True)
    out = {"dtype": dtype}
    ref = HFReference(ckpt, dtype=dtype, device=dev, attn_implementation="sdpa")
    x = ref._bench_prompt(P)
    out["weights_dtype"] = str(next(ref.model.parameters()).dtype)
    c0 = _counters()
    dec = StaticGraphDecoder(ref.model, P + N, suppress=ref.eos_ids())
    t = time.perf_counter(); dec.run(x, N); out["warmup_s"] = time.perf_counter() - t
    c1 = _counters()
    r = dec.run(x, N)
    c2 = _counters()
    out["decode_tok_s"] = (N - 1) / r["decode_s"]
    out["prefill_tok_s"] = P / r["prefill_s"]
    out["warm"], out["timed"] = _delta(c0, c1), _delta(c1, c2)
    out["cache_dtypes"] = sorted({str(l.keys.dtype) for l in dec.cache.layers if getattr(l, "keys", None) is not None})
    tok = torch.tensor([[int(x[-1])]], device=dev)          # the kernels of 16 decode steps
    with torch.no_grad():
        dec.cache.reset(); dec._prefill(torch.as_tensor(x[None], device=dev)); sync()
        with profile(activities=[ProfilerActivity.CUDA if dev == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(16):
                torch.compiler.cudagraph_mark_step_begin()
                tok = dec._step(tok).clone()
            sync()
    rows = sorted(prof.key_averages(), key=lambda e: -tt(e))[:12]
    out["kernels"] = [(e.key[:90], round(tt(e) / 16, 1), e.count // 16) for e in rows]
    if stock:   # transformers' own StaticCache layers: dynamo only (cheap), then inductor + CUDA graphs
        torch._dynamo.reset()
        c3 = _counters()
        try:
            d2 = StaticGraphDecoder(ref.model, P + 13, suppress=ref.eos_ids(), backend="eager", full_length=False)
            t = time.perf_counter(); d2.run(x, 13); out["stock_s"] = time.perf_counter() - t
            out["stock"] = _delta(c3, _counters())
        except Exception as e:
            out["stock_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        torch._dynamo.reset()
        c4 = _counters()
        try:
            d3 = StaticGraphDecoder(ref.model, P + 25, suppress=ref.eos_ids(), full_length=False)
            t = time.perf_counter(); d3.run(x, 25); out["stock_graphs_warm_s"] = time.perf_counter() - t
            out["stock_graphs_tok_s"] = 24 / d3.run(x, 25)["decode_s"]
            out["stock_graphs"] = _delta(c4, _counters())
        except Exception as e:
            out["stock_graphs_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print("DIAG-JSON " + json.dumps(out), flush=True)
    del dec, ref
    torch._dynamo.reset()
"""


def part_diag(ckpt, args):
    n = 32
    say(f"\n## Why bfloat16 vs float32 (HF graphed decoder, pp{args.prompt_len}, {n} tokens, one child process, "
        f"TORCH_LOGS=recompiles,graph_breaks,perf_hints) {elapsed()}\n")
    env = dict(os.environ, TORCH_LOGS="recompiles,graph_breaks,perf_hints", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", DIAG_CHILD, str(ROOT), str(ckpt), str(args.prompt_len), str(n),
           "1" if args.diag_stock else "0", "float32", "bfloat16"]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.diag_timeout)
        stdout, stderr, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = f"timed out after {args.diag_timeout} s"
    got = [json.loads(ln[len("DIAG-JSON "):]) for ln in stdout.splitlines() if ln.startswith("DIAG-JSON ")]
    say(f"child: exit {rc}, {len(got)} dtype(s) reported {elapsed()}")
    if not got:
        say("```")
        say((stdout + stderr)[-3000:])
        say("```")
    logs_by = {}
    cur = None
    keys = ("Recompiling", "- 0/", "Graph break", "graph break", "skipping cudagraphs", "distinct", "CUDAGraph",
            "cudagraph", "FallbackKernel")
    for ln in stderr.splitlines():
        if ln.startswith("=== DTYPE "):
            cur = ln.split()[-1]
        elif any(w in ln for w in keys):
            logs_by.setdefault(cur, []).append(ln.split("] ", 1)[-1])
    for d in got:
        dt = d["dtype"]
        say(f"### {dt}")
        say(f"- decode {d['decode_tok_s']:.1f} tok/s, prefill {d['prefill_tok_s']:.0f} tok/s, warm-up {d['warmup_s']:.1f} s; "
            f"weights {d['weights_dtype']}, KV cache {d['cache_dtypes']}")
        say(f"- dynamo: warm-up {d['warm']}, timed {d['timed']}")
        if "stock" in d or "stock_error" in d:
            say(f"- transformers' own StaticCache layers (dynamo only, 13 tokens): {d.get('stock') or d.get('stock_error')}")
        if "stock_graphs" in d:
            say(f"- transformers' own StaticCache layers under inductor + CUDA graphs (24 tokens, 2nd run): "
                f"{d['stock_graphs_tok_s']:.1f} tok/s, first run {d['stock_graphs_warm_s']:.1f} s, {d['stock_graphs']}")
        elif "stock_graphs_error" in d:
            say(f"- transformers' own StaticCache layers under CUDA graphs: {d['stock_graphs_error']}")
        say("- top CUDA kernels per decode step (µs, launches):")
        for k, us, n_ in d["kernels"]:
            say(f"    {us:8.1f} µs  x{n_:<3d} {k}")
        logs = logs_by.get(dt, [])
        say(f"- TORCH_LOGS lines ({len(logs)}):")
        for ln in logs[:20]:
            say("    " + ln.strip()[:300])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--parts", default="bench,diag")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ckpt", default="/tmp/wb-peers-r270")
    ap.add_argument("--diag-timeout", type=int, default=85)
    ap.add_argument("--diag-stock", action="store_true",
                    help="diag also runs transformers' own StaticCache layers (dynamo-only, then CUDA graphs): +2-3 min")
    args = ap.parse_args()
    outdir = pathlib.Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    say.path = outdir / "peers.md"
    say(f"# Peers on {card()} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    ckpt = make(pathlib.Path(args.ckpt))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for name, fn in (("bench", lambda: part_bench(ckpt, args, outdir)), ("diag", lambda: part_diag(ckpt, args))):
        if name in parts:
            try:
                fn()
            except Exception:
                say(f"part {name} failed:\n```\n{traceback.format_exc()[-4000:]}\n```")
    say(f"\ndone {elapsed()}")


if __name__ == "__main__":
    main()

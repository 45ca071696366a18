"""The ``workbench`` command: info, parity, generate, bench, notebooks, dashboard, demo."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

DEFAULT_MODEL = "gemma3-270m"


def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("gemma-workbench", "numpy", "torch", "mlx", "transformers", "tokenizers", "gguf", "llama_cpp_python",
                "streamlit", "papermill", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def cmd_info(args) -> int:
    from . import backends
    print("Gemma Workbench")
    print(f"  machine: {platform.machine()} {platform.system()} {platform.release()}, python {platform.python_version()}")
    try:
        from .runs import machine_info
        mi = machine_info()
        if mi:
            print(f"  cpu: {mi.get('cpu') or mi.get('processor') or ''}")
    except Exception:
        pass
    print("versions:")
    for k, v in _versions().items():
        print(f"  {k:18s} {v or '(not installed)'}")
    print("backends:")
    av = backends.available()
    for b, why in av.reasons.items():
        print(f"  {'OK' if b in av else '--'}  {b:12s} {why}")
    try:
        import torch
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    except Exception:
        pass
    try:
        from .weights import registry
        print("registered models: " + ", ".join(registry.names()))
    except Exception:
        pass
    return 0


def cmd_parity(args) -> int:
    from .parity import compare
    refs = [r for r in (args.references or "").split(",") if r]
    prompt = args.prompt
    if args.prompt_ids:
        prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    tols = {}
    for t in args.tolerance or []:
        key, _, val = t.partition("=")
        parts = key.split(":")
        tols[(":".join(parts[:-1]), parts[-1]) if len(parts) > 1 else key] = float(val)
    rep = compare(args.model, backends=args.backends, dtypes=args.dtypes, reference=args.reference,
                  prompt=prompt, decode_steps=args.decode_steps, references=refs, db=args.db,
                  store=not args.no_store, progress=True, tolerances=tols or None)
    print(rep.summary())
    if rep.run_id:
        print(f"stored run {rep.run_id}")
    if args.heatmap:
        fig = rep.heatmap(by="backends")
        fig.savefig(args.heatmap, dpi=120)
        print(f"heatmap written to {args.heatmap}")
    if args.json:
        rep.to_frame().to_json(args.json, orient="records", indent=1)
    return 0 if rep.passed else 1


def cmd_generate(args) -> int:
    from .loader import load
    m = load(args.model, backend=args.backend, dtype=args.dtype)
    t0 = time.perf_counter()
    it = m.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=True, chat=args.chat)
    if not args.quiet:
        print(args.prompt, end="", flush=True)
    for piece in it:
        print(piece, end="", flush=True)
    print()
    st = getattr(m, "last_stats", {})
    print(f"[{m.backend} {m.dtype}] prompt {st.get('prompt_tokens')} tok at {st.get('prompt_tok_s', 0):.1f} tok/s, "
          f"generated {st.get('generated_tokens', 0)} tok at {st.get('gen_tok_s', float('nan')):.1f} tok/s, "
          f"ttft {st.get('ttft_s', 0) * 1000:.0f} ms, total {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench import bench
    res = bench(args.model, backends=args.backends, dtypes=args.dtypes, prompt_len=args.prompt_len,
                gen_len=args.gen_len, repeats=args.repeats, peers=args.peers, db=args.db, store=not args.no_store,
                baseline=args.baseline, fast=not args.plain)
    print(res.table())
    if args.json:
        res.to_frame().to_json(args.json, orient="records", indent=1)
        print(f"json written to {args.json}")
    if args.csv:
        res.to_frame().to_csv(args.csv, index=False)
        print(f"csv written to {args.csv}")
    if res.run_id:
        print(f"stored run {res.run_id}")
    return 1 if getattr(res, "regressions", None) else 0


def cmd_notebooks(args) -> int:
    from .notebooks import run_notebook
    params = {}
    for p in args.param or []:
        k, _, v = p.partition("=") if "=" in p else (p, None, None)
        params[k] = _coerce(v)
    for k, v in (args.p or []):
        params[k] = _coerce(v)
    out = run_notebook(args.name, params, output=args.output)
    print(f"executed -> {out}")
    return 0


def _coerce(v):
    if v is None:
        return None
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


def cmd_dashboard(args) -> int:
    import subprocess
    from pathlib import Path
    app = Path(__file__).resolve().parent.parent / "dashboards" / "parity.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.headless", "true" if args.headless else "false"]
    if args.db:
        cmd += ["--", "--db", args.db]
    print(" ".join(cmd))
    return subprocess.call(cmd)


def cmd_demo(args) -> int:
    """The main job: parity of the embedded default model on every backend here, stored; then the dashboard."""
    pargs = argparse.Namespace(model=args.model, backends="all", dtypes="float32,bfloat16",
                               reference="torch:cpu:float64", prompt=None, decode_steps=4, references="hf",
                               db=args.db, no_store=False, heatmap=None, json=None)
    rc = cmd_parity(pargs)
    try:
        from .bench import bench
        res = bench(args.model, backends="all", dtypes=["float32", "bfloat16"], prompt_len=64, gen_len=32,
                    repeats=2, db=args.db)
        print(res.table())
    except Exception as e:  # the dashboard still shows parity
        print(f"benchmark skipped: {e}", file=sys.stderr)
    if args.no_dashboard:
        return rc
    return cmd_dashboard(argparse.Namespace(port=args.port, headless=True, db=args.db))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="workbench", description="Gemma Workbench: one Gemma over torch and MLX, "
                                 "per-layer parity and throughput")
    sub = ap.add_subparsers(dest="cmd", required=True)

    sub.add_parser("info", help="versions, backends and devices").set_defaults(fn=cmd_info)

    p = sub.add_parser("parity", help="per-layer comparison of backends x dtypes against float64")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF dir, .gguf, or registered name (default %(default)s)")
    p.add_argument("--backends", default="all", help="'all' or a comma list, e.g. torch:cpu,mlx:cpu")
    p.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16,float16")
    p.add_argument("--reference", default="torch:cpu:float64")
    p.add_argument("--references", default="", help="independent references to include: hf,llamacpp")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of a text prompt")
    p.add_argument("--tolerance", action="append", help="override, e.g. float32=1e-5 or mlx:gpu:float32=1e-2")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--db", default=None, help="results database (default $WORKBENCH_DB or the user data dir)")
    p.add_argument("--no-store", action="store_true")
    p.add_argument("--heatmap", default=None, help="write a per-layer heatmap PNG here")
    p.add_argument("--json", default=None, help="write per-tap rows as JSON here")
    p.set_defaults(fn=cmd_parity)

    g = sub.add_parser("generate", help="stream a continuation and print tokens/s")
    g.add_argument("prompt")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--backend", default="torch:cpu")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    g.add_argument("--quiet", action="store_true", help="do not echo the prompt")
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="prefill/decode throughput per backend x dtype (pp/tg)")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--backends", default="all")
    b.add_argument("--dtypes", default="float32")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--gen-len", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--peers", action="store_true", help="also measure HF transformers, mlx-lm, llama.cpp")
    b.add_argument("--plain", action="store_true", help="plain decode path (no compile / static cache)")
    b.add_argument("--baseline", default=None, help="run id to compare against (flags regressions)")
    b.add_argument("--db", default=None)
    b.add_argument("--no-store", action="store_true")
    b.add_argument("--json", default=None)
    b.add_argument("--csv", default=None)
    b.set_defaults(fn=cmd_bench)

    n = sub.add_parser("notebooks", help="run a notebook with papermill")
    nsub = n.add_subparsers(dest="nbcmd", required=True)
    nr = nsub.add_parser("run", help="workbench notebooks run parity -p model gemma3-270m -p backends '[\"torch:cpu\"]'")
    nr.add_argument("name", help="parity | throughput | explore_layers | path to .ipynb")
    nr.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), help="parameter (JSON or string)")
    nr.add_argument("--param", action="append", help="NAME=VALUE")
    nr.add_argument("-o", "--output", default=None)
    nr.set_defaults(fn=cmd_notebooks)

    d = sub.add_parser("dashboard", help="streamlit run dashboards/parity.py")
    d.add_argument("--port", type=int, default=8501)
    d.add_argument("--db", default=None)
    d.add_argument("--headless", action="store_true")
    d.set_defaults(fn=cmd_dashboard)

    m = sub.add_parser("demo", help="the main job: parity + bench of the default model, then the dashboard")
    m.add_argument("--model", default=DEFAULT_MODEL)
    m.add_argument("--db", default=None)
    m.add_argument("--port", type=int, default=8501)
    m.add_argument("--no-dashboard", action="store_true")
    m.set_defaults(fn=cmd_demo)

    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"workbench {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

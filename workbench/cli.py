"""The ``workbench`` command: info, parity, generate, bench, notebooks, dashboard, demo.

One parser (:func:`build_parser`) holds every subcommand and its defaults. Each subcommand is declared by an
``_add_<name>(sub)`` function listed in ``SUBCOMMANDS``; to add one, write its ``_add_`` function and its
``cmd_`` function and append the former to ``SUBCOMMANDS``. Commands that run other commands (``demo``) go
through the same parser (:func:`parse`), so their arguments can't drift from the real ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_PORT = 8501


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


# ============================================================================ argument types
def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {v}")
    return v


def _pos_int(s: str) -> int:
    v = _nonneg_int(s)
    if v == 0:
        raise argparse.ArgumentTypeError("expected a whole number >= 1, got 0")
    return v


def _token_ids(s: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (argparse type of --prompt-ids)."""
    parts = [x.strip() for x in s.split(",") if x.strip()]
    try:
        ids = [int(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 2,651,6037, got {s!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id, e.g. 2,651,6037")
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {min(ids)}")
    return ids


def _default_port() -> int:
    v = os.environ.get("WORKBENCH_PORT")
    if not v:
        return DEFAULT_PORT
    try:
        return int(v)
    except ValueError:
        raise SystemExit(f"workbench: error: WORKBENCH_PORT must be a port number, not {v!r}") from None


# ============================================================================ commands
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
    try:
        from . import resources
        print(f"dashboard: {resources.dashboard_path()}")
        print(f"notebooks: {resources.notebook_dir()}")
    except Exception as e:
        print(f"package data: {e}")
    return 0


def cmd_parity(args) -> int:
    from .comparison import compare     # wb.compare: against= / --nproc dispatched there
    refs = "auto" if args.references == "auto" else [r for r in (args.references or "").split(",") if r]
    prompt = args.prompt_ids if args.prompt_ids is not None else args.prompt
    tols = {}
    for t in args.tolerance or []:
        key, _, val = t.partition("=")
        parts = key.split(":")
        try:
            tols[(":".join(parts[:-1]), parts[-1]) if len(parts) > 1 else key] = float(val)
        except ValueError:
            raise ValueError(f"--tolerance {t!r}: expected KEY=NUMBER, e.g. float32=1e-5 or "
                             "mlx:gpu:float32=1e-2") from None
    model = None if getattr(args, "against", None) and args.model == DEFAULT_MODEL else args.model
    rep = compare(model, backends=args.backends, dtypes=args.dtypes, reference=args.reference,
                  prompt=prompt, decode_steps=args.decode_steps, references=refs, db=args.db,
                  store=not args.no_store, progress=True, tolerances=tols or None,
                  anchor=not getattr(args, "no_anchor", False),
                  against=getattr(args, "against", None), world=getattr(args, "nproc", 1),
                  decode=getattr(args, "decode", "plain"))
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
    if (args.prompt is None) == (args.prompt_ids is None):
        raise ValueError("give the prompt as text (workbench generate \"Once upon a time\") or as token ids "
                         "(--prompt-ids 2,651,6037), not both" if args.prompt is not None else
                         "no prompt: give text (workbench generate \"Once upon a time\") or token ids "
                         "(--prompt-ids 2,651,6037)")
    m = load(args.model, backend=args.backend, dtype=args.dtype, quant=args.quant)
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    t0 = time.perf_counter()
    it = m.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=True, chat=args.chat)
    sep = ""
    if m.tokenizer is None:          # no tokenizer: the pieces are token ids; keep them apart
        sep = " "
        if not args.quiet:
            print(" ".join(map(str, prompt)) + " ->", end="", flush=True)
    elif not args.quiet:
        print(prompt if isinstance(prompt, str) else m.tokenizer.decode(prompt), end="", flush=True)
    for piece in it:
        print(sep + piece, end="", flush=True)
    print()
    st = getattr(m, "last_stats", {})
    print(f"[{m.backend} {m.dtype}] prompt {st.get('prompt_tokens')} tok at {st.get('prompt_tok_s', 0):.1f} tok/s, "
          f"generated {st.get('generated_tokens', 0)} tok at {st.get('gen_tok_s', float('nan')):.1f} tok/s, "
          f"ttft {st.get('ttft_s', 0) * 1000:.0f} ms, total {time.perf_counter() - t0:.2f}s, "
          f"decode route: {st.get('route')}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench import bench
    res = bench(args.model, backends=args.backends, dtypes=args.dtypes, prompt_len=args.prompt_len,
                gen_len=args.gen_len, repeats=args.repeats, peers=args.peers, db=args.db, store=not args.no_store,
                baseline=args.baseline, fast=not args.plain, quant=args.quant)
    print(res.table())
    if args.json:
        res.to_frame().to_json(args.json, orient="records", indent=1)
        print(f"json written to {args.json}")
    if args.csv:
        res.to_frame().to_csv(args.csv, index=False)
        print(f"csv written to {args.csv}")
    if res.run_id:
        print(f"stored run {res.run_id}")
    regs = res.regressions
    n_regs = 0 if regs is None else len(regs)
    if args.baseline:
        print(f"baseline {res.meta.get('baseline', args.baseline)}: "
              + (f"{n_regs} regression(s) (throughput more than 5 % below)" if n_regs else "no regressions"))
    return 1 if n_regs else 0


def cmd_notebooks(args) -> int:
    from .notebooks import run_notebook
    params = {}
    for p in args.param or []:
        k, _, v = p.partition("=") if "=" in p else (p, None, None)
        params[k] = _coerce(v)
    for k, v in (args.p or []):
        params[k] = _coerce(v)
    from .notebooks import NotebookCellError
    try:
        out = run_notebook(args.name, params, output=args.output)
    except NotebookCellError as e:      # the failing cell and its error, not papermill's traceback
        print(f"workbench notebooks run: {e}", file=sys.stderr)
        return 1
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
    from . import resources
    app = resources.dashboard_path()
    # always headless for Streamlit: its non-headless first run stops to ask for an e-mail address on stdin
    # (and exits when there is none); the browser is opened here instead, once the server answers
    cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
           "--server.address", args.address, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    if args.db:
        cmd += ["--", "--db", args.db]
    print(" ".join(cmd))
    host = "localhost" if args.address in ("127.0.0.1", "localhost", "0.0.0.0") else args.address
    url = f"http://{host}:{args.port}"
    print(f"dashboard: {url}  (Ctrl-C stops it)", flush=True)
    display = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if not args.headless and display:      # as Streamlit does: no browser without a display
        _open_browser_when_up(url)
    return subprocess.call(cmd)


def _open_browser_when_up(url: str, timeout: float = 120.0) -> None:
    """Open ``url`` in the user's browser once ``url/_stcore/health`` answers (a daemon thread; gives up quietly)."""
    import threading
    import urllib.request
    import webbrowser

    def wait_and_open():
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                with urllib.request.urlopen(url.replace("localhost", "127.0.0.1") + "/_stcore/health", timeout=2):
                    webbrowser.open(url)
                    return
            except OSError:
                time.sleep(0.5)

    threading.Thread(target=wait_and_open, daemon=True).start()


def cmd_demo(args) -> int:
    """The main job: parity of the embedded default model on every backend here (anchor, float64 and HF as
    references), stored; a short benchmark, stored; then the dashboard on both. Every step is parsed by the
    real parser, so it runs with exactly the defaults of ``workbench parity`` / ``bench`` / ``dashboard``."""
    import importlib.util
    db = ["--db", args.db] if args.db else []
    refs = "hf"
    if importlib.util.find_spec("transformers") is None:
        refs = ""
        print("demo: HF transformers is not installed, so the comparison is against float64 only "
              "(pip install 'gemma-workbench[reference]' adds HF)", file=sys.stderr)
    print(f"== demo 1/3: parity of {args.model}", flush=True)
    ids = ["--prompt-ids", ",".join(map(str, args.prompt_ids))] if args.prompt_ids else []
    pargs = parse(["parity", "--model", args.model, "--dtypes", "float32,bfloat16", "--references", refs, *ids, *db])
    prc = pargs.fn(pargs)
    print(f"== demo 2/3: decode throughput of {args.model}", flush=True)
    bargs = parse(["bench", "--model", args.model, "--dtypes", "float32,bfloat16", "--prompt-len", "64",
                   "--gen-len", "32", "--repeats", "2", *db])
    try:
        brc = bargs.fn(bargs)
    except Exception as e:  # the dashboard still shows parity; the exit code says what failed
        print(f"demo: the benchmark failed: {type(e).__name__}: {e}", file=sys.stderr)
        brc = 1
    rc = prc or brc
    from .runs import default_path
    print(f"== demo: parity {'PASSED' if prc == 0 else 'FAILED'}, benchmark {'done' if brc == 0 else 'FAILED'}; "
          f"results store {args.db or default_path()}", flush=True)
    if args.no_dashboard:
        return rc
    print("== demo 3/3: dashboard", flush=True)
    dargs = parse(["dashboard", "--headless", "--port", str(args.port), *db])
    drc = dargs.fn(dargs)
    return rc or drc


# ============================================================================ the parser
def _add_info(sub):
    sub.add_parser("info", help="versions, backends and devices").set_defaults(fn=cmd_info)


def _add_parity(sub):
    p = sub.add_parser("parity", help="per-layer comparison of backends x dtypes against float64")
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF dir, .gguf, or registered name (default %(default)s; "
                   "with --against, the default means the artifact's own model)")
    p.add_argument("--backends", default="all", help="'all' or a comma list, e.g. torch:cpu,mlx:cpu")
    p.add_argument("--dtypes", default="float32", help="comma list: float32,bfloat16,float16")
    p.add_argument("--reference", default="torch:cpu:float64")
    p.add_argument("--references", default="auto",
                   help="independent references beside the anchor: hf,llamacpp; 'auto' (default): llamacpp for a "
                        "GGUF where installed; one named here that cannot run fails the run")
    p.add_argument("--no-anchor", action="store_true",
                   help="skip the anchor (the float64 reference vs HF transformers float64): the report then says "
                        "UNANCHORED and passes on the backends alone")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", type=_token_ids, default=None,
                   help="comma-separated token ids instead of a text prompt")
    p.add_argument("--tolerance", action="append", help="override, e.g. float32=1e-5 or mlx:gpu:float32=1e-2")
    p.add_argument("--decode-steps", type=_nonneg_int, default=4)
    p.add_argument("--decode", choices=["plain", "fast"], default="plain",
                   help="decode-phase route: plain per-token forward (default) or the fast kernels m.generate runs "
                        "(Triton step / MLX CUDA kernels / CPU GEMV), compared per layer, teacher-forced")
    p.add_argument("--db", default=None, help="results database (default $WORKBENCH_DB or the user data dir)")
    p.add_argument("--no-store", action="store_true")
    p.add_argument("--heatmap", default=None, help="write a per-layer heatmap PNG here")
    p.add_argument("--json", default=None, help="write per-tap rows as JSON here")
    p.add_argument("--against", default=None, metavar="FILE",
                   help="compare with a reference artifact (workbench reference export) instead of running the reference here; refused if its weight/config/tokenizer hashes differ")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="shard the reference over N processes (torchrun; gloo on CPUs, NCCL for a torch:cuda reference)")
    p.set_defaults(fn=cmd_parity)
    return p


def _add_generate(sub):
    g = sub.add_parser("generate", help="stream a continuation and print tokens/s")
    g.add_argument("prompt", nargs="?", default=None, help="text prompt (or use --prompt-ids)")
    g.add_argument("--prompt-ids", type=_token_ids, default=None,
                   help="comma-separated token ids instead of text (checkpoints without a tokenizer)")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--backend", default="torch:cpu")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--max-new-tokens", type=_nonneg_int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=_pos_int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in Gemma's chat template")
    g.add_argument("--quiet", action="store_true", help="do not echo the prompt")
    g.add_argument("--quant", choices=("keep", "keep-exact"), default=None, help=_QUANT_HELP)
    g.set_defaults(fn=cmd_generate)
    return g


_QUANT_HELP = ("a GGUF's weights kept in its quantised blocks (torch:cpu, float32): keep = 8-bit activations as "
               "llama.cpp, keep-exact = float32 activations; default: dequantised on load")


def _add_bench(sub):
    b = sub.add_parser("bench", help="prefill/decode throughput per backend x dtype (pp/tg)")
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--backends", default="all")
    b.add_argument("--dtypes", default="float32")
    b.add_argument("--prompt-len", type=_pos_int, default=128)
    b.add_argument("--gen-len", type=_pos_int, default=64)
    b.add_argument("--repeats", type=_pos_int, default=3)
    b.add_argument("--peers", action="store_true", help="also measure HF transformers, mlx-lm, llama.cpp")
    b.add_argument("--plain", action="store_true", help="plain decode path (no compile / static cache)")
    b.add_argument("--quant", choices=("keep", "keep-exact"), default=None, help=_QUANT_HELP)
    b.add_argument("--baseline", default=None, help="stored bench run id (or unique prefix) to compare against: "
                   "exit code 1 when a throughput is more than 5 %% below it")
    b.add_argument("--db", default=None)
    b.add_argument("--no-store", action="store_true")
    b.add_argument("--json", default=None)
    b.add_argument("--csv", default=None)
    b.set_defaults(fn=cmd_bench)
    return b


def _add_notebooks(sub):
    n = sub.add_parser("notebooks", help="run a notebook with papermill")
    nsub = n.add_subparsers(dest="nbcmd", required=True)
    nr = nsub.add_parser("run", help="workbench notebooks run parity -p model gemma3-270m -p backends '[\"torch:cpu\"]'")
    nr.add_argument("name", help="parity | throughput | explore_layers | path to .ipynb")
    nr.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), help="parameter (JSON or string)")
    nr.add_argument("--param", action="append", help="NAME=VALUE")
    nr.add_argument("-o", "--output", default=None)
    nr.set_defaults(fn=cmd_notebooks)
    return n


def _serve_args(p, address: bool = False):
    """--port (and --address) and --db of the commands that serve the dashboard."""
    p.add_argument("--port", type=int, default=_default_port(), help="default $WORKBENCH_PORT or %(default)s")
    if address:
        p.add_argument("--address", default="127.0.0.1", help="interface to listen on (default loopback; 0.0.0.0 "
                       "serves other machines)")
    p.add_argument("--db", default=None, help="results database (default $WORKBENCH_DB or the user data dir)")


def _add_dashboard(sub):
    d = sub.add_parser("dashboard", help="the Streamlit dashboard of the results store")
    _serve_args(d, address=True)
    d.add_argument("--headless", action="store_true", help="do not open a browser")
    d.set_defaults(fn=cmd_dashboard)
    return d


def _add_demo(sub):
    m = sub.add_parser("demo", help="the main job: parity + bench of the default model, then the dashboard")
    m.add_argument("--model", default=DEFAULT_MODEL)
    m.add_argument("--prompt-ids", type=_token_ids, default=None,
                   help="parity prompt as token ids (checkpoints without a tokenizer)")
    _serve_args(m)
    m.add_argument("--no-dashboard", action="store_true")
    m.set_defaults(fn=cmd_demo)
    return m


def _add_diverge(sub):
    from .diverge import add_cli    # the subcommand lives beside wb.diverge
    return add_cli(sub)


def _add_lab(sub):
    from .lab import add_cli        # the subcommand lives beside the lab launcher
    return add_cli(sub)


def _add_runs(sub):
    from .runs_cli import add_cli   # workbench runs list/show/load/export/import
    return add_cli(sub)


def _add_make_random(sub):
    from .make_random import add_cli    # workbench make-random NAME|CONFIG OUT
    return add_cli(sub)


def _add_reference(sub):
    from .comparison import add_cli     # workbench reference export [--nproc N]
    return add_cli(sub)


SUBCOMMANDS = [_add_info, _add_parity, _add_diverge, _add_generate, _add_bench, _add_notebooks, _add_dashboard,
               _add_demo, _add_lab, _add_runs, _add_make_random, _add_reference]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description="Gemma Workbench: one Gemma over torch and MLX, "
                                 "per-layer parity and throughput")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return ap


def parse(argv) -> argparse.Namespace:
    """``argv`` (a list of strings) through the one parser: the Namespace ``workbench ARGV...`` would get."""
    return build_parser().parse_args(list(argv))


def _user_errors() -> tuple:
    """Exceptions that mean bad input (file, id, value): one line on stderr and exit code 2, no traceback."""
    errs = [ValueError, FileNotFoundError, NotImplementedError]
    try:
        from .runs import RunStoreError, UnknownRunError
        errs += [RunStoreError, UnknownRunError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"workbench {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Throughput: prefill (pp) and decode (tg) per backend x dtype, with peers measured in the same run.

Method (llama-bench / mlx_lm.benchmark style): fixed random prompt ids, EOS ignored, one warm-up run
(which also pays for compilation), then ``repeats`` timed runs; per run: time to first token (prefill +
first argmax), prefill tokens/s, decode µs/step and tokens/s (device synchronised at the end of the
timed region only — the fast path does not sync per token). Achieved GB/s = bytes read per decode step
(all weights once — the tied head reads the whole embedding — plus the KV cache in use) × steps/s;
the fraction is against the device's memory bandwidth, whose source is reported with it.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from . import backends as _bk
from .generate import default_compile
from .progress import Progress, ProgressArg, as_progress

# Peak memory bandwidth of known accelerators (vendor spec sheets), GB/s.
GPU_BANDWIDTH_GBS = {
    "H100 80GB HBM3": 3350.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
    "H200": 4800.0, "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0, "A100-SXM4-40GB": 1555.0,
    "L40S": 864.0, "A10G": 600.0, "RTX 4090": 1008.0,
}


@dataclass
class BenchResult:
    rows: list[dict]
    meta: dict
    run_id: str | None = None
    regressions: object = None
    comparison: object = None     # with a baseline: RunStore.compare_bench's frame (all rows)
    skipped: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def ratios(self):
        """workbench / peer decode and prefill speed, same backend (llama.cpp: same device class) and dtype
        (llama.cpp runs its GGUF quantisation: compared with every workbench dtype on that device)."""
        import pandas as pd
        df = self.to_frame()
        if df.empty or "impl" not in df:
            return pd.DataFrame()
        ok = df[df["status"] == "ok"]
        ours = ok[ok["impl"] == "workbench"]
        out = []
        for _, p in ok[ok["impl"] != "workbench"].iterrows():
            if p["impl"] == "llama.cpp":
                dev = p["backend"].split(":")[-1]
                same = ours[ours["backend"].map(lambda b: ("cpu" if b.endswith("cpu") else "gpu") == dev)]
            else:
                same = ours[(ours["backend"] == p["backend"]) & (ours["dtype"] == p["dtype"])]
            for _, o in same.iterrows():
                out.append(dict(backend=o["backend"], dtype=o["dtype"], peer=p["impl"], peer_dtype=p["dtype"],
                                decode_ratio=o["decode_tok_s"] / p["decode_tok_s"] if p["decode_tok_s"] else None,
                                prefill_ratio=o["prefill_tok_s"] / p["prefill_tok_s"] if p["prefill_tok_s"] else None))
        return pd.DataFrame(out)

    def table(self) -> str:
        lines = [f"Throughput of {self.meta.get('model')}: pp{self.meta.get('prompt_len')} / "
                 f"tg{self.meta.get('gen_len')}, batch 1, {self.meta.get('repeats')} repeats after warm-up "
                 f"({self.meta.get('machine', {}).get('cpu', '')})"]
        hdr = (f"{'impl':16s} {'backend':12s} {'dtype':9s} {'ttft ms':>8s} {'pp tok/s':>9s} {'tg tok/s':>9s} "
               f"{'µs/step (p10-p90)':>22s} {'GB/s':>7s} {'of limit':>8s} {'peak MiB':>9s}")
        lines += [hdr, "-" * len(hdr)]
        for r in self.rows:
            if r["status"] != "ok":
                lines.append(f"{r['impl']:16s} {r['backend']:12s} {r['dtype']:9s} skipped: {r.get('reason')}")
                continue
            spread = f"{r['decode_us_median']:.0f} ({r['decode_us_p10']:.0f}-{r['decode_us_p90']:.0f})"
            frac = f"{100 * r['bw_fraction']:.0f}%" if r.get("bw_fraction") else "-"
            gbs = f"{r['gbps']:.1f}" if r.get("gbps") else "-"
            pm = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "-"
            lines.append(f"{r['impl']:16s} {r['backend']:12s} {r['dtype']:9s} {1000 * r['ttft_s']:8.1f} "
                         f"{r['prefill_tok_s']:9.1f} {r['decode_tok_s']:9.1f} {spread:>22s} {gbs:>7s} {frac:>8s} {pm:>9s}")
        bw = {r["backend"]: (r.get("bw_limit_gbps"), r.get("bw_source")) for r in self.rows if r.get("bw_limit_gbps")}
        for b, (v, src) in bw.items():
            lines.append(f"bandwidth limit {b}: {v:.0f} GB/s ({src})")
        kern = {(r["backend"], r["dtype"]): r.get("kernels") for r in self.rows
                if r.get("kernels") and r["impl"] == "workbench"}
        for (b, d), k in kern.items():
            lines.append(f"decode kernels {b} {d}: {k}")
        for r in self.rows:
            if r["status"] == "ok" and r["impl"] != "workbench" and (r.get("reason") or r.get("route")):
                lines.append(f"peer {r['impl']} {r['backend']} {r['dtype']}: {r.get('reason') or r.get('route')}")
        rt = self.ratios()
        if not rt.empty:
            lines.append("workbench / peer:")
            for _, r in rt.iterrows():
                lines.append(f"  {r['backend']:12s} {r['dtype']:9s} vs {r['peer']:16s} ({r['peer_dtype']}): decode "
                             f"{r['decode_ratio']:.2f}x, prefill {r['prefill_ratio']:.2f}x")
        if self.regressions is not None and len(self.regressions):
            lines.append("REGRESSIONS against the baseline:")
            lines.append(self.regressions.to_string(index=False))
        return "\n".join(lines)

    def __repr__(self):
        return self.table()


_CPU_BW: dict = {}


def cpu_bandwidth_gbs() -> tuple[float, str]:
    """Read bandwidth measured here: a 512 MiB float32 array summed by torch (all threads), best of 3."""
    if "v" in _CPU_BW:
        return _CPU_BW["v"]
    try:
        import torch
        a = torch.ones(128 * 2**20, dtype=torch.float32)
        a.sum()
        best = 1e9
        for _ in range(3):
            t = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t)
        v = a.numel() * 4 / best / 1e9
        src = f"measured here: torch sum over 512 MiB, {torch.get_num_threads()} threads"
    except Exception:
        a = np.ones(64 * 2**20, dtype=np.float32)
        t = time.perf_counter()
        a.sum()
        v = a.nbytes / (time.perf_counter() - t) / 1e9
        src = "measured here: numpy sum over 256 MiB"
    _CPU_BW["v"] = (v, src)
    return v, src


def device_bandwidth(spec, device_name: str) -> tuple[float | None, str]:
    if spec.device in ("cuda", "gpu") and device_name:
        for k, v in GPU_BANDWIDTH_GBS.items():
            if k.lower() in device_name.lower():
                return v, f"vendor spec for {k}"
        return None, f"unknown device {device_name!r}: no bandwidth figure"
    if spec.device == "cpu":
        return cpu_bandwidth_gbs()
    return None, "no bandwidth figure for this device"


def device_name(spec) -> str:
    if spec.framework == "torch" and spec.device == "cuda":
        import torch
        return torch.cuda.get_device_name(spec.index or 0)
    if spec.framework == "mlx" and spec.device == "gpu":
        try:
            import mlx.core as mx
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            return str(info.get("device_name") or info.get("architecture") or "mlx gpu")
        except Exception:
            return "mlx gpu"
    try:
        from .runs import machine_info
        return machine_info().get("cpu") or "cpu"
    except Exception:
        return "cpu"


def bytes_per_step(model, context: int) -> int:
    cfg = model.config
    el = {"float64": 8, "float32": 4}.get(model.dtype, 2)
    n = model.n_params
    if cfg.has_ple:   # only one row of the per-layer embedding is read per token
        V, LP = model.w["embed_tokens_per_layer.weight"].shape
        n -= V * LP - LP
    kv = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.kv_shared(i):
            continue
        w = cfg.sliding_window(i)
        ctx = min(context, w) if w else context
        per = cfg.num_kv_heads(i) * cfg.head_dim(i) * el
        kv += ctx * (per if cfg.k_eq_v(i) else 2 * per)
    if getattr(model.ops, "quant", None):       # GGUF blocks kept quantised: their own bytes (backends/quant.py)
        return model.weight_bytes + kv
    return n * el + kv


def _peak_mem(ops) -> int | None:
    v = ops.peak_memory() if hasattr(ops, "peak_memory") else None
    if v:
        return v
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # process-wide on CPU (Linux: KiB)


def _one_run(model, ids, gen_len, fast, compile, state: dict):
    """One timed prefill + decode. fast: exactly what ``m.generate`` runs (``generate_iter``, greedy, EOS ignored:
    the decode engine's route, its engine and cache reused across runs so what it compiled or captured is kept;
    its setup — compile, graph capture — is timed apart, as ``m.generate`` reports it). Else the plain path: one
    ``model.forward`` per token."""
    ops = model.ops
    if fast:
        from .generate import generate_iter
        st: dict = {}
        ops.synchronize()
        toks = list(generate_iter(model, ids[0].tolist(), gen_len + 1, ignore_eos=True, stats=st,
                                  compile=compile))
        state["route"], state["route_reason"] = st.get("route"), st.get("route_reason")
        return dict(ttft=st["ttft_s"], prefill=st["prefill_s"], decode=st["decode_s"], steps=st["decode_steps"],
                    tokens=toks[1:], setup=st.get("setup_s", 0.0))
    cache = state.get("cache")
    if cache is None:
        cache = state["cache"] = model.new_cache(batch=1, max_len=ids.shape[1] + gen_len + 1)
    else:
        cache.reset()
    ops.synchronize()
    t0 = time.perf_counter()
    logits = model.forward(ids, cache=cache, last_only=True).logits
    first = int(np.argmax(logits[0, -1]))
    t1 = time.perf_counter()
    t2 = time.perf_counter()
    tok = first
    toks = []
    for _ in range(gen_len):
        lg = model.forward(np.asarray([[tok]]), cache=cache, last_only=True).logits
        tok = int(np.argmax(lg[0, -1]))
        toks.append(tok)
    ops.synchronize()
    t3 = time.perf_counter()
    return dict(ttft=t1 - t0, prefill=t1 - t0, decode=(t3 - t2), steps=gen_len, tokens=toks)


def bench_model(model, prompt_len=128, gen_len=64, repeats=3, fast=True, compile=None, progress: ProgressArg = True,
                label="") -> dict:
    """One model's warm-up and ``repeats`` timed runs; each is reported to ``progress`` as a note (a
    ``workbench.progress.Progress`` of the caller's run, or True / a callback / False)."""
    prog = as_progress(progress, 1)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    ids = rng.integers(min(100, V - 1), V, size=(1, prompt_len))
    prog.note(f"{label} warm-up{' (compiling)' if compile else ''} ...")
    state: dict = {}
    _one_run(model, ids, gen_len, fast, compile, state)
    runs = []
    for r in range(repeats):
        runs.append(_one_run(model, ids, gen_len, fast, compile, state))
        x = runs[-1]
        prog.note(f"{label} run {r + 1}/{repeats}: pp {prompt_len / x['prefill']:.1f} tok/s, "
                  f"tg {x['steps'] / x['decode']:.1f} tok/s")
    us = [1e6 * x["decode"] / x["steps"] for x in runs]
    pp = [prompt_len / x["prefill"] for x in runs]
    tt = [x["ttft"] for x in runs]
    med_us = statistics.median(us)
    return dict(route=state.get("route") or "plain", route_reason=state.get("route_reason"),
                compiled=bool(compile) and "compile" in (state.get("route_reason") or ""),
                ttft_s=statistics.median(tt), prefill_tok_s=statistics.median(pp), decode_us_median=med_us,
                decode_us_p10=float(np.percentile(us, 10)), decode_us_p90=float(np.percentile(us, 90)),
                decode_tok_s=1e6 / med_us, tokens=runs[-1]["tokens"])


def bench(source="gemma3-270m", backends=None, dtypes=None, prompt_len: int = 128, gen_len: int = 64,
          repeats: int = 3, peers: bool = False, db=None, store: bool = True, baseline: str | None = None,
          fast: bool = True, compile: bool | None = None, progress: ProgressArg = True,
          quant: str | None = None) -> BenchResult:
    """Prefill/decode throughput of every backend x dtype (and, with peers=True, HF transformers, mlx-lm
    and llama.cpp on the same weights); stored in the results store; compared with ``baseline`` (a run id).
    quant: "keep" / "keep-exact" — a GGUF's weights kept in its blocks (torch:cpu float32 only; the rows' dtype
    reads e.g. ``float32+keep``; other targets are skipped with the reason).
    progress: True prints "[i/N] what" lines to stderr; a callable gets (step, total, what) (the same as
    ``wb.compare``'s and ``wb.diverge``'s); False: silent."""
    from .loader import build_model, read_source, source_hash
    from .parity import _targets, check_target

    targets = _targets(backends, dtypes)
    base_run = _load_baseline(baseline, db) if baseline else None   # a bad id fails before anything runs
    prog = Progress(progress, len(targets) + (1 if peers else 0))
    prog.note(f"loading {source}")
    from .backends import quant as _quant
    quant = _quant.check_mode(quant)
    ckpt = read_source(source, dtype="float32", progress=prog.prints, quant=quant)
    cfg, tensors, path, tok = ckpt
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for b, d in targets:
        base = dict(backend=b, dtype=d, impl="workbench", prompt_len=prompt_len, gen_len=gen_len)
        try:
            spec, _, _ = check_target(b, d)
        except _bk.BackendError as e:
            skipped[f"{b}:{d}"] = str(e)
            rows.append(dict(base, status="skipped", reason=str(e)))
            prog.step(f"{b} {d} skipped: {e}")
            continue
        prog.note(f"{b} {d}: building the model")
        ops = _bk.get_ops(b, d)
        if quant:
            try:
                _quant.check_ops(ops)
            except (ValueError, RuntimeError) as e:
                rows.append(dict(base, status="skipped", reason=str(e)))
                prog.step(f"{b} {d} skipped: {e}")
                continue
            ops.quant, ops.quant_act8 = quant, _quant.MODES[quant]
            base["dtype"] = f"{d}+{quant}"
        m = build_model(ckpt, ops, source)
        use_compile = compile if compile is not None else default_compile(spec)
        note = None
        try:
            res = bench_model(m, prompt_len, gen_len, repeats, fast=fast, compile=use_compile and fast,
                              progress=prog, label=f"{b} {d}")
        except Exception as e:
            if not (use_compile and fast):
                raise
            note = f"compiled step failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); eager static path"
            prog.note(f"{b} {d}: {note}")
            use_compile = False
            res = bench_model(m, prompt_len, gen_len, repeats, fast=fast, compile=False, progress=prog,
                              label=f"{b} {d}")
        dev = device_name(spec)
        bw, bw_src = device_bandwidth(spec, dev)
        nbytes = bytes_per_step(m, prompt_len + gen_len // 2)
        gbps = nbytes * res["decode_tok_s"] / 1e9
        rows.append(dict(base, status="ok", reason=note, ttft_s=res["ttft_s"], prefill_tok_s=res["prefill_tok_s"],
                         decode_us_median=res["decode_us_median"], decode_us_p10=res["decode_us_p10"],
                         decode_us_p90=res["decode_us_p90"], decode_tok_s=res["decode_tok_s"],
                         peak_mem_bytes=_peak_mem(m.ops), bytes_per_step=nbytes, gbps=gbps, bw_limit_gbps=bw,
                         bw_fraction=gbps / bw if bw else None, bw_source=bw_src, device=dev,
                         path="fast" + ("+compile" if res.get("compiled") else "") if fast else "plain",
                         route=res.get("route"),
                         kernels=f"{res.get('route')}: {res.get('route_reason')}" if fast else "plain forward"))
        del m
        prog.step(f"{b} {d}: pp {res['prefill_tok_s']:.1f} tok/s, tg {res['decode_tok_s']:.1f} tok/s")
    if peers:
        rows += _peer_rows(path, targets, prompt_len, gen_len, repeats, prog)
        prog.step("peers")
    import platform
    meta = dict(model=str(source), source=str(path), source_hash=source_hash(path),
                backends=sorted({b for b, _ in targets}), dtypes=sorted({d for _, d in targets}),
                prompt_len=prompt_len, gen_len=gen_len, repeats=repeats, peers=peers, fast=fast,
                skipped=skipped, device=", ".join(sorted({r.get("device") for r in rows if r.get("device")})),
                threads=os.cpu_count(), platform=platform.platform())
    res = BenchResult(rows=rows, meta=meta, skipped=skipped)
    try:
        from .runs import machine_info
        meta["machine"] = machine_info()
    except Exception:
        meta["machine"] = {}
    if store:
        from . import runs
        res.run_id = runs.save_run("bench", meta, rows, db=db, params=dict(prompt_len=prompt_len, gen_len=gen_len,
                                                                           repeats=repeats, peers=peers, fast=fast))
    if base_run is not None:
        cmp = _compare_with_baseline(res, base_run, db)
        res.comparison = cmp
        res.regressions = cmp[cmp["regression"]].reset_index(drop=True)
        meta["baseline"] = base_run.run_id
    return res


def _load_baseline(baseline: str, db):
    """The stored bench run ``baseline`` (id or unique prefix); unknown id -> UnknownRunError, another kind of
    run -> ValueError. Called before measuring, so a typo costs nothing and stores nothing."""
    from . import runs
    with runs.RunStore(db) as st:
        try:
            run = st.load(baseline)
        except runs.UnknownRunError as e:
            raise runs.UnknownRunError(f"baseline: {e} (list the stored bench runs with "
                                       "wb.runs.list(kind='bench'))") from None
    if run.kind != "bench":
        raise ValueError(f"baseline {run.run_id} is a {run.kind} run, not a bench run")
    return run


def _compare_with_baseline(res: BenchResult, base_run, db):
    """RunStore.compare_bench of this result against ``base_run``: in the store when the result was stored,
    otherwise (store=False) in a throw-away store holding copies of both runs, so the real one is not written."""
    from . import runs
    if res.run_id is not None:
        with runs.RunStore(db) as st:
            return st.compare_bench(res.run_id, base_run.run_id)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="wb-baseline-") as tmp:
        with runs.RunStore(os.path.join(tmp, "compare.sqlite")) as st:
            cur = st.save("bench", res.meta, res.rows)
            base = st.save("bench", base_run.meta, base_run.rows.to_dict("records"))
            cmp = st.compare_bench(cur, base)
    cmp.attrs.update(run_id=None, baseline_id=base_run.run_id)
    return cmp


def _peer_rows(path, targets, prompt_len, gen_len, repeats, progress) -> list[dict]:
    """Every peer of ``targets`` on the same weights (``workbench.references.peers``: HF transformers eager, HF
    with a StaticCache in CUDA graphs, transformers' own compiled static generate, mlx-lm, llama.cpp): a row each,
    measured or skipped with its reason; each peer is a note to ``progress`` (the run's Progress, or True / a
    callback / False)."""
    from .references.peers import peer_rows
    progress = as_progress(progress, 1)
    return peer_rows(path, targets, prompt_len, gen_len, repeats, note=progress.note)

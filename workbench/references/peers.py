"""The peers of ``wb.bench(..., peers=True)``: which independent engines run beside each target, and a row for
every one that could not run, with the reason.

Peers per target kind (backend without its index) and dtype, on the same weights:

* ``hf``: transformers ``generate`` (greedy, EOS suppressed), dynamic cache, ``sdpa`` attention, no compile —
  what a transformers user gets by default;
* ``hf-static-graphs`` (torch:cuda): a ``StaticCache`` and one ``torch.compile(mode="reduce-overhead",
  fullgraph=True)`` decode step replayed as a CUDA graph, gpt-fast style (``hf_static.StaticGraphDecoder``);
* ``hf+static`` (torch:cuda): transformers' own ``generate`` with a static cache and
  ``CompileConfig(mode="reduce-overhead", fullgraph=True)`` (``hf_static.bench_generate_static``);
* ``mlx-lm`` (mlx:*): mlx-lm's ``generate_step`` on the same weights (a GGUF is exported first);
* ``llama.cpp`` (per device class, cpu / gpu, GGUF sources): llama-cpp-python on the same file.

A peer that cannot run is a row with ``status="skipped"`` and a ``reason`` that starts with its kind —
``not installed:``, ``needs CUDA:``, ``not applicable:``, ``no GPU build:``, ``target unavailable:``,
``failed:``, ``not selected:`` — so a table never silently drops one. ``$WORKBENCH_PEERS`` (a comma list of the
names above) limits which peers run; the others are rows saying so.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

PEER_ROUTES = {
    "hf": "transformers generate, dynamic cache, sdpa attention, no compile",
    "hf-static-graphs": "transformers model, StaticCache, torch.compile(reduce-overhead, fullgraph) decode step "
                        "in CUDA graphs (gpt-fast style)",
    "hf+static": "transformers generate(compile_config=CompileConfig(reduce-overhead, fullgraph)) with a "
                 "StaticCache",
    "mlx-lm": "mlx-lm generate_step",
    "llama.cpp": "llama-cpp-python (llama.cpp) on the GGUF",
}


class PeerSkip(Exception):
    """A peer that cannot run here; ``str(e)`` is the reason (kind prefix included)."""


def _reason(e: BaseException) -> str:
    if isinstance(e, PeerSkip):
        msg = str(e)
    elif isinstance(e, ImportError):
        msg = f"not installed: {e}"
    else:
        msg = f"failed: {type(e).__name__}: {e}"
    return msg.splitlines()[0][:300] if msg else type(e).__name__


def _target_status(backend: str, dtype: str) -> tuple[bool, str]:
    from .. import backends as _bk
    try:
        spec = _bk.parse(backend)
        ok, why = _bk.status(backend)
        if not ok:
            return False, why
        _bk.check_dtype(dtype, spec)
    except _bk.BackendError as e:
        return False, str(e)
    return True, ""


def _row(impl, backend, dtype, prompt_len, gen_len, r: dict) -> dict:
    tg = r["decode_tok_s"]
    return dict(backend=backend, dtype=dtype, impl=impl, prompt_len=prompt_len, gen_len=gen_len, status="ok",
                reason=r.get("note"), ttft_s=r.get("ttft_s", r.get("prefill_s", float("nan"))),
                prefill_tok_s=r["prefill_tok_s"],
                decode_tok_s=tg, decode_us_median=1e6 / tg, decode_us_p10=r.get("decode_us_p10", 1e6 / tg),
                decode_us_p90=r.get("decode_us_p90", 1e6 / tg), peak_mem_bytes=r.get("peak_mem_bytes"),
                device=r.get("device"), route=PEER_ROUTES.get(impl))


def plan(path, targets):
    """``(entries, run)``: entries are (impl, backend label, dtype, job or None, reason if it cannot run) for every
    peer of ``targets``; ``run(job, prompt_len, gen_len, repeats)`` measures one job (a dict of rates)."""
    path = Path(path)
    gguf = path.suffix.lower() == ".gguf"
    by_kind: dict[str, dict[str, tuple[bool, str]]] = {}
    for b, d in targets:
        fw, dev = b.split(":")[:2]
        by_kind.setdefault(f"{fw}:{dev}", {}).setdefault(d, _target_status(b, d))
    out: list = []
    refs: dict = {}
    only = {x.strip() for x in os.environ.get("WORKBENCH_PEERS", "").split(",") if x.strip()}

    def hf_ref(kind, d):
        """One HF model per (kind, dtype), shared by the HF peers; a load failure is re-raised for each."""
        key = (kind, d)
        if key not in refs:
            if refs:                # the peers come grouped by (kind, dtype): free the previous model first
                refs.clear()
                import gc
                gc.collect()
            try:
                from .hf import HFReference
                refs[key] = HFReference(str(path), dtype=d, device=kind.split(":")[1], gguf_cache=gguf or None,
                                        attn_implementation="sdpa")
            except Exception as e:  # noqa: BLE001 - every HF peer of this kind/dtype reports it
                refs[key] = e
        if isinstance(refs[key], Exception):
            raise refs[key]
        return refs[key]

    for kind in sorted(by_kind):
        fw, dev = kind.split(":")
        for d, (ok, why) in sorted(by_kind[kind].items()):
            names = ["hf", "hf-static-graphs", "hf+static"] if fw == "torch" else ["mlx-lm"] if fw == "mlx" else []
            for impl in names:
                if only and impl not in only:
                    out.append((impl, kind, d, None, f"not selected: WORKBENCH_PEERS={','.join(sorted(only))}"))
                elif not ok:
                    out.append((impl, kind, d, None, f"target unavailable: {why}"))
                elif impl in ("hf-static-graphs", "hf+static") and dev != "cuda":
                    out.append((impl, kind, d, None, "needs CUDA: " + (
                        "CUDA graphs (torch.compile mode='reduce-overhead') exist only on torch:cuda"
                        if impl == "hf-static-graphs" else
                        "transformers compiles generate's static-cache step only on CUDA-like devices")))
                elif impl == "mlx-lm" and d == "float64":
                    out.append((impl, kind, d, None, "not applicable: MLX has no float64"))
                else:
                    out.append((impl, kind, d, (impl, kind, d), None))
    devices: dict[str, list[str]] = {}     # device class -> "" per target that ran, else why it could not
    for k, v in by_kind.items():
        dc = devices.setdefault("cpu" if k.endswith(":cpu") else "gpu", [])
        if any(ok for ok, _ in v.values()):
            dc.append("")
        else:
            dc.extend(f"{k}: {w}" for _, w in v.values())
    for dc, whys in sorted(devices.items()):
        if "" not in whys:
            out.append(("llama.cpp", f"llamacpp:{dc}", "gguf", None, f"target unavailable: {whys[0]}"))
        elif only and "llama.cpp" not in only:
            out.append(("llama.cpp", f"llamacpp:{dc}", "gguf", None,
                        f"not selected: WORKBENCH_PEERS={','.join(sorted(only))}"))
        elif not gguf:
            out.append(("llama.cpp", f"llamacpp:{dc}", "gguf", None,
                        f"not applicable: llama.cpp runs GGUF files and {path.name} is an HF checkpoint (make one: "
                        "python convert_hf_to_gguf.py DIR --outtype f16, from llama.cpp; then bench the .gguf)"))
        else:
            out.append(("llama.cpp", f"llamacpp:{dc}", "gguf", ("llama.cpp", dc, "gguf"), None))

    def run(job, prompt_len, gen_len, repeats) -> dict:
        impl, kind, d = job
        if impl == "hf":
            return hf_ref(kind, d).bench_decode(prompt_len, gen_len, repeats)
        if impl == "hf-static-graphs":
            from .hf_static import bench_static_graphs
            return bench_static_graphs(hf_ref(kind, d), prompt_len, gen_len, repeats)
        if impl == "hf+static":
            from .hf_static import bench_generate_static
            return bench_generate_static(hf_ref(kind, d), prompt_len, gen_len, repeats)
        if impl == "mlx-lm":
            from . import mlxlm
            r = mlxlm.bench(str(path), prompt_len, gen_len, repeats, dtype=d)
            if "error" in r:
                raise RuntimeError(r["error"])
            return r
        from .llamacpp import LlamaCppReference, _import_llama_cpp
        gpu = kind == "gpu"
        if gpu:
            lc = _import_llama_cpp()
            if not lc.llama_supports_gpu_offload():
                raise PeerSkip("no GPU build: this llama-cpp-python cannot offload to a GPU (a CPU-only build); "
                               "build one with CMAKE_ARGS='-DGGML_CUDA=on' (tests/tools/gpu/llamacpp_cuda.sh)")
        ref = LlamaCppReference(str(path), n_ctx=prompt_len + gen_len + 16, n_gpu_layers=-1 if gpu else 0)
        try:
            return ref.bench(prompt_len, gen_len, repeats)
        finally:
            ref.close()

    return out, run


def peer_rows(path, targets, prompt_len: int, gen_len: int, repeats: int,
              note: Callable[[str], None] | None = None) -> list[dict]:
    """Measure every peer of ``targets`` (``[(backend, dtype)]``) on ``path``; one row per peer, a skipped row with
    its reason for each that could not run. ``note`` gets a progress line per peer."""
    note = note or (lambda s: None)
    rows: list[dict] = []
    entries, run = plan(path, targets)
    for impl, backend, dtype, job, why in entries:
        base = dict(backend=backend, dtype=dtype, impl=impl, prompt_len=prompt_len, gen_len=gen_len)
        if job is None:
            note(f"peer {impl} {backend} {dtype}: skipped ({why})")
            rows.append(dict(base, status="skipped", reason=why))
            continue
        note(f"peer {impl} {backend} {dtype}" + (" (compiling, capturing CUDA graphs)" if "static" in impl else ""))
        try:
            r = run(job, prompt_len, gen_len, repeats)
            r.pop("static_compile", None)
            rows.append(_row(impl, backend, dtype, prompt_len, gen_len, r))
        except Exception as e:  # noqa: BLE001 - a peer reports, it does not end the run
            rows.append(dict(base, status="skipped", reason=_reason(e)))
            note(f"peer {impl} {backend} {dtype}: {rows[-1]['reason']}")
    return rows

"""Tensor parallelism of the one Gemma forward pass over ``torch.distributed`` (gloo on CPUs, NCCL on GPUs),
launched by ``torchrun``: for references that do not fit one device (Gemma 3 27B in float64 is ~216 GB).

The model code is the same ``workbench.model.gemma.Gemma``; three things change under N ranks:

* **Weights are sharded by role at load** (:class:`ShardPlan`), each rank reading only its slice from the
  safetensors files (``safe_open(...).get_slice``; a GGUF is dequantised once into the cache and each rank
  memory-maps and slices it):
  q_proj rows by query head, k/v_proj rows by KV head (GQA with fewer KV heads than ranks: each rank keeps the
  one KV head its query heads read, i.e. KV heads are replicated), o_proj columns by query head; gate/up rows
  and down columns by intermediate unit; the embedding (and the tied or separate head, and Gemma 4's per-layer
  embedding table) by vocabulary rows; MoE experts: every expert's gate/up rows and down columns by
  intermediate unit (each rank holds a 1/N slice of every expert, so memory and work split evenly whatever the
  routing); norms, q/k norms, the router, PLE projections and layer scalars are replicated.
  KV-shared layers read their source layer's sharded K/V; k_eq_v layers have no v_proj (nothing changes).
* **Collectives at the points the math needs them** (``ops.all_reduce`` in ``gemma.py``, identity in one
  process): after o_proj, after down_proj, after the MoE experts' sum; the vocabulary-parallel embedding is a
  masked lookup + all-reduce and the vocabulary-parallel head a matmul + all-gather (:class:`TPOps`, by the
  identity of those weight arrays).
* **Taps are gathered** (per-head taps along heads, ``mlp.hook_post`` along the intermediate axis), so every
  rank — and so rank 0's report — sees exactly what one process sees.

Entry points: ``wb.compare(..., world=N)`` / ``workbench parity --nproc N`` (the reference sharded through
``export_sharded``, chosen by :mod:`workbench.comparison`; :func:`compare` shards the torch targets too),
``workbench reference export --nproc N`` (a sharded reference written as a reference artifact,
e.g. float64 on GPUs; compare a one-GPU target with ``parity --against``), and ``python -m
workbench.distributed selftest`` (sharded vs one process, the CI test and the memory table).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DistributedError(RuntimeError):
    """A torchrun launch that failed, or a distributed setting that cannot work."""


class ShardError(ValueError):
    """A model whose shapes do not split over the requested number of ranks."""


# ------------------------------------------------------------------------------------------------ process group
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    backend: str            # "gloo" | "cpu:gloo,cuda:nccl"


_DIST: Dist | None = None


def env_world() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))))


def init(device: str = "cpu") -> Dist:
    """The process group from torchrun's env (env:// rendezvous): NCCL for CUDA devices, gloo otherwise."""
    global _DIST
    import torch
    import torch.distributed as dist
    rank, world, local = env_world()
    if _DIST is not None:
        return _DIST
    # on GPUs: NCCL for CUDA tensors and gloo for CPU ones (a CPU reference beside CUDA targets), by tensor device
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise DistributedError("WORLD_SIZE > 1 but no MASTER_ADDR: launch through torchrun "
                                   "(python -m torch.distributed.run --nproc-per-node N ...)")
        kw = {"device_id": torch.device("cuda", local)} if device == "cuda" else {}
        dist.init_process_group(backend, **kw)
    _DIST = Dist(rank, world, local, backend)
    return _DIST


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------ the plan
class ShardPlan:
    """Which slice of every canonical tensor rank ``rank`` of ``world`` holds, and the per-rank config."""

    def __init__(self, cfg, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        H, L = cfg.num_attention_heads, cfg.num_hidden_layers
        if H % world:
            raise ShardError(f"{H} query heads do not split over {world} ranks (use a divisor of {H})")
        self.Hl = H // world
        self.kv: dict[int, tuple[int, int]] = {}
        for i in range(L):
            self.kv[i] = self.kv_slice(i, rank)
            F = cfg.intermediate(i)
            if F % world:
                raise ShardError(f"layer {i}: intermediate size {F} does not split over {world} ranks")
        if cfg.arch == "gemma4" and cfg.enable_moe_block and cfg.moe_intermediate_size % world:
            raise ShardError(f"moe_intermediate_size {cfg.moe_intermediate_size} does not split over {world} ranks")
        V = cfg.vocab_size
        self.vocab = (V * rank // world, V * (rank + 1) // world) if V % world == 0 else None
        Vp = cfg.vocab_size_per_layer_input if cfg.has_ple else None
        self.ple_vocab = (Vp * rank // world, Vp * (rank + 1) // world) if Vp and Vp % world == 0 else None

    def kv_slice(self, i: int, rank: int) -> tuple[int, int]:
        """(first KV head, count) rank ``rank`` holds at layer i."""
        kv, N = self.cfg.num_kv_heads(i), self.world
        if kv % N == 0:
            return rank * (kv // N), kv // N
        if N % kv == 0:           # fewer KV heads than ranks: the one KV head this rank's query heads read
            return rank * kv // N, 1
        raise ShardError(f"layer {i}: {kv} KV heads neither split over nor divide {N} ranks")

    # per-rank configs: shapes of the shards (checked by the model) and the model's (full vocabulary)
    def model_config(self):
        cfg = self.cfg
        over = {i: {"head_dim": cfg.head_dim(i), "num_key_value_heads": self.kv[i][1]}
                for i in range(cfg.num_hidden_layers)}
        kw = dict(num_attention_heads=self.Hl, num_key_value_heads=self.kv[0][1], per_layer_overrides=over,
                  intermediate_size=cfg.intermediate_size // self.world)
        if cfg.arch == "gemma4" and cfg.enable_moe_block:
            kw["moe_intermediate_size"] = cfg.moe_intermediate_size // self.world
        return dataclasses.replace(cfg, **kw)

    def shard_config(self):
        c = self.model_config()
        kw = {}
        if self.vocab:
            kw["vocab_size"] = self.vocab[1] - self.vocab[0]
        if self.ple_vocab:
            kw["vocab_size_per_layer_input"] = self.ple_vocab[1] - self.ple_vocab[0]
        return dataclasses.replace(c, **kw)

    def pieces(self, name: str) -> tuple[int, list[tuple[int, int]]] | None:
        """(axis, [(start, stop), ...]) of the canonical tensor ``name`` this rank holds (pieces joined along
        the axis), or None for a replicated tensor."""
        r, N, cfg = self.rank, self.world, self.cfg
        if name in ("embed_tokens.weight", "lm_head.weight"):
            return (0, [self.vocab]) if self.vocab else None
        if name == "embed_tokens_per_layer.weight":
            return (0, [self.ple_vocab]) if self.ple_vocab else None
        m = re.match(r"layers\.(\d+)\.(.+)$", name)
        if not m:
            return None
        i, rest = int(m.group(1)), m.group(2)
        hd = cfg.head_dim(i)
        q = (r * self.Hl * hd, (r + 1) * self.Hl * hd)
        if rest == "self_attn.q_proj.weight":
            return 0, [q]
        if rest == "self_attn.o_proj.weight":
            return 1, [q]
        if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            k0, n = self.kv[i]
            return 0, [(k0 * hd, (k0 + n) * hd)]
        Fl = cfg.intermediate(i) // N
        if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            return 0, [(r * Fl, (r + 1) * Fl)]
        if rest == "mlp.down_proj.weight":
            return 1, [(r * Fl, (r + 1) * Fl)]
        if rest.startswith("experts."):
            Fm = cfg.moe_intermediate_size
            Fml = Fm // N
            if rest == "experts.gate_up_proj":     # [E, 2*Fm, D]: gate rows then up rows
                return 1, [(r * Fml, (r + 1) * Fml), (Fm + r * Fml, Fm + (r + 1) * Fml)]
            if rest == "experts.down_proj":        # [E, D, Fm]
                return 2, [(r * Fml, (r + 1) * Fml)]
        return None

    def local_shape(self, name: str, shape: tuple) -> tuple:
        p = self.pieces(name)
        if p is None:
            return tuple(shape)
        ax, ps = p
        s = list(shape)
        s[ax] = sum(b - a for a, b in ps)
        return tuple(s)

    def take(self, name: str, a):
        """The rank's part of a full array ``a`` (numpy or a safetensors slice) as numpy."""
        p = self.pieces(name)
        if p is None:
            return a[...] if not isinstance(a, np.ndarray) else a
        ax, ps = p
        parts = [a[(slice(None),) * ax + (slice(lo, hi),)] for lo, hi in ps]
        return parts[0] if len(parts) == 1 else _cat(parts, ax)


def _cat(parts, ax):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=ax)
    import torch
    return torch.cat(parts, dim=ax)


def _to_numpy(t):
    import torch
    if isinstance(t, np.ndarray):
        return t
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.contiguous().numpy()


# ------------------------------------------------------------------------------------------------ reading
def read_config(source):
    """(GemmaConfig, path, tokenizer or None) without reading any weight."""
    from .config import GemmaConfig
    from .loader import _tokenizer, resolve_source
    p = resolve_source(source)
    if p.is_dir():
        cfg = GemmaConfig.from_file(p)
        tok = _tokenizer(p) if (p / "tokenizer.json").exists() else None
        return cfg, p, tok
    from .weights.gguf import load_gguf
    hf_cfg, _ = load_gguf(p, dtype="float32", progress=False)
    return GemmaConfig.from_dict(hf_cfg, where=str(p)), p, _tokenizer(p)


def _locations(d: Path, model_type: str) -> dict[str, tuple[Path, str]]:
    """canonical name -> (file, HF name), from the safetensors headers (no data read)."""
    from .weights.names import canonical_name
    from .weights.safetensors import CheckpointError
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        wmap = json.loads(idx.read_text())["weight_map"]
        items = [(k, d / f) for k, f in wmap.items()]
    else:
        files = [d / "model.safetensors"] if (d / "model.safetensors").exists() else sorted(d.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{d}: no safetensors weights")
        from safetensors import safe_open
        items = []
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                items += [(k, f) for k in h.keys()]
    out = {}
    for k, f in items:
        c = canonical_name(k, model_type)
        if c is not None:
            out[c] = (f, k)
    return out


def read_shard(path: Path, cfg, plan: ShardPlan, progress: bool = False) -> dict[str, np.ndarray]:
    """The rank's slice of every tensor the config needs (float32, or float64 for a float64 GGUF cache),
    reading only those bytes from safetensors. Full shapes are checked against the config first."""
    from .model.gemma import WeightError, expected_shapes
    want = expected_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    if Path(path).is_file():          # GGUF: dequantised once into the cache, memory-mapped, sliced
        from .weights.gguf import load_gguf
        _, full = load_gguf(path, dtype="float32", progress=progress and plan.rank == 0)
        for k, shp in want.items():
            if k not in full:
                raise WeightError(f"{path}: tensor {k!r} the config needs is missing")
            out[k] = np.ascontiguousarray(plan.take(k, full[k]))
        return out
    from safetensors import safe_open
    loc = _locations(Path(path), cfg.model_type)
    handles = {}
    try:
        for n, (k, shp) in enumerate(want.items()):
            if k not in loc:
                raise WeightError(f"{path}: tensor {k!r} the config needs is missing from the checkpoint")
            f, hn = loc[k]
            h = handles.get(f)
            if h is None:
                h = handles[f] = safe_open(str(f), framework="pt").__enter__()
            sl = h.get_slice(hn)
            got = tuple(sl.get_shape())
            if got != tuple(shp) and not (k.endswith("layer_scalar") and got in ((), (1,))):
                raise WeightError(f"{f}: tensor {hn!r} has shape {got}, expected {tuple(shp)} from the config")
            out[k] = _to_numpy(plan.take(k, sl) if got else sl[...])
            if progress and plan.rank == 0 and (n % 50 == 0 or n == len(want) - 1):
                print(f"  rank 0 read {n + 1}/{len(want)} shards ({time.perf_counter() - t0:.1f}s)",
                      file=sys.stderr, flush=True)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return out


# ------------------------------------------------------------------------------------------------ ops + model
def _tp_ops_class():
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from .backends.torch import TorchOps

    class TPOps(TorchOps):
        """TorchOps whose collectives are torch.distributed's; vocabulary-parallel embedding and head for the
        weight arrays registered in ``vocab`` (id -> (first row, end row))."""

        def __init__(self, spec, dtype, d: Dist):
            super().__init__(spec, dtype)
            self.tp = d
            self.vocab: dict[int, tuple[int, int]] = {}
            self.comm_seconds = 0.0
            self.comm_calls = 0
            self.comm_bytes = 0
            self.timing = os.environ.get("WORKBENCH_TP_TIMING", "0") == "1"

        def _timed(self, fn, x):
            if not self.timing:
                return fn()
            self.synchronize()
            t0 = time.perf_counter()
            y = fn()
            self.synchronize()
            self.comm_seconds += time.perf_counter() - t0
            self.comm_calls += 1
            self.comm_bytes += x.numel() * x.element_size()
            return y

        def all_reduce(self, x):
            if self.tp.world == 1:
                return x
            low = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)   # gloo: float32/64

            def run():
                y = x.float() if low else x.contiguous()
                dist.all_reduce(y)
                return y.to(x.dtype) if low else y
            return self._timed(run, x)

        def all_gather(self, x, dim):
            if self.tp.world == 1:
                return x
            low = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)

            def run():
                y = (x.float() if low else x).contiguous()
                parts = [torch.empty_like(y) for _ in range(self.tp.world)]
                dist.all_gather(parts, y)
                out = torch.cat(parts, dim=dim)
                return out.to(x.dtype) if low else out
            return self._timed(run, x)

        def take_rows(self, w, ids):
            r = self.vocab.get(id(w))
            if r is None:
                return super().take_rows(w, ids)
            v0, v1 = r
            inside = (ids >= v0) & (ids < v1)
            y = F.embedding(torch.where(inside, ids - v0, torch.zeros_like(ids)), w)
            return self.all_reduce(y.masked_fill(~inside.unsqueeze(-1), 0))

        def linear(self, x, w):
            y = super().linear(x, w)
            return self.all_gather(y, -1) if id(w) in self.vocab else y

    return TPOps


_TPOPS = None


def tp_ops(backend: str, dtype: str, d: Dist):
    """Ops of one rank: torch:cpu, or torch:cuda on the rank's local GPU (float64 allowed there: the sharded
    reference)."""
    global _TPOPS
    from . import backends as _bk
    spec = _bk.parse(backend)
    if spec.framework != "torch":
        raise DistributedError(f"tensor parallelism runs on torch backends; {backend} is {spec.framework}")
    if spec.device == "cuda":
        spec = _bk.BackendSpec("torch", "cuda", d.local_rank)
    elif spec.device != "cpu":
        raise DistributedError(f"tensor parallelism: {backend} (torch:cpu with gloo, torch:cuda with NCCL)")
    dtype = _bk.check_dtype(dtype, _bk.BackendSpec("torch", "cpu"))   # float64 also on CUDA here
    if _TPOPS is None:
        _TPOPS = _tp_ops_class()
    return _TPOPS(spec, dtype, d)


_HEAD_TAP = re.compile(r"^blocks\.(\d+)\.attn\.hook_(q|k|v|z|pattern)$")
_MLP_TAP = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


def _model_class():
    from .model.gemma import Gemma

    class ShardedGemma(Gemma):
        """A rank's part of the model: sharded weights (see ShardPlan), full-model taps and logits.

        A decoder built here, not by ``loader.build_model``: its tensors are this rank's slices (``read_shard``,
        never the whole checkpoint) under a shard config (``plan.shard_config()``: per-rank heads, intermediate
        and vocabulary sizes), and ``forward`` gathers the sharded taps. The LanguageModel front adds nothing a
        rank uses (the tokenizer is read once by ``read_config``; media are refused under tensor parallelism).
        The one-process models here (``_worker_selftest``'s reference passes) do come from ``build_model``."""

        def __init__(self, cfg, plan: ShardPlan, tensors, ops, where="checkpoint"):
            super().__init__(plan.shard_config(), tensors, ops, where=where)
            self.config = plan.model_config()        # full vocabulary (ids are checked against it)
            self.full_config = cfg
            self.plan = plan
            for k, r in (("embed_tokens.weight", plan.vocab), ("lm_head.weight", plan.vocab),
                         ("embed_tokens_per_layer.weight", plan.ple_vocab)):
                if r is not None and k in self.w:
                    ops.vocab[id(self.w[k])] = r
            self.local_weight_bytes = int(sum(t.numel() * t.element_size() for t in self.w.values()))

        def forward(self, ids, taps=None, hooks=None, cache=None, last_only=False, **mm):
            if mm.get("images") or mm.get("audio"):
                raise NotImplementedError("tensor parallelism covers the text decoder; run media in one process")
            if hooks:
                from .model.taps import Points
                pts = Points(self.config, None, hooks)
                sharded = sorted(n for n in pts.hooked if _HEAD_TAP.match(n) or _MLP_TAP.match(n))
                if sharded:
                    raise NotImplementedError(f"hooks on per-head / intermediate points under tensor parallelism "
                                              f"(each rank holds a slice): {sharded[:4]}")
            out = super().forward(ids, taps=taps, hooks=hooks, cache=cache, last_only=last_only)
            out.taps = {k: self._gather_tap(k, v) for k, v in out.taps.items()}
            return out

        def _gather_tap(self, name, v):
            import torch
            m = _HEAD_TAP.match(name)
            mm_ = _MLP_TAP.match(name) if m is None else None
            if (m is None and mm_ is None) or self.plan.world == 1:
                return v
            ops = self.ops
            x = torch.from_numpy(np.ascontiguousarray(v)).to(ops.device)
            if mm_ is not None:
                return ops.numpy(ops.all_gather(x, -1))
            i, kind = int(m.group(1)), m.group(2)
            if kind == "pattern":                      # [B, H, T, S]
                return ops.numpy(ops.all_gather(x, 1))
            g = ops.numpy(ops.all_gather(x, 2))          # tap layout [B, T, H, hd]
            if kind in ("q", "z"):
                return g
            # K/V: rank r holds KV heads [k0(r), k0(r) + n); with replicated KV heads keep one copy of each
            kv = self.full_config.num_kv_heads(i)
            full = np.empty(g.shape[:2] + (kv,) + g.shape[3:], dtype=g.dtype)
            for r in range(self.plan.world):
                k0, n = self.plan.kv_slice(i, r)
                full[:, :, k0:k0 + n] = g[:, :, r * n:(r + 1) * n]
            return full

    return ShardedGemma


_SHARDED = None


def build(cfg, plan, tensors, ops, where="checkpoint"):
    global _SHARDED
    if _SHARDED is None:
        _SHARDED = _model_class()
    return _SHARDED(cfg, plan, tensors, ops, where=where)


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _device_of(backend: str) -> str:
    return "cuda" if "cuda" in backend else "cpu"


def _gather_obj(obj):
    """Every rank's picklable ``obj`` on every rank (a list in rank order)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------ workers
def _worker_compare(spec: dict, out_path: Path):
    """Every rank: the sharded reference, then every (torch) target sharded; rank 0 writes rows + meta."""
    from . import parity as P
    from .loader import source_hash
    from .model.taps import point_names
    ref_b, ref_d = P._split_reference(spec["reference"])
    d = init(_device_of(ref_b) if "cuda" in ref_b else _device_of(",".join(b for b, _ in spec["targets"])))
    cfg, path, tok = read_config(spec["source"])
    ids = P._prompt_ids(spec["prompt"], tok, spec["max_tokens"], spec["source"])
    ids_arr = np.asarray(ids, dtype=np.int64)[None]
    T = ids_arr.shape[1]
    plan = ShardPlan(cfg, d.rank, d.world)
    tensors = read_shard(path, cfg, plan, progress=spec["progress"])
    taps = list(spec["taps"] or P.DEFAULT_TAPS)
    order_of = {n: k for k, n in enumerate(point_names(cfg))}
    prog = P._Progress(spec["progress"] and d.rank == 0, 1 + len(spec["targets"]))
    ref = build(cfg, plan, tensors, tp_ops(ref_b, ref_d, d), where=str(path))
    o = ref.forward(ids_arr, taps=taps)
    ref_taps = dict(o.taps)
    ref_taps["logits"] = o.logits
    del ref, o
    prog.step(f"reference {spec['reference']} over {d.world} ranks")
    targets, skipped = [], {}
    for b, dt in spec["targets"]:
        if not b.startswith("torch:"):
            skipped[f"{b}:{dt}"] = "tensor parallelism runs torch backends only"
        else:
            targets.append((b, dt))
    tols = {tuple(k.split("|")) if "|" in k else k: v for k, v in (spec.get("tolerances") or {}).items()} or None
    rows, sk, devices, _ = P.target_rows(lambda ops: build(cfg, plan, tensors, ops, where=str(path)), targets,
                                         ids_arr, taps, ref_taps, order_of,
                                         decode_steps=max(0, min(spec["decode_steps"], T - 1)), tolerances=tols,
                                         fault=spec.get("fault"), prog=prog, make_ops=lambda b, dt: tp_ops(b, dt, d))
    skipped.update(sk)
    mem = _gather_obj(dict(rank=d.rank, peak_rss=peak_rss_bytes()))
    if d.rank == 0:
        ds = max(0, min(spec["decode_steps"], T - 1))
        meta = dict(model=str(spec["source"]), source=str(path), source_hash=source_hash(path),
                    reference=f"{spec['reference']} (tensor parallel, {d.world} ranks)",
                    backends=sorted({b for b, _ in spec["targets"]}), dtypes=sorted({x for _, x in spec["targets"]}),
                    n_tokens=T, decode_steps=ds, media=dict(images=0, audio=0),
                    prompt=spec["prompt"] if isinstance(spec["prompt"], str) else None, token_ids=ids, taps=taps,
                    skipped=skipped, devices=devices, arch=cfg.arch,
                    world=d.world, dist_backend=d.backend, rank_memory=mem)
        Path(out_path).write_text(json.dumps(dict(rows=rows, meta=meta, skipped=skipped)))


def _worker_export(spec: dict, out_path: Path):
    """Every rank: the sharded reference; rank 0 writes the reference artifact and a JSON of timings/memory."""
    import torch
    from .parity import _prompt_ids, _split_reference
    from .reference_artifact import manifest_for, write
    ref_b, ref_d = _split_reference(spec["reference"])
    d = init(_device_of(ref_b))
    t0 = time.perf_counter()
    cfg, path, tok = read_config(spec["source"])
    ids = _prompt_ids(spec["prompt"], tok, spec["max_tokens"], spec["source"])
    plan = ShardPlan(cfg, d.rank, d.world)
    tensors = read_shard(path, cfg, plan, progress=spec["progress"])
    ops = tp_ops(ref_b, ref_d, d)
    m = build(cfg, plan, tensors, ops, where=str(path))
    del tensors
    t_load = time.perf_counter() - t0
    ids_arr = np.asarray(ids, dtype=np.int64)[None]
    want = spec.get("want") or spec["taps"]
    barrier()
    ops.synchronize()
    t1 = time.perf_counter()
    o = m.forward(ids_arr, taps=want)
    ops.synchronize()
    t_fwd = time.perf_counter() - t1
    got = dict(o.taps)
    got["logits"] = o.logits
    del o
    info = dict(rank=d.rank, load_s=t_load, forward_s=t_fwd, weight_bytes=m.local_weight_bytes)
    if spec.get("timing") and d.world > 1:
        # a second pass untimed (warm: wall time), a third with each collective bracketed by device syncs (its share)
        barrier()
        ops.synchronize()
        t2 = time.perf_counter()
        m.forward(ids_arr, taps=want)
        ops.synchronize()
        info["warm_forward_s"] = time.perf_counter() - t2
        ops.timing, ops.comm_seconds, ops.comm_calls, ops.comm_bytes = True, 0.0, 0, 0
        barrier()
        t3 = time.perf_counter()
        m.forward(ids_arr, taps=want)
        ops.synchronize()
        info["timed_forward_s"] = time.perf_counter() - t3
        ops.timing = False
    info.update(comm_s=ops.comm_seconds, comm_calls=ops.comm_calls, comm_bytes=ops.comm_bytes,
                peak_rss=peak_rss_bytes(),
                gpu_peak=int(torch.cuda.max_memory_allocated()) if ops.device.type == "cuda" else None)
    ranks = _gather_obj(info)
    if d.rank == 0:
        man = manifest_for(spec["source"], path, cfg, tok, spec["prompt"], ids, spec["taps"], spec["reference"],
                           spec["decode_steps"], d.world, got)
        man["ranks"] = ranks
        write(spec["output"], got, man)
        Path(out_path).write_text(json.dumps(dict(ranks=ranks, output=str(spec["output"]))))


def _errors(ref: dict, got: dict, src) -> dict:
    """Worst tap per phase: rel_max (max|d| / max|ref|) and rel_l2 (|d| / |ref|); NaN/inf count as inf."""
    worst = {}
    for phase in ("prefill", "decode"):
        best, l2, n = dict(rel_max=-1.0, tap=None), 0.0, 0
        for k, r in ref[phase].items():
            x = got[phase][k]
            if x.shape != r.shape:
                raise DistributedError(f"{src} {k}: sharded shape {x.shape} vs one process {r.shape}")
            r64, d = r.astype(np.float64), x.astype(np.float64) - r.astype(np.float64)
            if not np.isfinite(x).all():
                rm = rl = float("inf")
            else:
                rm = float(np.abs(d).max()) / (float(np.abs(r64).max()) or 1.0)
                rl = float(np.linalg.norm(d)) / (float(np.linalg.norm(r64)) or 1.0)
            if rm > best["rel_max"]:
                best = dict(rel_max=rm, tap=k)
            l2, n = max(l2, rl), n + 1
        worst[phase] = dict(best, rel_l2=l2, n_taps=n)
    return worst


def _worker_selftest(spec: dict, out_path: Path):
    """Sharded vs one process on each model: every tap (prefill, and cached decode steps), per dtype, against
    the one-process pass of the same dtype and (float32/bfloat16) both against the one-process float64 pass;
    per-rank weight bytes and peak RSS. Rank 0 runs the one-process passes and writes the results."""
    from . import backends as _bk
    from .loader import build_model, read_source
    d = init("cpu")
    results = []
    for src in spec["models"]:
        cfg, path, _ = read_config(src)
        plan = ShardPlan(cfg, d.rank, d.world)
        tensors = read_shard(path, cfg, plan)
        T, ds = spec.get("tokens", 12), spec.get("decode_steps", 3)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, T)[None]
        single = spec.get("single", True) and d.rank == 0
        full = read_source(src, dtype="float64", progress=False) if single else None
        one: dict = {}

        def one_pass(dt):
            if dt not in one:
                m1 = build_model(full, _bk.get_ops("torch:cpu", dt), src)     # the one-process model, as wb.load's
                one[dt] = (_run_passes(m1, ids, ds), int(sum(t.numel() * t.element_size() for t in m1.w.values())))
            return one[dt]
        for dt in spec["dtypes"]:
            rec = dict(model=str(src), dtype=dt, world=d.world)
            m = build(cfg, plan, tensors, tp_ops("torch:cpu", dt, d), where=str(path))
            t0 = time.perf_counter()
            sh = _run_passes(m, ids, ds)
            rec["seconds"] = time.perf_counter() - t0
            rec["weight_bytes"] = _gather_obj(m.local_weight_bytes)
            del m
            if single:
                ref, rec["single_weight_bytes"] = one_pass(dt)
                rec["errors"] = _errors(ref, sh, src)
                if dt != "float64":
                    r64 = one_pass("float64")[0]
                    rec["vs_float64"] = dict(sharded=_errors(r64, sh, src), single=_errors(r64, ref, src))
            results.append(rec)
        del tensors, full, one
    rss = _gather_obj(peak_rss_bytes())
    if d.rank == 0:
        Path(out_path).write_text(json.dumps(dict(results=results, peak_rss=rss, world=d.world)))


def _run_passes(m, ids, decode_steps):
    """All taps of a prefill pass and of cached decode steps over the last ``decode_steps`` tokens."""
    o = m.forward(ids, taps=["*"])
    pre = dict(o.taps)
    pre["logits"] = o.logits
    T = ids.shape[1]
    P = T - decode_steps
    cache = m.new_cache(batch=1, max_len=T)
    m.forward(ids[:, :P], cache=cache)
    steps = [m.forward(ids[:, t:t + 1], taps=["*"], cache=cache) for t in range(P, T)]
    dec = {}
    for n in steps[0].taps:
        if n.endswith("hook_pattern"):       # [B, H, 1, S]: S grows with the cache; keep the last step
            dec[n] = steps[-1].taps[n]
        else:
            dec[n] = np.concatenate([s.taps[n] for s in steps], axis=1 if not n.endswith("hook_router_probs")
                                    else -2)
    dec["logits"] = np.concatenate([s.logits for s in steps], axis=1)
    return dict(prefill=pre, decode=dec)


# ------------------------------------------------------------------------------------------------ launching
def launch(mode: str, spec: dict, world: int, progress: bool = True, timeout: float | None = None,
           extra_env: dict | None = None) -> dict:
    """Run ``python -m workbench.distributed MODE`` on ``world`` processes through torchrun; returns rank 0's
    JSON. Errors carry the tail of the ranks' output."""
    if world < 1:
        raise DistributedError(f"world must be >= 1, got {world}")
    with tempfile.TemporaryDirectory(prefix="wb-tp-") as td:
        sp, op = Path(td) / "spec.json", Path(td) / "out.json"
        sp.write_text(json.dumps(spec, default=str))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "workbench.distributed", mode, str(sp), str(op)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
        env.update(extra_env or {})
        tail: list[str] = []
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in p.stdout:
                tail = (tail + [line])[-40:]
                if progress:
                    sys.stderr.write(line)
            p.wait(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        if p.returncode != 0 or not op.exists():
            raise DistributedError(f"torchrun ({world} processes, {mode}) exited with {p.returncode}:\n"
                                   + "".join(tail[-25:]))
        return json.loads(op.read_text())


def compare(source="gemma3-270m", backends=None, dtypes=None, reference: str = "torch:cpu:float64", prompt=None,
            taps=None, decode_steps: int = 4, references=("hf",), tolerances: dict | None = None, db=None,
            store: bool = True, progress: bool = True, fault: dict | None = None, max_tokens: int = 64,
            world: int = 2, anchor: bool = True, **unsupported):
    """The reference AND the torch targets sharded over N torchrun processes (gloo on CPU, NCCL for
    torch:cuda), for targets that do not fit one device either; rows as ``wb.compare``'s plain decode rows
    (flat tolerance table: no same-dtype budgets, no anchor — those need the whole model in one process, as
    do the external references). ``wb.compare(..., world=N)`` shards the reference only and runs the targets
    with wb.compare's own engine."""
    from . import parity as P
    if unsupported.get("images") or unsupported.get("audio"):
        raise NotImplementedError("wb.compare(world=N) covers the text decoder; media run with world=1")
    targets = P._targets(backends, dtypes)
    if prompt is not None and not isinstance(prompt, str):
        prompt = [int(i) for i in np.asarray(prompt).reshape(-1)]
    tols = {("|".join(k) if isinstance(k, tuple) else k): v for k, v in (tolerances or {}).items()}
    spec = dict(source=str(source), targets=targets, reference=reference, prompt=prompt, taps=taps,
                decode_steps=decode_steps, tolerances=tols, fault=fault, max_tokens=max_tokens, progress=progress)
    res = launch("compare", spec, world, progress=progress)
    meta, rows, skipped = res["meta"], res["rows"], res["skipped"]
    for ext in references or ():
        skipped[ext] = f"external references run in one process (wb.compare(world=1)); not with {world} ranks"
    meta["skipped"] = skipped
    info = dict(status="off", reason="anchor=False: knowingly unanchored") if not anchor else \
        dict(status="unanchored", reason="sharded targets: the anchor (HF in float64) needs the whole model in one "
             "process; use wb.compare(world=N) (reference sharded, targets and anchor in one process)")
    meta["anchor"] = info
    rep = P.ParityReport(rows=rows, meta=meta, skipped=skipped, anchor_info=info)
    meta["passed"] = rep.passed
    if store:      # stored like wb.compare's runs (same kind, same meta keys)
        from . import runs
        rep.run_id = runs.save_run("parity", meta, rows, db=db, devices=meta.get("devices", {}),
                                   params=dict(decode_steps=meta.get("decode_steps"), taps=meta.get("taps"),
                                               tolerances=P._jsonable(tolerances), fault=fault))
    return rep


def export_sharded(source, out, prompt=None, taps=None, reference="torch:cpu:float64", decode_steps=4,
                   max_tokens=64, world=2, progress=True, timing: bool = False) -> Path:
    """``workbench reference export --nproc N``: the reference sharded over N processes, written by rank 0."""
    from .parity import ANCHOR_TAPS, DEFAULT_TAPS
    out = Path(os.path.expanduser(str(out))).resolve()
    if prompt is not None and not isinstance(prompt, str):
        prompt = [int(i) for i in np.asarray(prompt).reshape(-1)]
    taps = list(taps or DEFAULT_TAPS)
    spec = dict(source=str(source), output=str(out), prompt=prompt, taps=taps,
                want=list(dict.fromkeys(taps + ANCHOR_TAPS)),
                reference=reference, decode_steps=decode_steps, max_tokens=max_tokens, progress=progress,
                timing=timing)
    res = launch("export", spec, world, progress=progress)
    if progress:
        for r in res["ranks"]:
            print(f"  rank {r['rank']}: weights {r['weight_bytes'] / 2**30:.2f} GiB, peak RSS "
                  f"{r['peak_rss'] / 2**30:.2f} GiB" + (f", GPU peak {r['gpu_peak'] / 2**30:.2f} GiB"
                                                       if r.get("gpu_peak") else "")
                  + f", load {r['load_s']:.1f}s, forward {r['forward_s']:.2f}s", file=sys.stderr)
    return out


def selftest(models, world: int, dtypes=("float64", "float32"), tokens: int = 12, decode_steps: int = 3,
             single: bool = True, progress: bool = False, timeout: float | None = None) -> dict:
    """Sharded (``world`` gloo processes) vs one process on each model; see ``_worker_selftest``."""
    spec = dict(models=[str(m) for m in models], dtypes=list(dtypes), tokens=tokens, decode_steps=decode_steps,
                single=single)
    # the CPU GEMV kernel of one-row products stalls when several ranks share few cores (measured: 2 ranks on 2
    # cores, float32 decode 6x slower); the test compares the sharded and one-process math, so both run without it
    return launch("selftest", spec, world, progress=progress, timeout=timeout,
                  extra_env={"WORKBENCH_CPU_GEMV": os.environ.get("WORKBENCH_CPU_GEMV", "off")})


_WORKERS = {"compare": _worker_compare, "export": _worker_export, "selftest": _worker_selftest}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in _WORKERS:
        print("usage: torchrun ... -m workbench.distributed {compare|export|selftest} SPEC.json OUT.json",
              file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    try:
        _WORKERS[argv[0]](spec, Path(argv[2]))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

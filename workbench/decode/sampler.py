"""Sampling with the same semantics on every route and backend, on the device.

Greedy: argmax (first on ties). Sampled (temperature > 0): the Gumbel-max trick with a counter-based RNG —
the noise of candidate token ``j`` for the token at absolute position ``p`` is a hash of (seed, p, j) — so a
seed gives the same tokens on torch and MLX, on the plain and the fast routes (up to near-ties that the routes'
rounding can flip), with no generator state to carry and nothing to bring to the host per step.

top-k / top-p: the candidates are the ``top_k`` most likely tokens (top-p alone: the ``CANDIDATES`` most likely);
top-p keeps the smallest prefix of them (by probability, normalised over the whole vocabulary) whose mass
reaches ``top_p``; if the candidates hold less than ``top_p`` of the mass, all of them are kept (at the usual
top_p = 0.9-0.95 of a trained model this bound never binds; it keeps the work per step bounded). Neither:
the whole vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANDIDATES = 256
_M = 0xFFFFFFFF
_C1, _C2, _GOLD = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature <= 0

    def candidates(self, vocab: int) -> int | None:
        """How many candidates the sampler looks at (None: the whole vocabulary)."""
        if self.top_k:
            return min(int(self.top_k), vocab)
        if self.top_p is not None and self.top_p < 1.0:
            return min(CANDIDATES, vocab)
        return None

    @property
    def use_top_p(self) -> bool:
        return self.top_p is not None and self.top_p < 1.0

    def key(self, vocab: int) -> tuple:
        """What shapes the device code (the rest — seed, temperature, top_p — are runtime values)."""
        return ("greedy",) if self.greedy else ("sample", self.candidates(vocab), self.use_top_p)


def make(temperature=0.0, top_k=None, top_p=None, seed=0) -> Sampling:
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return Sampling(float(temperature or 0.0), int(top_k) if top_k else None,
                    float(top_p) if top_p is not None else None, int(seed or 0) & _M)


# ------------------------------------------------------------------------------------------- numpy (reference)
def _mix_np(x):
    x = x.astype(np.uint64) & _M
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(_C1)) & _M
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(_C2)) & _M
    x ^= x >> np.uint64(16)
    return x


def gumbel_np(seed: int, pos: int, ids: np.ndarray) -> np.ndarray:
    key = _mix_np(_mix_np(np.asarray(seed, np.uint64)) ^ np.uint64(pos))
    h = _mix_np((key + np.asarray(ids, np.uint64) * np.uint64(_GOLD)) & _M)
    u = ((h >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)
    return -np.log(-np.log(u))


def sample_np(logits: np.ndarray, s: Sampling, pos: int) -> int:
    """The token at absolute position ``pos`` from last-position logits [V] (host, numpy)."""
    logits = np.asarray(logits).reshape(-1)
    if not np.isfinite(logits).any():
        raise FloatingPointError("logits are all NaN/inf: the model diverged (try float32 or bfloat16)")
    if s.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float32) * np.float32(1.0 / s.temperature)     # as the device samplers: x * (1/T)
    V = z.shape[0]
    C = s.candidates(V)
    if C is None:
        return int(np.argmax(z + gumbel_np(s.seed, pos, np.arange(V))))
    idx = np.argpartition(-z, C - 1)[:C] if C < V else np.arange(V)
    idx = idx[np.argsort(-z[idx], kind="stable")]
    vals = z[idx]
    if s.use_top_p:
        m = z.max()
        lse = m + np.log(np.exp((z - m).astype(np.float64)).sum())
        p = np.exp(vals.astype(np.float64) - lse)
        keep = (np.cumsum(p) - p) < s.top_p
        vals = np.where(keep, vals, -np.inf)
    return int(idx[int(np.argmax(vals + gumbel_np(s.seed, pos, idx)))])


# ------------------------------------------------------------------------------------------------------ torch
def _mix_t(x):
    x = x & _M
    x = x ^ (x >> 16)
    x = (x * _C1) & _M
    x = x ^ (x >> 15)
    x = (x * _C2) & _M          # int64 products wrap; the low 32 bits are the uint32 product
    x = x ^ (x >> 16)
    return x


def _topk_t(z, C: int):
    """Top C (sorted, descending) of z [1, V]: for a large vocabulary in two stages — the top C of each of 64
    groups, then the top C of those (exactly the top C; far cheaper on a GPU than one top-C over 262k entries)."""
    import torch
    V = z.shape[-1]
    G = 64
    if V >= 65536 and V % G == 0 and C <= V // G:
        v1, i1 = torch.topk(z.reshape(G, V // G), C, dim=-1, sorted=False)
        i1 = i1 + (torch.arange(G, device=z.device) * (V // G))[:, None]
        v2, j = torch.topk(v1.reshape(1, -1), C, dim=-1, sorted=True)
        return v2, torch.gather(i1.reshape(1, -1), 1, j)
    return torch.topk(z, C, dim=-1, sorted=True)


class TorchParams:
    """The runtime sampling values in device tensors [1, 1] — seed (int64, the uint32 seed), 1/temperature and
    top_p (float32) — read by the torch and Triton samplers; :meth:`set` changes them in place (no re-capture)."""

    def __init__(self, device, s: Sampling | None = None):
        import torch
        self.seed = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.inv_t = torch.ones((1, 1), dtype=torch.float32, device=device)
        self.top_p = torch.ones((1, 1), dtype=torch.float32, device=device)
        if s is not None and not s.greedy:
            self.set(s)

    def set(self, sp: Sampling):
        self.seed.fill_(int(sp.seed))
        self.inv_t.fill_(1.0 / float(sp.temperature))
        self.top_p.fill_(float(sp.top_p if sp.top_p is not None else 1.0))


def torch_sampler(s: Sampling, vocab: int, device, compile: bool | None = None, dtype=None):
    """``fn(logits [1, V], pos [1] int64 (the input token's position)) -> token [1, 1] int64`` on the device,
    with seed, temperature and top_p in device tensors (``fn.set(sampling)`` changes them without re-capture).
    On CUDA (``compile`` None) the elementwise work is compiled by inductor (a handful of kernels, not ~30).
    (The Triton decode step samples in its own kernels instead: ``backends.triton_decode.TritonSampler``.)"""
    import torch
    C = s.candidates(vocab)
    prm = TorchParams(device)
    st = dict(seed=prm.seed, inv_t=prm.inv_t, top_p=prm.top_p)
    use_top_p = s.use_top_p

    def gumbel(seed, pos, ids):
        key = _mix_t(_mix_t(seed) ^ pos)
        h = _mix_t(key + ids * _GOLD)
        u = ((h >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)
        return -torch.log(-torch.log(u))

    def full(logits, pos, seed, inv_t, top_p):
        z = logits.reshape(1, -1).to(torch.float32) * inv_t
        ar = torch.arange(vocab, dtype=torch.long, device=logits.device)[None]
        return torch.argmax(z + gumbel(seed, pos.reshape(1, 1) + 1, ar), dim=-1, keepdim=True)

    def cand(logits, pos, seed, inv_t, top_p):
        # top-k on the raw logits (x / T keeps the order for T > 0): no float copy of the vocabulary first
        lg = logits.reshape(1, -1)
        vals, idx = _topk_t(lg, C)
        vals = vals.to(torch.float32) * inv_t
        if use_top_p:
            lse = torch.logsumexp(lg.to(torch.float32) * inv_t, dim=-1, keepdim=True)
            p = torch.exp(vals - lse)
            keep = (torch.cumsum(p, dim=-1) - p) < top_p
            vals = torch.where(keep, vals, torch.full_like(vals, float("-inf")))
        j = torch.argmax(vals + gumbel(seed, pos.reshape(1, 1) + 1, idx), dim=-1, keepdim=True)
        return torch.gather(idx, 1, j)

    body = full if C is None else cand
    dev = torch.device(device)
    note = "eager"
    if compile if compile is not None else dev.type == "cuda":
        cbody = torch.compile(body, fullgraph=True, dynamic=False)
        try:     # compile now (not inside a CUDA graph capture); keep the eager ops if inductor fails here
            cbody(torch.zeros((1, vocab), dtype=dtype or torch.float32, device=dev),
                  torch.zeros((1,), dtype=torch.long, device=dev), st["seed"], st["inv_t"], st["top_p"])
            body, note = cbody, "compiled"
        except Exception as e:  # noqa: BLE001
            note = f"eager (torch.compile failed: {type(e).__name__})"

    def fn(logits, pos):
        return body(logits, pos, st["seed"], st["inv_t"], st["top_p"])

    fn.set = prm.set
    fn.note = note
    prm.set(s)
    return fn


# -------------------------------------------------------------------------------------------------------- mlx
def _mix_mx(mx, x):
    x = x ^ (x >> 16)
    x = x * mx.array(_C1, dtype=mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(_C2, dtype=mx.uint32)
    x = x ^ (x >> 16)
    return x


def mlx_sampler(s: Sampling, vocab: int):
    """``fn(logits [1, V], pos [1] int32, params) -> token [1, 1] int32`` in MLX ops (traceable by mx.compile);
    ``params(sampling)`` gives the runtime arrays (seed uint32, 1/temperature, top_p)."""
    import mlx.core as mx
    C = s.candidates(vocab)

    def gumbel(seed, pos, ids):
        key = _mix_mx(mx, _mix_mx(mx, seed) ^ pos.astype(mx.uint32))
        h = _mix_mx(mx, key + ids.astype(mx.uint32) * mx.array(_GOLD, dtype=mx.uint32))
        u = ((h >> 8).astype(mx.float32) + 0.5) * (2.0 ** -24)
        return -mx.log(-mx.log(u))

    def fn(logits, pos, prm):
        seed, inv_t, top_p = prm
        z = logits.reshape(1, -1).astype(mx.float32) * inv_t
        p1 = pos.reshape(1, 1) + 1
        if C is None:
            ids = mx.arange(vocab)[None]
            return mx.argmax(z + gumbel(seed, p1, ids), axis=-1, keepdims=True).astype(mx.int32)
        idx = mx.argpartition(-z, C - 1, axis=-1)[:, :C] if C < vocab else mx.arange(vocab)[None]
        vals = mx.take_along_axis(z, idx, axis=-1)
        order = mx.argsort(-vals, axis=-1)
        idx = mx.take_along_axis(idx, order, axis=-1)
        vals = mx.take_along_axis(vals, order, axis=-1)
        if s.use_top_p:
            lse = mx.logsumexp(z, axis=-1, keepdims=True)
            p = mx.exp(vals - lse)
            keep = (mx.cumsum(p, axis=-1) - p) < top_p
            vals = mx.where(keep, vals, mx.array(float("-inf"), dtype=mx.float32))
        j = mx.argmax(vals + gumbel(seed, p1, idx), axis=-1, keepdims=True)
        return mx.take_along_axis(idx, j, axis=-1).astype(mx.int32)

    def params(sp: Sampling):
        return (mx.array(int(sp.seed), dtype=mx.uint32), mx.array(1.0 / float(sp.temperature), dtype=mx.float32),
                mx.array(float(sp.top_p if sp.top_p is not None else 1.0), dtype=mx.float32))
    fn.params = params
    return fn

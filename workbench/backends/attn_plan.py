"""How ``Ops.attention`` runs a :class:`~workbench.backends.protocol.CausalMask`, written once for every backend.

A causal mask over keys that are consecutive positions ending at the last query's needs no [T, S] array in the
common cases: without a window (or with one no shorter than the keys) it is the kernels' own causal mode; keys
older than the first query's window are never attended and are dropped; a sliding window much shorter than T
runs as a banded pass — the queries in blocks of ``W``, each block against its own ``2W`` keys, one kernel
call for all blocks — so the work grows with T * W, not T * S. The plan and the band's index arrays are numpy;
the backends cache their device copies by shape, so a forward pass builds each at most once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .protocol import CausalMask

# banded when T >= band_min * W: 3 where attention is compute-bound (CPUs; float32 anywhere: H200 pp4096 W=512 float32
# banded 96.7k tok/s vs one dense mask 66.1k); 16 on a GPU in half precision, where the fused kernels (cuDNN / flash)
# skip little but mask cheaply and the band's gathers and copies cost more launches than the masked work saves
# (H200 bfloat16 pp4096: dense 226k vs banded 163k tok/s)
BAND_MIN = 3
BAND_MIN_GPU_HALF = 16


@dataclass(frozen=True)
class AttnPlan:
    kind: str               # "causal": the kernel's causal mode; "dense": one [T, S'] mask; "band": blocks
    skip: int               # keys [0, skip) are outside every query's window: drop them
    window: int | None      # the window still to apply (None for "causal")


def mode() -> str:
    """WORKBENCH_ATTN=dense: always one dense mask over all keys (the pre-plan behaviour); =band: the banded pass
    wherever a window applies (both for A/B timing); else auto."""
    return os.environ.get("WORKBENCH_ATTN", "auto").strip().lower()


def plan(cm: CausalMask, T: int, S: int, band_min: int = BAND_MIN) -> AttnPlan:
    if S < T:
        raise ValueError(f"CausalMask needs at least as many keys as queries, got T={T}, S={S}")
    W = cm.window
    md = mode()
    if md == "dense":
        return AttnPlan("dense", 0, W)
    if md == "band":
        band_min = 1
    skip = 0
    if W is not None:
        skip = max(0, S - (T + W - 1))
        if S - skip <= W:           # every kept key is within every query's window
            W = None
    if W is None:
        return AttnPlan("causal", skip, None)
    return AttnPlan("band" if T >= band_min * W else "dense", skip, W)


def dense(T: int, S: int, window: int | None) -> np.ndarray:
    """bool [T, S]: query t (at key index t + S - T) attends key s."""
    return CausalMask(window).dense(T, S)


def band(T: int, S: int, W: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The banded pass over T queries and S keys (lower-right aligned), window W: blocks of W queries.
    Returns (blocks, idx [blocks, 2W] key index per block and slot (clipped into [0, S)), ok [blocks, W, 2W] bool:
    query i of the block attends slot j). 2W - 1 slots would do; the last (never attended) keeps the mask rows
    aligned for the kernels. Padded queries past T keep at least one key (no empty row)."""
    nb, L, o = -(-T // W), 2 * W, S - T
    first = o + np.arange(nb) * W - (W - 1)                 # the key index of each block's slot 0
    raw = first[:, None] + np.arange(L)[None, :]
    t = np.arange(nb)[:, None] * W + np.arange(W)[None, :]  # query index of each block row
    d = (t[:, :, None] + o) - raw[:, None, :]
    ok = (d >= 0) & (d < W) & (raw[:, None, :] >= 0) & (raw[:, None, :] < S)
    return nb, np.clip(raw, 0, S - 1), ok


class PlannedAttention:
    """Mixin of the backends: ``Ops.attention``, with :class:`CausalMask` plans. The backend provides ``_sdpa(q, k, v,
    mask, scale, causal=False)`` — its fused kernel, ``mask`` a device bool array (broadcast over heads) or None,
    ``causal`` the lower-right causal mask without an array — ``_explicit_attention(q, k, v, mask, scale, softcap)`` —
    the written-out path returning (out, probabilities) — and the protocol's shape ops."""

    def attention(self, q, k, v, mask, scale, softcap, want_probs):
        if isinstance(mask, CausalMask):    # the causal kernel, banded windows, or one dense mask
            out, mask = self._causal_attention(q, k, v, mask, scale, softcap, want_probs)
            if out is not None:
                return out, None
        if softcap is None and not want_probs:
            return self._sdpa(q, k, v, mask, scale), None
        return self._explicit_attention(q, k, v, mask, scale, softcap)

    def _attn_arrays(self, key, make):
        cache = self.__dict__.setdefault("_attn_cache", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 16:
                cache.clear()
            hit = cache[key] = make()
        return hit

    def _causal_mask(self, T, S, window):
        """The mask as a device bool [T, S], copied to the device once per shape."""
        return self._attn_arrays(("dense", T, S, window), lambda: self.asmask(dense(T, S, window)))

    def _causal_attention(self, q, k, v, cm: CausalMask, scale, softcap, want_probs):
        """(out, None) when the plan ran it on the fused kernel; else (None, the dense mask) for the explicit path
        (a softcap, or the probabilities asked for: those keep all S keys)."""
        T, S = q.shape[2], k.shape[2]
        if softcap is not None or want_probs:
            return None, self._causal_mask(T, S, cm.window)
        half_gpu = self.spec.device != "cpu" and self.dtype in ("bfloat16", "float16")
        pl = plan(cm, T, S, BAND_MIN_GPU_HALF if half_gpu else BAND_MIN)
        if pl.skip:
            k, v, S = k[:, :, pl.skip:], v[:, :, pl.skip:], S - pl.skip
        if pl.kind == "causal":
            return self._sdpa(q, k, v, None, scale, causal=True), None
        if pl.kind == "band":
            return self._band(q, k, v, pl.window, scale), None
        return self._sdpa(q, k, v, self._causal_mask(T, S, pl.window), scale), None

    def _band(self, q, k, v, W, scale):
        """Blocks of W queries, each against its own 2W keys (:func:`band`), in one kernel call."""
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]

        def make():
            nb, idx, ok = band(T, S, W)
            m = np.broadcast_to(ok[None], (B,) + ok.shape).reshape(B * nb, 1, W, ok.shape[-1]).copy()
            return nb, self.asids(idx), self.asmask(m)
        nb, idx, m = self._attn_arrays(("band", B, T, S, W), make)
        L = 2 * W
        qp = self.pad(q, 2, 0, nb * W - T) if nb * W != T else q
        qb = self.reshape(self.transpose(self.reshape(qp, (B, H, nb, W, D)), (0, 2, 1, 3, 4)), (B * nb, H, W, D))
        kb = self.reshape(self.transpose(k[:, :, idx], (0, 2, 1, 3, 4)), (B * nb, Hkv, L, D))
        vb = self.reshape(self.transpose(v[:, :, idx], (0, 2, 1, 3, 4)), (B * nb, Hkv, L, D))
        o = self._sdpa(qb, kb, vb, m, scale)
        return self.reshape(self.transpose(self.reshape(o, (B, nb, H, W, D)), (0, 2, 1, 3, 4)), (B, H, nb * W, D))[
            :, :, :T]

"""The torch decode step on CUDA as five Triton kernels per layer (plus the head), for batch-1 greedy decoding.

The compiled generic step (inductor) spends its time in ~13 small kernels per layer, each a few µs of launch
and ramp-up for 1-5 MB of weights. Here one layer is five kernels, each latency-bound code written straight
(every load of a program issued at once, no loop where the row fits one tile):

* ``_norm_gemv`` (q/k/v): the residual update of the previous layer (its post-FFN norm + add) and this layer's
  input RMSNorm as a prologue every program recomputes from the 1-row vectors, then the fused q/k/v product;
* ``_attn_split`` (one program per query head and chunk of slots): q/k RMSNorm, RoPE (rows of the cache's
  tables), the cache write at ``pos % slots`` (and the slot's position), and one-query attention over the
  chunk with an online softmax (flash-decoding);
  the last program of each head to finish combines the chunks' partial softmaxes (a counter per head);
* ``_norm_gemv`` (o): the o projection;
* ``_norm_gemv`` (gate/up): post-attention norm + residual add + pre-FFN norm in the prologue, gate and up rows
  of the same index in one program, GELU(gate)·up in the epilogue;
* ``_norm_gemv`` (down).

The last residual update and the final norm run once (``_norm_vec``); the head is ``_norm_gemv`` with the final
softcap (Gemma 2) and each program's argmax in its epilogue, ``_argmax_final`` picks the token. Sampled decoding
(:class:`TritonSampler`) keeps that shape: the head's epilogue leaves each program's max and partial softmax sum
(or its max of z + gumbel), and ``_sample_cand`` (or ``_argmax_final``) picks the token — no torch op in the step.
Apart from the attention's counter, every kernel reads one buffer and writes another; on Hopper each is launched early
(programmatic dependent launch) and loads its weights while the previous kernel finishes. Products and sums in
float32, rounded to the model dtype where the plain path rounds (after each norm, projection, residual add,
GELU), so the step computes what ``Gemma.decode_step`` computes up to summation order (tested against it, and
through the interpreter on CPU in CI).

Supported: Gemma 1-3 text layers (post norms or not, q/k norms or not, attention and final softcaps, sliding
windows, GQA), batch 1, float32 / bfloat16 / float16. Gemma 4 layers (KV sharing, k=v, V norm, PLE, layer scalar,
MoE) and exact-erf GELU are not; :func:`unsupported` says so and the route (``workbench.decode.route``) runs the
compiled generic step instead.
"""
from __future__ import annotations

import os

import torch

from .base import fused_decode_unsupported

try:  # optional: CUDA builds of torch ship it; CPU tests use its interpreter (TRITON_INTERPRET=1)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no triton
    triton = None
    tl = None
try:  # programmatic dependent launch (Hopper+): the next kernel starts, loads its weights, then waits
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_go
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except Exception:  # pragma: no cover - older triton
    _gdc_go = _gdc_wait = None

_DT = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def unsupported(cfg, ops, cache=None) -> str | None:
    """Why the Triton step can't run a model of this config on these ops (None: it can)."""
    if triton is None:
        return "triton is not installed"
    if ops.framework != "torch":
        return "not a torch backend"
    if ops.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"device {ops.device.type} (CUDA, or the interpreter with TRITON_INTERPRET=1)"
    why = fused_decode_unsupported(cfg, ops, cache)
    if why:
        return why
    for i in range(cfg.num_hidden_layers):
        if cfg.head_dim(i) % 2:
            return f"layer {i}: odd head_dim"
    return None


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


if triton is not None:

    @triton.jit
    def _rnd(x, DT: tl.constexpr):
        """Round to the model dtype (float32 round trip: a no-op for float32 models)."""
        return x.to(DT).to(tl.float32)

    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _resid(R, Y, PW, o, m, rs_y, HAS_Y: tl.constexpr, POST_NORM: tl.constexpr, DT: tl.constexpr):
        """A chunk of the residual after adding Y (post-normed when the model has post norms)."""
        r = tl.load(R + o, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(Y + o, mask=m, other=0.0).to(tl.float32)
            if POST_NORM:
                y = _rnd(y * rs_y * tl.load(PW + o, mask=m, other=0.0), DT)
            r = _rnd(r + y, DT)
        return r

    @triton.jit
    def _xvec(R, Y, pw, nw, ROUT, o, m, K, eps, pid, TOK, esc,
              HAS_NORM: tl.constexpr, HAS_Y: tl.constexpr, POST_NORM: tl.constexpr, WRITE_R: tl.constexpr,
              EMB: tl.constexpr, DT: tl.constexpr):
        """The product's input over one tile holding all K entries: R itself, or rms_norm(resid) * nw with
        resid = R (+ post_norm(Y) * pw), which program 0 also stores to ROUT (pw, nw: the loaded norm weights).
        EMB: R is the embedding table, the residual its row TOK[0] times esc (the scale in the dtype)."""
        if EMB:
            r = _rnd(tl.load(R + tl.load(TOK) * K + o, mask=m, other=0.0).to(tl.float32) * esc, DT)
        else:
            r = tl.load(R + o, mask=m, other=0.0).to(tl.float32)
        if HAS_NORM:
            if HAS_Y:
                y = tl.load(Y + o, mask=m, other=0.0).to(tl.float32)
                if POST_NORM:
                    rs_y = tl.rsqrt(tl.sum(y * y, 0) / K + eps)
                    y = _rnd(y * rs_y * pw, DT)
                r = _rnd(r + y, DT)
            if WRITE_R:
                if pid == 0:
                    tl.store(ROUT + o, r.to(DT), mask=m)
            rs_r = tl.rsqrt(tl.sum(r * r, 0) / K + eps)
            r = _rnd(r * rs_r * nw, DT)
        return r

    @triton.jit
    def _mix(x):
        """The sampler's 32-bit hash (workbench.decode.sampler._mix_np) in int64 lanes, low 32 bits kept."""
        x = x & 0xFFFFFFFF
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        return x

    @triton.jit
    def _gumbel(SEED, p1, ids):
        """Gumbel noise of token ids (int64) for the token at position p1 (as sampler.gumbel_np)."""
        key = _mix(_mix(tl.load(SEED)) ^ p1)
        h = _mix(key + ids * 0x9E3779B9)
        u = ((h >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
        return -tl.log(-tl.log(u))

    @triton.jit
    def _epilogue(yv, rows, rmask, blk, bok, PMAX, PIDX, PSUM, SEED, INVT, POS, BN: tl.constexpr,
                  EPI: tl.constexpr):
        """What blocks of logits yv [G, BN] (float32, as stored; -inf outside rmask; rows: their token ids) leave
        for the sampled token's pick, block blk [G] (where bok) at PMAX[blk] ... EPI 2 (sampling the whole
        vocabulary): the max of z + gumbel (z = yv * 1/T) and its row. 3 (sampling candidates): its max and
        sum(exp(z - max z)), the partial softmax normaliser (so the whole-vocabulary logsumexp of top-p needs no
        pass of its own). (EPI 1, greedy — each block's max and row, first on ties — is the head's own code.)"""
        if EPI == 2:
            sc = tl.where(rmask, yv * tl.load(INVT) + _gumbel(SEED, tl.load(POS) + 1, rows.to(tl.int64)),
                          float("-inf"))
            tl.store(PMAX + blk, tl.max(sc, 1), mask=bok)
            tl.store(PIDX + blk, blk * BN + tl.argmax(sc, 1, tie_break_left=True), mask=bok)
        if EPI == 3:
            inv_t = tl.load(INVT)
            mx = tl.max(yv, 1)
            tl.store(PMAX + blk, mx, mask=bok)
            ms = tl.where(bok, mx, 0.0)[:, None] * inv_t
            tl.store(PSUM + blk, tl.sum(tl.where(rmask, tl.exp(tl.where(rmask, yv, 0.0) * inv_t - ms), 0.0), 1),
                     mask=bok)

    @triton.jit
    def _norm_gemv(R, Y, PW, NW, W, OUT, ROUT, PMAX, PIDX, TOK, PSUM, SEED, INVT, POS,
                   N, K, eps, cap, esc,
                   HAS_NORM: tl.constexpr, HAS_Y: tl.constexpr, POST_NORM: tl.constexpr,
                   WRITE_R: tl.constexpr, PAIR: tl.constexpr, CAP: tl.constexpr, SINGLE: tl.constexpr,
                   EPI: tl.constexpr, EMB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DT: tl.constexpr, PDL: tl.constexpr):
        """OUT[n] = sum_k W[n, k] x[k] for this program's BLOCK_N rows, x being R or (HAS_NORM)
        rms_norm(resid) * NW with resid = R (+ post_norm(Y) * PW) — ROUT gets resid (program 0).
        PAIR: rows n and N + n (gate, up) give GELU(gate) * up. CAP: cap * tanh(y / cap). EPI (the head): the
        program's share of the token's pick from its (stored) outputs, see :func:`_epilogue` (EPI 1: greedy, its
        largest output and row to PMAX/PIDX, first row on ties as torch.argmax; 2, 3: sampling).
        SINGLE (K <= BLOCK_K): straight-line code, every load issued at once — these products are latency-bound.
        PDL: launched early (programmatic dependent launch); the weights load before waiting on the previous
        kernel, everything it wrote after."""
        if PDL:
            _gdc_go()
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        ko = tl.arange(0, BLOCK_K)
        if SINGLE:
            m = ko < K
            wm = rmask[:, None] & m[None, :]
            w = tl.load(W + rows[:, None] * K + ko[None, :], mask=wm, other=0.0).to(tl.float32)
            if PAIR:
                w2 = tl.load(W + (rows[:, None] + N) * K + ko[None, :], mask=wm, other=0.0).to(tl.float32)
            pw = tl.zeros([BLOCK_K], tl.float32)           # constants: loaded before the wait too
            nw = tl.zeros([BLOCK_K], tl.float32)
            if POST_NORM:
                pw = tl.load(PW + ko, mask=m, other=0.0)
            if HAS_NORM:
                nw = tl.load(NW + ko, mask=m, other=0.0)
            if PDL:
                _gdc_wait()
            x = _xvec(R, Y, pw, nw, ROUT, ko, m, K, eps, pid, TOK, esc, HAS_NORM, HAS_Y, POST_NORM, WRITE_R,
                      EMB, DT)
            y = tl.sum(w * x[None, :], 1)
            if PAIR:
                y2 = tl.sum(w2 * x[None, :], 1)
        else:
            if PDL:
                _gdc_wait()
            if HAS_NORM:
                rs_y = 1.0
                if HAS_Y and POST_NORM:
                    a = tl.zeros([BLOCK_K], tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        yv = tl.load(Y + k0 + ko, mask=k0 + ko < K, other=0.0).to(tl.float32)
                        a += yv * yv
                    rs_y = tl.rsqrt(tl.sum(a, 0) / K + eps)
                a2 = tl.zeros([BLOCK_K], tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    r = _resid(R, Y, PW, k0 + ko, k0 + ko < K, rs_y, HAS_Y, POST_NORM, DT)
                    a2 += r * r
                rs_r = tl.rsqrt(tl.sum(a2, 0) / K + eps)
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            if PAIR:
                acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                o = k0 + ko
                m = o < K
                if HAS_NORM:
                    r = _resid(R, Y, PW, o, m, rs_y, HAS_Y, POST_NORM, DT)
                    if WRITE_R:
                        if pid == 0:
                            tl.store(ROUT + o, r.to(DT), mask=m)
                    x = _rnd(r * rs_r * tl.load(NW + o, mask=m, other=0.0), DT)
                else:
                    x = tl.load(R + o, mask=m, other=0.0).to(tl.float32)
                wm = rmask[:, None] & m[None, :]
                w = tl.load(W + rows[:, None] * K + o[None, :], mask=wm, other=0.0).to(tl.float32)
                acc += w * x[None, :]
                if PAIR:
                    w2 = tl.load(W + (rows[:, None] + N) * K + o[None, :], mask=wm, other=0.0).to(tl.float32)
                    acc2 += w2 * x[None, :]
            y = tl.sum(acc, 1)
            if PAIR:
                y2 = tl.sum(acc2, 1)
        if PAIR:
            g = _rnd(y, DT)
            u = _rnd(y2, DT)
            g = _rnd(0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))), DT)
            y = g * u
        if CAP:
            y = _tanh(_rnd(y, DT) / cap) * cap
        tl.store(OUT + rows, y.to(DT), mask=rmask)
        if EPI == 1:                       # greedy
            yv = tl.where(rmask, y.to(DT).to(tl.float32), float("-inf"))
            tl.store(PMAX + pid, tl.max(yv, 0))
            tl.store(PIDX + pid, pid * BLOCK_N + tl.argmax(yv, 0, tie_break_left=True))
        if EPI > 1:
            yv = tl.where(rmask, y.to(DT).to(tl.float32), float("-inf"))
            bk1 = pid + tl.arange(0, 1)
            _epilogue(yv[None, :], rows[None, :], rmask[None, :], bk1, bk1 >= 0,
                      PMAX, PIDX, PSUM, SEED, INVT, POS, BLOCK_N, EPI)

    @triton.jit
    def _argmax_final(PMAX, PIDX, TOK, POS, n, BLOCK: tl.constexpr, ADVANCE: tl.constexpr, PDL: tl.constexpr):
        """One program: the row of the largest of the head programs' maxima (first on ties) -> TOK [1];
        ADVANCE: TOK is the step's own input and the position POS moves on by one (a self-feeding graph)."""
        if PDL:
            _gdc_go()
            _gdc_wait()
        o = tl.arange(0, BLOCK)
        v = tl.load(PMAX + o, mask=o < n, other=float("-inf"))
        j = tl.argmax(v, 0, tie_break_left=True)
        tl.store(TOK, tl.load(PIDX + j).to(tl.int64))
        if ADVANCE:
            tl.store(POS, tl.load(POS) + 1)

    @triton.jit
    def _block_stats(LOGITS, PMAX, PIDX, PSUM, SEED, INVT, POS, V, NB, G: tl.constexpr, BLOCK_N: tl.constexpr,
                     EPI: tl.constexpr):
        """:func:`_epilogue` of logits [V] already in memory, G blocks a program (the sampler on its own)."""
        blk = tl.program_id(0) * G + tl.arange(0, G)
        rows = blk[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        rmask = (rows < V) & (blk < NB)[:, None]
        yv = tl.load(LOGITS + rows, mask=rmask, other=float("-inf")).to(tl.float32)
        _epilogue(yv, rows, rmask, blk, blk < NB, PMAX, PIDX, PSUM, SEED, INVT, POS, BLOCK_N, EPI)

    @triton.jit
    def _okey(x):
        """float32 -> int32 in the same order (-0 just below +0)."""
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def _kth_key(key, valid, k, RB: tl.constexpr, BITS: tl.constexpr):
        """The k-th largest of the int32 keys (in [-2**(BITS-1), 2**(BITS-1))) where valid (1 <= k <= their
        count), exactly: a radix search from the top bits, RB bits a round (2**RB - 1 counts per round, BITS / RB
        rounds), in unsigned space."""
        thr = tl.sum(tl.zeros([2], tl.int64), 0)
        if RB == 1:                                   # one count a round: the bit is set if enough are above
            for it in tl.static_range(BITS):
                shift = BITS - 1 - it
                cand = (thr + (1 << shift) - (1 << (BITS - 1))).to(tl.int32)
                cnt = tl.sum(((key >= cand) & valid).to(tl.int32), 0)
                thr = thr + ((cnt >= k).to(tl.int64) << shift)
        elif RB == 2:                                 # three counts a round, packed in one int64 sum (20 bits each)
            for it in tl.static_range(BITS // 2):
                shift = BITS - 2 * (it + 1)
                base = thr - (1 << (BITS - 1))
                g1 = ((key >= (base + (1 << shift)).to(tl.int32)) & valid).to(tl.int64)
                g2 = ((key >= (base + (2 << shift)).to(tl.int32)) & valid).to(tl.int64)
                g3 = ((key >= (base + (3 << shift)).to(tl.int32)) & valid).to(tl.int64)
                pk = tl.sum(g1 + (g2 << 20) + (g3 << 40), 0)
                n = ((pk & 0xFFFFF) >= k).to(tl.int64) + (((pk >> 20) & 0xFFFFF) >= k).to(tl.int64) \
                    + (((pk >> 40) & 0xFFFFF) >= k).to(tl.int64)
                thr = thr + (n << shift)
        else:
            d = tl.arange(0, 1 << RB).to(tl.int64)
            for it in tl.static_range(BITS // RB):
                shift = BITS - RB * (it + 1)
                cand = (thr + (d << shift) - (1 << (BITS - 1))).to(tl.int32)
                ge = (key[None, :] >= cand[:, None]) & valid[None, :]
                cnt = tl.sum(ge.to(tl.int32), 1)
                thr = thr + (tl.sum(((cnt >= k) & (d > 0)).to(tl.int64), 0) << shift)
        return (thr - (1 << (BITS - 1))).to(tl.int32)

    @triton.jit
    def _top_first(key, valid, k, RB: tl.constexpr, BITS: tl.constexpr):
        """Exactly k of the valid entries with the largest keys (ties: the first ones), as a mask."""
        t = _kth_key(key, valid, k, RB, BITS)
        gt = (key > t) & valid
        tie = (key == t) & valid
        if RB == 1:                               # (the plainest code: the engine's fallback if the rest fails)
            need = k - tl.sum(gt.to(tl.int32), 0)
            sel = gt | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
        else:
            pk = tl.sum(gt.to(tl.int64) + (tie.to(tl.int64) << 32), 0)        # both counts in one sum
            need = k - (pk & 0xFFFFFFFF)
            sel = gt | tie
            if (pk >> 32) > need:                 # more ties than places: the first ones (a scan only then)
                sel = gt | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
        return sel

    @triton.jit
    def _select_blocks(key, o, bm, BLK, SKEY, SIDX, SB, NBP: tl.constexpr, RB: tl.constexpr, BITS: tl.constexpr,
                       SIEVE: tl.constexpr, G: tl.constexpr):
        """Store the ids of exactly SB blocks with the largest keys (ties: the first) to BLK. SIEVE (a power of
        two): first a bound L <= the SB-th largest key — the SB-th largest of G >= SB group maxima (each a block's
        key) — then, when at most SIEVE blocks reach L, the search runs over those only (compacted to SKEY/SIDX,
        in block order); otherwise over all NBP."""
        if SIEVE > 0:
            gk = tl.max(tl.reshape(tl.where(bm, key, -2147483648), [G, NBP // G]), 1)
            lb = _kth_key(gk, gk > -2147483648, SB, RB, BITS)
            ok = bm & (key >= lb)
            n1 = tl.sum(ok.to(tl.int32), 0)
            if n1 <= SIEVE:
                at = tl.cumsum(ok.to(tl.int32), 0) - 1
                tl.store(SKEY + at, key, mask=ok)
                tl.store(SIDX + at, o, mask=ok)
                tl.debug_barrier()
                so = tl.arange(0, SIEVE)
                sm = so < n1
                sk = tl.load(SKEY + so, mask=sm, other=0, cache_modifier=".cg")
                si = tl.load(SIDX + so, mask=sm, other=0, cache_modifier=".cg")
                sel = _top_first(sk, sm, SB, RB, BITS)
                tl.store(BLK + tl.cumsum(sel.to(tl.int32), 0) - 1, si, mask=sel)
            else:
                sel = _top_first(key, bm, SB, RB, BITS)
                tl.store(BLK + tl.cumsum(sel.to(tl.int32), 0) - 1, o, mask=sel)
        else:
            sel = _top_first(key, bm, SB, RB, BITS)
            tl.store(BLK + tl.cumsum(sel.to(tl.int32), 0) - 1, o, mask=sel)

    @triton.jit
    def _sample_cand(PMAX, PSUM, LOGITS, BLK, CV, CI, NKEEP, SEED, INVT, TOPP, TOK, POS, SKEY, SIDX, V, NB, C, SB,
                     NBP: tl.constexpr, BN: tl.constexpr, SBP: tl.constexpr, CP: tl.constexpr, CJ: tl.constexpr,
                     ALLB: tl.constexpr, TOP_P: tl.constexpr, ADVANCE: tl.constexpr, RB: tl.constexpr,
                     BF16: tl.constexpr, PDL: tl.constexpr, SIEVE: tl.constexpr = 0, G: tl.constexpr = 1,
                     PHASES: tl.constexpr = 3):
        """One program: the sampled token from the NB blocks of BN logits and their partials (PMAX: each block's
        max, PSUM: its sum(exp(z - max z))), with the semantics of ``workbench.decode.sampler.sample_np``:

        1. the SB blocks with the largest maxima (ALLB: all NB) — the C largest logits lie in them (the C-th
           largest is at least the SB-th largest block max, SB = min(C, NB)); see :func:`_select_blocks`;
        2. their C largest z = logit * 1/T (exactly C; ties: the first) -> CV, CI (compacted);
        3. TOP_P: each candidate's mass before it (ranked by z, then place), normalised over the whole
           vocabulary (the logsumexp from the partials), kept while below top_p (NKEEP: how many);
        4. Gumbel-max over the kept ones -> TOK (ADVANCE: POS moves on by one).
        Selections are exact radix searches (:func:`_kth_key`); no sort. BF16: the block maxima are bfloat16
        values, whose order keys fit 16 bits (half the rounds)."""
        if PDL:
            _gdc_go()
            _gdc_wait()
        inv_t = tl.load(INVT)
        pos = tl.load(POS)
        o = tl.arange(0, NBP)
        bm = o < NB
        pm = tl.load(PMAX + o, mask=bm, other=float("-inf"))
        if TOP_P:
            zm = pm * inv_t
            gm = tl.max(zm, 0)
            ps = tl.load(PSUM + o, mask=bm, other=0.0)
            lse = gm + tl.log(tl.sum(tl.where(bm, ps * tl.exp(zm - gm), 0.0), 0))
        if not ALLB:
            if BF16:
                _select_blocks(_okey(pm) >> 16, o, bm, BLK, SKEY, SIDX, SB, NBP, RB, 16, SIEVE, G)
            else:
                _select_blocks(_okey(pm), o, bm, BLK, SKEY, SIDX, SB, NBP, RB, 32, SIEVE, G)
            tl.debug_barrier()                                  # the block list stored before it is read
        if PHASES >= 2:                                         # (PHASES < 3: timing the parts)
            f = tl.arange(0, SBP * BN)
            fb = f // BN
            fm = fb < SB
            if ALLB:
                b = fb
            else:
                b = tl.load(BLK + fb, mask=fm, other=0, cache_modifier=".cg")
            row = b * BN + f % BN
            vm = fm & (row < V)
            z = tl.load(LOGITS + row, mask=vm, other=float("-inf")).to(tl.float32) * inv_t
            sel2 = _top_first(_okey(z), vm, C, RB, 32)
            at = tl.cumsum(sel2.to(tl.int32), 0) - 1
            tl.store(CV + at, z, mask=sel2)
            tl.store(CI + at, row, mask=sel2)
            tl.debug_barrier()
        if PHASES >= 3:
            c = tl.arange(0, CP)
            cm = c < C
            cv = tl.load(CV + c, mask=cm, other=float("-inf"), cache_modifier=".cg")
            ci = tl.load(CI + c, mask=cm, other=0, cache_modifier=".cg")
            if TOP_P:
                before = tl.zeros([CP], tl.float32)
                # rank key: z's order key, then the earlier place first (one int64 compare per pair)
                ki = (_okey(cv).to(tl.int64) << 32) + (CP - 1 - c)
                for j0 in tl.static_range(0, CP, CJ):
                    j = j0 + tl.arange(0, CJ)
                    jm = j < C
                    vj = tl.load(CV + j, mask=jm, other=float("-inf"), cache_modifier=".cg")
                    pj = tl.where(jm, tl.exp(vj - lse), 0.0)
                    if RB == 1:                   # (the plainest code: the engine's fallback)
                        ahead = (vj[None, :] > cv[:, None]) | ((vj[None, :] == cv[:, None])
                                                               & (j[None, :] < c[:, None]))
                    else:
                        kj = (_okey(vj).to(tl.int64) << 32) + (CP - 1 - j)
                        ahead = kj[None, :] > ki[:, None]
                    before += tl.sum(tl.where(ahead, pj[None, :], 0.0), 1)
                keep = cm & (before < tl.load(TOPP))
                cv = tl.where(keep, cv, float("-inf"))
                tl.store(NKEEP, tl.sum(keep.to(tl.int32), 0))
            sc = tl.where(cm, cv + _gumbel(SEED, pos + 1, ci.to(tl.int64)), float("-inf"))
            jb = tl.argmax(sc, 0, tie_break_left=True)
            tl.store(TOK, tl.sum(tl.where(c == jb, ci, 0), 0).to(tl.int64))
            if ADVANCE:
                tl.store(POS, pos + 1)

    @triton.jit
    def _norm_vec(R, Y, PW, NW, X, ROUT, K, eps, POST_NORM: tl.constexpr, WRITE_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, DT: tl.constexpr, PDL: tl.constexpr):
        """One program: X = rms_norm(R + post_norm(Y) * PW) * NW (the input of the head); WRITE_R: the residual
        R + post_norm(Y) * PW to ROUT too (capture mode: the last layer's resid_post)."""
        if PDL:
            _gdc_go()
            _gdc_wait()
        ko = tl.arange(0, BLOCK_K)
        m = ko < K
        pw = tl.zeros([BLOCK_K], tl.float32)
        if POST_NORM:
            pw = tl.load(PW + ko, mask=m, other=0.0)
        x = _xvec(R, Y, pw, tl.load(NW + ko, mask=m, other=0.0), ROUT, ko, m, K, eps, 0, X, 1.0, True, True,
                  POST_NORM, WRITE_R, False, DT)
        tl.store(X + ko, x.to(DT), mask=m)

    @triton.jit
    def _attn_load(KC, VC, KPOS, s0, lim, S, kvh, d, dm, HD: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_S: tl.constexpr):
        """BLOCK_S cached slots from s0 (below lim): their positions and K, V halves in float32."""
        sl = s0 + tl.arange(0, BLOCK_S)
        sm = sl < lim
        lo = (kvh * S + sl)[:, None] * HD + d[None, :]
        lm = sm[:, None] & dm[None, :]
        kp = tl.load(KPOS + sl, mask=sm, other=-1)
        K1 = tl.load(KC + lo, mask=lm, other=0.0).to(tl.float32)
        K2 = tl.load(KC + lo + HALF, mask=lm, other=0.0).to(tl.float32)
        V1 = tl.load(VC + lo, mask=lm, other=0.0).to(tl.float32)
        V2 = tl.load(VC + lo + HALF, mask=lm, other=0.0).to(tl.float32)
        return sl, kp, K1, K2, V1, V2

    @triton.jit
    def _attn_fold(sl, kp, K1, K2, V1, V2, end, pos, slot, window, scale, cap,
                   q1, q2, k1, k2, v1, v2, m_i, l_i, a1, a2, CAP: tl.constexpr, WINDOW: tl.constexpr):
        """Fold loaded slots into the online softmax of one query (m_i, l_i, a1|a2); the slot written this step
        takes the new k/v from registers. Products and sums in float32, as the plain path."""
        new = sl == slot
        kp = tl.where(new, pos, kp)
        ok = (sl < end) & (kp >= 0) & (kp <= pos)
        if WINDOW:
            ok = ok & (pos - kp < window)
        K1 = tl.where(new[:, None], k1[None, :], K1)
        K2 = tl.where(new[:, None], k2[None, :], K2)
        V1 = tl.where(new[:, None], v1[None, :], V1)
        V2 = tl.where(new[:, None], v2[None, :], V2)
        sc = (tl.sum(K1 * q1[None, :], 1) + tl.sum(K2 * q2[None, :], 1)) * scale
        if CAP:
            sc = _tanh(sc / cap) * cap
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(sc - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        a1 = a1 * alpha + tl.sum(p[:, None] * V1, 0)
        a2 = a2 * alpha + tl.sum(p[:, None] * V2, 0)
        return m_new, l_i, a1, a2

    @triton.jit
    def _attn_split(QKV, QW, KW, COS, SIN, POS, KC, VC, KPOS, OP, MP, LP, CNT, Z,
                    S, chunk, nsplit, scale, cap, eps, window,
                    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, HALF: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
                    QK_NORM: tl.constexpr, CAP: tl.constexpr, WINDOW: tl.constexpr, RING: tl.constexpr,
                    ONE_BLOCK: tl.constexpr, BLOCK_SP: tl.constexpr, DT: tl.constexpr, PDL: tl.constexpr):
        """Program (query head h, chunk): the new token's q (head h), k and v of h's kv head — normed, rotated,
        rounded as the plain path does; the first query head of each kv head writes k, v (and the slot's
        position) when the slot is in its chunk; attends over the chunk's slots; stores the unnormalised
        partial (acc, max, sum); the last of head h's programs to finish (a counter per head) combines the
        partials into Z (the o projection's input) and resets the counter. ONE_BLOCK (chunk == BLOCK_S): the
        cached slots load first, before waiting on the q/k/v product."""
        if PDL:
            _gdc_go()
        h = tl.program_id(0)
        sp = tl.program_id(1)
        kvh = h // G
        d = tl.arange(0, BLOCK_H)
        dm = d < HALF
        start = sp * chunk
        lim = tl.minimum(start + chunk, S)
        if ONE_BLOCK:
            sl, kp, K1, K2, V1, V2 = _attn_load(KC, VC, KPOS, start, lim, S, kvh, d, dm, HD, HALF, BLOCK_S)
        pos = tl.load(POS)
        slot = pos % S
        c1 = tl.load(COS + pos * HD + d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(COS + pos * HD + HALF + d, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + pos * HD + d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + pos * HD + HALF + d, mask=dm, other=0.0).to(tl.float32)
        if PDL:
            _gdc_wait()       # q/k/v come from the previous kernel; the cache, tables and position do not
        q1 = tl.load(QKV + h * HD + d, mask=dm, other=0.0).to(tl.float32)
        q2 = tl.load(QKV + h * HD + HALF + d, mask=dm, other=0.0).to(tl.float32)
        ko = H * HD + kvh * HD + d
        k1 = tl.load(QKV + ko, mask=dm, other=0.0).to(tl.float32)
        k2 = tl.load(QKV + ko + HALF, mask=dm, other=0.0).to(tl.float32)
        vo = (H + HKV) * HD + kvh * HD + d
        v1 = tl.load(QKV + vo, mask=dm, other=0.0).to(tl.float32)
        v2 = tl.load(QKV + vo + HALF, mask=dm, other=0.0).to(tl.float32)
        if QK_NORM:
            qr = tl.rsqrt((tl.sum(q1 * q1, 0) + tl.sum(q2 * q2, 0)) / HD + eps)
            q1 = _rnd(q1 * qr * tl.load(QW + d, mask=dm, other=0.0), DT)
            q2 = _rnd(q2 * qr * tl.load(QW + HALF + d, mask=dm, other=0.0), DT)
            kr = tl.rsqrt((tl.sum(k1 * k1, 0) + tl.sum(k2 * k2, 0)) / HD + eps)
            k1 = _rnd(k1 * kr * tl.load(KW + d, mask=dm, other=0.0), DT)
            k2 = _rnd(k2 * kr * tl.load(KW + HALF + d, mask=dm, other=0.0), DT)
        q1, q2 = _rnd(q1 * c1 - q2 * s1, DT), _rnd(q2 * c2 + q1 * s2, DT)
        k1, k2 = _rnd(k1 * c1 - k2 * s1, DT), _rnd(k2 * c2 + k1 * s2, DT)

        mine = (slot >= start) & (slot < start + chunk) & (h % G == 0)
        co = (kvh * S + slot) * HD + d
        if mine:
            tl.store(KC + co, k1.to(DT), mask=dm)
            tl.store(KC + co + HALF, k2.to(DT), mask=dm)
            tl.store(VC + co, v1.to(DT), mask=dm)
            tl.store(VC + co + HALF, v2.to(DT), mask=dm)
            if kvh == 0:
                tl.store(KPOS + slot, pos)

        end = lim
        if not RING:
            end = tl.minimum(end, pos + 1)     # slot == position: later slots are empty
        m_i = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
        l_i = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
        a1 = tl.zeros([BLOCK_H], tl.float32)
        a2 = tl.zeros([BLOCK_H], tl.float32)
        if ONE_BLOCK:
            m_i, l_i, a1, a2 = _attn_fold(sl, kp, K1, K2, V1, V2, end, pos, slot, window, scale, cap,
                                          q1, q2, k1, k2, v1, v2, m_i, l_i, a1, a2, CAP, WINDOW)
        else:
            for s0 in range(start, end, BLOCK_S):
                sl, kp, K1, K2, V1, V2 = _attn_load(KC, VC, KPOS, s0, end, S, kvh, d, dm, HD, HALF, BLOCK_S)
                m_i, l_i, a1, a2 = _attn_fold(sl, kp, K1, K2, V1, V2, end, pos, slot, window, scale, cap,
                                              q1, q2, k1, k2, v1, v2, m_i, l_i, a1, a2, CAP, WINDOW)
        oo = (sp * H + h) * HD + d
        tl.store(OP + oo, a1, mask=dm)
        tl.store(OP + oo + HALF, a2, mask=dm)
        tl.store(MP + sp * H + h, m_i)
        tl.store(LP + sp * H + h, l_i)
        tl.debug_barrier()                                     # every thread's partial stored ...
        done = tl.atomic_add(CNT + h, 1, sem="acq_rel")        # ... before the count (release) / after (acquire)
        if done == nsplit - 1:
            tl.debug_barrier()
            spi = tl.arange(0, BLOCK_SP)
            spm = spi < nsplit
            mp = tl.load(MP + spi * H + h, mask=spm, other=float("-inf"), cache_modifier=".cg")
            lp = tl.load(LP + spi * H + h, mask=spm, other=0.0, cache_modifier=".cg")
            po = (spi * H + h)[:, None] * HD + d[None, :]
            pm = spm[:, None] & dm[None, :]
            o1 = tl.load(OP + po, mask=pm, other=0.0, cache_modifier=".cg")
            o2 = tl.load(OP + po + HALF, mask=pm, other=0.0, cache_modifier=".cg")
            e = tl.where(spm, tl.exp(mp - tl.max(mp, 0)), 0.0)
            den = tl.sum(e * lp, 0)
            tl.store(Z + h * HD + d, (tl.sum(e[:, None] * o1, 0) / den).to(DT), mask=dm)
            tl.store(Z + h * HD + HALF + d, (tl.sum(e[:, None] * o2, 0) / den).to(DT), mask=dm)
            tl.store(CNT + h, 0)


# (BLOCK_N, BLOCK_K, num_warps) per product of a layer and the head; attention: (BLOCK_S, num_warps, most
# chunks per layer).
# Picked by a sweep of whole-step CUDA-graph replays on an H100 (see README "Throughput"); WORKBENCH_TRITON_TUNE
# ("kind=BN,BK,W;...") overrides them for tuning runs.
TUNE = {"qkv": (8, 256, 4), "o": (4, 256, 4), "gu": (2, 256, 4), "down": (2, 256, 4), "head": (16, 256, 8),
        "attn": (16, 2, 64), "sample": (1, 16, 64, 0)}
# sample: (radix bits a round, num_warps, pairwise chunk, sieve: search only the blocks (up to this many, at least
# 2x the blocks wanted) that reach a bound from group maxima (if they fit; 0: no sieve)). One bit a round (one count
# and one reduction per round) beat two (three counts packed in one int64 sum) on the H200: selection kernel 58.6 vs
# 71.9 µs (f32), 49.6 vs 61.5 (bf16), and m.generate sampled 1,836 vs 1,782 tok/s (f32), 2,316 vs 2,200 (bf16); a
# 256-bin histogram a round (tl.histogram, 4 rounds for 32 bits) was slower still (121 / 86 µs) and is not kept.


def _single_max() -> int:
    """Products with K up to this many columns load their whole rows at once (env: tests of the loop path)."""
    return int(os.environ.get("WORKBENCH_TRITON_SINGLE_MAX", "2048"))


def _tune(kind: str) -> tuple:
    env = os.environ.get("WORKBENCH_TRITON_TUNE", "")
    for part in filter(None, env.split(";")):
        k, v = part.split("=")
        if k.strip() == kind:
            return tuple(int(x) for x in v.split(","))
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and kind not in ("attn", "sample"):
        return (64,) + TUNE[kind][1:]          # the interpreter's cost is per program
    return TUNE[kind]


class TritonDecodeStep:
    """``step(tok [1, 1], pos [1]) -> logits [1, V]`` for one :class:`~workbench.decode.plan.DecodePlan` (its
    weights by role, per-layer flags and the static cache's buffers; see module doc); captured into a CUDA graph
    by :class:`workbench.decode.engine.DecodeEngine`. The route checks :func:`unsupported` first."""

    def __init__(self, plan):
        self.plan_ = plan
        ops = plan.ops
        self.ops = ops
        self.dt = getattr(tl, _DT[ops.tdtype])
        self.pdl = bool(ops.device.type == "cuda" and _gdc_wait is not None
                        and torch.cuda.get_device_capability(ops.device)[0] >= 9
                        and os.environ.get("WORKBENCH_TRITON_PDL", "1") != "0")
        self.launch = {"launch_pdl": True} if self.pdl else {}
        dev, D = ops.device, plan.hidden
        self.H = plan.n_heads
        self.eps = plan.eps
        self.layers = []
        max_split, max_q = 1, 1
        for lp in plan.layers:
            hd, kvh = lp.head_dim, lp.kv_heads
            lc = lp.kv
            S = lc.slots
            bs_, _, most = _tune("attn")
            chunk = max(bs_, _pow2(-(-S // most)))          # slots per program
            nsplit = -(-S // chunk)
            max_split = max(max_split, nsplit)
            max_q = max(max_q, self.H * hd)
            self.layers.append(dict(
                hd=hd, kvh=kvh, S=S, chunk=chunk, nsplit=nsplit, ring=lc.ring, lc=lc, i=lp.index, rope=lp.rope,
                qkv=lp.qkv, o=lp.o, gu=lp.gate_up, down=lp.down, n_in=lp.input_norm, n_pre=lp.pre_ff_norm,
                n_pa=lp.post_attn_norm, n_pf=lp.post_ff_norm, qn=lp.q_norm, kn=lp.k_norm,
                F=lp.intermediate, window=lp.window, scale=lp.scale))
        self.head = plan.head
        self.embed = plan.embed
        td = ops.tdtype
        nq = max((self.H + 2 * lay["kvh"]) * lay["hd"] for lay in self.layers)
        f32 = torch.float32
        self.b_qkv = torch.empty(nq, dtype=td, device=dev)
        self.b_p = torch.empty(D, dtype=td, device=dev)          # residual entering the attention
        self.b_m = torch.empty(D, dtype=td, device=dev)          # residual entering the MLP
        self.b_yo = torch.empty(D, dtype=td, device=dev)
        self.b_yd = torch.empty(D, dtype=td, device=dev)
        self.b_a = torch.empty(max(lay["F"] for lay in self.layers), dtype=td, device=dev)
        self.b_x = torch.empty(D, dtype=td, device=dev)          # final normed hidden state (the head's input)
        self.b_z = torch.empty(max_q, dtype=td, device=dev)             # attention output (o's input)
        self.b_op = torch.empty(max_split * max_q, dtype=f32, device=dev)
        self.b_mp = torch.empty(max_split * self.H, dtype=f32, device=dev)
        self.b_lp = torch.empty(max_split * self.H, dtype=f32, device=dev)
        self.logits = torch.empty((1, self.head.shape[0]), dtype=td, device=dev)
        nh = triton.cdiv(self.head.shape[0], _tune("head")[0])           # head programs: argmax partials
        self.b_pmax = torch.empty(nh, dtype=f32, device=dev)
        self.b_pidx = torch.empty(nh, dtype=torch.int32, device=dev)
        self.sampler = None             # greedy; use_sampler(TritonSampler) samples
        self.token = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.b_cnt = torch.zeros(self.H, dtype=torch.int32, device=dev)  # finished chunks per head
        self._dummy = torch.zeros(1, dtype=f32, device=dev)
        # the embedding scale rounded to the dtype first, as ops.scale (and HF) do; on the device, so a CUDA
        # graph can capture the step
        self.escale = torch.tensor(plan.embed_scale, dtype=td, device=dev)
        self.esc = float(self.escale.float().cpu())
        self.b_x0 = torch.empty(D, dtype=td, device=dev)

    def _gemv(self, kind, N, K, W, OUT, R, Y=None, PW=None, NW=None, ROUT=None, pair=False, cap=None,
              pick=None, tok=None):
        """A launch of ``_norm_gemv`` (returned, not run). tok: R is the embedding table, x its row tok[0].
        pick (the head): (EPI, PMAX, PIDX, PSUM, SEED, INVT, POS) of :func:`_epilogue`."""
        bn, bk, nw = _tune(kind)
        single = _pow2(K) <= _single_max()
        bk = _pow2(K) if single else min(bk, _pow2(K))
        z = self._dummy
        epi, *pk = pick or (0, z, z, z, z, z, z)
        return lambda: _norm_gemv[(triton.cdiv(N, bn),)](
            R, z if Y is None else Y, z if PW is None else PW, z if NW is None else NW,
            W, OUT, z if ROUT is None else ROUT, pk[0], pk[1], z if tok is None else tok, *pk[2:],
            N, K, self.eps, float(cap or 1.0), self.esc,
            HAS_NORM=NW is not None, HAS_Y=Y is not None, POST_NORM=PW is not None, WRITE_R=ROUT is not None,
            PAIR=pair, CAP=cap is not None, SINGLE=single, EPI=epi, EMB=tok is not None, BLOCK_N=bn,
            BLOCK_K=bk, DT=self.dt, PDL=self.pdl, num_warps=nw, **self.launch)

    def use_sampler(self, sampler, check: bool = False) -> str | None:
        """Sample instead of taking the argmax: ``sampler`` (a :class:`TritonSampler` over this head's blocks)
        gets its partials from the head's epilogue and picks the token in one more kernel; None: greedy.
        check: compile (and run, on scratch buffers) the head and the pick now; if that fails the step stays
        greedy and the reason is returned (the caller samples some other way)."""
        if sampler is not None and sampler.bn != _tune("head")[0]:
            raise ValueError(f"the sampler's blocks ({sampler.bn}) are not the head's ({_tune('head')[0]})")
        self.sampler = sampler
        if sampler is None or not check:
            return None
        err = None
        tuned = _tune("sample")
        for tune in (None, TritonSampler.PLAIN):     # the tuned selection kernel, else its plainest variant
            if tune is not None and tuple(tune) == tuple(tuned):
                break                                # (the same kernel: it failed already)
            sampler.tune = tune
            try:
                tok = torch.zeros((1, 1), dtype=torch.long, device=self.ops.device)
                pos = torch.zeros(1, dtype=torch.long, device=self.ops.device)
                for name, launch in self.plan(tok, pos):
                    if name in ("head", "sample"):    # they write only the logits, the partials and tok
                        launch()
                self.ops.synchronize()
                if tune is not None:
                    sampler.note += f" [sample={tune}: the tuned kernel failed: {err}]"
                return None
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        self.sampler = None
        return err

    def plan(self, tok, pos, advance: bool = False, capture=None) -> list:
        """The step's kernel launches in order, as (name, launch) pairs, for the token ``tok`` [1, 1] at the
        device-side position ``pos`` [1]. advance: the argmax goes back into ``tok`` and ``pos`` moves on
        (the step feeds itself, for a CUDA graph replayed token after token); else it lands in ``self.token``.
        capture: a [L, D] buffer that gets each layer's residual after the layer (hook_resid_post) — the
        kernels' own residual buffers copied as the next layer's first kernel writes them (parity)."""
        plan = self.plan_
        D, H = plan.hidden, self.H
        z = self._dummy
        out = []
        if _pow2(D) <= _single_max():          # the embedding row is read by the first product's prologue
            R, Y, PW, emb = self.embed, None, None, tok
        else:
            def embed():
                self.b_x0.copy_((self.ops.take_rows(self.embed, tok.reshape(1, 1)) * self.escale).reshape(D))
            out.append(("embed", embed))
            R, Y, PW, emb = self.b_x0, None, None, None
        capa = plan.attn_softcap
        bs, aw = _tune("attn")[:2]
        for li, lay in enumerate(self.layers):
            hd, kvh, lc, F = lay["hd"], lay["kvh"], lay["lc"], lay["F"]
            # residual update of the previous layer + input norm + q/k/v
            out.append(("qkv", self._gemv("qkv", (H + 2 * kvh) * hd, D, lay["qkv"], self.b_qkv, R, Y, PW,
                                          lay["n_in"], ROUT=self.b_p, tok=emb)))
            if capture is not None and li > 0:              # b_p: the residual entering this layer
                out.append(("capture", lambda li=li: capture[li - 1].copy_(self.b_p)))
            emb = None
            cos, sin = lay["rope"]                          # [max_len, hd], made by begin_static
            out.append(("attn", lambda lay=lay, hd=hd, kvh=kvh, lc=lc, cos=cos, sin=sin: _attn_split[
                (H, lay["nsplit"])](
                self.b_qkv, z if lay["qn"] is None else lay["qn"], z if lay["kn"] is None else lay["kn"],
                cos, sin, pos, lc.k, lc.v, lc.kpos_dev, self.b_op, self.b_mp, self.b_lp, self.b_cnt, self.b_z,
                lay["S"], lay["chunk"], lay["nsplit"], float(lay["scale"]), float(capa or 1.0), self.eps,
                int(lay["window"] or 0),
                H=H, HKV=kvh, G=H // kvh, HD=hd, HALF=hd // 2, BLOCK_H=_pow2(hd // 2), BLOCK_S=bs,
                QK_NORM=lay["qn"] is not None, CAP=capa is not None, WINDOW=lay["window"] is not None,
                RING=lay["ring"], ONE_BLOCK=lay["chunk"] == bs, BLOCK_SP=_pow2(lay["nsplit"]), DT=self.dt,
                PDL=self.pdl, num_warps=aw, **self.launch)))
            out.append(("o", self._gemv("o", D, H * hd, lay["o"], self.b_yo, self.b_z)))
            out.append(("gu", self._gemv("gu", F, D, lay["gu"], self.b_a, self.b_p, self.b_yo, lay["n_pa"],
                                         lay["n_pre"], ROUT=self.b_m, pair=True)))
            out.append(("down", self._gemv("down", D, F, lay["down"], self.b_yd, self.b_a)))
            R, Y, PW = self.b_m, self.b_yd, lay["n_pf"]
        V = self.head.shape[0]
        nw = plan.final_norm
        last = None if capture is None else capture[len(self.layers) - 1]
        if _pow2(D) <= 8192:
            # the last residual update and the final norm once, so the head's many programs read only x
            out.append(("final_norm", lambda R=R, Y=Y, PW=PW: _norm_vec[(1,)](
                R, Y, z if PW is None else PW, nw, self.b_x, z if last is None else last, D, self.eps,
                POST_NORM=PW is not None, WRITE_R=last is not None,
                BLOCK_K=_pow2(D), DT=self.dt, PDL=self.pdl, num_warps=8, **self.launch)))
            out.append(("head", self._gemv("head", V, D, self.head, self.logits, self.b_x,
                                           cap=plan.final_softcap, pick=self._pick(pos))))
        else:
            out.append(("head", self._gemv("head", V, D, self.head, self.logits, R, Y, PW, nw, ROUT=last,
                                           cap=plan.final_softcap, pick=self._pick(pos))))
        into = tok if advance else self.token
        if self.sampler is not None:
            out.append(("sample", self.sampler.finish(self.logits, into, pos, advance, self.pdl)))
            return out
        nh = self.b_pmax.shape[0]
        out.append(("argmax", lambda: _argmax_final[(1,)](
            self.b_pmax, self.b_pidx, into, pos, nh, BLOCK=_pow2(nh), ADVANCE=advance,
            PDL=self.pdl, num_warps=16, **self.launch)))
        return out

    def _pick(self, pos):
        if self.sampler is None:
            z = self._dummy
            return (1, self.b_pmax, self.b_pidx, z, z, z, z)
        return self.sampler.partials(pos)

    def __call__(self, tok, pos, capture=None):
        """Logits [1, V] of the token after ``tok`` at position ``pos``; its greedy choice lands in
        ``self.token`` [1, 1] (see :meth:`greedy`). capture: see :meth:`plan`."""
        for _, launch in self._plan(tok, pos, False, capture):
            launch()
        return self.logits

    def greedy(self, tok, pos):
        """The step's token [1, 1] (int64): the argmax (the first on ties, as torch.argmax), or the sampler's."""
        self(tok, pos)
        return self.token

    def advance(self, tok, pos):
        """One step that writes its token into ``tok`` and adds one to ``pos`` (both [1], on the device)."""
        for _, launch in self._plan(tok, pos, True):
            launch()
        return tok

    def _plan(self, tok, pos, advance, capture=None):
        if not self.plan_.cache.static:
            raise RuntimeError("the Triton decode step needs the cache in static mode (cache.begin_static())")
        if tok.dtype != torch.long or pos.dtype != torch.long:
            raise TypeError(f"token and position must be int64 tensors, got {tok.dtype} and {pos.dtype}")
        return self.plan(tok, pos, advance, capture)


class TritonSampler:
    """The next token sampled on the device in Triton kernels, with the semantics of
    :mod:`workbench.decode.sampler` (``sample_np``): per-block partials of the logits — left by the Triton step's
    head in its epilogue (:meth:`partials`), or by :func:`_block_stats` over logits in memory (:meth:`__call__`)
    — and one more kernel (:meth:`finish`): :func:`_argmax_final` over each block's max(z + gumbel) when the
    whole vocabulary is sampled, :func:`_sample_cand` when there are candidates (top-k / top-p). Seed, 1/T and
    top_p are the device tensors of ``params`` (``sampler.TorchParams``): a CUDA graph holding the kernels is not
    re-captured when they change (:meth:`set`)."""

    CMAX = 1024          # candidates (top_k) the selection kernel takes; more: the torch sampler
    PLAIN = (1, 16, 64, 0)   # the selection kernel's plainest variant (1 bit a round, no sieve)

    @classmethod
    def unsupported(cls, s, vocab: int) -> str | None:
        C = s.candidates(vocab)
        if triton is None:
            return "triton is not installed"
        if C is not None and C > cls.CMAX:
            return f"top_k={C} (more than {cls.CMAX} candidates)"
        return None

    def __init__(self, s, vocab: int, device, params, block_n: int | None = None):
        why = self.unsupported(s, vocab)
        if why:
            raise ValueError(f"TritonSampler: {why}")
        self.bn = int(block_n or _tune("head")[0])
        self.V, self.C, self.top_p, self.params = int(vocab), s.candidates(vocab), s.use_top_p, params
        self.nb = triton.cdiv(self.V, self.bn)
        f32, i32 = torch.float32, torch.int32
        self.pmax = torch.empty(self.nb, dtype=f32, device=device)
        self.pidx = torch.empty(self.nb, dtype=i32, device=device)
        self.psum = torch.empty(self.nb, dtype=f32, device=device)
        self.epi = 2 if self.C is None else 3
        if self.C is not None:
            self.sb = min(self.C, self.nb)
            self.blk = torch.zeros(self.sb, dtype=i32, device=device)      # the blocks searched
            self.cv = torch.zeros(self.C, dtype=f32, device=device)        # the candidates' z (in no order)
            self.ci = torch.zeros(self.C, dtype=i32, device=device)        # ... and their token ids
            self.nkeep = torch.zeros(1, dtype=i32, device=device)          # top-p: how many were kept
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.skey = self.sidx = None                                        # the sieve's scratch (tune)
        self.tune = None                                    # (RB, warps, chunk, sieve) instead of _tune("sample")
        self.note = ("triton (whole vocabulary: Gumbel-max in the head's epilogue)" if self.C is None else
                     f"triton (top {self.C} from the head's block maxima{', top-p' if self.top_p else ''})")

    def set(self, sp):
        self.params.set(sp)

    def partials(self, pos):
        """The head epilogue's arguments (EPI, PMAX, PIDX, PSUM, SEED, INVT, POS)."""
        p = self.params
        return (self.epi, self.pmax, self.pidx, self.psum, p.seed, p.inv_t, pos)

    def finish(self, logits, into, pos, advance: bool = False, pdl: bool = False, phases: int = 3):
        """The launch (returned, not run) that picks the token from the partials into ``into`` [1, 1] (advance:
        ``pos`` moves on by one); ``logits`` [V] or [1, V]: the candidates are read from it."""
        launch = {"launch_pdl": True} if pdl else {}
        p, nb = self.params, self.nb
        if self.C is None:
            return lambda: _argmax_final[(1,)](self.pmax, self.pidx, into, pos, nb, BLOCK=_pow2(nb),
                                               ADVANCE=advance, PDL=pdl, num_warps=16, **launch)
        rb, nw, cj, *sv = self.tune or _tune("sample")
        if rb not in (1, 2, 4, 8, 16):
            raise ValueError(f"sample tune: {rb} radix bits a round (1, 2, 4, 8 or 16: it must divide 16)")
        C, sb = self.C, self.sb
        if max(_pow2(nb), _pow2(sb) * self.bn) > 1 << 19:
            raise ValueError(f"TritonSampler: {nb} blocks of {self.bn}: the packed counts hold up to 2**19 entries")
        # the sieve's bound: the sb-th largest of 4x as many group maxima (random logits: ~1.15 sb blocks reach it)
        sieve = max(_pow2(sv[0]), 2 * _pow2(sb)) if sv and sv[0] else 0
        g = min(_pow2(nb) // 2, 4 * _pow2(sb))
        if sieve and (g < sb or sieve > _pow2(nb) // 2):
            sieve = 0                                  # nothing to gain: as many blocks as a full search
        if sieve and (self.skey is None or self.skey.numel() < sieve):
            self.skey = torch.zeros(sieve, dtype=torch.int32, device=self.pmax.device)
            self.sidx = torch.zeros(sieve, dtype=torch.int32, device=self.pmax.device)
        sk, si = (self.skey, self.sidx) if sieve else (self.pmax, self.pidx)
        return lambda: _sample_cand[(1,)](
            self.pmax, self.psum, logits, self.blk, self.cv, self.ci, self.nkeep, p.seed, p.inv_t, p.top_p,
            into, pos, sk, si, self.V, nb, C, sb, NBP=_pow2(nb), BN=self.bn, SBP=_pow2(sb), CP=_pow2(C),
            CJ=min(cj, _pow2(C)), ALLB=sb == nb, TOP_P=self.top_p, ADVANCE=advance, RB=rb,
            BF16=logits.dtype == torch.bfloat16, PDL=pdl, SIEVE=sieve, G=g if sieve else 1, PHASES=phases,
            num_warps=nw, **launch)

    def stats(self, logits, pos):
        """The launch (returned, not run) of the partials of logits already in memory."""
        p = self.params
        g = max(1, min(_pow2(self.nb), 4096 // self.bn))           # 4096 logits a program
        return lambda: _block_stats[(triton.cdiv(self.nb, g),)](
            logits, self.pmax, self.pidx, self.psum, p.seed, p.inv_t, pos, self.V, self.nb, G=g, BLOCK_N=self.bn,
            EPI=self.epi, num_warps=4)

    def __call__(self, logits, pos):
        """``logits`` [1, V] (any float dtype, contiguous), ``pos`` [1] int64 (the input token's position) ->
        the token [1, 1] int64 (this sampler's buffer), as ``sampler.torch_sampler``'s function."""
        self.stats(logits, pos)()
        self.finish(logits, self.token, pos)()
        return self.token

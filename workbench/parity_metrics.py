"""Parity metrics where the target's arrays live: only scalars come to the host.

``workbench.parity.metrics`` / ``_topk_agree`` are the definitions (numpy, float64); this module computes the
same numbers in the target's framework, on the target's device:

* torch:cpu / torch:cuda and mlx:cpu: float64, the same arithmetic as numpy (max|Δ| and the scale are the same
  bits; the sums differ only by summation order: <= 1e-12 relative, tested in tests/test_parity_cost.py).
* mlx:gpu and torch:mps (no float64): compensated float32. The float64 reference is held as a float32 pair
  hi + lo (lo = ref - hi), so Δ = (x - hi) - lo carries no rounding of the reference (a float32 target whose
  error is 1e-7 is measured as such, not as the reference's own float32 rounding); the sums are float32
  reductions (tree-ordered on the GPU) over chunks of at most CHUNK elements. The top-1 / top-k sets of the
  reference are computed in float64 on the host, once per tap and positions, and uploaded as masks.

A phase's taps of one size (a 270M's 56 residual / attention / MLP taps: [1, T, 640] each) go in runs
(``_group_stats``): the run's target taps are stacked into one [g, N] array, cast to the statistics' float type in
that one copy, and each statistic (max|Δ|, max|ref|, the four sums, the NaN / inf / mismatch counts) is ONE
reduction along the rows, so a phase costs a few dozen device operations, not ~15 a tap (on the CPU, counted with
torch's dispatcher: 3026 -> 37 for those 56 taps), and a NaN of one tap stays in its own row. A run holds at most
CHUNK elements (RUN_HOST on the CPU, where a smaller run's passes stay in the caches). The reference of a run is
uploaded once per comparison and device as the rows of one tensor (``RefCache.stacked``; decode positions: their
own small stack). The logits (top-1 / top-k) and any tap over the limit go one by one (``_tap_stats``): a few
device reductions per chunk of rows (CHUNK elements at most, so a 600-token full-vocabulary logits tensor needs
no full-size float64 copy), the reference uploaded whole once and sliced on the device for the decode positions.
All taps of one phase cross to the host in one transfer (floats and counts).

Top-k follows numpy's stable argsort of ``-x``: ties go to the lower index, NaN ranks below every number (so
below -inf), and the argmax of a row with a NaN is its first NaN, as ``np.argmax`` returns.
"""
from __future__ import annotations

import math
import time

import numpy as np

CHUNK = 1 << 24          # elements per reduction chunk on a device (float64: 128 MiB per temporary)
CHUNK_HOST = 1 << 20     # on the CPU: a chunk's few passes stay in the caches (float64: 8 MiB; 2x faster than 2^24)
RUN_HOST = 1 << 19       # on the CPU, elements of a run of taps (a run of one where a tap is larger, up to CHUNK_HOST):
                         # 1.7x faster than 2^20 on a 256-token 270M prefill (the run's passes stay in the caches)
_F = 6                   # float stats: max|d|, max|r|, sum d^2, sum r^2, sum x^2, sum x*r (finite entries)
_I = 5                   # counts: NaN, inf, inf mismatches, top-1 agreements, top-k overlaps (logits only)


# ---------------------------------------------------------------------------------------- frameworks
class _Numpy:
    """Host float64 (the fallback where torch is not importable). The elementwise functions come from ``xp``
    (numpy, torch or mlx.core: the same names); the adapters below differ where the frameworks do."""
    key = ("numpy",)
    exact = True
    host_sync = True     # the arrays are on the host: a data-dependent branch costs no transfer
    inf = math.inf
    xp = np

    def isnan(self, x):
        return self.xp.isnan(x)

    def isinf(self, x):
        return self.xp.isinf(x)

    def isfinite(self, x):
        return self.xp.isfinite(x)

    def sign(self, x):
        return self.xp.sign(x)

    def abs(self, x):
        return self.xp.abs(x)

    def where(self, m, a, b):
        return self.xp.where(m, a, b)

    def shape(self, x):
        return tuple(x.shape)

    def rows(self, x, L):
        return x.reshape(-1, L)

    def py(self, v):
        return v.item() if hasattr(v, "item") else v

    def amax(self, x):
        return x.max()

    def fsum(self, x):
        return x.sum()

    def count(self, m):
        return m.sum()

    def stack(self, xs):
        return self.xp.stack(xs)

    def zeros(self, n):
        return self.xp.zeros(n)

    def ctx(self):
        return np.errstate(invalid="ignore", over="ignore")     # inf - inf where both are inf: masked out after

    # numpy's own
    def up(self, a):
        return np.asarray(a, dtype=np.float64)

    def f(self, x):
        return np.asarray(x, dtype=np.float64)

    def maxabs(self, d):
        return max(d.max(), -d.min())

    def native(self, x):
        """x as this framework's array in its own dtype (numpy input converted, not cast)."""
        return np.asarray(x)

    def dot(self, a, b):
        return np.dot(a.ravel(), b.ravel())

    def argmax_first(self, y):
        return np.argmax(y, -1)

    def allfinite(self, x):
        """Every entry finite (the host engines' choice of the fast route; where it says False the general
        route gives the same numbers, so an override may be conservative)."""
        return bool(self.py(self.xp.all(self.xp.isfinite(x))))

    def fix_rows(self, m, bad, fn):
        """m with the rows where ``bad`` is set replaced by fn(those rows' indices)."""
        rows = self.xp.where(bad.reshape(-1))[0]
        m[rows] = fn(rows)
        return m

    keep = {"keepdims": True}     # torch spells it keepdim

    def colmax(self, x):
        return self.xp.amax(x, 0)

    def rowsum(self, m):
        return m.sum(-1, **self.keep)

    def rowmax(self, x):
        return self.xp.amax(x, -1, **self.keep)

    def cumsum(self, m):
        return self.xp.cumsum(m, -1)

    def kth(self, y, k):
        return np.partition(y, y.shape[-1] - k, axis=-1)[:, y.shape[-1] - k:y.shape[-1] - k + 1]

    def first(self, m):
        return np.argmax(m, -1)

    def concat(self, xs):
        return np.concatenate(xs)

    def host(self, x):
        return np.asarray(x)

    def tofloat(self, v):
        return np.asarray(v, dtype=np.float64)

    def toint(self, v):
        return np.asarray(v, dtype=np.int64)

    # row-wise ([n taps, N] stacks: one reduction per row)
    def upstack(self, rs):
        """Host float64 arrays of one size as the rows of one [len(rs), N] array on the device."""
        return self.up(_rows(rs))

    def fstack(self, xs):
        """The taps xs (same size) as one [len(xs), N] array of the statistics' float type: one cast per group."""
        out = np.empty((len(xs), int(np.prod(self.shape(xs[0])))), np.float64)
        for i, x in enumerate(xs):
            out[i] = np.asarray(x).reshape(-1)
        return out

    def stack1(self, xs):
        return self.xp.stack(xs, 1)

    def count1(self, m):
        return m.sum(1)

    def maxabs1(self, d):
        return np.maximum(d.max(1), -d.min(1))

    def dot1(self, a, b):
        return np.stack([np.dot(u, v) for u, v in zip(a, b)]) if a.shape[0] else np.zeros(0)

    def izeros(self, shape):
        return self.toint(self.xp.zeros(shape))


class _Torch(_Numpy):
    """torch on the tensor's device: float64 on cpu/cuda, compensated float32 on mps."""
    keep = {"keepdim": True}

    def __init__(self, device, exact: bool | None = None):
        import torch
        self.t = self.xp = torch
        self.device = torch.device(device)
        self.exact = self.device.type != "mps" if exact is None else exact     # exact=False: tests of float32
        self.host_sync = self.device.type == "cpu"
        self.fd = torch.float64 if self.exact else torch.float32
        self.key = ("torch", str(self.device), self.exact)

    def up(self, a):
        return self._from(a).to(self.device, self.fd)

    def _from(self, a):
        import warnings
        with warnings.catch_warnings():     # read-only arrays (stored references): nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            return self.t.from_numpy(np.ascontiguousarray(a))

    def f(self, x):
        if isinstance(x, np.ndarray):
            x = self._from(x)
        return x.detach().to(self.device, self.fd)

    def maxabs(self, d):
        return d.abs().amax()        # the same bits as vector_norm(inf), 6x faster on the CPU

    def native(self, x):
        return (self._from(x) if isinstance(x, np.ndarray) else x.detach()).to(self.device)

    def allfinite(self, x):
        """A sum of squares is finite only where every entry is (the terms are >= 0; an overflow of huge finite
        values says False: the general route): one BLAS pass, 8x faster on the CPU than isfinite().all()."""
        x = x.reshape(-1)
        return bool(self.t.isfinite(self.t.dot(x, x))) if x.is_floating_point() else True

    def dot(self, a, b):
        return self.t.dot(a.reshape(-1), b.reshape(-1))

    def argmax_first(self, y):
        return y.argmax(-1)      # the first maximal value (torch documents it)

    def kth(self, y, k):
        return self.t.topk(y, k, dim=-1).values[:, -1:]

    def first(self, m):
        return m.to(self.t.uint8).argmax(-1)     # the first maximal value (torch documents it)

    def concat(self, xs):
        return self.t.cat(xs)

    def host(self, x):
        return x.cpu().numpy()

    def tofloat(self, v):
        return v.to(self.fd)

    def zeros(self, n):
        return self.t.zeros(n, device=self.device)

    def toint(self, v):
        return v.to(self.t.int64)

    def upstack(self, rs):
        """Each host array copied into its row of one device tensor: no host-side concatenation (a pass over the
        reference: 34 ms for 56 taps x 600 tokens x 640 here), a few microseconds of setup per row's transfer. On
        the CPU numpy's row copies (3x faster here than torch's copy_)."""
        if not self.exact or self.device.type == "cpu":
            return self.up(_rows(rs))
        out = self.t.empty((len(rs), rs[0].size), dtype=self.fd, device=self.device)
        for i, a in enumerate(rs):
            out[i].copy_(self._from(a).reshape(-1))
        return out

    def fstack(self, xs):
        xs = [self._from(x) if isinstance(x, np.ndarray) else x.detach() for x in xs]
        out = self.t.empty((len(xs), xs[0].numel()), dtype=self.fd, device=self.device)
        try:      # one pass: the copy into the float64 rows is the cast
            return self.t.stack([x.reshape(-1) for x in xs], out=out)
        except (RuntimeError, TypeError):
            return self.t.stack([x.reshape(-1) for x in xs]).to(self.device, self.fd)

    def maxabs1(self, d):
        return d.abs().amax(1)

    def dot1(self, a, b):
        if self.host_sync:           # BLAS per row on the CPU (a few rows)
            return self.t.stack([self.t.dot(u, v) for u, v in zip(a, b)])
        return (a * b).sum(1)

    def izeros(self, shape):
        return self.t.zeros(shape, dtype=self.t.int64, device=self.device)


class _MLX(_Numpy):
    """MLX: float64 on the CPU stream (mlx:cpu), compensated float32 on the GPU (mlx:gpu has no float64)."""
    fix_rows = None      # no row assignment by index: rows with a tie take every row the general route

    def __init__(self, device=None, exact: bool | None = None):
        import mlx.core as mx
        self.mx = self.xp = mx
        dev = device if device is not None else mx.default_device()
        self.dev = dev
        self.exact = dev == mx.cpu if exact is None else exact     # exact=False on the CPU: tests of float32
        self.host_sync = dev == mx.cpu
        self.fd = mx.float64 if self.exact else mx.float32
        self.key = ("mlx", str(dev), self.exact)

    def ctx(self):
        return self.mx.stream(self.dev)

    def up(self, a):
        return self.mx.array(np.ascontiguousarray(a, dtype=np.float64 if self.exact else np.float32), dtype=self.fd)

    def f(self, x):
        if isinstance(x, np.ndarray):
            return self.up(x)
        return x.astype(self.fd)

    def py(self, v):
        return v.item()

    def maxabs(self, d):
        return self.mx.max(self.mx.abs(d))

    def native(self, x):
        return self.mx.array(x) if isinstance(x, np.ndarray) else x

    def dot(self, a, b):
        return self.mx.sum(a * b)

    def argmax_first(self, y):
        return self.first(y == self.rowmax(y))

    def count(self, m):
        return self.mx.sum(m.astype(self.mx.int32))

    def rowsum(self, m):
        return self.mx.sum(m.astype(self.mx.int32), axis=-1, keepdims=True)

    def rowmax(self, x):
        return self.mx.max(x, axis=-1, keepdims=True)

    def colmax(self, x):
        return self.mx.max(x, axis=0)

    def cumsum(self, m):
        return self.mx.cumsum(m.astype(self.mx.int32), axis=-1)

    def kth(self, y, k):
        return self.mx.min(self.mx.topk(y, k, axis=-1), axis=-1, keepdims=True)

    def first(self, m):
        L = m.shape[-1]
        return self.mx.min(self.mx.where(m, self.mx.arange(L), L), axis=-1)

    def concat(self, xs):
        return self.mx.concatenate(xs)

    def host(self, x):
        return np.array(x)

    def tofloat(self, v):
        return v.astype(self.fd)

    def toint(self, v):
        return v.astype(self.mx.int32)

    def fstack(self, xs):
        return self.mx.stack([self.f(x).reshape(-1) for x in xs])

    def stack1(self, xs):
        return self.mx.stack(xs, axis=1)

    def count1(self, m):
        return self.mx.sum(m.astype(self.mx.int32), axis=1)

    def maxabs1(self, d):
        return self.mx.max(self.mx.abs(d), axis=1)

    def dot1(self, a, b):
        return self.mx.sum(a * b, axis=1)

    def izeros(self, shape):
        return self.mx.zeros(shape, dtype=self.mx.int32)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _is_mlx(x) -> bool:
    return type(x).__module__.startswith("mlx")


def _host_engine():
    try:
        return _Torch("cpu")
    except ImportError:
        return _Numpy()


def engine_for(x):
    """The framework adapter that computes x's statistics where x lives (numpy: torch on the CPU, float64)."""
    if _is_torch(x):
        return _Torch(x.device)
    if _is_mlx(x):
        return _MLX()
    return _host_engine()


# ---------------------------------------------------------------------------------------- the reference
class RefCache:
    """The reference taps (numpy float64) uploaded once per target device and sliced there; the reference's
    top-1 / top-k sets per (tap, positions), computed once. One per comparison."""

    def __init__(self, ref_taps: dict):
        self.ref_taps = ref_taps
        self._up: dict = {}
        self._top: dict = {}
        self._chunk: dict = {}
        self._stack: dict = {}
        self.upload_s = 0.0

    def get(self, ns, name: str, positions):
        """(hi, lo) of the reference tap at ``positions`` on ns's device; lo is None in float64."""
        key = (ns.key, name)
        if key not in self._up:
            t0 = time.perf_counter()
            r = np.asarray(self.ref_taps[name], dtype=np.float64)
            if ns.exact:
                self._up[key] = (ns.up(r), None)
            else:
                with np.errstate(invalid="ignore", over="ignore"):
                    hi = r.astype(np.float32)
                    lo = (r - hi.astype(np.float64)).astype(np.float32)
                self._up[key] = (ns.up(hi), ns.up(lo))
            self.upload_s += time.perf_counter() - t0
        hi, lo = self._up[key]
        if positions is not None:
            hi = hi[:, positions]
            lo = lo[:, positions] if lo is not None else None
        return hi, lo

    def top(self, ns, name: str, positions, k: int, rows_per: int):
        """Per row chunk, the reference's (argmax, top-k mask) on ns's device (float64 on the host where ns is a
        float32 device, then uploaded)."""
        key = (ns.key, name, None if positions is None else (positions.start, positions.stop), k, rows_per)
        if key not in self._top:
            calc = ns if ns.exact else _host_engine()
            if calc is ns:       # the reference already on this device (``get``)
                src = self.get(ns, name, positions)[0]
            else:
                src = np.asarray(self.ref_taps[name], dtype=np.float64)
                src = calc.up(src[:, positions] if positions is not None else src)
            with calc.ctx():
                rr = calc.rows(src, src.shape[-1] if len(src.shape) else 1)
                out = []
                for s in range(0, rr.shape[0], rows_per):
                    c = rr[s:s + rows_per]
                    fast = _fast_top(calc, c, k) if calc.host_sync and calc.allfinite(c) else None
                    out.append(fast or (_argmax(calc, c), _topmask(calc, c, k)))
            if calc is not ns:
                out = [(_upload(ns, calc.host(a)), _upload(ns, calc.host(m))) for a, m in out]
            self._top[key] = out
        return self._top[key]

    def stacked(self, ns, names: tuple, positions) -> dict:
        """The reference taps ``names`` (one size) at ``positions`` as one [len(names), N] stack on ns's device,
        uploaded in one transfer per (device, group, positions): {"hi", "lo" (None in float64)}; ``stacked_part``
        adds the masks "inf" / "fin" and, for the host engines, "host": (all finite, max|ref| and sum ref^2 per
        row), each made once."""
        key = (ns.key, names, None if positions is None else (positions.start, positions.stop))
        if key not in self._stack:
            t0 = time.perf_counter()
            rs = [np.asarray(self.ref_taps[n], dtype=np.float64) for n in names]
            rs = [r[:, positions] if positions is not None else r for r in rs]
            if ns.exact:
                g = dict(hi=ns.upstack(rs), lo=None)
            else:
                r = _rows(rs)
                with np.errstate(invalid="ignore", over="ignore"):
                    hi = r.astype(np.float32)
                    lo = (r - hi.astype(np.float64)).astype(np.float32)
                g = dict(hi=ns.up(hi), lo=ns.up(lo))
            self._stack[key] = g
            self.upload_s += time.perf_counter() - t0
        return self._stack[key]

    def stacked_part(self, ns, R: dict, part: str):
        """R's "inf" / "fin" masks or "host" statistics, made on the first use (once per comparison)."""
        if part not in R:
            h = R["hi"]
            if part == "host":
                R[part] = (ns.allfinite(h), ns.maxabs1(h), ns.dot1(h, h))
            else:
                R[part] = ns.isinf(h) if part == "inf" else ns.isfinite(h)
        return R[part]

    def chunk(self, ns, name: str, positions, rows_per: int, j: int, hc):
        """(all finite, max|ref|, sum ref^2) of the reference's row chunk j (host engines' fast route), once."""
        key = (ns.key, name, None if positions is None else (positions.start, positions.stop), rows_per, j)
        if key not in self._chunk:
            self._chunk[key] = (ns.allfinite(hc), ns.maxabs(hc), ns.dot(hc, hc))
        return self._chunk[key]


def _rows(rs) -> np.ndarray:
    """Host arrays of one size as the rows of one float64 array."""
    r = np.empty((len(rs), rs[0].size), np.float64)
    for i, a in enumerate(rs):
        r[i] = a.reshape(-1)
    return r


def _upload(ns, a):
    """An integer or bool numpy array on ns's device, as it is (int32 for MLX)."""
    if isinstance(ns, _Torch):
        return ns._from(a).to(ns.device)
    if isinstance(ns, _MLX):
        return ns.mx.array(a.astype(np.int32) if a.dtype.kind in "iu" else a)
    return a


# ---------------------------------------------------------------------------------------- the statistics
def _topmask(ns, y, k):
    """Rows' top-k sets as masks, as numpy's stable argsort of -y: ties to the lower index, NaN below -inf."""
    nan = ns.isnan(y)
    y = ns.where(nan, -ns.inf, y)
    kth = ns.kth(y, k)
    gt = y > kth
    eq = (y == kth) & ~nan
    need = k - ns.rowsum(gt)
    take = eq & (ns.cumsum(eq) <= need)
    need2 = need - ns.rowsum(eq)
    return gt | take | (nan & (ns.cumsum(nan) <= need2))


def _fast_top(ns, y, k):
    """(argmax, top-k mask) of NaN-free rows on a host engine: where a row has no tie at its k-th value the mask
    y >= kth is the stable sort's set; the rows with one (common in bfloat16) take the general route (ties by
    index) — only those rows where the framework indexes rows by a host list, else None (all rows general)."""
    kth = ns.kth(y, k)
    m = y >= kth
    cnt = ns.rowsum(m)
    if ns.py(ns.count(cnt != k)) == 0:
        return ns.argmax_first(y), m
    if ns.fix_rows is None:
        return None
    return ns.argmax_first(y), ns.fix_rows(m, cnt != k, lambda rows: _topmask(ns, y[rows], k))


def _argmax(ns, y):
    """np.argmax per row: the first NaN where the row has one, else the first maximum."""
    nan = ns.isnan(y)
    has = ns.rowsum(nan) > 0
    ymax = ns.rowmax(ns.where(nan, -ns.inf, y))
    return ns.first(ns.where(has, nan, y == ymax))


def _chunk_stats(ns, x, hi, lo):
    xn, xi, ri = ns.isnan(x), ns.isinf(x), ns.isinf(hi)
    ints = [ns.count(xn), ns.count(xi), ns.count(xi != ri) + ns.count(xi & ri & (ns.sign(x) != ns.sign(hi)))]
    fin = ns.isfinite(x) & ns.isfinite(hi)
    d = x - hi if lo is None else (x - hi) - lo
    d, r, xf = ns.where(fin, d, 0.0), ns.where(fin, hi, 0.0), ns.where(fin, x, 0.0)
    fl = [ns.amax(ns.abs(d)), ns.amax(ns.abs(r)), ns.fsum(d * d), ns.fsum(r * r), ns.fsum(xf * xf), ns.fsum(xf * r)]
    return fl, ints


def _tap_stats(ns, refs, name, x, positions, k):
    """(float vector [6], int vector [5], n rows) of one tap, still on the device."""
    hi, lo = refs.get(ns, name, positions)
    xs, rs = ns.shape(x), tuple(hi.shape)
    if xs != rs:
        raise ValueError(f"{name}: shape mismatch: reference {rs} vs {xs}")
    L = xs[-1] if xs else 1
    n = int(np.prod(xs[:-1])) if len(xs) > 1 else 1
    size = int(np.prod(xs)) if xs else 1
    if size == 0:
        return ns.tofloat(ns.zeros(_F)), ns.toint(ns.zeros(_I)), 0
    rows_per = max(1, (CHUNK_HOST if ns.host_sync else CHUNK) // max(L, 1))
    xr, hr, lr = ns.rows(x, L), ns.rows(hi, L), (ns.rows(lo, L) if lo is not None else None)
    top = refs.top(ns, name, positions, min(k, L), rows_per) if k else None
    fls, ins = [], []
    for j, s in enumerate(range(0, n, rows_per)):
        c = slice(s, s + rows_per)
        xc, hc, lc = ns.f(xr[c]), hr[c], (lr[c] if lr is not None else None)
        fast = None
        if ns.host_sync:     # on the CPU a branch on the data costs nothing: finite chunks take fewer passes
            rfin, rscale, rsq = refs.chunk(ns, name, positions, rows_per, j, hc)
            sxx = ns.dot(xc, xc) if rfin else None     # finite iff every entry is (terms >= 0; overflow: general)
            fast = rfin and ns.allfinite(sxx)
        if fast:
            d = xc - hc if lc is None else (xc - hc) - lc
            fl = [ns.maxabs(d), rscale, ns.dot(d, d), rsq, sxx, ns.dot(xc, hc)]
            it = [ns.count(xc[:0] > 0)] * 3
        else:
            fl, it = _chunk_stats(ns, xc, hc, lc)
        if top is not None:     # in the target's own dtype: widening to float64 keeps the order, ties and NaN
            ra, rm = top[j]
            yc = ns.native(xr[c])
            xa, xm = (fast and _fast_top(ns, yc, min(k, L))) or (_argmax(ns, yc), _topmask(ns, yc, min(k, L)))
            it += [ns.count(xa == ra), ns.count(xm & rm)]
        fls.append(ns.stack(fl))
        ins.append(ns.stack(it))
    F, I = ns.stack(fls), ns.stack(ins)
    i = I.sum(0)
    if top is None:
        i = ns.concat([i, ns.toint(ns.zeros(_I - 3))])     # made on the device: no host-to-device copy per tap
    return ns.concat([ns.colmax(F[:, :2]), F[:, 2:].sum(0)]), i, n


def _ref_shape(refs, name, positions):
    r = refs.ref_taps[name]
    return tuple((r[:, positions] if positions is not None else r).shape)


def _groups(ns, refs, items, positions):
    """The taps of ``items`` [(name, x)] that are batched: runs of one shape and dtype, at most CHUNK elements
    a run (RUN_HOST on a host engine; a run of one up to CHUNK_HOST), in order; the rest (empty taps, a tap over
    the limit) go one by one (``_tap_stats``, in row chunks)."""
    limit = CHUNK_HOST if ns.host_sync else CHUNK
    run = min(RUN_HOST, CHUNK_HOST) if ns.host_sync else CHUNK
    by: dict = {}
    single = []
    for name, x in items:
        xs, rs = ns.shape(x), _ref_shape(refs, name, positions)
        if xs != rs:
            raise ValueError(f"{name}: shape mismatch: reference {rs} vs {xs}")
        size = int(np.prod(xs)) if xs else 1
        if size == 0 or size > limit:
            single.append((name, x))
        else:
            by.setdefault((xs, str(getattr(x, "dtype", ""))), []).append((name, x))
    runs = []
    for (xs, _), its in by.items():
        per = max(1, run // int(np.prod(xs) if xs else 1))
        runs += [its[s:s + per] for s in range(0, len(its), per)]
    return runs, single


def _group_stats(ns, refs, run, positions):
    """(floats [g, 6], counts [g, 5]) of a run of g same-size taps, still on the device: each statistic is one
    reduction along the rows of the [g, N] stacks (the target cast to the statistics' float type once), so a
    NaN or inf of one tap stays in its own row. Host engines: a finite run takes fewer passes (the reference's
    scale and sum of squares made once per comparison)."""
    R = refs.stacked(ns, tuple(n for n, _ in run), positions)
    H, L = R["hi"], R["lo"]
    X = ns.fstack([x for _, x in run])
    if ns.host_sync and refs.stacked_part(ns, R, "host")[0]:
        d = X - H if L is None else (X - H) - L
        sxx = ns.dot1(X, X)        # finite iff every entry of X is (the terms are >= 0; an overflow: general route)
        if ns.allfinite(sxx):
            _, rscale, rsq = R["host"]
            fl = [ns.maxabs1(d), rscale, ns.dot1(d, d), rsq, sxx, ns.dot1(X, H)]
            return ns.stack1(fl), ns.izeros((len(run), _I))
    xi, ri = ns.isinf(X), refs.stacked_part(ns, R, "inf")
    # numpy's two terms (exactly one is inf; both are, with other signs) are exclusive: inf somewhere, x != ref
    ints = [ns.count1(ns.isnan(X)), ns.count1(xi), ns.count1((xi | ri) & (X != H))]
    ints = [ns.toint(v) for v in ints] + [ns.izeros(len(run))] * (_I - 3)     # no top-k here
    fin = ns.isfinite(X) & refs.stacked_part(ns, R, "fin")
    xf, r = ns.where(fin, X, 0.0), ns.where(fin, H, 0.0)
    d = xf - r if L is None else (xf - r) - ns.where(fin, L, 0.0)     # where fin: x - ref, the same operation
    fl = [ns.maxabs1(d), ns.maxabs1(r), ns.dot1(d, d), ns.dot1(r, r), ns.dot1(xf, xf), ns.dot1(xf, r)]
    return ns.stack1(fl), ns.stack1(ints)


def _finish(f, i, n, k, logits: bool) -> dict:
    """The metric dict of ``workbench.parity.metrics`` (and top1 / top5_overlap) from the device's sums."""
    max_abs, scale, sdd, srr, sxx, sxr = (float(v) for v in f)
    nan, inf, mism = int(i[0]), int(i[1]), int(i[2])
    rel_max = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    l2r = math.sqrt(srr)
    rel_l2 = math.sqrt(sdd) / l2r if l2r > 0 else (0.0 if max_abs == 0 else math.inf)
    nmse = sdd / srr if srr > 0 else (0.0 if max_abs == 0 else math.inf)
    den = math.sqrt(sxx) * l2r
    cosine = sxr / den if den > 0 else (1.0 if max_abs == 0 else 0.0)
    bad = nan > 0 or mism > 0
    out = dict(max_abs=max_abs, ref_scale=scale, rel_max=rel_max if not bad else math.inf, rel_l2=rel_l2,
               nmse=nmse, cosine=cosine, nan_count=nan, inf_count=inf, inf_mismatch=mism,
               min_tol=rel_max if not bad else math.inf)
    if logits:
        out["top1"] = int(i[3]) / n if n else math.nan
        out["top5_overlap"] = int(i[4]) / (n * k) if n else math.nan
    return out


def tap_metrics(ref_taps: dict, taps: dict, positions: slice | None = None, refs: RefCache | None = None,
                k: int = 5, topk_taps=("logits",), engine=None, batch: bool = True) -> dict[str, dict]:
    """{name: metrics} of every tap in ``taps`` (numpy, torch or MLX arrays) against ``ref_taps[name]`` (numpy,
    sliced ``[:, positions]`` for decode steps), computed on each tap's device; the taps listed in ``topk_taps``
    also get top1 / top5_overlap. The other taps go in runs of one size (``_group_stats``: a handful of
    reductions a run, not a few per tap); ``batch=False``: every tap on its own (``_tap_stats``; the tests compare
    the two). One host transfer (floats, counts) per framework/device for all taps."""
    refs = refs if refs is not None else RefCache(ref_taps)
    groups: dict = {}
    for name, x in taps.items():
        ns = engine if engine is not None else engine_for(x)
        groups.setdefault(ns.key, (ns, []))[1].append((name, x))
    out: dict[str, dict] = {}
    for ns, items in groups.values():
        with ns.ctx():
            runs, single = _groups(ns, refs, [it for it in items if it[0] not in topk_taps] if batch else [], positions)
            single += [it for it in items if it[0] in topk_taps or not batch]
            names, Fs, Is, nrows = [], [], [], []
            for run in runs:
                f, i = _group_stats(ns, refs, run, positions)
                names += [n for n, _ in run]
                nrows += [int(np.prod(ns.shape(x)[:-1])) if len(ns.shape(x)) > 1 else 1 for _, x in run]
                Fs.append(f)
                Is.append(i)
            for name, x in single:
                f, i, n = _tap_stats(ns, refs, name, x, positions, k if name in topk_taps else 0)
                names.append(name)
                nrows.append(n)
                Fs.append(f)
                Is.append(i)
            # [taps, 6] floats and [taps, 5] counts, in the order of ``names``: one transfer each
            F = ns.host(ns.concat([ns.tofloat(v).reshape(-1) for v in Fs])) if names else np.zeros(0)
            I = ns.host(ns.concat([ns.toint(v).reshape(-1) for v in Is])) if names else np.zeros(0)
        F = np.asarray(F, np.float64).reshape(-1, _F)
        I = np.asarray(I, np.int64).reshape(-1, _I)
        for j, name in enumerate(names):
            out[name] = _finish(F[j], I[j], nrows[j], k, name in topk_taps)
    return {name: out[name] for name, _ in taps.items()}


def host_metrics(ref, x) -> dict:
    """``parity.metrics(ref, x)``'s numbers (no top-k) for one pair of arrays, through the engine of x's framework
    (numpy: torch on the CPU in float64): the anchor's noise floor and the same-dtype budgets use it."""
    return tap_metrics({"x": ref}, {"x": x}, topk_taps=())["x"]


# ---------------------------------------------------------------------------------------- device taps
def device_forward(m, ids, taps, cache=None):
    """One forward of a LanguageModel's text decoder with the taps left on the device: {name: backend array},
    "logits" included; None where that route does not apply (then the caller uses ``m.forward``)."""
    from .model.gemma import Gemma
    from .model.taps import Points
    dec = getattr(m, "decoder", None)
    if not isinstance(dec, Gemma) or dec.ops.framework not in ("torch", "mlx"):
        return None

    class _DevicePoints(Points):
        def visit(self, ops, name, x, to_np=None, from_np=None):
            if name in self.tapped and name not in self.hooked and to_np is None:
                self.values[name] = x
                return x
            return super().visit(ops, name, x, to_np, from_np)

    a = dec.check_ids(ids)
    start = cache.offset if cache is not None else 0
    pts = _DevicePoints(dec.config, taps, None)
    logits = dec._forward(a, pts, cache, start, False)
    if cache is not None:
        cache.offset = start + a.shape[1]
    got = dict(pts.values)
    got["logits"] = logits
    return got


def ready(m, arrays) -> None:
    """Wait until the device has computed ``arrays`` (so a forward's time is its own, not the metrics')."""
    arrs = [a for a in arrays if _is_mlx(a)]
    if arrs:
        import mlx.core as mx
        mx.eval(*arrs)
    dec = getattr(m, "decoder", None)
    if dec is not None and any(_is_torch(a) for a in arrays):
        dec.ops.synchronize()


def concat_steps(steps: list[dict]) -> dict:
    """Decode steps' taps ([B, 1, ...] each) along the position axis, on their device."""
    out = {}
    for n in steps[0]:
        xs = [s[n] for s in steps]
        if _is_torch(xs[0]):
            import torch
            out[n] = torch.cat(xs, 1)
        elif _is_mlx(xs[0]):
            import mlx.core as mx
            out[n] = mx.concatenate(xs, 1)
        else:
            out[n] = np.concatenate(xs, 1)
    return out


def to_numpy(m, x):
    """A tap as numpy (the MoE routing taps, compared on the host)."""
    if isinstance(x, np.ndarray):
        return x
    return m.decoder.ops.numpy(x)


# ---------------------------------------------------------------------------------------- the run's cost
class Laps:
    """Wall time of a comparison's steps: ``laps("reference_s")`` closes the step that ran since the last lap."""

    def __init__(self):
        self.t = time.perf_counter()
        self.start = self.t
        self.laps: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now

    def cost(self, per_target: dict) -> dict:
        """meta["cost"]: the steps' seconds, the targets' own forward time against the parity work on their
        outputs (``overhead_ratio`` = parity overhead / targets' forward), per target, and the total."""
        fwd = sum(c["forward_s"] for c in per_target.values())
        over = sum(c["metrics_s"] for c in per_target.values())
        out = {k: round(v, 3) for k, v in self.laps.items()}
        out.update(targets_forward_s=round(fwd, 3), parity_overhead_s=round(over, 3),
                   targets_build_s=round(sum(c["build_s"] for c in per_target.values()), 3),
                   overhead_ratio=round(over / fwd, 3) if fwd > 0 else None,
                   total_s=round(time.perf_counter() - self.start, 3), per_target=per_target)
        return out


def cost_line(cost: dict) -> str:
    """The summary's line on what the run cost (meta["cost"])."""
    ratio = cost.get("overhead_ratio")
    steps = ", ".join(f"{k[:-2].replace('_', ' ')} {cost[k]:.1f} s" for k in
                      ("reference_s", "anchor_s", "budgets_s", "load_s", "independent_s") if cost.get(k))
    return (f"cost: targets' own forward {cost['targets_forward_s']:.2f} s, parity overhead "
            f"{cost['parity_overhead_s']:.2f} s" + (f" ({ratio:.2f}x the forward)" if ratio is not None else "")
            + f"; target builds {cost['targets_build_s']:.1f} s" + (f", {steps}" if steps else "")
            + f"; total {cost['total_s']:.1f} s")

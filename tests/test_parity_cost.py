"""Parity metrics on the target's device (workbench.parity_metrics) against the numpy float64 definitions
(``parity.metrics`` / ``parity._topk_agree``), and the cost split a compare run reports (issue 19, item 5).

Bounds (u64 = 2^-53, u32 = 2^-24):
* float64 engines (numpy, torch:cpu, mlx:cpu): Δ = x - ref is the same IEEE operation as numpy's, so max|Δ|, the
  scale and rel_max must be the same bits; the sums only differ in summation order: for n non-negative terms any
  two orders differ by <= 2(n-1)·u64 relative, so rel_l2 / nmse within 4·n·u64 and cosine (|Σx·r| <= |x||r|)
  within 2·n·u64 absolute. Counts and top-k agreement: exact.
* compensated float32 (mlx:gpu, torch:mps; run here on the CPU): Δ = (x - hi) - lo has two float32 roundings
  (<= 2·u32 relative to Δ), the scale one (u32/2): max-based metrics within 1e-6 relative; the float32 sums are
  tree-ordered reductions (~log2(n)·u32 ≈ 1e-6 at these sizes): 1e-5 relative, cosine 1e-5 absolute. Counts and
  top-k agreement exact (the reference's sets come from float64, the target's values are float32 already).
"""
import math

import numpy as np
import pytest

from conftest import fixture_dir, have
from workbench import parity as P
from workbench import parity_metrics as M

# numpy's metrics() subtracts inf - inf before masking it out (the cases with inf): expected, not a problem
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
U64 = 2.0 ** -53
FLOAT_KEYS = ("max_abs", "ref_scale", "rel_max", "min_tol", "rel_l2", "nmse", "cosine")
INT_KEYS = ("nan_count", "inf_count", "inf_mismatch")


def engines():
    out = [("numpy", M._Numpy)]
    if have("torch"):
        out += [("torch:cpu", lambda: M._Torch("cpu")),
                ("torch:cpu general", lambda: _general(M._Torch("cpu"))),
                ("torch f32-compensated", lambda: _general(M._Torch("cpu", exact=False)))]
    if have("mlx"):
        import mlx.core as mx
        out += [("mlx:cpu", lambda: M._MLX(mx.cpu)),
                ("mlx f32-compensated", lambda: _general(M._MLX(mx.cpu, exact=False)))]
    return out


def _general(e):
    """The device route (no data-dependent host branches), as on a GPU."""
    e.host_sync = False
    return e


def _as(e, x):
    if isinstance(e, M._Torch):
        import torch
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(e, M._MLX):
        import mlx.core as mx
        return mx.array(x)
    return x


def cases():
    """(name, ref float64, target float32) pairs: clean, NaN, inf, a planted fault, and logits with ties."""
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((1, 12, 64)) * 3
    clean = (ref + 1e-4 * rng.standard_normal(ref.shape)).astype(np.float32)
    out = {"clean": (ref, clean)}
    x = clean.copy()
    x[0, 2, 5] = np.nan
    x[0, 7, 1] = np.nan
    out["nan"] = (ref, x)
    r2 = ref.copy()
    r2[0, 1, 1], r2[0, 3, 3], r2[0, 4, 4] = np.inf, -np.inf, np.inf
    x = clean.copy()
    x[0, 1, 1], x[0, 3, 3] = np.inf, np.inf      # +inf matches, +inf against -inf does not, one missing
    x[0, 9, 9] = -np.inf                          # inf where the reference is finite
    out["inf"] = (r2, x)
    x = clean.copy()
    x[0, 5:8] *= 1.01                             # a planted 1% fault on three positions
    out["fault"] = (ref, x)
    out["zeros"] = (np.zeros((1, 3, 8)), np.zeros((1, 3, 8), np.float32))
    out["empty"] = (np.zeros((1, 0, 8)), np.zeros((1, 0, 8), np.float32))
    # logits: bfloat16-like values (many exact ties, ties at the top-k boundary and at the max), a NaN row
    lr = np.round(rng.standard_normal((1, 12, 700)) * 4, 0)
    lr += rng.standard_normal(lr.shape) * 1e-3      # the reference: distinct values
    lx = np.round(lr * 2) / 2                        # the target: coarse, so ties everywhere
    out["logits_ties"] = (lr, lx.astype(np.float32).copy())     # finite: the host engines' fast route + tied rows
    lx[0, 3, :] = lx[0, 3].max()                     # a row that is all one value
    lx[0, 4, 10] = np.nan                            # NaN in a row (its argmax is that NaN, as numpy's)
    lx[0, 5, 3:] = np.nan                            # fewer than k numbers: NaNs complete the top-5 by index
    out["logits"] = (lr, lx.astype(np.float32))
    return out


def _want(ref, x, logits):
    w = P.metrics(ref, x)
    if logits:
        w["top1"], w["top5_overlap"] = P._topk_agree(ref, x)
    return w


def _check(name, got, want, n, exact):
    for k in INT_KEYS:
        assert got[k] == want[k], (name, k, got[k], want[k])
    for k in ("top1", "top5_overlap"):
        if k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), (name, k, got[k], want[k])
    for k in FLOAT_KEYS:
        g, w = got[k], want[k]
        assert not (math.isnan(g) or math.isnan(w)), (name, k, g, w)
        if math.isinf(w) or math.isinf(g):
            assert g == w, (name, k, g, w)
            continue
        if exact:
            if k in ("max_abs", "ref_scale", "rel_max", "min_tol"):
                assert g == w, (name, k, g, w)          # the same IEEE operations: the same bits
            elif k == "cosine":
                assert abs(g - w) <= 2 * n * U64 + 4 * U64, (name, k, g, w)
            else:
                assert abs(g - w) <= 4 * n * U64 * abs(w) + 1e-300, (name, k, g, w)
        else:
            tol = 1e-6 if k in ("max_abs", "ref_scale", "rel_max", "min_tol") else 1e-5
            if k == "cosine":
                assert abs(g - w) <= 1e-5, (name, k, g, w)
            else:
                assert abs(g - w) <= tol * abs(w), (name, k, g, w)


@pytest.mark.parametrize("ename,make", engines(), ids=[e for e, _ in engines()])
@pytest.mark.parametrize("chunk", [1 << 24, 100])
def test_device_metrics_equal_numpy_metrics(ename, make, chunk, monkeypatch):
    """Every case through one tap_metrics call per engine (one host transfer) equals the numpy definitions;
    chunk=100 splits every tap into several row chunks (the logits one row per chunk)."""
    monkeypatch.setattr(M, "CHUNK", chunk)
    monkeypatch.setattr(M, "CHUNK_HOST", chunk)
    e = make()
    cs = cases()
    ref_taps = {k: r for k, (r, _) in cs.items()}
    top = ("logits", "logits_ties")
    got = M.tap_metrics(ref_taps, {k: _as(e, x) for k, (_, x) in cs.items()}, engine=e, topk_taps=top)
    for k, (r, x) in cs.items():
        _check(f"{ename}/{k}", got[k], _want(r, x, k in top), r.size, e.exact)
    # the cases do what they claim: NaN and an inf mismatch fail, the fault shows, the ties are there
    assert got["nan"]["nan_count"] == 2 and got["nan"]["rel_max"] == math.inf
    assert got["inf"]["inf_mismatch"] == 3 and got["inf"]["rel_max"] == math.inf
    assert got["fault"]["rel_max"] > 50 * got["clean"]["rel_max"]
    for k in top:
        assert 0 < got[k]["top1"] < 1 and 0 < got[k]["top5_overlap"] < 1
    lx = cs["logits_ties"][1].reshape(-1, 700)
    kth = np.sort(lx, -1)[:, -5:-4]
    assert ((lx >= kth).sum(-1) > 5).sum() >= 3       # rows with a tie at the 5th value (the tie-break matters)


def test_decode_positions_and_reference_upload_once():
    """positions= slices the uploaded reference on the device; the reference is uploaded once per device."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    ref = {"a": rng.standard_normal((1, 10, 32)), "logits": rng.standard_normal((1, 10, 50))}
    refs = M.RefCache(ref)
    e = M._Torch("cpu")
    for _ in range(2):
        x = {k: (v[:, 6:] + 1e-3 * rng.standard_normal(v[:, 6:].shape)).astype(np.float32) for k, v in ref.items()}
        got = M.tap_metrics(ref, {k: _as(e, v) for k, v in x.items()}, positions=slice(6, 10), refs=refs, engine=e)
        for k in ref:
            _check(k, got[k], _want(ref[k][:, 6:], x[k], k == "logits"), x[k].size, True)
    # logits one by one (uploaded whole, sliced on the device); "a" in a run: its [1, N] stack at 6:10, once
    assert sorted(k[1] for k in refs._up) == ["logits"]
    assert [(k[1], k[2]) for k in refs._stack] == [(("a",), (6, 10))]


def _mixed():
    """(ref, target) float32 taps of three sizes (two of the sizes' taps interleaved in order): a NaN row in one
    tap, inf (matched, of the other sign, missing, unexpected) in another, a planted fault, clean neighbours."""
    rng = np.random.default_rng(11)
    out = {}
    for i, shape in enumerate([(1, 12, 64)] * 5 + [(1, 7, 32)] * 3 + [(1, 12, 64), (1, 1, 5)]):
        r = rng.standard_normal(shape) * (1 + i)
        out[f"t{i}"] = [r, (r + 1e-4 * rng.standard_normal(shape)).astype(np.float32)]
    out["t1"][1][0, 4, :] = np.nan                 # NaN in one row
    out["t1"][1][0, 6, 2] = np.nan
    out["t3"][0][0, 2, 7] = np.inf                 # inf: matched, against -inf, missing in the target, unexpected
    out["t3"][1][0, 2, 7] = np.inf
    out["t3"][0][0, 3, 1] = -np.inf
    out["t3"][1][0, 3, 1] = np.inf
    out["t3"][0][0, 5, 5] = np.inf
    out["t3"][1][0, 9, 9] = -np.inf
    out["t6"][1][0, 2:4] *= 1.01                   # a planted fault beside a NaN-free neighbour
    out["t7"][1][0, 0, 0] = np.nan                 # NaN in the second size too
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("ename,make", engines(), ids=[e for e, _ in engines()])
@pytest.mark.parametrize("chunk", [1 << 24, 64 * 12 * 4])
def test_batched_runs_equal_the_one_tap_route(ename, make, chunk, monkeypatch):
    """The batched route (runs of one size, one reduction per statistic and run) gives each tap the numbers of the
    one-tap route and of numpy's metrics(); a NaN or inf in one tap stays in its own row (its neighbours' numbers
    are those they have alone). chunk=3072: the six taps of 768 elements in runs of 4 and 2."""
    monkeypatch.setattr(M, "CHUNK", chunk)
    monkeypatch.setattr(M, "CHUNK_HOST", chunk)
    calls = {"run": [], "one": 0}
    grp, one = M._group_stats, M._tap_stats

    def group_spy(ns, refs, run, pos):
        calls["run"].append(len(run))
        return grp(ns, refs, run, pos)

    def one_spy(*a, **kw):
        calls["one"] += 1
        return one(*a, **kw)
    monkeypatch.setattr(M, "_group_stats", group_spy)
    monkeypatch.setattr(M, "_tap_stats", one_spy)
    e = make()
    cs = _mixed()
    ref = {k: r for k, (r, _) in cs.items()}
    xs = {k: _as(e, x) for k, (_, x) in cs.items()}
    got = M.tap_metrics(ref, xs, engine=e)
    assert calls["one"] == 0 and sum(calls["run"]) == len(cs)
    assert calls["run"] == ([6, 3, 1] if chunk == 1 << 24 else [4, 2, 3, 1])     # sizes 768 x6, 224 x3, 5 x1
    calls["run"].clear()
    alone = M.tap_metrics(ref, xs, engine=e, batch=False)
    assert calls["run"] == [] and calls["one"] == len(cs)
    for k, (r, x) in cs.items():
        _check(f"{ename}/{k} batched vs numpy", got[k], P.metrics(r, x), r.size, e.exact)
        _check(f"{ename}/{k} batched vs one-tap", got[k], alone[k], r.size, e.exact)
        solo = M.tap_metrics({k: r}, {k: xs[k]}, engine=e)[k]     # a run of one: nothing beside it
        _check(f"{ename}/{k} batched vs solo", got[k], solo, r.size, e.exact)
    assert got["t1"]["nan_count"] == 65 and got["t1"]["rel_max"] == math.inf
    assert got["t3"]["inf_count"] == 3 and got["t3"]["inf_mismatch"] == 3 and got["t3"]["rel_max"] == math.inf
    assert got["t7"]["nan_count"] == 1
    for k in ("t0", "t2", "t4", "t5", "t6", "t8", "t9"):   # the neighbours: no NaN, no inf, a finite verdict
        assert got[k]["nan_count"] == got[k]["inf_count"] == got[k]["inf_mismatch"] == 0, k
        assert math.isfinite(got[k]["rel_max"]) and got[k]["rel_max"] < 1e-3 * (50 if k == "t6" else 1), k
    assert got["t6"]["rel_max"] > 50 * got["t5"]["rel_max"]


def test_batched_bfloat16_and_the_device_route():
    """torch bfloat16 taps: the run's stack is cast to float64 in its one copy, as one-tap's .to(float64); the
    logits' top-1 / top-k taken in bfloat16 itself; the device route (no host branches, as on a GPU) and the host
    route agree with numpy on the same values."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    ref = {f"b{i}": rng.standard_normal((1, 9, 48)) for i in range(4)}
    xs = {k: torch.from_numpy(v + 1e-2 * rng.standard_normal(v.shape)).to(torch.bfloat16) for k, v in ref.items()}
    xs["b2"][0, 3, 3] = float("nan")
    lr = rng.standard_normal((1, 6, 300)) * 3
    ref["logits"] = lr
    xs["logits"] = torch.from_numpy(lr).to(torch.bfloat16)     # bfloat16 logits: ties (top-k in bfloat16 itself)
    xs["logits"][0, 2, 7] = float("nan")
    for e in (M._Torch("cpu"), _general(M._Torch("cpu"))):
        got = M.tap_metrics(ref, xs, engine=e)
        for k in ref:
            w = _want(ref[k], xs[k].double().numpy(), k == "logits")
            _check(k, got[k], w, ref[k].size, True)
        lx = xs["logits"].double().numpy().reshape(-1, 300)
        assert (np.sort(lx, -1)[:, -5] == np.sort(lx, -1)[:, -6]).any()     # a tie at the 5th value
        assert got["logits"]["nan_count"] == 1 and 0 < got["logits"]["top1"] < 1
        assert got["b2"]["nan_count"] == 1 and got["b1"]["nan_count"] == 0 and math.isfinite(got["b3"]["rel_max"])


def test_batched_shape_mismatch_names_the_tap():
    pytest.importorskip("torch")
    ref = {"a": np.zeros((1, 4, 8)), "b": np.zeros((1, 4, 8))}
    with pytest.raises(ValueError, match=r"b: shape mismatch: reference \(1, 4, 8\) vs \(1, 4, 9\)"):
        M.tap_metrics(ref, {"a": np.zeros((1, 4, 8), np.float32), "b": np.zeros((1, 4, 9), np.float32)})


def test_topk_agree_is_the_stable_sort_definition():
    """The numpy reference itself, against a brute-force sort by (-value, index) with NaN last."""
    rng = np.random.default_rng(5)
    r = np.round(rng.standard_normal((6, 40)) * 2) / 2
    x = np.round(r + rng.standard_normal(r.shape) * 0.5)
    x[1, 7] = np.nan
    x[2, :] = 1.0

    def order(row):
        return sorted(range(len(row)), key=lambda i: (math.isnan(row[i]), -row[i] if not math.isnan(row[i]) else 0, i))
    over = np.mean([len(set(order(a)[:5]) & set(order(b)[:5])) / 5 for a, b in zip(r, x)])
    first = [int(np.flatnonzero(np.isnan(b))[0]) if np.isnan(b).any() else order(b)[0] for b in x]
    top1 = np.mean([order(a)[0] == f for a, f in zip(r, first)])
    assert P._topk_agree(r, x) == (pytest.approx(top1), pytest.approx(over))


def _forward_rows_numpy(src, backend, dtype, ids, taps, fault, decode_steps):
    """The rows' statistics the old way: m.forward's numpy taps and parity.metrics, prefill and decode:
    {(phase, tap name): (metrics, size)}."""
    import workbench as wb
    ref = wb.load(src, backend="torch:cpu", dtype="float64", progress=False)
    ro = ref.forward(ids, taps=taps)
    rt = dict(ro.taps, logits=ro.logits)
    m = wb.load(src, backend=backend, dtype=dtype, progress=False)
    if fault:
        m.perturb = P._make_fault(fault)
    o = m.forward(ids, taps=taps)
    want = {("prefill", k): (_want(rt[k], v, k == "logits"), v.size) for k, v in dict(o.taps, logits=o.logits).items()}
    T = ids.shape[1]
    Pn = T - decode_steps
    cache = m.new_cache(batch=1, max_len=T)
    m.forward(ids[:, :Pn], cache=cache)
    steps = [m.forward(ids[:, t:t + 1], taps=taps, cache=cache) for t in range(Pn, T)]
    dec = {n: np.concatenate([s.taps[n] for s in steps], 1) for n in steps[0].taps}
    dec["logits"] = np.concatenate([s.logits for s in steps], 1)
    for k, v in dec.items():
        want[("decode", k)] = (_want(rt[k][:, Pn:], v, k == "logits"), v.size)
    return want


@pytest.mark.parametrize("backend", [b for b in ("torch:cpu", "mlx:cpu") if have(b.split(":")[0])])
def test_compare_rows_equal_numpy_metrics_with_a_planted_fault(backend, tmp_db):
    """wb.compare's rows (taps left on the device, statistics there) equal parity.metrics on m.forward's numpy
    taps, prefill and decode, with a planted fault: the fault's layer is the first divergence; the run reports
    its cost split."""
    import workbench as wb
    src = str(fixture_dir("gemma3_text"))
    ids = np.random.default_rng(0).integers(1, 200, (1, 20))
    taps = ["blocks.*.hook_resid_post", "blocks.*.hook_mlp_out", "blocks.*.attn.hook_q"]   # hook_q: numpy layout route
    fault = {"backend": backend, "layer": 1, "tap": "hook_mlp_out", "scale": 1e-2}
    rep = wb.compare(src, backends=[backend], dtypes=["float32"], prompt=ids[0].tolist(), taps=taps, decode_steps=3,
                     anchor=False, fault=fault, db=tmp_db, progress=False)
    want = _forward_rows_numpy(src, backend, "float32", ids, taps, fault, 3)
    names = {(r["phase"], r["tap"] if r["layer"] is None else P._tap_name(r["tap"], r["layer"])): r for r in rep.rows}
    assert set(names) == set(want)
    for key, (w, n) in want.items():
        _check(str(key), names[key], w, n, True)
    fd = rep.first_divergence
    assert not rep.passed and (fd["tap"], fd["layer"]) == ("hook_mlp_out", 1)
    cost = rep.meta["cost"]
    pt = cost["per_target"][f"{backend}:float32"]
    assert pt["forward_s"] > 0 and pt["metrics_s"] > 0
    assert cost["targets_forward_s"] == pytest.approx(pt["forward_s"], abs=2e-3)
    assert cost["total_s"] >= cost["targets_forward_s"] + cost["parity_overhead_s"] - 1e-2
    line = [ln for ln in rep.summary().splitlines() if ln.startswith("cost: ")]
    assert len(line) == 1 and "parity overhead" in line[0]
    back = P.ParityReport.from_run(rep.run_id, store=tmp_db)
    assert back.summary() == rep.summary() and back.meta["cost"] == cost


def test_nan_target_fails_through_the_device_route():
    """A NaN in a device tensor gives a failing row (rel_max inf), however small the other errors."""
    torch = pytest.importorskip("torch")
    ref = {"blocks.0.hook_resid_post": np.ones((1, 4, 8))}
    x = torch.ones((1, 4, 8), dtype=torch.bfloat16)
    x[0, 2, 3] = float("nan")
    rows = P._rows_for(ref, {"blocks.0.hook_resid_post": x}, "torch:cpu", "bfloat16", "torch:cpu", "prefill", 1.0, {})
    assert len(rows) == 1 and not rows[0]["passed"] and rows[0]["nan_count"] == 1 and rows[0]["rel_max"] == math.inf


def test_host_metrics_equal_numpy_metrics():
    """host_metrics (the anchor's noise floor, the same-dtype budgets): parity.metrics' numbers on numpy arrays."""
    for name, (r, x) in cases().items():
        _check(name, M.host_metrics(r, x), P.metrics(r, x), r.size, True)

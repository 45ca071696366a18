"""The Triton sampler (``workbench.backends.triton_decode.TritonSampler``: block partials, then one selection kernel
— on the card the partials come from the Triton step's head) means what ``sampler.sample_np`` means: the same
candidates (exactly the top C of z = logits / T, found through the block maxima), the same top-p prefix (normalised
over the whole vocabulary) and the same Gumbel-max token, on random, peaked, flat and tie-heavy logits, top-k only,
top-p only, both, k > 256 and the whole vocabulary. Run through Triton's interpreter on the CPU (TRITON_INTERPRET=1,
in a subprocess: the flag must be set before the kernels are defined); on the GPU tests/tools/gpu/sampler_bench.py
compares the same kernels with the torch sampler and numpy."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import fixture_dir, have

pytestmark = pytest.mark.skipif(not have("triton"), reason="triton is not installed (pip install triton)")

SCRIPT = r'''
import json, sys, numpy as np, torch
from workbench.decode import sampler
from workbench.backends import triton_decode as td
rng = np.random.default_rng(0)
V = 20000                                    # 1250 blocks of 16: the block selection is exercised (C <= 1000)

def logits(kind):
    x = (rng.normal(size=V) * 3).astype(np.float32)
    if kind == "peaked":                     # two tokens hold nearly all the mass
        x[rng.integers(V)] = 30.0; x[rng.integers(V)] = 29.0
    if kind == "flat":                       # 256 candidates hold far less than top_p: all kept
        x = (rng.normal(size=V) * 0.01).astype(np.float32)
    if kind == "ties":                       # many exact ties at the boundary
        x = np.round(x * 2) / 2
    if kind == "spread":                     # each block's largest far above the rest: the top C in C blocks,
        x = (rng.normal(size=V) * 0.1).astype(np.float32)           # so every block searched must be the right one
        x[np.arange(0, V, 16) + rng.integers(0, 16, size=V // 16)] = (4 + rng.normal(size=V // 16)).astype(np.float32)
    return x

def reference(lg, s):
    z = lg.astype(np.float32) * np.float32(1.0 / s.temperature)
    C = s.candidates(V)
    idx = np.argsort(-z, kind="stable")[:C]
    nkeep = None
    if s.use_top_p:
        lse = z.max() + np.log(np.exp((z - z.max()).astype(np.float64)).sum())
        p = np.exp(z[idx].astype(np.float64) - lse)
        nkeep = int(((np.cumsum(p) - p) < s.top_p).sum())
    return z, idx, nkeep

cases = {"top_p": (dict(temperature=0.8, top_p=0.95), "normal", "float32"),
         "top_k": (dict(temperature=1.0, top_k=50), "normal", "float32"),
         "both": (dict(temperature=1.3, top_k=300, top_p=0.5), "normal", "float32"),
         "k_over_256": (dict(temperature=1.0, top_k=1000), "spread", "float32"),
         "one_per_block": (dict(temperature=0.5, top_p=0.95), "spread", "float32"),
         "k_over_256_top_p": (dict(temperature=2.0, top_k=700, top_p=0.1), "normal", "float32"),
         "peaked": (dict(temperature=0.7, top_p=0.9), "peaked", "float32"),
         "flat": (dict(temperature=1.0, top_p=0.95), "flat", "float32"),
         "whole_vocabulary": (dict(temperature=0.8), "normal", "float32"),
         "bfloat16": (dict(temperature=0.8, top_p=0.95), "normal", "bfloat16"),
         "ties": (dict(temperature=1.0, top_k=256, top_p=0.99), "ties", "float32")}
out = {}
for name, (kw, kind, dt) in cases.items():
    s = sampler.make(seed=7, **kw)
    lt = torch.tensor(logits(kind))[None].to(getattr(torch, dt))
    lg = lt.float().numpy()[0]
    z, idx, nkeep = reference(lg, s)
    ts = td.TritonSampler(s, V, "cpu", sampler.TorchParams("cpu", s), block_n=16)
    r = dict(tokens=[], ref=[], same_set=True, same_values=True, distinct=True, nkeep=[], ref_nkeep=nkeep,
             blocks=ts.nb, searched=getattr(ts, "sb", None))
    for p in (1, 2, 3, 50, 51):
        r["tokens"].append(int(ts(lt, torch.tensor([p - 1]))))
        r["ref"].append(sampler.sample_np(lg, s, p))
        if ts.C is not None:
            ci = ts.ci.numpy()
            r["same_set"] &= set(ci.tolist()) == set(idx.tolist())
            r["same_values"] &= bool(np.array_equal(np.sort(ts.cv.numpy()), np.sort(z[idx])))
            r["distinct"] &= len(set(ci.tolist())) == ts.C
            if s.use_top_p:
                r["nkeep"].append(int(ts.nkeep[0]))
    out[name] = r
print("RESULT " + json.dumps(out))
'''


TUNES = {"default": None, "sieve": "2,16,64,1024", "two_bits": "2,16,64,0"}


@pytest.fixture(scope="module", params=list(TUNES))
def kernels(request):
    """The script's results with the default selection kernel, with the sieve (the blocks searched first cut to
    those reaching a bound from group maxima: WORKBENCH_TRITON_TUNE sample=...,1024) and with two radix bits a round
    (the default is one)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    if TUNES[request.param]:
        env["WORKBENCH_TRITON_TUNE"] = "sample=" + TUNES[request.param]
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    return json.loads(line[0][7:])


CASES = ["top_p", "top_k", "both", "k_over_256", "one_per_block", "k_over_256_top_p", "peaked", "flat",
         "whole_vocabulary", "bfloat16", "ties"]


@pytest.mark.parametrize("case", CASES)
def test_triton_sampler_tokens_equal_sample_np(kernels, case):
    r = kernels[case]
    if case != "ties":           # ties: which of the tied boundary tokens are candidates is arbitrary
        assert r["tokens"] == r["ref"], r
    assert len(set(r["tokens"])) > 1 or case == "peaked", "positions give different draws"


@pytest.mark.parametrize("case", [c for c in CASES if c != "whole_vocabulary"])
def test_triton_sampler_candidates_are_exactly_the_top_c(kernels, case):
    r = kernels[case]
    assert r["searched"] < r["blocks"], "the block selection ran (fewer blocks searched than there are)"
    assert r["distinct"], "C distinct candidates"
    assert r["same_values"], "the candidates' values are the top C values"
    if case != "ties":
        assert r["same_set"], "the candidates are the top C tokens"
    if r["ref_nkeep"] is not None:
        assert r["nkeep"] == [r["ref_nkeep"]] * len(r["nkeep"]), r
    if case == "peaked":
        assert r["ref_nkeep"] == 2 and set(r["tokens"]) <= set(r["ref"])
    if case == "flat":
        assert r["ref_nkeep"] == 256


FUSED = r'''
import json, os, sys, numpy as np
import workbench as wb
m = wb.load(sys.argv[1], progress=False)
prompt = [int(t) for t in np.random.default_rng(3).integers(3, 256, size=11)]
kw, seeds = json.loads(sys.argv[2])
os.environ["WORKBENCH_DECODE"] = "plain"
plain = [m.generate(prompt, max_new_tokens=3, ignore_eos=True, **dict(kw, seed=s)).token_ids for s in seeds]
del os.environ["WORKBENCH_DECODE"]
g = m.generate(prompt, max_new_tokens=3, ignore_eos=True, **dict(kw, seed=seeds[0]))
fast = [g.token_ids] + [m.generate(prompt, max_new_tokens=3, ignore_eos=True, **dict(kw, seed=s)).token_ids
                        for s in seeds[1:]]
print("RESULT " + json.dumps(dict(plain=plain, fast=fast, route=g.stats["route"], sampler=g.stats.get("sampler"))))
'''


@pytest.mark.slow          # (test_triton_decode's module run checks one sampled generate of this kind too)
@pytest.mark.parametrize("kw,seeds", [(dict(temperature=1.5, top_k=8, top_p=0.9), [2, 3]),
                                      (dict(temperature=1.5), [4, 5]), (dict(temperature=1.5, top_p=0.9), [6, 7])],
                         ids=["top_k_top_p", "whole_vocabulary", "top_p"])
def test_triton_step_samples_in_its_own_kernels_as_the_plain_route(kw, seeds):
    """The Triton step (interpreter) with the sampler fused: the head's epilogue leaves the partials (64 blocks of
    4 logits here, so top_k=8 searches 8 of them), one kernel picks — the plain route's tokens for each seed (the
    later ones through the same engine, its seed changed in place)."""
    env = dict(os.environ, TRITON_INTERPRET="1", WORKBENCH_GPU_DECODE="triton", WORKBENCH_TRITON_TUNE="head=4,256,8")
    p = subprocess.run([sys.executable, "-c", FUSED, str(fixture_dir("gemma3_text")), json.dumps([kw, seeds])], env=env,
                       capture_output=True, text=True, timeout=900)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    r = json.loads(line[0][7:])
    assert r["route"] == "triton step" and r["sampler"].startswith("triton"), r
    assert r["fast"] == r["plain"], r


def test_sampling_params_change_in_place():
    """seed / 1/T / top_p live in device tensors that set() rewrites (a captured graph sees the new values)."""
    import torch

    from workbench.decode import sampler
    prm = sampler.TorchParams("cpu", sampler.make(temperature=0.5, top_p=0.9, seed=3))
    ptrs = (prm.seed.data_ptr(), prm.inv_t.data_ptr(), prm.top_p.data_ptr())
    prm.set(sampler.make(temperature=0.8, top_p=0.5, seed=2**32 + 5))
    assert ptrs == (prm.seed.data_ptr(), prm.inv_t.data_ptr(), prm.top_p.data_ptr())
    assert int(prm.seed) == 5 and float(prm.top_p) == 0.5
    assert float(prm.inv_t) == float(np.float32(1 / 0.8)) and prm.inv_t.dtype == torch.float32

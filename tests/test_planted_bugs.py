"""Issue 14: ten bugs planted in the shared model (tests/_planted.py) make ``workbench parity`` with its
defaults exit non-zero with FAILED at the anchor row, on a Gemma 1, 2, 3 and 4 fixture and on the real 270M;
the unmodified model passes. Cross-backend parity alone cannot see these bugs (the float64 reference runs
the same wrong code), which is why the anchor against HF transformers exists.

Each bug runs where it changes the model (``_planted.applies``); the prompt is 3x the sliding window, so the
window bug bites. The planted code is checked to really change the model (``test_each_bug_changes_the_model``):
a bug that was a no-op would make the failing-anchor assertion meaningless."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import _planted as P
from conftest import fixture_dir, have, one_torch_thread

import workbench as wb
from workbench import cli

pytestmark = pytest.mark.skipif(not have("transformers"), reason="the anchor needs HF transformers "
                                "(pip install gemma-workbench[reference])")

FIXTURES = ["gemma1", "gemma2", "gemma3_text", "gemma4_kv"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def _ids(cfg, n=None):
    n = n or P.min_prompt(cfg)
    return np.random.default_rng(11).integers(3, min(cfg.vocab_size, 20000), size=n).tolist()


def _cases():
    out = []
    for name in FIXTURES:
        cfg = wb.load(fixture_dir(name)).config
        out += [(name, bug) for bug in P.BUGS if P.applies(bug, cfg)]
    return out


def _parity(capsys, model, ids, *extra):
    rc = cli.main(["parity", "--model", str(model), "--prompt-ids", ",".join(map(str, ids)), "--no-store", *extra])
    return rc, capsys.readouterr().out


def _anchor_row(out: str) -> str:
    rows = [ln for ln in out.splitlines() if ln.startswith("hf:float64") and " anchor " in ln]
    assert len(rows) == 1, out
    return rows[0]


def test_every_generation_gets_most_bugs():
    """The applicability rules leave every bug on at least one fixture, and the fixtures cover them all."""
    covered = {bug for _, bug in _cases()}
    assert covered == set(P.BUGS), set(P.BUGS) - covered


@pytest.mark.parametrize("name,bug", _cases())
def test_each_bug_changes_the_model(name, bug):
    """The planted bug changes the float64 model's logits on this prompt (so it is a real bug here)."""
    d = fixture_dir(name)
    cfg = wb.load(d).config
    ids = _ids(cfg)
    clean = wb.load(d, dtype="float64").forward(ids).logits
    with P.planted(bug):
        bad = wb.load(d, dtype="float64").forward(ids).logits
    assert np.abs(bad - clean).max() > 1e-6 * np.abs(clean).max(), f"{bug} is a no-op on {name}"
    again = wb.load(d, dtype="float64").forward(ids).logits
    np.testing.assert_array_equal(again, clean)   # restored on exit


@pytest.mark.parametrize("name", FIXTURES)
def test_unmodified_model_passes_anchored(name, capsys):
    cfg = wb.load(fixture_dir(name)).config
    rc, out = _parity(capsys, fixture_dir(name), _ids(cfg))
    assert rc == 0, out
    assert "reference anchored to HF transformers" in out and "Overall: PASSED" in out
    assert _anchor_row(out).rstrip().endswith("PASSED")


@pytest.mark.parametrize("name,bug", _cases())
def test_planted_bug_fails_at_the_anchor(name, bug, capsys):
    cfg = wb.load(fixture_dir(name)).config
    with P.planted(bug):
        rc, out = _parity(capsys, fixture_dir(name), _ids(cfg))
    assert rc == 1, f"{P.DESCRIPTION[bug]} on {name}: exit {rc}\n{out}"
    assert "ANCHOR FAILED" in out and "Overall: FAILED" in out, out
    assert _anchor_row(out).rstrip().endswith("FAILED"), out


@pytest.mark.parametrize("name,bug", [("gemma2", "attn_softcap_dropped"), ("gemma3_text", "qpas_ignored")])
def test_no_anchor_is_blind_to_the_bug_and_says_so(name, bug, capsys):
    """--no-anchor: the backends agree with the (wrong) reference, so it passes, and the report says it is
    unanchored - the reason the anchor is on by default."""
    cfg = wb.load(fixture_dir(name)).config
    with P.planted(bug):
        rc, out = _parity(capsys, fixture_dir(name), _ids(cfg), "--no-anchor")
    assert rc == 0, out
    assert "UNANCHORED (knowingly" in out and "Overall: PASSED" in out


# ------------------------------------------------------------------------------------------ the real 270M
REAL_BUGS = ["clean", "norm_w", "eps_x100", "embed_scale_1pct", "window_plus_one"]


@pytest.mark.slow
@pytest.mark.parametrize("bug", REAL_BUGS)
def test_real_270m(bug, g270m, capsys):
    """The bugs that apply to Gemma 3 270M (its query_pre_attn_scalar equals its head dim, its RoPE has no
    linear factor, it has no softcaps: those four are no-ops there). The window bug needs a prompt longer
    than the 512-token window. One backend (torch:cpu) keeps it affordable; the anchor does not depend on it."""
    from workbench.loader import read_source
    cfg = read_source(g270m, dtype="float32", progress=False)[0]
    if bug != "clean":
        assert P.applies(bug, cfg)
    n = cfg.sliding_window_ + 40 if bug == "window_plus_one" else 40
    ids = [2] + _ids(cfg, n - 1)
    with (P.planted(bug) if bug != "clean" else contextlib.nullcontext()):
        rc, out = _parity(capsys, g270m, ids, "--backends", "torch:cpu", "--decode-steps", "2")
    if bug == "clean":
        assert rc == 0 and "Overall: PASSED" in out, out
        assert _anchor_row(out).rstrip().endswith("PASSED")
    else:
        assert rc == 1 and "ANCHOR FAILED" in out, out
        assert _anchor_row(out).rstrip().endswith("FAILED")

"""Projector and tower parity per backend is part of wb.compare: a Gemma 4 multimodal checkpoint with an
image and an audio clip, every vision/audio layer and both projector outputs compared with float64 — and the
float64 reference itself anchored to HF transformers' Gemma 4 multimodal model (tests/test_media_anchor.py has
the anchor's own checks: planted tower bugs, the float32 fallback)."""
import numpy as np
import pytest

from conftest import FIXTURES, cpu_backends, have, one_torch_thread

import workbench as wb


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """Tiny tensors: one torch thread is fastest and steady on a busy machine; restored afterwards."""
    with one_torch_thread():
        yield


def _inputs():
    d = FIXTURES / "multimodal" / "gemma4_mm"
    cfg = wb.load(d).config
    raw = cfg.raw
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    wav = (np.sin(np.linspace(0, 400 * np.pi, 16000)) * 0.3).astype(np.float32)
    ids = [cfg.bos_token_id or 2, 5, raw["image_token_id"], 6, raw["audio_token_id"], 7, 8]
    return d, ids, img, wav


@pytest.mark.skipif(not have("transformers"), reason="transformers (the anchor) is not installed")
def test_compare_covers_towers_and_projectors(tmp_db):
    d, ids, img, wav = _inputs()
    # the default report: anchored to HF, towers and projectors per backend, PASSED
    rep = wb.compare(d, backends=cpu_backends(), dtypes=["float32"], prompt=ids, images=[img], audio=[(wav, 16000)],
                     references=(), db=tmp_db, progress=False)
    assert rep.passed, rep.summary()
    assert rep.anchor_info["status"] == "anchored"
    assert rep.summary().splitlines()[1].startswith("reference anchored to HF transformers")
    anchored = {r["tap"] for r in rep.anchor}
    assert {"vision.hook_resid_post", "embed_vision.hook_out", "audio.hook_resid_post", "embed_audio.hook_out",
            "hook_resid_post", "logits"} <= anchored, anchored
    df = rep.to_frame()
    for b in cpu_backends():
        taps = set(df[df.backend == b].tap)
        assert {"embed_vision.hook_out", "embed_audio.hook_out", "vision.hook_resid_post",
                "audio.hook_resid_post", "logits"} <= taps, taps
        assert df[(df.backend == b) & (df.tap == "embed_vision.hook_out")].rel_max.iloc[0] < 1e-5
    # stored with its anchor rows and status
    from workbench import runs
    run = runs.RunStore(tmp_db).load(rep.run_id)
    assert run.meta["anchor"]["status"] == "anchored"
    assert (run.rows.phase == "anchor").sum() == len(rep.anchor)


def test_compare_media_without_anchor():
    """anchor=False: knowingly unanchored (said so), the verdict rests on the backends; a fault in the text
    model shows up after the towers, not in them."""
    d, ids, img, wav = _inputs()
    b = cpu_backends()[0]
    rep = wb.compare(d, backends=[b], dtypes=["float32"], prompt=ids, images=[img], audio=[(wav, 16000)],
                     references=(), store=False, progress=False, anchor=False)
    assert rep.passed and rep.anchor_info["status"] == "off" and not rep.anchor
    assert "UNANCHORED (knowingly, anchor=False" in rep.summary()
    rep2 = wb.compare(d, backends=[b], dtypes=["float32"], prompt=ids, images=[img], audio=[(wav, 16000)],
                      references=(), store=False, progress=False, anchor=False,
                      fault={"backend": b, "layer": 1, "tap": "hook_mlp_out", "scale": 1e-3})
    fd = rep2.first_divergence
    assert (fd["tap"], fd["layer"]) == ("hook_mlp_out", 1)

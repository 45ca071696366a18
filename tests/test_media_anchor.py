"""The anchor of media prompts (issue 14 item 1): with images/audio, ``wb.compare`` runs HF transformers'
Gemma4ForConditionalGeneration on the same weights and on our preprocessed inputs (pixel values, log-mel
features, expanded ids), in float64 where HF can and in float32 per tower where it cannot (transformers 5.24's
audio attention raises in float64), and compares per tap: the vision tower's patch embedding and layers, the
pooler, the tower output and embed_vision; the audio sub-sampler, layers, output projection and embed_audio;
then the decoder. Tolerance per tap: 10x our own float32 run's error there, within [1e-6, 1e-4].

A bug planted in the shared tower code (monkeypatched at run time) reaches every backend alike, so the backend
rows still pass: only the anchor can catch it, and it must fail at the tap where the bug first shows."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import FIXTURES, have, multimodal_fixture_module, one_torch_thread

import workbench as wb
from workbench import parity
from workbench.multimodal import audio as audio_mod
from workbench.multimodal import preprocess as pp
from workbench.multimodal import projector as projector_mod
from workbench.multimodal import vision as vision_mod

pytestmark = [pytest.mark.skipif(not have("torch"), reason="torch is not installed"),
              pytest.mark.skipif(not have("transformers"), reason="transformers (the anchor) is not installed")]
pytest.importorskip("PIL", reason="Pillow (image decoding) is not installed")

MM = FIXTURES / "multimodal" / "gemma4_mm"


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def media():
    """Two images of different sizes and two clips of different lengths (the padding of each batch is real),
    as token ids with one placeholder per item."""
    fx = multimodal_fixture_module()
    raw = wb.load(MM, progress=False).config.raw
    im, au = raw["image_token_id"], raw["audio_token_id"]
    ids = [2, 5, im, 6, au, 7, im, 8, au, 9]
    # our preprocessing at the smallest soft-token budget (70): a tenth of the default's patches, a faster test
    imgs = [pp.preprocess_image(im, 70, 16, 3, pad=False) for im in fx.make_test_images()]
    clips = [(a, 16000) for a in fx.make_test_audio()]
    return ids, imgs, clips


def _compare(media, **kw):
    ids, imgs, clips = media
    return wb.compare(MM, backends=["torch:cpu"], dtypes=["float32"], prompt=ids, images=imgs, audio=clips,
                      references=(), store=False, progress=False, **kw)


@pytest.fixture(scope="module")
def clean(media):
    return _compare(media)


def test_default_media_report_is_anchored_and_passes(clean):
    rep = clean
    info = rep.anchor_info
    assert info["status"] == "anchored", rep.summary()
    assert rep.passed, rep.summary()
    line = rep.summary().splitlines()[1]
    assert line.startswith("reference anchored to HF transformers") and line.endswith(parity._MEDIA_SCOPE), line
    # every part's dtype is stated, and it is what the rows say
    pd = info["part_dtypes"]
    assert pd["projectors"] == pd["decoder"] == "float64"
    for part in ("vision", "audio"):
        assert f"{part} tower {pd[part]}" in line, line
        assert {r["dtype"] for r in rep.anchor if r["tap"].startswith(part + ".")} == {pd[part]}
    assert pd["vision"] == "float64"
    if pd["audio"] == "float32":     # transformers 5.24: HF's float64 audio attention raises; the reason is kept
        assert "audio tower float32" in info["note"] and "Double" in info["note"]
    # per tap: every tower layer, both projectors, the decoder and the logits
    got = {(r["tap"], r["layer"]) for r in rep.anchor}
    want = {("vision.hook_patch_embed", None), ("vision.hook_pooled", None), ("vision.hook_out", None),
            ("embed_vision.hook_out", None), ("audio.hook_subsample", None), ("audio.hook_out", None),
            ("embed_audio.hook_out", None), ("hook_embed", None), ("ln_final.hook_normalized", None),
            ("logits", None)}
    want |= {("vision.hook_resid_post", i) for i in range(2)} | {("audio.hook_resid_post", i) for i in range(2)}
    want |= {(t, i) for t in ("hook_attn_out", "hook_mlp_out", "hook_resid_post") for i in range(4)}
    assert want <= got, want - got
    for r in rep.anchor:
        assert r["passed"] and math.isfinite(r["rel_max"]) and r["nan_count"] == 0
        assert 1e-6 <= r["tol"] <= 1e-4 and r["phase"] == "anchor" and r["backend"] == "hf"
        # not vacuous: HF and our float64 differ at float32 rounding, not 0, and stay well inside the tol
        assert 0 < r["rel_max"] < 0.5 * r["tol"], r
    lg = [r for r in rep.anchor if r["tap"] == "logits"][0]
    assert lg["top1"] == 1.0


def test_anchor_compares_the_real_rows_of_each_item(media):
    """Padding dropped as HF drops it: vision rows = the real patches / soft tokens of both images, audio rows
    = the real frames of both clips (the decoder rows cover the whole expanded prompt)."""
    ids, imgs, clips = media
    m = wb.load(MM, progress=False)
    out = m.forward(np.asarray(ids)[None], images=imgs, audio=clips)
    n_soft, n_frames = sum(out.num_image_tokens), sum(out.num_audio_tokens)
    assert len(set(out.num_image_tokens)) == 2 and len(set(out.num_audio_tokens)) == 2   # padding is real
    inp = parity._media_inputs(m, imgs, clips, out)
    assert inp["image_counts"] == out.num_image_tokens and int(inp["audio_mask"].sum()) == n_frames
    P, S, Ta = inp["pixel_values"].shape[1], max(out.num_image_tokens), inp["audio_mask"].shape[1]
    rows = parity._media_rows_only
    assert rows("vision.blocks.0.hook_resid_post", np.zeros((2, P, 3)), inp).shape == (1, 9 * n_soft, 3)
    assert rows("vision.hook_out", np.zeros((2, S, 3)), inp).shape == (1, n_soft, 3)
    assert rows("vision.hook_out", np.zeros((n_soft, 3)), inp, hf_layout=True).shape == (1, n_soft, 3)
    assert rows("audio.hook_out", np.zeros((2, Ta, 3)), inp).shape == (1, n_frames, 3)
    assert rows("logits", np.zeros((1, len(out.input_ids[0]), 3)), inp).shape == (1, len(out.input_ids[0]), 3)
    # the rows kept are the items' own: image b's first counts[b] soft tokens, in order
    x = np.arange(2 * S)[None].reshape(2, S, 1).astype(float)
    kept = rows("vision.hook_out", x, inp)[0, :, 0]
    c0, c1 = out.num_image_tokens
    assert kept.tolist() == list(range(c0)) + list(range(S, S + c1))


def _one_plus_w(ops, wts, name, dim):
    """The planted bug: a Gemma-1-style 1 + w norm weight (Gemma 4's towers scale by w)."""
    acc = "float64" if ops.dtype == "float64" else "float32"
    return ops.asarray(1.0 + wts.get(name, (dim,)).astype(np.float64), dtype=acc)


def _scaled_embedder(scale):
    orig = projector_mod.Embedder.__call__

    def call(self, x, pts):
        if self.name == "embed_vision":
            y = self.ops.linear(self.ops.rms_norm(x, None, self.eps), self.w) * scale
            return pts.visit(self.ops, self.name + ".hook_out", y)
        return orig(self, x, pts)
    return call


@pytest.mark.parametrize("bug,first", [
    ("vision norm 1+w", ("vision.hook_resid_post", 0)),
    ("audio norm 1+w", ("audio.hook_subsample", None)),
    ("embed_vision x (1 + 1e-3)", ("embed_vision.hook_out", None)),
])
def test_planted_tower_bug_fails_at_the_anchor_row(media, clean, monkeypatch, bug, first):
    if bug == "vision norm 1+w":
        monkeypatch.setattr(vision_mod, "norm_weight", _one_plus_w)
    elif bug == "audio norm 1+w":
        monkeypatch.setattr(audio_mod, "norm_weight", _one_plus_w)
    else:
        monkeypatch.setattr(projector_mod.Embedder, "__call__", _scaled_embedder(1 + 1e-3))
    rep = _compare(media)
    info = rep.anchor_info
    assert info["status"] == "failed", rep.summary()
    assert not rep.passed
    # the backends alone cannot see it: the bug is in the shared code every backend runs
    assert rep.rows and all(r["passed"] for r in rep.rows), rep.summary()
    bad = sorted([r for r in rep.anchor if not r["passed"]], key=lambda r: r["order"])
    assert (bad[0]["tap"], bad[0]["layer"]) == first, [(r["tap"], r["layer"]) for r in bad]
    where = first[0] + (f" @ layer {first[1]}" if first[1] is not None else "")
    assert info["first_at"] == where
    line = rep.summary().splitlines()[1]
    assert line.startswith("ANCHOR FAILED: reference disagrees with HF transformers") and where in line, line
    # everything before the bug still agrees (so it is located, not smeared)
    for r in rep.anchor:
        if r["order"] < bad[0]["order"]:
            assert r["passed"], r
    # the bug is far outside the clean error: >= 20x the tolerance at its first tap
    assert bad[0]["rel_max"] > 20 * bad[0]["tol"], bad[0]


def test_a_tower_forced_to_float32_is_stated_and_still_anchored(media, monkeypatch):
    """The per-part fallback: a tower HF runs in float32 (here the vision tower, forced) is named in the anchor
    line and its rows carry float32; the projectors and the decoder still run in float64."""
    monkeypatch.setattr(parity, "MEDIA_ANCHOR_FLOAT32_PARTS", ("vision",))
    rep = _compare(media)
    info = rep.anchor_info
    assert info["status"] == "anchored", rep.summary()
    assert info["part_dtypes"]["vision"] == "float32" and "vision tower float32" in rep.summary().splitlines()[1]
    assert {r["dtype"] for r in rep.anchor if r["tap"].startswith("vision.")} == {"float32"}
    assert {r["dtype"] for r in rep.anchor if r["tap"] in ("embed_vision.hook_out", "logits")} == {"float64"}
    assert rep.passed


def test_media_anchor_without_transformers_is_unanchored_and_fails(media, monkeypatch):
    import workbench.references.hf as hf

    def missing():
        raise ImportError("No module named 'transformers'")
    monkeypatch.setattr(hf, "_import_transformers", missing)
    rep = _compare(media)
    assert rep.anchor_info["status"] == "unanchored" and not rep.passed
    assert "UNANCHORED: transformers is not installed" in rep.summary()

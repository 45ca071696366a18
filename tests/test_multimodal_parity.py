"""Projector and tower parity per backend is part of wb.compare: a Gemma 4 multimodal checkpoint with an
image and an audio clip, every vision/audio layer and both projector outputs compared with float64."""
import numpy as np

from conftest import FIXTURES, cpu_backends

import workbench as wb


def test_compare_covers_towers_and_projectors(tmp_db):
    d = FIXTURES / "multimodal" / "gemma4_mm"
    cfg = wb.load(d).config
    raw = cfg.raw
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    wav = (np.sin(np.linspace(0, 400 * np.pi, 16000)) * 0.3).astype(np.float32)
    ids = [cfg.bos_token_id or 2, 5, raw["image_token_id"], 6, raw["audio_token_id"], 7, 8]
    # anchor=False: anchoring media prompts against HF is not implemented (the report says UNANCHORED and
    # would fail by default); this test is about the towers' cross-backend rows
    rep = wb.compare(d, backends=cpu_backends(), dtypes=["float32"], prompt=ids, images=[img], audio=[(wav, 16000)],
                     references=(), db=tmp_db, progress=False, anchor=False)
    assert rep.passed, rep.summary()
    unanchored = wb.compare(d, backends=cpu_backends()[:1], dtypes=["float32"], prompt=ids, images=[img], audio=[(wav, 16000)],
                            references=(), store=False, progress=False)
    assert not unanchored.passed and "UNANCHORED: anchoring a media prompt" in unanchored.summary()
    df = rep.to_frame()
    for b in cpu_backends():
        taps = set(df[df.backend == b].tap)
        assert {"embed_vision.hook_out", "embed_audio.hook_out", "vision.hook_resid_post",
                "audio.hook_resid_post", "logits"} <= taps, taps
        assert df[(df.backend == b) & (df.tap == "embed_vision.hook_out")].rel_max.iloc[0] < 1e-5
    # a fault in the text model shows up after the towers, not in them
    rep2 = wb.compare(d, backends=cpu_backends()[:1], dtypes=["float32"], prompt=ids, images=[img],
                      audio=[(wav, 16000)], references=(), store=False, progress=False, anchor=False,
                      fault={"backend": cpu_backends()[0], "layer": 1, "tap": "hook_mlp_out", "scale": 1e-3})
    fd = rep2.first_divergence
    assert (fd["tap"], fd["layer"]) == ("hook_mlp_out", 1)

"""Gemma 4 multimodal against Hugging Face: vision tower + embed_vision, audio tower + embed_audio, and the full
multimodal forward (placeholders expanded, media merged, PLE pad ids, bidirectional image attention on sliding
layers) within 1e-5 relative (max|Δ|/max|ref|), on torch:cpu and mlx:cpu — against the committed dump
(fixtures/multimodal/gemma4_mm, python fixtures/make_multimodal_fixture.py) and live against transformers.
Plus taps/hooks on the towers, generation through the cache, and clear errors for bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import FIXTURES, multimodal_fixture_module, one_torch_thread, cpu_backends, have, rel_max

import workbench as wb
from workbench.model.taps import TapError
from workbench.multimodal import MediaError, multimodal_forward, multimodal_generate, preprocess as pp, runner
from workbench.multimodal.points import MediaPoints

pytest.importorskip("PIL", reason="Pillow (image decoding) is not installed")

TOL = 1e-5
MM = FIXTURES / "multimodal" / "gemma4_mm"
BACKENDS = cpu_backends()



@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """Tiny tensors: one torch thread is fastest and steady on a busy machine; restored afterwards."""
    with one_torch_thread():
        yield

_load_fixture_module = multimodal_fixture_module


fx = _load_fixture_module()


class TinyTokenizer:
    """The fixture's word-level tokenizer behind the workbench tokenizer interface (encode / decode)."""

    def __init__(self):
        self.tk = fx.tiny_tokenizers_tokenizer()
        self.stop_ids = [1]

    def encode(self, text):
        return self.tk.encode(text).ids

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=False)


@pytest.fixture(scope="module")
def ref():
    if not (MM / "reference.npz").exists():
        pytest.fail("fixture multimodal/gemma4_mm is missing: run python fixtures/make_multimodal_fixture.py")
    return dict(np.load(MM / "reference.npz"))


_MODELS: dict = {}


def model(backend):
    if backend not in _MODELS:
        m = wb.load(MM, backend=backend, progress=False)
        m.tokenizer = TinyTokenizer()
        _MODELS[backend] = m
    return _MODELS[backend]


def pixel_values(ref):
    return (ref["pixel_values_u8"].astype(np.float64) * (1 / 255)).astype(np.float32)


# ------------------------------------------------------------------------------------------ against the dump
@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_tower_and_projector_match_dump(backend, ref):
    m = model(backend)
    enc = runner.MediaEncoders.for_model(m)
    assert enc.vision.unused == [] and enc.embed_vision.unused == []
    pts = MediaPoints(enc.point_names(), ["vision.*", "embed_vision.*"], None)
    soft, counts = enc.vision(pixel_values(ref), ref["image_position_ids"], pts)
    assert counts == list(ref["num_soft_tokens_per_image"])
    ev = enc.embed_vision(soft, pts)
    flat = lambda a: np.concatenate([a[b, :c] for b, c in enumerate(counts)])  # noqa: E731
    assert rel_max(ref["vision_out"], flat(m.ops.numpy(soft))) < TOL
    assert rel_max(ref["embed_vision_out"], flat(m.ops.numpy(ev))) < TOL
    last = pts.values[f"vision.blocks.{enc.vcfg.num_hidden_layers - 1}.hook_resid_post"]
    valid = (ref["image_position_ids"] != -1).all(-1)[:, :last.shape[1]]
    assert rel_max(ref["vision_last_hidden"], last[valid]) < TOL
    assert np.array_equal(pts.values["embed_vision.hook_out"], m.ops.numpy(ev))


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_tower_and_projector_match_dump(backend, ref):
    m = model(backend)
    enc = runner.MediaEncoders.for_model(m)
    assert enc.audio.unused == [] and enc.embed_audio.unused == []
    pts = MediaPoints(enc.point_names(), ["audio.*"], None)
    out, mask = enc.audio(ref["audio_features"], ref["audio_mask"], pts)
    assert np.array_equal(mask, ref["audio_out_mask"])
    assert rel_max(ref["audio_subsample"], pts.values["audio.hook_subsample"]) < TOL
    last = pts.values[f"audio.blocks.{enc.acfg.num_hidden_layers - 1}.hook_resid_post"]
    assert rel_max(ref["audio_last_hidden"], last) < TOL
    assert rel_max(ref["audio_out"], m.ops.numpy(out)) < TOL
    assert rel_max(ref["embed_audio_out"], m.ops.numpy(enc.embed_audio(out, pts))) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_forward_matches_dump(backend, ref):
    """HF processor ids (pre-expanded runs) + the raw media -> embeddings, every layer and the logits."""
    m = model(backend)
    out = multimodal_forward(m, ref["input_ids"], images=fx.make_test_images(), audio=fx.make_test_audio(),
                             taps=["hook_embed", "blocks.*.hook_resid_post", "logits"], max_soft_tokens=70)
    assert np.array_equal(out.input_ids, ref["input_ids"])
    assert np.array_equal(out.mm_token_type_ids, ref["mm_token_type_ids"])
    assert rel_max(ref["embed"], out.taps["hook_embed"]) < TOL
    for i in range(m.config.num_hidden_layers):
        assert rel_max(ref["resid_post"][i], out.taps[f"blocks.{i}.hook_resid_post"]) < TOL, i
    assert rel_max(ref["logits"], out.logits) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_prompt_expands_like_the_processor(backend, ref):
    """The text prompt with <|image|>/<|audio|> gives the processor's ids and the same logits; so do ids with
    one placeholder id per item."""
    m = model(backend)
    imgs, auds = fx.make_test_images(), fx.make_test_audio()
    a = multimodal_forward(m, str(ref["prompt"]), images=imgs, audio=auds, max_soft_tokens=70)
    assert np.array_equal(a.input_ids, ref["input_ids"])
    assert a.num_image_tokens == [63, 60] and a.num_audio_tokens == [50, 33]
    assert rel_max(ref["logits"], a.logits) < TOL
    short = m.tokenizer.encode(str(ref["prompt"]))          # one image/audio id per item
    b = multimodal_forward(m, short, images=imgs, audio=auds, max_soft_tokens=70)
    assert np.array_equal(b.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(a.logits, b.logits)


def test_preprocessing_matches_dump(ref):
    pv = pixel_values(ref)
    for i, im in enumerate(fx.make_test_images()):
        p = pp.preprocess_image(im, 70)
        np.testing.assert_array_equal(p.pixel_values, pv[i])
        np.testing.assert_array_equal(p.position_ids, ref["image_position_ids"][i])
        assert p.num_soft_tokens == ref["num_soft_tokens_per_image"][i]
    feats, mask = pp.batch_audio([pp.preprocess_audio(a) for a in fx.make_test_audio()])
    np.testing.assert_array_equal(mask, ref["audio_mask"])
    np.testing.assert_array_equal(feats, ref["audio_features"])


# ------------------------------------------------------------------------------------------ taps, hooks, generate
@pytest.mark.parametrize("backend", BACKENDS)
def test_media_taps_and_hooks(backend):
    m = model(backend)
    imgs, auds = fx.make_test_images()[:1], fx.make_test_audio()[:1]
    prompt = "w5 <|image|> w6 <|audio|> w7"
    base = multimodal_forward(m, prompt, images=imgs, audio=auds, max_soft_tokens=70,
                              taps=["vision.*", "audio.*", "embed_*", "logits"])
    t = base.taps
    assert t["vision.hook_patch_embed"].shape == (1, 567, 32)
    assert t["vision.blocks.0.attn.hook_q"].shape == (1, 567, 2, 16)
    assert t["vision.hook_pooled"].shape == (1, 63, 32)
    assert t["embed_vision.hook_out"].shape == (1, 63, 32)
    assert t["audio.hook_subsample"].shape == (1, 50, 32)
    assert t["audio.blocks.1.attn.hook_pattern"].shape[:3] == (1, 2, 5)
    assert t["embed_audio.hook_out"].shape == (1, 50, 32)
    assert "logits" in t and "hook_embed" not in t
    # an identity hook changes nothing; zeroing the image embeddings changes the logits (after the image only).
    # (Tapping attn.hook_pattern switches attention to the explicit path, so ``base`` differs in the last bits.)
    plain = multimodal_forward(m, prompt, images=imgs, audio=auds, max_soft_tokens=70)
    assert rel_max(plain.logits, base.logits) < TOL
    same = multimodal_forward(m, prompt, images=imgs, audio=auds, max_soft_tokens=70,
                              hooks={"vision.blocks.*.hook_resid_post": lambda x, n: x,
                                     "audio.blocks.*.hook_resid_post": lambda x, n: None})
    np.testing.assert_array_equal(same.logits, plain.logits)
    zero = multimodal_forward(m, prompt, images=imgs, audio=auds, max_soft_tokens=70,
                              hooks={"embed_vision.hook_out": lambda x, n: np.zeros_like(x)})
    first_img = int(np.argmax(base.mm_token_type_ids[0] == 1))
    np.testing.assert_array_equal(zero.logits[0, :first_img], base.logits[0, :first_img])
    assert np.abs(zero.logits - base.logits).max() > 1e-3
    names = runner.tap_names(m)
    assert "vision.blocks.1.hook_resid_post" in names and "embed_audio.hook_out" in names and "logits" in names
    with pytest.raises(TapError, match="matches no point"):
        multimodal_forward(m, prompt, images=imgs, audio=auds, taps=["vision.nope"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_matches_full_forward(backend):
    """Greedy tokens from one multimodal prefill + cached decode equal re-running the whole prompt each step;
    streaming gives the same text."""
    m = model(backend)
    imgs = [pp.preprocess_image(fx.make_test_images()[0], 70)]
    auds = [pp.preprocess_audio(fx.make_test_audio()[1])]
    prompt = "w5 <|image|> w6 <|audio|> w7"
    g = multimodal_generate(m, prompt, images=imgs, audio=auds, max_new_tokens=3, ignore_eos=True)
    assert len(g.token_ids) == 3 and g.stats["image_tokens"] == [63] and g.stats["audio_tokens"] == [33]
    ids = list(g.prompt_ids)
    for tok in g.token_ids:
        full = multimodal_forward(m, ids, images=imgs, audio=auds, last_only=True)
        assert int(np.argmax(full.logits[0, -1])) == tok
        ids.append(tok)
    pieces = list(multimodal_generate(m, prompt, images=imgs, audio=auds, max_new_tokens=3, ignore_eos=True,
                                      stream=True))
    assert "".join(pieces) == g.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_api_when_wired(backend, ref):
    """``m.forward(prompt, images=, audio=)`` / ``m.generate`` as DESIGN.md has them: gemma.py routes media to
    the multimodal runner (no skip: a NotImplementedError here is a failure)."""
    m = model(backend)
    imgs, auds = fx.make_test_images(), fx.make_test_audio()
    out = m.forward(str(ref["prompt"]), images=imgs, audio=auds, taps=["vision.hook_out", "logits"])
    # the model's default budget is 280 soft tokens per image (no processor config in the fixture)
    assert out.logits.shape[1] == out.taps["logits"].shape[1]
    assert "vision.hook_out" in out.taps
    same = multimodal_forward(m, str(ref["prompt"]), images=imgs, audio=auds)
    np.testing.assert_array_equal(out.logits, same.logits)
    g = m.generate(str(ref["prompt"]), images=imgs, audio=auds, max_new_tokens=2, ignore_eos=True)
    assert len(g.token_ids) == 2 and g.token_ids[0] == int(np.argmax(out.logits[0, -1]))


def test_runner_uses_the_models_forward_embeds_hook():
    """The runner goes through the text decoder's public ``forward_embeds`` (with the image block mask)."""
    m = model(BACKENDS[0])
    calls = []
    orig = m.decoder.forward_embeds

    def hook(x, ple_ids, pts=None, cache=None, start=0, last_only=False, extra_mask=None):
        calls.append(extra_mask is not None)
        return orig(x, ple_ids, pts, cache, start, last_only, extra_mask=extra_mask)

    m.decoder.forward_embeds = hook
    try:
        multimodal_forward(m, "w5 <|image|> w6", images=fx.make_test_images()[:1], max_soft_tokens=70)
    finally:
        del m.decoder.forward_embeds
    assert calls == [True]


def test_bidirectional_blocks():
    kinds = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0, 3, 3, 0])
    blk = runner.image_block_mask(kinds)
    assert blk[2, 4] and blk[4, 2] and blk[6, 7] and not blk[4, 6] and not blk[9, 10] and not blk[0, 1]
    assert runner.image_block_mask(np.array([0, 3, 3, 0])) is None


# ------------------------------------------------------------------------------------------ errors
def test_bad_media_errors(tmp_path):
    m = model(BACKENDS[0])
    img = fx.make_test_images()[0]
    buf = io.BytesIO()
    img.save(buf, "PNG")
    png = buf.getvalue()
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    jpg = buf.getvalue()
    for bad, what in ((png[:len(png) // 2], "truncated|corrupt"), (jpg[:len(jpg) // 3], "truncated|corrupt"),
                      (b"not an image at all" * 10, "not an image"), (b"", "empty")):
        with pytest.raises(MediaError, match=what):
            multimodal_forward(m, "w5 <|image|>", images=[bad])
    corrupt = bytearray(png)
    corrupt[60:200] = b"\x00" * 140
    with pytest.raises(MediaError):
        pp.load_image(bytes(corrupt))
    with pytest.raises(MediaError, match="does not exist"):
        multimodal_forward(m, "w5 <|image|>", images=[tmp_path / "missing.png"])
    with pytest.raises(MediaError, match="uint8"):
        pp.load_image(np.zeros((20, 20, 3), np.float32))

    (tmp_path / "a.mp3").write_bytes(b"ID3\x03\x00" + b"\x00" * 100)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "nosamples.wav").write_bytes(pp.write_wav(None, np.zeros((0, 1)), 16000))
    (tmp_path / "text.wav").write_text("hello")
    for f, what in (("a.mp3", "not a WAV.*MP3"), ("empty.wav", "empty"), ("nosamples.wav", "no samples"),
                    ("text.wav", "not a WAV")):
        with pytest.raises(MediaError, match=what):
            multimodal_forward(m, "w5 <|audio|>", audio=[tmp_path / f])
    with pytest.raises(MediaError, match="empty audio"):
        multimodal_forward(m, "w5 <|audio|>", audio=[np.zeros(0, np.float32)])
    with pytest.raises(MediaError, match="too short"):
        multimodal_forward(m, "w5 <|audio|>", audio=[np.zeros(100, np.float32)])
    with pytest.raises(MediaError, match="unsupported WAV encoding"):
        pp.read_wav(pp.write_wav(None, np.zeros(10), 16000).replace(b"\x01\x00\x01\x00", b"\x02\x00\x01\x00", 1))


def test_placeholder_count_errors():
    m = model(BACKENDS[0])
    img, aud = fx.make_test_images()[0], fx.make_test_audio()[1]
    with pytest.raises(MediaError, match=r"2 image placeholder\(s\).*but 1 image"):
        multimodal_forward(m, "w5 <|image|> <|image|>", images=[img])
    with pytest.raises(MediaError, match=r"1 image placeholder\(s\).*but 2 image"):
        multimodal_forward(m, "w5 <|image|>", images=[img, img])
    with pytest.raises(MediaError, match=r"0 audio placeholder\(s\).*but 1 audio"):
        multimodal_forward(m, "w5 w6", audio=[aud])
    with pytest.raises(MediaError, match=r"1 audio placeholder\(s\).*but 0 audio"):
        multimodal_forward(m, [2, 5, 105, 6])
    with pytest.raises(MediaError, match="expanded image run"):      # a processor-style run of the wrong length
        multimodal_forward(m, [2, 100] + [102] * 5 + [101], images=[img], max_soft_tokens=70)
    with pytest.raises(MediaError, match="consecutive"):
        multimodal_forward(m, [2, 102, 102], images=[img])


def test_media_on_a_model_without_towers():
    m = wb.load(FIXTURES / "gemma4_e2b", backend=BACKENDS[0], progress=False)
    with pytest.raises(wb.model.gemma.InputError, match="multimodal checkpoint"):
        multimodal_forward(m, [2, 5, 258880], images=[fx.make_test_images()[0]])


# ------------------------------------------------------------------------------------------ live vs transformers
@pytest.fixture(scope="module")
def hf():
    if not have("transformers"):
        pytest.skip("transformers not installed")
    import torch
    from transformers import Gemma4ForConditionalGeneration
    torch.set_num_threads(1)
    model_hf = Gemma4ForConditionalGeneration.from_pretrained(MM, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    return model_hf


@pytest.mark.reference
@pytest.mark.parametrize("backend", BACKENDS)
def test_live_vs_transformers(backend, hf):
    """Other media than the dump: a wide JPEG-decoded image (140-token budget), a grey image, one short clip
    (25 tokens, not a multiple of the 12-frame attention chunk) - through HF's processor and model."""
    import torch
    from PIL import Image
    y, x = np.mgrid[0:90, 0:320]
    wide = Image.fromarray(np.stack([(x * 0.8) % 256, (y * 2.8) % 256, (x + y) % 256], -1).astype(np.uint8))
    buf = io.BytesIO()
    wide.save(buf, "JPEG", quality=90)
    wide = Image.open(io.BytesIO(buf.getvalue()))
    grey = Image.fromarray((np.add.outer(np.arange(70), np.arange(50)) % 256).astype(np.uint8), "L")
    t = np.arange(int(1.07 * 16000)) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 330 * t) * np.exp(-t)).astype(np.float32)
    prompt = "<|image|> w9 w10 <|audio|> w11 <|image|> w12"
    proc = fx.hf_processor(max_soft_tokens=140)
    inputs = proc(text=prompt, images=[wide, grey], audio=[clip], return_tensors="pt")
    with torch.no_grad():
        ref_logits = hf(**inputs).logits.numpy()
    m = model(backend)
    out = multimodal_forward(m, prompt, images=[wide, grey], audio=[clip], max_soft_tokens=140)
    np.testing.assert_array_equal(out.input_ids, inputs["input_ids"].numpy())
    np.testing.assert_array_equal(out.mm_token_type_ids, inputs["mm_token_type_ids"].numpy())
    assert rel_max(ref_logits, out.logits) < TOL

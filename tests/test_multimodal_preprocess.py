"""Gemma 4 media preprocessing equals Hugging Face's: the PIL image processor (pixel_values, position ids,
padding, soft-token counts) over several sizes, aspect ratios, modes and budgets; the audio feature extractor
(log-mel and frame mask) over several lengths; WAV decoding (PCM 8/16/24/32-bit, float 32/64, plain and
extensible, mono/stereo, several rates) against ``transformers.audio_utils.load_audio`` (soundfile + soxr);
the numpy resampler against scipy's resample_poly; the placeholder counts against Gemma4Processor."""
from __future__ import annotations


import numpy as np
import pytest

from conftest import have, multimodal_fixture_module, one_torch_thread

from workbench.multimodal import MediaError, preprocess as pp

pytest.importorskip("PIL", reason="Pillow (image decoding) is not installed")

needs_hf = pytest.mark.skipif(not have("transformers"), reason="transformers not installed")
# independent WAV readers/writers (the dev extra installs both): the WAV code is checked against them, not
# only against our own writer
try:
    import soundfile as sf
    from scipy.io import wavfile
except ImportError as _e:   # only the WAV tests need them
    sf = wavfile = None
    _WHY = f"soundfile and scipy are needed ({_e}; pip install gemma-workbench[dev])"
needs_readers = pytest.mark.skipif(sf is None or wavfile is None, reason="soundfile/scipy not installed")



@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """Tiny tensors: one torch thread is fastest and steady on a busy machine; restored afterwards."""
    with one_torch_thread():
        yield

_fx = multimodal_fixture_module


def _image(h, w, mode="RGB", seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 7 + yy) % 256, (yy * 5) % 256, (xx * yy) % 256, 40 + (xx + yy) % 200], -1)
    base = (base + rng.integers(0, 30, base.shape)).clip(0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(base[..., :3], "RGB")
    if mode == "RGBA":
        return Image.fromarray(base, "RGBA")
    if mode == "L":
        return Image.fromarray(base[..., 0], "L")
    if mode == "P":
        im = Image.fromarray(base[..., :3], "RGB").convert("P", palette=Image.ADAPTIVE, colors=16)
        im.info["transparency"] = 3
        return im
    if mode == "LA":
        return Image.fromarray(base[..., [0, 3]], "LA")
    raise ValueError(mode)


IMAGE_CASES = [  # (h, w, mode, max_soft_tokens)
    (150, 200, "RGB", 70), (130, 60, "RGBA", 70), (48, 48, "RGB", 280), (1000, 30, "L", 140),
    (33, 700, "RGB", 280), (480, 640, "P", 560), (17, 23, "LA", 70), (720, 1280, "RGB", 1120), (96, 144, "RGB", 280),
    (240, 240, "RGB", 140), (1, 4000, "RGB", 70), (3000, 2, "L", 280),
]


@needs_hf
@pytest.mark.reference
@pytest.mark.parametrize("h,w,mode,budget", IMAGE_CASES)
def test_image_processor_equals_hf(h, w, mode, budget):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    img = _image(h, w, mode, seed=h * w)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=budget)(img, return_tensors="np")
    mine = pp.preprocess_image(img, budget)
    np.testing.assert_array_equal(mine.pixel_values, ref["pixel_values"][0])
    np.testing.assert_array_equal(mine.position_ids, ref["image_position_ids"][0])
    assert mine.num_soft_tokens == int(ref["num_soft_tokens_per_image"][0])
    assert mine.num_soft_tokens <= budget


@needs_hf
@pytest.mark.reference
def test_image_inputs_as_files_and_arrays(tmp_path):
    """Paths (PNG with alpha, JPEG with an EXIF rotation) and bytes give what HF gives for the same path (its
    load_image: EXIF transpose, RGB); PIL images and uint8 arrays what HF gives for them (alpha on white)."""
    from PIL import Image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    proc = Gemma4ImageProcessorPil(max_soft_tokens=70)
    rgba = _image(120, 90, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6                        # rotate 90 degrees on display
    for name, img, kw in (("x.png", rgba, {}), ("y.jpg", rgba.convert("RGB"), {"exif": exif.tobytes()})):
        p = tmp_path / name
        img.save(p, **kw)
        ref = proc(str(p), return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(pp.preprocess_image(p, 70).pixel_values, ref)
        np.testing.assert_array_equal(pp.preprocess_image(str(p), 70).pixel_values, ref)
        np.testing.assert_array_equal(pp.preprocess_image(p.read_bytes(), 70).pixel_values, ref)
        opened = Image.open(p)
        np.testing.assert_array_equal(pp.preprocess_image(opened, 70).pixel_values,
                                      proc(opened, return_tensors="np")["pixel_values"][0])
    assert pp.preprocess_image(tmp_path / "y.jpg", 70).source_size == (90, 120)     # rotated
    rng = np.random.default_rng(1)
    for shape in ((50, 60, 1), (50, 60, 3), (70, 40, 4)):       # HF's numpy path (its own RGBA compositing)
        arr = rng.integers(0, 256, shape).astype(np.uint8)
        np.testing.assert_array_equal(pp.preprocess_image(arr, 70).pixel_values,
                                      proc(arr, return_tensors="np")["pixel_values"][0])


def test_image_budget_errors():
    with pytest.raises(ValueError, match="max_soft_tokens"):
        pp.preprocess_image(_image(50, 50), 100)
    with pytest.raises(MediaError, match="empty image"):
        pp.preprocess_image(np.zeros((0, 5, 3), np.uint8), 70)


@needs_hf
@pytest.mark.reference
@pytest.mark.parametrize("n", [1000, 16000, 16001, 20000 + 77, 48000 * 2 + 5, 480_000 + 3000])
def test_log_mel_equals_hf(n):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    rng = np.random.default_rng(n)
    t = np.arange(n) / 16000
    x = (0.3 * np.sin(2 * np.pi * 500 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    ref = Gemma4AudioFeatureExtractor()([x], return_tensors="np")
    feats, mask = pp.log_mel(x)
    np.testing.assert_array_equal(mask, ref["input_features_mask"][0])
    np.testing.assert_array_equal(feats, ref["input_features"][0])


@needs_hf
@pytest.mark.reference
def test_audio_token_counts_equal_processor():
    """Soft tokens per clip = HF's replace_audio_token count (and its duration formula)."""
    fx = _fx()
    proc = fx.hf_processor()
    for n in (500, 1000, 1601, 16000, 16123, 33333, 480_000):
        x = np.zeros(n, np.float32) + 0.01
        a = pp.preprocess_audio(x) if n >= 800 else None
        out = proc(text="w5 <|audio|>", audio=[x], return_tensors="np")
        want = int((out["input_ids"][0] == 105).sum())
        assert want == proc._compute_audio_num_tokens(x, 16000)
        if a is not None:
            assert a.num_soft_tokens == want, n


@pytest.mark.parametrize("bits,fmt,ext", [(8, "pcm", False), (16, "pcm", False), (24, "pcm", False),
                                          (32, "pcm", False), (32, "float", False), (64, "float", False),
                                          (16, "pcm", True), (24, "pcm", True), (32, "float", True)])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [16000, 44100, 8000])
@needs_readers
def test_wav_decoding(tmp_path, bits, fmt, ext, channels, rate):
    """Our reader gives soundfile's float32 samples; the 16 kHz mono waveform equals HF's load_audio
    (soundfile decode, channel mean, soxr) when those packages are installed; otherwise checked by hand."""
    n = rate // 4 + 3
    rng = np.random.default_rng(bits + channels + rate)
    x = 0.7 * np.sin(np.arange(n)[:, None] * np.array([0.013, 0.05])[:channels])
    x = x + 0.02 * rng.standard_normal((n, channels))
    p = tmp_path / "a.wav"
    pp.write_wav(p, x, rate, bits, fmt, ext)
    w = pp.read_wav(p)
    assert w.samples.shape == (n, channels) and w.rate == rate and w.samples.dtype == np.float32
    q = {8: 1 / 128, 16: 1 / 32768, 24: 2 ** -23, 32: 2 ** -31, 64: 0}[bits] if fmt == "pcm" else 1e-7
    assert np.abs(w.samples - x).max() <= max(q, 1e-7) * 0.51 + 1e-7
    wave, src = pp.load_audio(p)
    assert src == rate and wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == -(-n * 16000 // rate)
    # our writer's file through two independent readers (so the writer is not only checked by our reader)
    s, r = sf.read(p, dtype="float32", always_2d=True)
    assert r == rate
    np.testing.assert_array_equal(w.samples, s)
    r2, raw = wavfile.read(p)
    assert r2 == rate
    np.testing.assert_array_equal(w.samples, _scipy_float32(raw).reshape(n, channels))
    if (rate == 16000 or have("soxr")) and have("transformers"):
        from transformers.audio_utils import load_audio
        np.testing.assert_array_equal(wave, load_audio(str(p), 16000, backend="soundfile"))


def _scipy_float32(raw: np.ndarray) -> np.ndarray:
    """scipy.io.wavfile's raw samples as float32 in [-1, 1), the usual PCM scaling (x / 2^(bits-1); 8-bit is
    unsigned, offset 128; scipy returns 24-bit samples left-justified in int32)."""
    if raw.dtype == np.uint8:
        return ((raw.astype(np.float64) - 128) / 128).astype(np.float32)
    if raw.dtype == np.int16:
        return (raw / 32768.0).astype(np.float32)
    if raw.dtype == np.int32:
        return (raw / 2.0 ** 31).astype(np.float32)
    return raw.astype(np.float32)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize("container", ["WAV", "WAVEX"])
@pytest.mark.parametrize("channels", [1, 2, 3])
@needs_readers
@pytest.mark.filterwarnings("ignore:Chunk .non-data. not understood")
def test_wav_reader_on_files_written_by_others(tmp_path, subtype, container, channels):
    """Files written by libsndfile (soundfile), in plain and WAVE_FORMAT_EXTENSIBLE containers: our reader
    gives the samples soundfile and scipy.io.wavfile read back from them."""
    rate = 22050
    n = 2001
    rng = np.random.default_rng(channels)
    x = np.clip(0.6 * np.sin(np.arange(n)[:, None] * np.array([0.011, 0.07, 0.3])[:channels])
                + 0.05 * rng.standard_normal((n, channels)), -1, 0.999)
    p = tmp_path / f"sf-{subtype}-{container}.wav"
    sf.write(p, x, rate, subtype=subtype, format=container)
    w = pp.read_wav(p)
    ref, r = sf.read(p, dtype="float32", always_2d=True)
    assert (w.rate, r) == (rate, rate) and w.samples.shape == (n, channels)
    np.testing.assert_array_equal(w.samples, ref)
    r2, raw = wavfile.read(p)
    assert r2 == rate
    np.testing.assert_array_equal(w.samples, _scipy_float32(raw).reshape(n, channels))
    # and the bytes path gives the same
    np.testing.assert_array_equal(pp.read_wav(p.read_bytes()).samples, w.samples)


def test_wav_mono_mix_and_tuple_inputs():
    st = np.stack([np.linspace(-0.5, 0.5, 1000), np.linspace(0.5, -0.1, 1000)], -1)
    wav = pp.write_wav(None, st, 16000, 32, "float")
    wave, _ = pp.load_audio(wav)
    np.testing.assert_array_equal(wave, st.astype(np.float32).T.mean(axis=0))
    a, _ = pp.load_audio((st.astype(np.float32), 16000))
    np.testing.assert_array_equal(a, wave)
    b, _ = pp.load_audio((np.round(st[:, 0] * 32767).astype(np.int16), 16000))
    np.testing.assert_allclose(b, st[:, 0], atol=1 / 32768)


@pytest.mark.skipif(not have("scipy"), reason="scipy not installed")
@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 32000, 44100, 48000])
def test_numpy_resampler_equals_scipy(rate):
    from scipy.signal import resample_poly
    x = np.random.default_rng(rate).standard_normal(rate // 5 + 7)
    np.testing.assert_allclose(pp.resample_poly(x, rate, 16000), resample_poly(x, 16000, rate), rtol=0, atol=1e-12)


@pytest.mark.skipif(not have("soxr"), reason="soxr not installed")
def test_resampler_choice():
    """"auto" is soxr (HF's resampler) when installed; the numpy fallback is within a few % of it."""
    import soxr
    t = np.arange(44100) / 44100
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t)).astype(np.float32)
    auto = pp.resample_to_16k(x, 44100)
    np.testing.assert_array_equal(auto, soxr.resample(x, 44100, 16000, quality="soxr_hq")[:16000])
    poly = pp.resample_to_16k(x, 44100, method="poly")
    assert len(poly) == len(auto) and np.abs(poly - auto)[100:-100].max() < 0.02


@needs_hf
@pytest.mark.reference
def test_processor_expansion_equals_hf():
    """Gemma4Processor (tiny tokenizer) vs our expansion on several prompts; mm_token_type_ids too."""
    fx = _fx()
    from workbench.multimodal import runner
    proc = fx.hf_processor(max_soft_tokens=70)
    tk = fx.tiny_tokenizers_tokenizer()
    tokens = runner.MediaTokens(**{k: v for k, v in dict(image=102, boi=100, eoi=101, audio=105, boa=103, eoa=104,
                                                          video=106, pad=0).items()})

    class Tok:
        def encode(self, s):
            return tk.encode(s).ids

    class M:
        tokenizer = Tok()

    imgs, auds = fx.make_test_images(), fx.make_test_audio()
    for prompt, ni, na in (("<|image|>", 1, 0), ("w5 <|audio|>", 0, 1), ("<|audio|><|image|> w7", 1, 1),
                           ("w4 <|image|> w5 <|image|> w6 <|audio|> w7 <|audio|>", 2, 2)):
        out = proc(text=prompt, images=imgs[:ni] or None, audio=auds[:na] or None, return_tensors="np")
        pieces, n_img, n_aud = runner.split_prompt(M(), prompt)
        ic = [pp.preprocess_image(i, 70).num_soft_tokens for i in imgs[:ni]]
        ac = [pp.preprocess_audio(a).num_soft_tokens for a in auds[:na]]
        ids, kinds = runner.expand(pieces, tokens, ic, ac)
        np.testing.assert_array_equal(ids, out["input_ids"][0])
        np.testing.assert_array_equal(kinds, out["mm_token_type_ids"][0])

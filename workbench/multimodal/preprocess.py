"""Media preprocessing for Gemma 4, equal to Hugging Face's processors.

Images (= ``Gemma4ImageProcessorPil``, the PIL backend transformers uses without torchvision)
    decode with Pillow (PNG, JPEG, anything Pillow reads; corrupt or truncated files raise ``MediaError``);
    files (paths, bytes) are EXIF-transposed and converted to RGB as HF's ``load_image`` does for paths
    -> RGB (in-memory transparency composited onto white, as HF's ``convert_to_rgb``)
    -> aspect-preserving bicubic resize (Pillow) to the largest H x W that are multiples of patch*pool (48) with
       at most ``max_soft_tokens * pool**2`` patches (skipped when the size already fits exactly)
    -> rescale by 1/255 (float64 multiply, then float32), no mean/std normalisation
    -> 16 x 16 patches in (row, col) order, each flattened (y, x, channel)
    -> padded to ``max_soft_tokens * pool**2`` patches (zeros; position (-1, -1)).
    ``max_soft_tokens`` is one of 70, 140, 280 (default), 560, 1120; soft tokens = patches / pool**2.
    (The torchvision backend of HF resizes with torch's antialiased bicubic and differs in the last bits.)

Audio
    WAV decoding is a small RIFF reader (no dependency): PCM 8/16/24/32-bit integer, IEEE float 32/64, plain or
    WAVE_FORMAT_EXTENSIBLE; samples scaled as libsndfile/soundfile do (int16 / 2**15, int24 / 2**23,
    int32 / 2**31, uint8 (x - 128) / 128), channels averaged to mono in float32 (HF's ``load_audio``).
    Resampling to 16 kHz (HF's feature extractor takes 16 kHz arrays; HF's ``load_audio`` resamples with
    ``soxr`` "HQ" and pads/trims to ceil(n * 16000 / rate)): with the ``soxr`` package installed we call it
    exactly as HF does, so the result is identical; without it a numpy polyphase windowed-sinc resampler
    runs — the same filter as ``scipy.signal.resample_poly`` (Kaiser beta 5, half length 10 * max(up, down),
    cut-off at the lower Nyquist), equal to scipy's output to float rounding, and close to soxr's (soxr's
    filter is steeper; differences are near the band edge).
    Log-mel (= ``Gemma4AudioFeatureExtractor``): pad the clip to a multiple of 128 samples (truncate past
    480 000 samples = 30 s), prepend 160 zeros (semicausal), frames of 321 samples every 160, drop the last
    sample of each frame, periodic Hann(320), |rfft(512)|, 128 HTK mel filters 0-8 kHz (no norm),
    log(mel + 1e-3); a frame is valid when all its samples are real audio; invalid frames are zeroed.
    Soft tokens = valid frames after two stride-2 halvings (HF's processor count), i.e. ~25 per second.
"""
from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import MediaError

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
SAMPLE_RATE = 16_000
MAX_SAMPLES = 480_000


# ================================================================================================ images
@dataclass
class PreparedImage:
    """One image as the vision tower takes it (same arrays as HF's image processor, batch axis removed)."""
    pixel_values: np.ndarray        # [max_patches, 3 * ps * ps] float32 in [0, 1]
    position_ids: np.ndarray        # [max_patches, 2] int64 (x, y); (-1, -1) for padding
    num_soft_tokens: int
    size: tuple                     # (height, width) after resizing
    source_size: tuple              # (height, width) as decoded


def aspect_ratio_preserving_size(height: int, width: int, patch_size: int, max_patches: int,
                                 pooling_kernel_size: int) -> tuple[int, int]:
    """HF ``get_aspect_ratio_preserving_size``: the largest (H, W), multiples of patch*pool, with at most
    ``max_patches`` patches, keeping the aspect ratio."""
    total_px = height * width
    target_px = max_patches * (patch_size ** 2)
    factor = math.sqrt(target_px / total_px)
    ideal_height = factor * height
    ideal_width = factor * width
    side_mult = pooling_kernel_size * patch_size
    target_height = int(math.floor(ideal_height / side_mult)) * side_mult
    target_width = int(math.floor(ideal_width / side_mult)) * side_mult
    if target_height == 0 and target_width == 0:
        raise MediaError(f"image of {height}x{width} pixels cannot be resized to a multiple of {side_mult} "
                         "pixels on both sides")
    max_side_length = (max_patches // pooling_kernel_size ** 2) * side_mult
    if target_height == 0:
        target_height = side_mult
        target_width = min(int(math.floor(width / height)) * side_mult, max_side_length)
    elif target_width == 0:
        target_width = side_mult
        target_height = min(int(math.floor(height / width)) * side_mult, max_side_length)
    if target_height * target_width > target_px:
        raise MediaError(f"image of {height}x{width} pixels: resizing to {target_height}x{target_width} exceeds "
                         f"{max_patches} patches of {patch_size} px (aspect ratio too extreme)")
    return target_height, target_width


def load_image(src):
    """A PIL image from a path, bytes, a file object, a PIL image or a uint8 array ([H, W], [H, W, 1|3|4]).
    Files are decoded fully (corrupt and truncated ones fail here with ``MediaError``), EXIF-transposed and
    converted to RGB, as HF's ``load_image`` does for paths (so a PNG's alpha is dropped, not composited);
    PIL images and arrays are returned as they are (their transparency is composited onto white later, as
    HF's image processor does for in-memory images)."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        a = src
        if a.dtype != np.uint8:
            raise MediaError(f"image arrays must be uint8 [H, W, 3] (or [H, W], [H, W, 4]); got dtype {a.dtype} "
                             "— pass a PIL image or a file path for other formats")
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
            raise MediaError(f"image array of shape {src.shape}: expected [H, W], [H, W, 3] or [H, W, 4]")
        if a.size == 0:
            raise MediaError(f"empty image array of shape {src.shape}")
        return Image.fromarray(np.ascontiguousarray(a))
    name = None
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        p = Path(name)
        if not p.exists():
            raise MediaError(f"image file {name!r} does not exist")
        data = p.read_bytes()
    elif isinstance(src, (bytes, bytearray)):
        data = bytes(src)
        name = "<bytes>"
    elif hasattr(src, "read"):
        data = src.read()
        name = getattr(src, "name", "<file>")
    else:
        raise MediaError(f"unsupported image input of type {type(src).__name__}: give a path, bytes, a PIL image "
                         "or a uint8 array")
    if not data:
        raise MediaError(f"image {name}: the file is empty")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise MediaError(f"image {name}: not an image Pillow can read (corrupt, or an unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"image {name}: cannot decode ({e}) — the file is corrupt or truncated") from None
    try:
        # as HF's load_image does for paths and URLs: EXIF orientation applied, then RGB (alpha dropped)
        from PIL import ImageOps
        img = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"image {name}: cannot decode ({e}) — the file is corrupt or truncated") from None
    return img


def to_rgb_array(img) -> np.ndarray:
    """HF ``convert_to_rgb`` for PIL images: transparency composited onto white; [H, W, 3] uint8."""
    from PIL import Image
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img).convert("RGB")
    else:
        img = img.convert("RGB")
    return np.array(img)


def preprocess_image(src, max_soft_tokens: int = 280, patch_size: int = 16, pooling_kernel_size: int = 3,
                     pad: bool = True) -> PreparedImage:
    """One image -> ``PreparedImage`` (HF ``Gemma4ImageProcessorPil`` outputs for that image)."""
    from PIL import Image
    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}")
    if isinstance(src, PreparedImage):
        return src
    img = load_image(src)
    rgb = to_rgb_array(img)                                  # [H, W, 3] uint8
    H, W = rgb.shape[:2]
    max_patches = max_soft_tokens * pooling_kernel_size ** 2
    th, tw = aspect_ratio_preserving_size(H, W, patch_size, max_patches, pooling_kernel_size)
    if (th, tw) != (H, W):
        rgb = np.array(Image.fromarray(rgb).resize((tw, th), resample=Image.BICUBIC))
    chw = (np.moveaxis(rgb, -1, 0).astype(np.float64) * (1 / 255)).astype(np.float32)
    C = chw.shape[0]
    ph, pw = th // patch_size, tw // patch_size
    patches = chw.reshape(C, ph, patch_size, pw, patch_size).transpose(1, 3, 2, 4, 0).reshape(ph * pw, -1)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    pos = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2).astype(np.int64)
    n = patches.shape[0]
    if pad and n < max_patches:
        patches = np.concatenate([patches, np.zeros((max_patches - n, patches.shape[1]), np.float32)])
        pos = np.concatenate([pos, np.full((max_patches - n, 2), -1, np.int64)])
    return PreparedImage(pixel_values=np.ascontiguousarray(patches), position_ids=pos,
                         num_soft_tokens=n // pooling_kernel_size ** 2, size=(th, tw), source_size=(H, W))


def batch_images(prepared: list[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
    """Stack prepared images, padding to the longest (HF pads every image to max_patches)."""
    P = max(p.pixel_values.shape[0] for p in prepared)
    pv = np.zeros((len(prepared), P, prepared[0].pixel_values.shape[1]), np.float32)
    pos = np.full((len(prepared), P, 2), -1, np.int64)
    for i, p in enumerate(prepared):
        pv[i, :p.pixel_values.shape[0]] = p.pixel_values
        pos[i, :p.position_ids.shape[0]] = p.position_ids
    return pv, pos


# ================================================================================================ WAV
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


@dataclass
class Wav:
    samples: np.ndarray        # [frames, channels] float32 in [-1, 1]
    rate: int
    bits: int
    fmt: str                   # "pcm" | "float"
    truncated: bool = False


def read_wav(src) -> Wav:
    """Parse a RIFF/WAVE file (path, bytes or file object)."""
    name = "<bytes>"
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        if not Path(name).exists():
            raise MediaError(f"audio file {name!r} does not exist")
        data = Path(name).read_bytes()
    elif isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read()
        name = getattr(src, "name", "<file>")
    else:
        raise MediaError(f"unsupported audio input of type {type(src).__name__}")
    if len(data) == 0:
        raise MediaError(f"audio {name}: the file is empty")
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        kind = _sniff(data)
        raise MediaError(f"audio {name}: not a WAV file (no RIFF/WAVE header{'; looks like ' + kind if kind else ''})"
                         " — only WAV is decoded; convert other formats to WAV or pass (samples, rate)")
    if data[:4] == b"RIFX":
        raise MediaError(f"audio {name}: big-endian WAV (RIFX) is not supported")
    pos = 12
    fmt = None
    payload = None
    declared = 0
    while pos + 8 <= len(data):
        cid = data[pos:pos + 4]
        size = struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise MediaError(f"audio {name}: malformed WAV 'fmt ' chunk ({len(body)} bytes)")
            tag, ch, rate, _, align, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE:
                if len(body) < 40 or body[26:40] != _GUID_TAIL:
                    raise MediaError(f"audio {name}: WAVE_FORMAT_EXTENSIBLE with an unknown sub-format")
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, ch, rate, align, bits)
        elif cid == b"data":
            payload = body
            declared = size
            break
        pos += 8 + size + (size & 1)
    if fmt is None:
        raise MediaError(f"audio {name}: WAV file without a 'fmt ' chunk (corrupt)")
    if payload is None:
        raise MediaError(f"audio {name}: WAV file without a 'data' chunk (corrupt or empty)")
    tag, ch, rate, align, bits = fmt
    if ch < 1 or rate < 1:
        raise MediaError(f"audio {name}: WAV header says {ch} channels at {rate} Hz")
    if tag == 1 and bits in (8, 16, 24, 32):
        kind = "pcm"
    elif tag == 3 and bits in (32, 64):
        kind = "float"
    else:
        raise MediaError(f"audio {name}: unsupported WAV encoding (format tag {tag}, {bits} bits); supported: "
                         "PCM 8/16/24/32-bit, IEEE float 32/64-bit")
    width = bits // 8
    frame = width * ch
    n = len(payload) // frame
    if n == 0:
        raise MediaError(f"audio {name}: the WAV file has no samples")
    raw = np.frombuffer(payload[:n * frame], dtype=np.uint8)
    if kind == "float":
        x = raw.view("<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:
        x = ((raw.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    elif bits == 16:
        x = (raw.view("<i2").astype(np.float64) / 32768.0).astype(np.float32)
    elif bits == 24:
        b = raw.reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = (v.astype(np.float64) / float(1 << 23)).astype(np.float32)
    else:
        x = (raw.view("<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    return Wav(samples=x.reshape(n, ch), rate=int(rate), bits=bits, fmt=kind, truncated=len(payload) < declared)


def _sniff(data: bytes) -> str:
    heads = {b"ID3": "MP3", b"\xff\xfb": "MP3", b"fLaC": "FLAC", b"OggS": "Ogg", b"\x89PNG": "PNG",
             b"\xff\xd8": "JPEG", b"GIF8": "GIF"}
    for h, k in heads.items():
        if data.startswith(h):
            return k
    if data[4:8] == b"ftyp":
        return "MP4/M4A"
    return ""


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[frames, channels] -> [frames]: the mean of the channels in float32 (HF load_audio / librosa)."""
    s = np.asarray(samples, dtype=np.float32)
    if s.ndim == 1:
        return s
    return s.T.mean(axis=0) if s.shape[1] > 1 else s[:, 0]


# ================================================================================================ resampling
def _kaiser_lowpass(up: int, down: int) -> tuple[np.ndarray, int]:
    """The FIR ``scipy.signal.resample_poly`` designs: firwin(2*10*max+1, 1/max, ('kaiser', 5.0)) * up."""
    max_rate = max(up, down)
    half = 10 * max_rate
    n = 2 * half + 1
    m = np.arange(n, dtype=np.float64) - half
    fc = 1.0 / max_rate
    h = fc * np.sinc(fc * m) * np.kaiser(n, 5.0)
    h = h / h.sum()
    return h * up, half


def resample_poly(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase windowed-sinc resampling, the algorithm of ``scipy.signal.resample_poly`` (zero padding at
    both ends); output length ceil(n * rate_out / rate_in). Computed in float64."""
    g = math.gcd(int(rate_in), int(rate_out))
    up, down = int(rate_out) // g, int(rate_in) // g
    x = np.asarray(x, dtype=np.float64)
    if up == down:
        return x.copy()
    h, half = _kaiser_lowpass(up, down)
    L = len(h)
    n_in = len(x)
    n_out = -(-n_in * up // down)
    t = np.arange(n_out, dtype=np.int64) * down + half           # y[m] = sum_n x[n] h[m*down - n*up + half]
    n_lo = np.maximum(0, -(-(t - L + 1) // up))                   # first n with t - n*up <= L-1
    K = (L + up - 1) // up + 1
    out = np.zeros(n_out, dtype=np.float64)
    step = max(1, (1 << 22) // K)
    for a in range(0, n_out, step):
        nn = n_lo[a:a + step, None] + np.arange(K)[None, :]
        idx = t[a:a + step, None] - nn * up
        ok = (idx >= 0) & (idx < L) & (nn < n_in)
        taps = np.where(ok, h[np.clip(idx, 0, L - 1)], 0.0)
        xs = np.where(ok, x[np.clip(nn, 0, n_in - 1)], 0.0)
        out[a:a + step] = (taps * xs).sum(1)
    return out


def resample_to_16k(x: np.ndarray, rate: int, method: str = "auto") -> np.ndarray:
    """Resample a mono float waveform to 16 kHz as HF's ``load_audio`` does (soxr HQ, then pad/trim to
    ceil(n * 16000 / rate)). ``method``: "auto" (soxr if installed, else "poly"), "soxr" or "poly"."""
    x = np.asarray(x, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return x
    n_out = math.ceil(len(x) * SAMPLE_RATE / rate)
    if method in ("auto", "soxr"):
        try:
            import soxr
        except ImportError:
            if method == "soxr":
                raise
            soxr = None
        if soxr is not None:
            y = soxr.resample(x, rate, SAMPLE_RATE, quality="soxr_hq")
            y = np.pad(y, (0, max(0, n_out - len(y))))[:n_out]
            return np.ascontiguousarray(y, dtype=np.float32)
    y = resample_poly(x, rate, SAMPLE_RATE)[:n_out]
    return y.astype(np.float32)


# ================================================================================================ audio input
@dataclass
class PreparedAudio:
    """One clip as the audio tower takes it (HF ``Gemma4AudioFeatureExtractor`` outputs, batch axis removed)."""
    features: np.ndarray       # [frames, 128] float32 log-mel (invalid frames zeroed)
    mask: np.ndarray           # [frames] bool
    num_soft_tokens: int
    num_samples: int           # 16 kHz samples used (after resampling and truncation)
    source_rate: int


def load_audio(src, method: str = "auto") -> tuple[np.ndarray, int]:
    """(mono float32 waveform at 16 kHz, original rate) from a WAV path/bytes/file, a ``(samples, rate)``
    tuple, or an array (taken to be 16 kHz, as HF's feature extractor assumes)."""
    if isinstance(src, tuple) and len(src) == 2 and np.isscalar(src[1]):
        x, rate = src
        x = _array_to_float(np.asarray(x))
        rate = int(rate)
    elif isinstance(src, np.ndarray) or (isinstance(src, list) and src and np.isscalar(src[0])):
        x, rate = _array_to_float(np.asarray(src)), SAMPLE_RATE
    else:
        w = read_wav(src)
        x, rate = w.samples, w.rate
    x = _mono_any(x)
    if x.size == 0:
        raise MediaError("empty audio: no samples")
    if rate <= 0:
        raise MediaError(f"sample rate must be positive, got {rate}")
    if not np.isfinite(x).all():
        raise MediaError("audio contains NaN or inf samples")
    return resample_to_16k(x, rate, method), rate


def _array_to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.int16:
        return (a.astype(np.float64) / 32768.0).astype(np.float32)
    if a.dtype == np.int32:
        return (a.astype(np.float64) / float(1 << 31)).astype(np.float32)
    if a.dtype == np.uint8:
        return ((a.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if not np.issubdtype(a.dtype, np.floating):
        raise MediaError(f"audio arrays must be float (or int16/int32/uint8 PCM), got dtype {a.dtype}")
    return a.astype(np.float32)


def _mono_any(x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise MediaError(f"audio array of shape {x.shape}: expected [samples] or [samples, channels]")
    if x.shape[1] <= 8 and x.shape[0] > x.shape[1]:
        return to_mono(x)
    if x.shape[0] <= 8 and x.shape[1] > x.shape[0]:
        return to_mono(x.T)
    raise MediaError(f"audio array of shape {x.shape}: cannot tell samples from channels (give [samples, channels])")


_MEL_CACHE: dict = {}


def mel_filters(n_fft: int = 512, n_mels: int = 128, fmin: float = 0.0, fmax: float = 8000.0,
                rate: int = SAMPLE_RATE) -> np.ndarray:
    """HF ``mel_filter_bank(n_fft//2+1, n_mels, fmin, fmax, rate, norm=None, mel_scale="htk")``: [bins, mels]."""
    key = (n_fft, n_mels, fmin, fmax, rate)
    if key not in _MEL_CACHE:
        hz2mel = lambda f: 2595.0 * np.log10(1.0 + (f / 700.0))   # noqa: E731
        mel2hz = lambda m: 700.0 * (np.power(10, m / 2595.0) - 1.0)  # noqa: E731
        mels = np.linspace(hz2mel(fmin), hz2mel(fmax), n_mels + 2)
        ff = mel2hz(mels)
        fft_freqs = np.linspace(0, rate // 2, n_fft // 2 + 1)
        diff = np.diff(ff)
        slopes = ff[None, :] - fft_freqs[:, None]
        down = -slopes[:, :-2] / diff[:-1]
        up = slopes[:, 2:] / diff[1:]
        _MEL_CACHE[key] = np.maximum(np.zeros(1), np.minimum(down, up))
    return _MEL_CACHE[key]


def log_mel(wave: np.ndarray, frame_length: int = 320, hop_length: int = 160, n_fft: int = 512, n_mels: int = 128,
            mel_floor: float = 1e-3, pad_to_multiple_of: int = 128, max_length: int | None = MAX_SAMPLES
            ) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel features and frame mask of one 16 kHz clip, as ``Gemma4AudioFeatureExtractor([wave])``."""
    w = np.asarray(wave, dtype=np.float32).reshape(-1)
    if max_length is not None and len(w) > max_length:
        w = w[:max_length]
    n = len(w)
    total = -(-n // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else n
    valid = np.zeros(total, dtype=np.int32)
    valid[:n] = 1
    w = np.pad(w, (0, total - n))
    pad_left = frame_length // 2
    w = np.pad(w, (pad_left, 0))
    valid = np.pad(valid, (pad_left, 0))
    size = frame_length + 1
    nf = (len(w) - size) // hop_length + 1
    if nf <= 0:
        raise MediaError(f"audio clip of {n} samples is too short for one {frame_length}-sample frame")
    frames = np.lib.stride_tricks.as_strided(w, shape=(nf, size), strides=(w.strides[0] * hop_length, w.strides[0]))
    frames = frames[:, :-1]
    window = (np.hanning(frame_length + 1)[:-1]).astype(np.float32)
    spec = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=-1))
    mel = np.matmul(spec, mel_filters(n_fft, n_mels))
    feats = np.log(mel + np.array(mel_floor, dtype=np.float64)).astype(np.float32)
    ends = np.arange(nf) * hop_length + size - 1
    mask = valid[ends].astype(bool)
    return feats * mask[:, None], mask


def audio_soft_tokens(mask: np.ndarray) -> int:
    """Soft tokens for one clip's frame mask: two stride-2 conv halvings (HF ``replace_audio_token``)."""
    m = np.asarray(mask)
    t = len(m)
    for _ in range(2):
        t_out = (t + 2 - 3) // 2 + 1
        m = m[::2][:t_out]
        t = len(m)
    return int(m.sum())


def preprocess_audio(src, method: str = "auto", max_length: int | None = MAX_SAMPLES) -> PreparedAudio:
    """One clip (WAV path/bytes, (samples, rate), or a 16 kHz array) -> ``PreparedAudio``."""
    if isinstance(src, PreparedAudio):
        return src
    wave, rate = load_audio(src, method)
    feats, mask = log_mel(wave, max_length=max_length)
    n_tok = audio_soft_tokens(mask)
    if n_tok == 0:
        raise MediaError(f"audio clip of {len(wave)} samples at 16 kHz is too short: it yields no audio token "
                         "(at least ~30 ms is needed)")
    return PreparedAudio(features=feats, mask=mask, num_soft_tokens=n_tok,
                         num_samples=min(len(wave), max_length or len(wave)), source_rate=rate)


def batch_audio(prepared: list[PreparedAudio]) -> tuple[np.ndarray, np.ndarray]:
    """Stack clips padded to the longest (padded frames are zero and masked, as in HF's batches)."""
    T = max(p.features.shape[0] for p in prepared)
    F = prepared[0].features.shape[1]
    feats = np.zeros((len(prepared), T, F), np.float32)
    mask = np.zeros((len(prepared), T), bool)
    for i, p in enumerate(prepared):
        feats[i, :len(p.mask)] = p.features
        mask[i, :len(p.mask)] = p.mask
    return feats, mask


def write_wav(path_or_none, samples: np.ndarray, rate: int, bits: int = 16, fmt: str = "pcm",
              extensible: bool = False) -> bytes:
    """Write a WAV (PCM 8/16/24/32 or float 32/64); ``samples`` float in [-1, 1], [n] or [n, channels].
    Returns the bytes (and writes them when a path is given). Used by tests and examples."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n, ch = x.shape
    if fmt == "float":
        data = x.astype("<f4" if bits == 32 else "<f8").tobytes()
        tag = 3
    elif bits == 8:
        data = np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
        tag = 1
    else:
        q = float(1 << (bits - 1))
        v = np.clip(np.round(x * q), -q, q - 1).astype(np.int64)
        if bits == 16:
            data = v.astype("<i2").tobytes()
        elif bits == 32:
            data = v.astype("<i4").tobytes()
        else:
            u = (v & 0xFFFFFF).astype(np.uint32)
            b = np.stack([u & 0xFF, (u >> 8) & 0xFF, (u >> 16) & 0xFF], -1).astype(np.uint8)
            data = b.tobytes()
        tag = 1
    align = ch * bits // 8
    if extensible:
        fmt_body = struct.pack("<HHIIHHHHI", 0xFFFE, ch, rate, rate * align, align, bits, 22, bits, 0) + \
            struct.pack("<H", tag) + _GUID_TAIL
    else:
        fmt_body = struct.pack("<HHIIHH", tag, ch, rate, rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body + b"data" + \
        struct.pack("<I", len(data)) + data + (b"\x00" if len(data) & 1 else b"")
    out = b"RIFF" + struct.pack("<I", len(body)) + body
    if path_or_none is not None:
        Path(path_or_none).write_bytes(out)
    return out

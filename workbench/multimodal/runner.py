"""The Gemma 4 multimodal runner: placeholders -> token ids, media -> soft tokens, one text forward pass.

    ids = expand(prompt)            "<|image|>" -> boi + image_token x N + eoi, "<|audio|>" -> boa + audio x N + eoa
                                    (N = the item's soft-token count, as Gemma4Processor expands them)
    x   = embed(ids with media ids -> pad) * sqrt(hidden)            text positions
    x[image positions] = embed_vision(vision_tower(pixels))          in prompt order, not scaled
    x[audio positions] = embed_audio(audio_tower(log-mel))
    PLE token part uses the pad id at media positions (HF); its projection part sees the merged x
    mask: causal (+ sliding window); with use_bidirectional_attention == "vision" the tokens of one image
          also see each other (future ones too) on *sliding* layers, as HF's create_masks_for_vision_model
    logits = text model(x)

The text model's pass is the decoder's public ``embed`` / ``forward_embeds``
(``m.decoder.forward_embeds(x, ple_ids, pts, cache, start, last_only, extra_mask)``); ``model`` below is the
:class:`workbench.lm.LanguageModel` (tokenizer, decoder, media towers).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from ..model.gemma import ForwardOutput, InputError
from ..model.taps import Points, point_names
from ..weights.names import MEDIA_PREFIXES
from .audio import AudioConfig, AudioTower
from .common import MediaError
from .points import MediaPoints, audio_point_names, split_patterns, vision_point_names
from .preprocess import PreparedAudio, PreparedImage, batch_audio, batch_images, preprocess_audio, preprocess_image
from .projector import Embedder
from .vision import VisionConfig, VisionTower

IMAGE_PLACEHOLDER = "<|image|>"
AUDIO_PLACEHOLDER = "<|audio|>"

# MediaTokens attribute: (the Gemma 4 default id, the config key that overrides it)
_TOKEN_KEYS = {"image": (258_880, "image_token_id"), "boi": (255_999, "boi_token_id"),
               "eoi": (258_882, "eoi_token_id"), "audio": (258_881, "audio_token_id"),
               "boa": (256_000, "boa_token_id"), "eoa": (258_883, "eoa_token_index"),
               "video": (258_884, "video_token_id")}


class MediaTokens:
    """The special token ids of a Gemma 4 multimodal prompt (image/audio placeholders, begin/end markers, pad)."""

    def __init__(self, pad: int = 0, **ids: int):
        for attr, (default, _) in _TOKEN_KEYS.items():
            setattr(self, attr, int(ids.pop(attr, default)))
        if ids:
            raise TypeError(f"unknown media token(s) {sorted(ids)}; known: {sorted(_TOKEN_KEYS)}")
        self.pad = int(pad)

    def __repr__(self) -> str:
        return "MediaTokens(" + ", ".join(f"{a}={getattr(self, a)}" for a in (*_TOKEN_KEYS, "pad")) + ")"

    @classmethod
    def from_config(cls, cfg) -> "MediaTokens":
        r = cfg.raw or {}
        ids = {attr: r[key] for attr, (_, key) in _TOKEN_KEYS.items() if r.get(key) is not None}
        if r.get("eoa_token_id") is not None and r.get("eoa_token_index") is None:
            ids["eoa"] = r["eoa_token_id"]
        return cls(pad=cfg.pad_token_id if cfg.pad_token_id is not None else 0, **ids)


@dataclass
class MultimodalOutput(ForwardOutput):
    input_ids: np.ndarray | None = None            # [1, T] the expanded ids the text model saw
    mm_token_type_ids: np.ndarray | None = None    # [1, T] 0 text, 1 image, 3 audio (HF's convention)
    num_image_tokens: list = field(default_factory=list)
    num_audio_tokens: list = field(default_factory=list)


# ================================================================================================ encoders
@dataclass
class MediaTensors:
    """The media towers' tensors of one checkpoint (numpy, canonical names ``vision_tower.*`` ...), kept by the
    loader beside the text decoder, and the image processor's ``max_soft_tokens``. The towers are built from
    these on first use (``LanguageModel.encoders()``); the checkpoint is never read again."""
    tensors: dict
    where: str = "tensors"
    max_soft_tokens: int = 280

    @classmethod
    def from_checkpoint(cls, tensors: dict, path) -> "MediaTensors | None":
        """The media tensors of a checkpoint's canonical tensors, or None when it has none (a GGUF file)."""
        keep = {k: v for k, v in tensors.items() if k.startswith(MEDIA_PREFIXES)}
        if not keep:
            return None
        return cls(keep, str(path), _read_max_soft_tokens(path) if path.is_dir() else 280)


class MediaEncoders:
    """The vision and audio towers and their projectors of one Gemma 4 checkpoint, on one backend."""

    def __init__(self, cfg, ops, tensors: dict[str, np.ndarray], where: str = "checkpoint"):
        raw = cfg.raw or {}
        self.ops = ops
        self.tokens = MediaTokens.from_config(cfg)
        self.vision = self.embed_vision = self.audio = self.embed_audio = None
        self.vcfg = self.acfg = None
        D = cfg.hidden_size
        if raw.get("vision_config"):
            self.vcfg = VisionConfig.from_dict(raw["vision_config"], f"{where} [vision_config]")
            self.vision = VisionTower(self.vcfg, tensors, ops, where)
            self.embed_vision = Embedder(tensors, "embed_vision.", self.vcfg.hidden_size, D, self.vcfg.rms_norm_eps,
                                         ops, where)
        if raw.get("audio_config"):
            self.acfg = AudioConfig.from_dict(raw["audio_config"], f"{where} [audio_config]")
            self.audio = AudioTower(self.acfg, tensors, ops, where)
            self.embed_audio = Embedder(tensors, "embed_audio.", self.acfg.output_proj_dims, D,
                                        self.acfg.rms_norm_eps, ops, where)
        self.max_soft_tokens = 280

    @classmethod
    def build(cls, cfg, ops, media: MediaTensors | None, source: str = "?") -> "MediaEncoders":
        """The towers of ``media`` on ``ops``; a clear error for a model without media towers or their tensors."""
        if cfg.arch != "gemma4" or not ((cfg.raw or {}).get("vision_config") or (cfg.raw or {}).get("audio_config")):
            raise InputError(f"images/audio need a Gemma 4 multimodal checkpoint (model_type 'gemma4' with a "
                             f"vision_config/audio_config); this model is {cfg.model_type!r} without media towers")
        if media is None:
            raise InputError(f"this model ({source!r}) was loaded without vision/audio tower tensors (GGUF files "
                             "carry none: use the Hugging Face checkpoint)")
        enc = cls(cfg, ops, media.tensors, media.where)
        enc.max_soft_tokens = media.max_soft_tokens
        return enc

    @staticmethod
    def for_model(model) -> "MediaEncoders":
        """A LanguageModel's towers (built once, from the tensors it was loaded with)."""
        return model.encoders()

    def point_names(self) -> list[str]:
        out = []
        if self.vision is not None:
            out += vision_point_names(self.vcfg.num_hidden_layers)
        if self.audio is not None:
            out += audio_point_names(self.acfg.num_hidden_layers)
        return out

    # --------------------------------------------------------------------------------------- encode
    def _encode(self, kind: str, batched, pts):
        tower, proj = (self.vision, self.embed_vision) if kind == "image" else (self.audio, self.embed_audio)
        if tower is None:
            raise InputError(f"this checkpoint has no {'vision' if kind == 'image' else 'audio'} tower "
                             f"({'vision' if kind == 'image' else 'audio'}_config is null): {kind}s are not supported")
        out, valid = tower(*batched, pts)
        return proj(out, pts), valid

    def encode_images(self, prepared: list[PreparedImage], pts):
        """-> (embeddings [n, S, D] backend array, soft-token counts)."""
        return self._encode("image", batch_images(prepared), pts)

    def encode_audio(self, prepared: list[PreparedAudio], pts):
        """-> (embeddings [n, S, D] backend array, the tower's output mask [n, S])."""
        return self._encode("audio", batch_audio(prepared), pts)


def _read_max_soft_tokens(path) -> int:
    """The image processor's ``max_soft_tokens`` from the checkpoint's (pre)processor config; 280 by default."""
    import json
    found = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if not f.exists():
            continue
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        for sub in (d, d.get("image_processor") or {}):
            for k in ("max_soft_tokens", "image_seq_length"):
                if isinstance(sub.get(k), int):
                    found.setdefault(k, int(sub[k]))
    return found.get("max_soft_tokens", found.get("image_seq_length", 280))


def attach_media(model, tensors: dict[str, np.ndarray], where: str = "tensors") -> MediaEncoders:
    """Give a LanguageModel media towers from explicit tensors (canonical names: vision_tower.*, ...)."""
    mst = model.media.max_soft_tokens if model.media is not None else 280
    model.attach_media(MediaTensors({k: v for k, v in tensors.items() if k.startswith(MEDIA_PREFIXES)}, where, mst))
    return model.encoders()


def tap_names(model) -> list[str]:
    """Every tap/hook point of a multimodal forward: the towers' points, then the text model's."""
    return MediaEncoders.for_model(model).point_names() + point_names(model.config)


# ================================================================================================ prompts
def _listify(x):
    if x is None:
        return []
    if isinstance(x, (list, tuple)) and not (isinstance(x, tuple) and len(x) == 2 and np.isscalar(x[1])):
        return list(x)
    return [x]


def _encode_text(tok, text: str, first: bool) -> list[int]:
    ids = list(tok.encode(text))
    if first:
        return ids
    prefix = list(tok.encode(""))          # what the tokenizer adds in front of every string (e.g. <bos>)
    if prefix and ids[:len(prefix)] == prefix:
        ids = ids[len(prefix):]
    return ids


def split_prompt(model, prompt) -> tuple[list, int, int]:
    """A text prompt -> a list of pieces: token-id lists and the markers "image" / "audio"; plus counts."""
    tok = model.tokenizer
    if tok is None:
        raise InputError("a text prompt needs a tokenizer; this model has none — pass token ids with one "
                         "image_token_id / audio_token_id per image / clip")
    if not prompt:
        raise InputError("empty prompt")
    parts = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})", prompt)
    marker = {IMAGE_PLACEHOLDER: "image", AUDIO_PLACEHOLDER: "audio"}
    pieces: list = []
    first = True
    for p in parts:
        if p in marker:
            if first:              # the tokenizer's prefix (e.g. <bos>) before a leading placeholder
                pieces.append(_encode_text(tok, "", True))
                first = False
            pieces.append(marker[p])
        elif p or first:
            pieces.append(_encode_text(tok, p, first))
            first = False
    return pieces, pieces.count("image"), pieces.count("audio")


def split_ids(ids, tokens: MediaTokens) -> tuple[list, int, int]:
    """Token ids -> pieces. A lone ``image_token_id`` (``audio_token_id``) is a placeholder for one image
    (clip); a run already wrapped as boi + image... + eoi (as HF's processor emits) counts as one expanded
    image and its length is checked later."""
    a = np.asarray(ids).reshape(-1).tolist() if not isinstance(ids, list) else [int(i) for i in ids]
    pieces: list = []
    cur: list[int] = []
    n_img = n_aud = 0
    i = 0
    while i < len(a):
        t = a[i]
        if t in (tokens.image, tokens.audio):
            kind = "image" if t == tokens.image else "audio"
            open_, close = (tokens.boi, tokens.eoi) if kind == "image" else (tokens.boa, tokens.eoa)
            j = i
            while j < len(a) and a[j] == t:
                j += 1
            wrapped = cur and cur[-1] == open_ and j < len(a) and a[j] == close
            if wrapped:
                cur.pop()
                pieces.append(cur)
                pieces.append((kind, j - i))          # pre-expanded run of this length
                cur = []
                i = j + 1
            else:
                if j - i > 1:
                    raise MediaError(f"{j - i} consecutive {kind} placeholder ids at position {i} without "
                                     f"{'boi/eoi' if kind == 'image' else 'boa/eoa'} around them: give one "
                                     f"{kind}_token_id per {kind} (or the processor's fully expanded run)")
                pieces.append(cur)
                pieces.append(kind)
                cur = []
                i += 1
            if kind == "image":
                n_img += 1
            else:
                n_aud += 1
            continue
        cur.append(t)
        i += 1
    pieces.append(cur)
    return pieces, n_img, n_aud


def expand(pieces: list, tokens: MediaTokens, image_counts: list[int], audio_counts: list[int]):
    """Pieces -> (ids [T], kinds [T]) with boi + image x N + eoi / boa + audio x N + eoa."""
    ids: list[int] = []
    kinds: list[int] = []
    ii = ai = 0
    for p in pieces:
        if isinstance(p, list):
            ids += p
            kinds += [0] * len(p)
            continue
        kind, given = (p, None) if isinstance(p, str) else p
        if kind == "image":
            n = image_counts[ii]
            open_, tid, close, k = tokens.boi, tokens.image, tokens.eoi, 1
            ii += 1
        else:
            n = audio_counts[ai]
            open_, tid, close, k = tokens.boa, tokens.audio, tokens.eoa, 3
            ai += 1
        if given is not None and given != n:
            raise MediaError(f"the prompt's expanded {kind} run {ii if kind == 'image' else ai} has {given} "
                             f"placeholder tokens but that {kind} yields {n} soft tokens")
        ids += [open_] + [tid] * n + [close]
        kinds += [0] + [k] * n + [0]
    return np.asarray(ids, dtype=np.int64), np.asarray(kinds, dtype=np.int64)


def _check_counts(n_img, n_aud, images, audio):
    if n_img != len(images):
        raise MediaError(f"the prompt has {n_img} image placeholder(s) ({IMAGE_PLACEHOLDER}) but {len(images)} "
                         f"image(s) were given")
    if n_aud != len(audio):
        raise MediaError(f"the prompt has {n_aud} audio placeholder(s) ({AUDIO_PLACEHOLDER}) but {len(audio)} "
                         f"audio clip(s) were given")


def image_block_mask(kinds: np.ndarray) -> np.ndarray | None:
    """[T, T] bool: True where query and key are tokens of the same image (HF get_block_sequence_ids_for_mask
    over mm_token_type_ids 1 (image) and 2 (video)); None when there is no image."""
    vis = (kinds == 1) | (kinds == 2)
    if not vis.any():
        return None
    starts = vis & ~np.concatenate([[False], vis[:-1]])
    gid = np.where(vis, np.cumsum(starts) - 1, -1)
    return (gid[:, None] == gid[None, :]) & (gid[:, None] >= 0)


# ================================================================================================ forward
@dataclass
class Prepared:
    ids: np.ndarray
    kinds: np.ndarray
    embeds: object            # backend [1, T, D]
    ple_ids: object           # backend [1, T]
    extra_mask: np.ndarray | None
    n_image_tokens: list
    n_audio_tokens: list


def prepare(model, prompt_or_ids, images=None, audio=None, mpts=None, max_soft_tokens: int | None = None) -> Prepared:
    """Expand placeholders, encode the media, and build the text model's input embeddings."""
    cfg, ops = model.config, model.ops
    images, audio = _listify(images), _listify(audio)
    enc = model.encoders() if (images or audio) else None
    tokens = enc.tokens if enc is not None else MediaTokens.from_config(cfg)
    if isinstance(prompt_or_ids, str):
        pieces, n_img, n_aud = split_prompt(model, prompt_or_ids)
    else:
        arr = np.asarray(prompt_or_ids)
        if arr.ndim == 2:
            if arr.shape[0] != 1:
                raise InputError(f"multimodal prompts run one sequence at a time; got a batch of {arr.shape[0]}")
            arr = arr[0]
        if arr.size == 0:
            raise InputError("empty prompt: at least one token id is needed")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"token ids must be integers, got dtype {arr.dtype}")
        pieces, n_img, n_aud = split_ids(arr, tokens)
    _check_counts(n_img, n_aud, images, audio)
    if mpts is None:
        mpts = MediaPoints([], None, None)
    mst = max_soft_tokens or (enc.max_soft_tokens if enc is not None else 280)
    img_feats = aud_feats = None
    n_img_tok: list[int] = []
    n_aud_tok: list[int] = []
    if images:
        vc = enc.vcfg
        if vc is None:
            raise InputError("this checkpoint has no vision tower (vision_config is null): images are not supported")
        prep = [preprocess_image(im, mst, vc.patch_size, vc.pooling_kernel_size, pad=False) for im in images]
        emb, n_img_tok = enc.encode_images(prep, mpts)
        img_feats = (emb, n_img_tok)
    if audio:
        if enc.audio is None:
            raise InputError("this checkpoint has no audio tower (audio_config is null): audio is not supported")
        prep_a = [preprocess_audio(a) for a in audio]
        emb, m = enc.encode_audio(prep_a, mpts)
        n_aud_tok = [int(r.sum()) for r in m]
        for p, n in zip(prep_a, n_aud_tok):
            if p.num_soft_tokens != n:          # the processor's count and the tower's mask must agree (HF checks)
                raise MediaError(f"audio clip yields {n} encodings but its placeholder count is {p.num_soft_tokens}")
        aud_feats = (emb, m)
    ids, kinds = expand(pieces, tokens, n_img_tok, n_aud_tok)
    T = len(ids)
    media = kinds != 0
    llm_ids = np.where(media, tokens.pad, ids)
    bad = (llm_ids < 0) | (llm_ids >= cfg.vocab_size)
    if bad.any():
        j = int(np.argwhere(bad)[0][0])
        raise InputError(f"token id {int(llm_ids[j])} at position {j} is outside the vocabulary [0, {cfg.vocab_size})"
                         + (" (a media begin/end token id: the config's boi/eoi/boa/eoa ids do not fit this vocabulary)"
                            if int(llm_ids[j]) in (tokens.boi, tokens.eoi, tokens.boa, tokens.eoa) else ""))
    ple_ids = ops.asids(llm_ids[None])
    x = model.decoder.embed(ple_ids)
    if media.any():
        D = cfg.hidden_size
        rows = [ops.reshape(x, (T, D))]
        src = np.arange(T)
        off = T
        for feats, kind in ((img_feats, 1), (aud_feats, 3)):
            if feats is None:
                continue
            emb, valid = feats
            n, S = emb.shape[0], emb.shape[1]
            if kind == 1:
                sel = np.concatenate([b * S + np.arange(c) for b, c in enumerate(valid)])
            else:
                sel = np.nonzero(np.asarray(valid).reshape(-1))[0]
            rows.append(ops.take(ops.cast(ops.reshape(emb, (n * S, D)), None), sel, 0))
            pos = np.nonzero(kinds == kind)[0]
            if len(pos) != len(sel):
                raise MediaError(f"{'image' if kind == 1 else 'audio'} soft tokens ({len(sel)}) and placeholder "
                                 f"positions ({len(pos)}) do not match")
            src[pos] = off + np.arange(len(sel))
            off += len(sel)
        x = ops.reshape(ops.take(ops.concat(rows, 0), src, 0), (1, T, D))
    extra = image_block_mask(kinds) if cfg.use_bidirectional_attention == "vision" else None
    return Prepared(ids=ids, kinds=kinds, embeds=x, ple_ids=ple_ids, extra_mask=extra,
                    n_image_tokens=n_img_tok, n_audio_tokens=n_aud_tok)


def multimodal_forward(model, prompt_or_ids, images=None, audio=None, taps=None, hooks=None, cache=None,
                       last_only: bool = False, max_soft_tokens: int | None = None) -> MultimodalOutput:
    """``m.forward(prompt, images=[...], audio=[...], taps=[...], hooks={...})`` for Gemma 4.

    prompt_or_ids: text with ``<|image|>`` / ``<|audio|>`` placeholders (needs the model's tokenizer), or ids
    [T] / [1, T] with one ``image_token_id`` / ``audio_token_id`` per item (or HF-processor-expanded runs).
    images: paths, bytes, PIL images, uint8 arrays or ``PreparedImage``; audio: WAV paths/bytes,
    ``(samples, rate)``, 16 kHz float arrays or ``PreparedAudio``. Taps/hooks may name text points and media
    points (``vision.*``, ``audio.*``, ``embed_vision.hook_out``, ``embed_audio.hook_out``)."""
    from ..model.cache import ContextOverflow
    cfg, ops = model.config, model.ops
    images, audio = _listify(images), _listify(audio)
    enc = model.encoders() if (images or audio) else model._encoders
    media_names = enc.point_names() if enc is not None else []
    text_taps, media_taps = split_patterns(taps, point_names(cfg), media_names)
    text_hooks, media_hooks = split_patterns(hooks, point_names(cfg), media_names, "hook")
    mpts = MediaPoints(media_names, media_taps, media_hooks)
    pts = Points(cfg, text_taps, text_hooks)
    prep = prepare(model, prompt_or_ids, images, audio, mpts, max_soft_tokens)
    T = len(prep.ids)
    start = cache.offset if cache is not None else 0
    limit = cache.max_len if cache is not None else cfg.max_position_embeddings
    if start + T > limit:
        raise ContextOverflow(f"prompt of {T} tokens (media expanded) at position {start} needs {start + T} "
                              f"positions but the {'cache' if cache is not None else 'model context'} holds {limit}")
    logits = model.decoder.forward_embeds(prep.embeds, prep.ple_ids, pts, cache, start, last_only, prep.extra_mask)
    if cache is not None:
        cache.offset = start + T
    out = None
    if logits is not None:
        out = ops.numpy(logits)
        if out.dtype != np.float64:
            out = out.astype(np.float32)
    values = dict(mpts.values)
    values.update(pts.values)
    return MultimodalOutput(logits=out, taps=values, input_ids=prep.ids[None], mm_token_type_ids=prep.kinds[None],
                            num_image_tokens=prep.n_image_tokens, num_audio_tokens=prep.n_audio_tokens)


# ================================================================================================ generate
def multimodal_generate_iter(model, prompt, images=None, audio=None, max_new_tokens: int = 32,
                             temperature: float = 0.0, top_k=None, top_p=None, seed=0, stop=None,
                             ignore_eos: bool = False, max_soft_tokens: int | None = None, stats: dict | None = None,
                             prompt_out: list | None = None):
    """Yield generated token ids: one prefill of the expanded prompt with the media embeddings (so the tokens
    of each image see each other), then the decode engine's fast step (``workbench.decode``: the same route as a
    text prompt's). Fills ``stats``."""
    from ..decode import engine as _engine
    from ..decode import sampler as _sampler
    from ..generate import _stop_ids, decode_tokens
    ops, cfg = model.ops, model.config
    st = stats if stats is not None else {}
    t0 = time.perf_counter()
    prep = prepare(model, prompt, images, audio, MediaPoints([], None, None), max_soft_tokens)
    T = len(prep.ids)
    if prompt_out is not None:
        prompt_out[:] = prep.ids.tolist()
    ctx = cfg.max_position_embeddings
    if T >= ctx:
        raise InputError(f"prompt of {T} tokens (media expanded) does not fit the model's context of {ctx} tokens")
    max_len = min(T + max_new_tokens, ctx)
    sampling = _sampler.make(temperature, top_k, top_p, seed)
    eng = _engine.session(model.decoder, max_len, sampling)
    cache = eng.cache
    logits = model.decoder.forward_embeds(prep.embeds, prep.ple_ids, None, cache, 0, True, prep.extra_mask)
    cache.offset = T
    logits = ops.numpy(logits).astype(np.float64)
    t1 = time.perf_counter()
    st.update(prompt_tokens=T, prefill_s=t1 - t0, ttft_s=t1 - t0, prompt_tok_s=T / max(t1 - t0, 1e-9),
              image_tokens=prep.n_image_tokens, audio_tokens=prep.n_audio_tokens)
    stops = set() if ignore_eos else _stop_ids(model, stop)
    yield from decode_tokens(model.decoder, eng, logits[0, -1], T, min(max_new_tokens, max_len - T), sampling, stops,
                             st)
    if max_len - T < max_new_tokens and st.get("stopped_by") == "length":
        st["stopped_by"] = "context"


def multimodal_generate(model, prompt, images=None, audio=None, max_new_tokens: int = 32, temperature: float = 0.0,
                        top_k=None, top_p=None, seed=0, stop=None, stream: bool = False, ignore_eos: bool = False,
                        max_soft_tokens: int | None = None, stats: dict | None = None, **_):
    """``m.generate(prompt, images=[...], audio=[...])``: a Generation, or with ``stream=True`` an iterator of
    text pieces. ``stop``: token ids and/or strings, as ``workbench.generate.generate``; ``stats``: a dict filled
    with the run's stats (the Generation's, or the stream's as it goes)."""
    from ..generate import Generation
    tok = model.tokenizer
    stop_strings = [s for s in (stop or []) if isinstance(s, str)]
    kw = dict(images=images, audio=audio, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
              top_p=top_p, seed=seed, stop=stop, ignore_eos=ignore_eos, max_soft_tokens=max_soft_tokens)
    if stream:
        from ..generate import stream_pieces
        stats_s = stats if stats is not None else {}
        return stream_pieces(tok, multimodal_generate_iter(model, prompt, stats=stats_s, **kw), stats_s,
                             stop_strings)
    stats = stats if stats is not None else {}
    ids: list[int] = []
    out: list[int] = []
    text = ""
    for t in multimodal_generate_iter(model, prompt, stats=stats, prompt_out=ids, **kw):
        out.append(t)
        if stop_strings and tok is not None:
            text = tok.decode(out)
            hit = [s for s in stop_strings if s in text]
            if hit:
                text = text[:text.index(hit[0])]
                stats["stopped_by"] = "stop"
                break
    if tok is not None and stats.get("stopped_by") != "stop":
        text = tok.decode(out)
    return Generation(text=text, token_ids=out, prompt_ids=ids, stats=stats,
                      stopped_by=stats.get("stopped_by", "length"))

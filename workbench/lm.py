"""``LanguageModel``: what ``wb.load`` returns — one checkpoint on one backend, as its parts.

    m = wb.load("gemma3-270m")          # workbench.loader.build_model makes every LanguageModel
    m.decoder                           # workbench.model.gemma.Gemma: the text decoder (ids/embeddings -> logits)
    m.tokenizer                         # workbench.tokenizer.Tokenizer, or None (a checkpoint without one)
    m.media                             # multimodal.runner.MediaTensors (Gemma 4 towers' tensors) or None
    m.forward(ids | text, taps, hooks, images=, audio=)    text -> the decoder; media -> multimodal runner
    m.generate(prompt, ..., stream=, images=, audio=)     -> workbench.generate / the multimodal runner

The decoder knows nothing above itself (no tokenizer, no generate, no towers); this front owns the dispatch.
The towers are built from ``m.media`` on first use (``m.encoders()``), never by re-reading the checkpoint.
"""
from __future__ import annotations

import numpy as np

from .model.gemma import Gemma, InputError

# Names read through to the decoder, each for a reason (the list is exact: anything else is an AttributeError).
# They keep ``m.<name>`` working where users, tests and the analysis code take the model ``wb.load`` gives them.
DECODER_NAMES = {
    "ops": "the backend the model runs on (tests and the decode engine reach the backend through the model)",
    "dtype": "the model dtype string (reports, CLI lines)",
    "backend": "the backend string (reports, CLI lines)",
    "w": "the decoder's weights on the backend (bench's bytes-per-step)",
    "n_params": "text-decoder parameter count (bench rows)",
    "weight_bytes": "text-decoder weight bytes (bench rows)",
    "new_cache": "a KV cache for this decoder (prefill/decode loops in tests, parity, diverge)",
    "tap_names": "the decoder's tap/hook points (the media towers' are multimodal.tap_names(m))",
    "decode_plan": "the decode kernels' input (the decode engine and parity's fast-route capture take a model)",
    "decode_step": "one static decode step (same)",
    "cached_step": "one plain cached decode step (same)",
    "plan_weights": "run the generic pass on a plan's weights (same)",
    "embed": "the decoder's public first step (token ids -> input embeddings)",
    "forward_embeds": "the decoder's public middle (input embeddings -> logits)",
}


class LanguageModel:
    """A Gemma checkpoint on one backend: ``decoder`` (the text model), ``tokenizer``, ``media`` (Gemma 4 tower
    tensors), with ``forward`` / ``generate`` dispatching text to the decoder and media to the multimodal runner.

    ``config``, ``source`` (as given to ``wb.load``), ``source_path`` (resolved), ``last_stats`` (the stats of the
    latest ``generate``, set once a stream is exhausted). Build with :func:`workbench.loader.build_model`."""

    def __init__(self, decoder: Gemma, tokenizer=None, media=None, source=None, source_path=None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.media = media
        self.source = str(source) if source is not None else decoder.where
        self.source_path = source_path
        self.last_stats: dict = {}
        self._encoders = None

    def __repr__(self) -> str:
        c = self.decoder.config
        return (f"LanguageModel({self.source!r}, {c.model_type}, {c.num_hidden_layers} layers, "
                f"{self.decoder.backend} {self.decoder.dtype}{', media' if self.media is not None else ''})")

    @property
    def config(self):
        return self.decoder.config

    @property
    def perturb(self):
        """Test-only fault injection on the decoder: fn(layer, name, x) -> x (read and set through)."""
        return self.decoder.perturb

    @perturb.setter
    def perturb(self, fn):
        self.decoder.perturb = fn

    def __getattr__(self, name):
        # only reached when normal lookup fails; forwards exactly DECODER_NAMES
        if name in DECODER_NAMES:
            return getattr(self.decoder, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r} (the decoder's parts are on "
                             f"m.decoder; read through here: {', '.join(sorted(DECODER_NAMES))})")

    # ------------------------------------------------------------------ tokens
    def check_ids(self, prompt) -> np.ndarray:
        """A text prompt (through the tokenizer) or token ids [T] / [B, T] -> checked int64 ids [B, T]."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("a text prompt needs a tokenizer; this model has none — pass token ids")
            prompt = self.tokenizer.encode(prompt)
        return self.decoder.check_ids(prompt)

    # ------------------------------------------------------------------ media
    def encoders(self):
        """The vision/audio towers and projectors (:class:`workbench.multimodal.runner.MediaEncoders`), built once
        from ``media`` on this backend; a clear error when the checkpoint has none."""
        if self._encoders is None:
            from .multimodal.runner import MediaEncoders
            self._encoders = MediaEncoders.build(self.decoder.config, self.decoder.ops, self.media, self.source)
        return self._encoders

    def attach_media(self, media) -> None:
        """Replace the media tensors (a :class:`workbench.multimodal.runner.MediaTensors`); towers rebuilt on use."""
        self.media = media
        self._encoders = None

    # ------------------------------------------------------------------ forward / generate
    def forward(self, ids, taps=None, hooks=None, cache=None, last_only: bool = False, images=None, audio=None,
                max_soft_tokens: int | None = None):
        """Token ids [T] / [B, T] or a text prompt -> ``ForwardOutput`` (logits, taps); with ``images`` / ``audio``
        (Gemma 4) the multimodal runner: placeholders expanded, media encoded, one decoder pass
        (``MultimodalOutput``). taps/hooks as :meth:`workbench.model.gemma.Gemma.forward` (media points too)."""
        if images or audio:
            from .multimodal.runner import multimodal_forward
            return multimodal_forward(self, ids, images=images, audio=audio, taps=taps, hooks=hooks, cache=cache,
                                      last_only=last_only, max_soft_tokens=max_soft_tokens)
        return self.decoder.forward(self.check_ids(ids), taps=taps, hooks=hooks, cache=cache, last_only=last_only)

    __call__ = forward

    def unembed(self, x):
        """Final norm + head (+ softcap) on residual-stream vectors [..., D] (numpy or backend) -> backend logits."""
        return self.decoder.unembed(x if not isinstance(x, np.ndarray) else self.decoder.ops.asarray(x))

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None, seed=0,
                 stop=None, stream: bool = False, images=None, audio=None, **kw):
        """Continue a text prompt or token ids: a ``Generation`` (text, token_ids, stats), or with ``stream=True``
        an iterator of text pieces. See :func:`workbench.generate.generate`; with media,
        :func:`workbench.multimodal.runner.multimodal_generate`. ``last_stats`` gets the run's stats."""
        stats: dict = {}
        self.last_stats = stats
        args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    stop=stop, stream=stream, stats=stats)
        if images or audio:
            from .multimodal.runner import multimodal_generate
            return multimodal_generate(self, prompt, images=images, audio=audio, **args, **kw)
        from .generate import generate
        return generate(self, prompt, **args, **kw)

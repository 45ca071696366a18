"""Tap and hook points of the Gemma 4 vision and audio towers and their projectors.

Names follow DESIGN.md's TransformerLens style with a ``vision.`` / ``audio.`` prefix::

    vision.hook_patch_embed                     [n_img, P, Dv]   input_proj(2*pixels-1) + 2-D position table
    vision.blocks.{i}.hook_resid_pre            [n_img, P, Dv]
    vision.blocks.{i}.ln1.hook_normalized       [n_img, P, Dv]
    vision.blocks.{i}.attn.hook_q / hook_k      [n_img, P, H, hd]  after q/k norm and 2-D RoPE
    vision.blocks.{i}.attn.hook_v               [n_img, P, H, hd]  after the scale-free v norm
    vision.blocks.{i}.attn.hook_pattern         [n_img, H, P, P]
    vision.blocks.{i}.attn.hook_z               [n_img, P, H, hd]
    vision.blocks.{i}.hook_attn_out             [n_img, P, Dv]   after post_attention_layernorm
    vision.blocks.{i}.hook_resid_mid            [n_img, P, Dv]
    vision.blocks.{i}.mlp.hook_post             [n_img, P, Fv]
    vision.blocks.{i}.hook_mlp_out              [n_img, P, Dv]   after post_feedforward_layernorm
    vision.blocks.{i}.hook_resid_post           [n_img, P, Dv]
    vision.hook_pooled                          [n_img, S, Dv]   k x k average pool by position, * sqrt(Dv)
    vision.hook_out                             [n_img, S, Dv]   after the optional standardisation
    embed_vision.hook_out                       [n_img, S, D]    scale-free RMSNorm + Linear -> text hidden

    audio.hook_subsample                        [n_aud, T, Da]   two stride-2 convs + input_proj_linear
    audio.blocks.{i}.hook_resid_pre             [n_aud, T, Da]
    audio.blocks.{i}.hook_ff1_out               [n_aud, T, Da]   after the first half-step feed-forward (+res)
    audio.blocks.{i}.attn.hook_pattern          [n_aud, H, blocks, chunk, context]  chunked local attention
    audio.blocks.{i}.hook_attn_out              [n_aud, T, Da]   after norm_post_attn
    audio.blocks.{i}.hook_resid_mid             [n_aud, T, Da]
    audio.blocks.{i}.hook_conv_out              [n_aud, T, Da]   light conv block output (+res)
    audio.blocks.{i}.hook_ff2_out               [n_aud, T, Da]
    audio.blocks.{i}.hook_resid_post            [n_aud, T, Da]   after norm_out
    audio.hook_out                              [n_aud, T, Do]   output_proj
    embed_audio.hook_out                        [n_aud, T, D]

Several images (clips) run as one batch padded to the longest, as Hugging Face batches them; P (T) is the
longest patch (frame) count, S the largest soft-token count. Rows past an item's own length are padding.
"""
from __future__ import annotations

from ..model.taps import Points


def vision_point_names(num_layers: int) -> list[str]:
    names = ["vision.hook_patch_embed"]
    for i in range(num_layers):
        b = f"vision.blocks.{i}."
        names += [b + "hook_resid_pre", b + "ln1.hook_normalized", b + "attn.hook_q", b + "attn.hook_k",
                  b + "attn.hook_v", b + "attn.hook_pattern", b + "attn.hook_z", b + "hook_attn_out",
                  b + "hook_resid_mid", b + "ln2.hook_normalized", b + "mlp.hook_post", b + "hook_mlp_out",
                  b + "hook_resid_post"]
    names += ["vision.hook_pooled", "vision.hook_out", "embed_vision.hook_out"]
    return names


def audio_point_names(num_layers: int) -> list[str]:
    names = ["audio.hook_subsample"]
    for i in range(num_layers):
        b = f"audio.blocks.{i}."
        names += [b + "hook_resid_pre", b + "hook_ff1_out", b + "attn.hook_pattern", b + "hook_attn_out",
                  b + "hook_resid_mid", b + "hook_conv_out", b + "hook_ff2_out", b + "hook_resid_post"]
    names += ["audio.hook_out", "embed_audio.hook_out"]
    return names


class MediaPoints(Points):
    """``Points`` over an explicit list of names (the towers' points), same matching and hook semantics."""

    def __init__(self, names: list[str], taps, hooks):   # noqa: D107 - mirrors Points.__init__
        import fnmatch
        self.all = list(names)
        if isinstance(taps, str):
            taps = [taps]
        self.tap_patterns = list(taps or [])
        self.hooks = dict(hooks or {})
        self.tapped = {n for n in self.all if any(fnmatch.fnmatchcase(n, p) for p in self.tap_patterns)}
        self.hooked: dict = {}
        for pat, fn in self.hooks.items():
            for n in self.all:
                if fnmatch.fnmatchcase(n, pat):
                    self.hooked.setdefault(n, []).append(fn)
        self.active = bool(self.tapped or self.hooked)
        self.values: dict = {}


def split_patterns(patterns, text_names: list[str], media_names: list[str], what: str = "tap/hook"):
    """Split tap patterns (or hook dict) between the text model's points and the media points. A pattern
    may match both (``*``); one that matches neither raises TapError, as ``Points`` does."""
    import fnmatch

    from ..model.taps import TapError
    if patterns is None:
        return None, None
    is_dict = isinstance(patterns, dict)
    if isinstance(patterns, str):
        patterns = [patterns]
    items = list(patterns.items()) if is_dict else [(p, None) for p in patterns]
    text, media = [], []
    for pat, fn in items:
        in_text = any(fnmatch.fnmatchcase(n, pat) for n in text_names)
        in_media = any(fnmatch.fnmatchcase(n, pat) for n in media_names)
        if not (in_text or in_media):
            close = [n for n in text_names + media_names if pat.split(".")[-1] in n][:3]
            raise TapError(f"{what} {pat!r} matches no point of this model"
                           + (f"; did you mean {close}?" if close else "")
                           + " (list them with workbench.multimodal.tap_names(model))")
        if in_text:
            text.append((pat, fn))
        if in_media:
            media.append((pat, fn))
    if is_dict:
        return dict(text), dict(media)
    return [p for p, _ in text], [p for p, _ in media]

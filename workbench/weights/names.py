"""One canonical naming for Gemma 1-4 weights.

Every loader (HF safetensors, GGUF) produces a ``dict[str, np.ndarray]`` keyed by these names, so the model
reads one vocabulary whatever the source. The names are Hugging Face's text-model names with the wrapper
prefix removed (``model.``, ``model.language_model.``, ``language_model.model.``), with one change: Gemma 1's
``post_attention_layernorm`` is the norm *before* the MLP, so it is renamed ``pre_feedforward_layernorm``
(the name it has from Gemma 2 on). Norm weights keep Hugging Face's convention: Gemma 1-3 store ``w`` and
the model scales by ``1 + w``; Gemma 4 stores the scale itself (``GemmaConfig.norm_offset`` says which).

Canonical names (``{i}`` is the layer index)::

    embed_tokens.weight                               [vocab, hidden]
    norm.weight                                       [hidden]
    layers.{i}.input_layernorm.weight                 [hidden]
    layers.{i}.post_attention_layernorm.weight        [hidden]   Gemma 2+ (after attention)
    layers.{i}.pre_feedforward_layernorm.weight       [hidden]
    layers.{i}.post_feedforward_layernorm.weight      [hidden]   Gemma 2+
    layers.{i}.self_attn.{q,k,v,o}_proj.weight        [out, in]  (v_proj absent on k_eq_v / KV-shared layers)
    layers.{i}.self_attn.{q,k}_norm.weight            [head_dim] Gemma 3+
    layers.{i}.mlp.{gate,up,down}_proj.weight         [out, in]
    layers.{i}.layer_scalar                           [1]        Gemma 4
    Gemma 4 per-layer embeddings (PLE):
    embed_tokens_per_layer.weight                     [vocab_ple, layers * ple_dim]
    per_layer_model_projection.weight                 [layers * ple_dim, hidden]
    per_layer_projection_norm.weight                  [ple_dim]
    layers.{i}.per_layer_input_gate.weight            [ple_dim, hidden]
    layers.{i}.per_layer_projection.weight            [hidden, ple_dim]
    layers.{i}.post_per_layer_input_norm.weight       [hidden]
    Gemma 4 MoE:
    layers.{i}.router.proj.weight                     [experts, hidden]
    layers.{i}.router.scale                           [hidden]
    layers.{i}.router.per_expert_scale                [experts]
    layers.{i}.experts.gate_up_proj                   [experts, 2 * moe_ffn, hidden]
    layers.{i}.experts.down_proj                      [experts, hidden, moe_ffn]
    layers.{i}.{post_feedforward_layernorm_1,pre_feedforward_layernorm_2,post_feedforward_layernorm_2}.weight
    Gemma 4 multimodal (kept under their HF names, prefix ``model.`` removed):
    vision_tower.*, embed_vision.*, audio_tower.*, embed_audio.*
    lm_head.weight is dropped when it equals the tied embedding; an untied head is kept as lm_head.weight.
"""
from __future__ import annotations

import re

_TEXT_PREFIXES = (
    "model.language_model.",
    "language_model.model.",
    "model.text_model.",
    "model.",
)
# the one list of media (non-text) tensor prefixes. canonical_name keeps these names (``model.`` removed);
# check_tensors leaves them out of the text decoder's tensors; the loader keeps them beside the decoder for the
# Gemma 4 towers (which read vision_tower/embed_vision/audio_tower/embed_audio; a Gemma 3 SigLIP tower with its
# multi_modal_projector, and vision_embedder, are recognised as media but not run)
MEDIA_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.", "multi_modal_projector.",
                  "vision_embedder.")


def canonical_name(hf_name: str, model_type: str) -> str | None:
    """Map one Hugging Face tensor name to the canonical name, or None for names the model never reads
    (rotary buffers and the like). ``model_type`` is the top-level HF model type (gemma, gemma2, gemma3,
    gemma3_text, gemma4, gemma4_text)."""
    name = hf_name
    if name.endswith("rotary_emb.inv_freq") or ".rotary_emb." in name:
        return None
    if name == "lm_head.weight" or name == "language_model.lm_head.weight":
        return "lm_head.weight"
    for mm in MEDIA_PREFIXES:
        if name.startswith("model." + mm):
            return name[len("model."):]
        if name.startswith(mm):
            return name
    for p in _TEXT_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    if model_type == "gemma":
        name = re.sub(r"^(layers\.\d+)\.post_attention_layernorm\.", r"\1.pre_feedforward_layernorm.", name)
    return name

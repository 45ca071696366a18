"""GGUF loading: the real Gemma 3 270M Q4_K_M (config, shapes, values against transformers, the cache), llama.cpp-
style round trips of the tiny HF fixtures (Gemma 1-4, forward against the HF dumps), dequantisation against
gguf-py, and the errors for bad files."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, cpu_backends, rel_max

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as ref_dequantize, quantize  # noqa: E402

from workbench.config import FULL, SLIDING, GemmaConfig  # noqa: E402
from workbench.weights.gguf import GGUFError, dequantize_rows, gguf_tokenizer_metadata, load_gguf, read_gguf  # noqa: E402
from workbench.weights.safetensors import load_hf_checkpoint  # noqa: E402

SMALL_VOCAB = 256


# ----------------------------------------------------------------------------------------------- helpers
def _vocab(n: int = SMALL_VOCAB):
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    tokens += [f"\u2581w{i}" for i in range(n - len(tokens))]
    types = [3, 3, 3, 2, 3, 3, 3] + [1] * (n - 7)
    return tokens, types


def _writer(path: Path, arch: str, vocab: int = SMALL_VOCAB) -> "gguf.GGUFWriter":
    w = gguf.GGUFWriter(str(path), arch)
    tokens, types = _vocab(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    return w


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_gemma3(path: Path, *, omit_key: str | None = None, extra_tensor: str | None = None,
                 int_tensor: bool = False, arch: str = "gemma3", qtype=None) -> dict[str, np.ndarray]:
    """A 2-layer gemma3 GGUF as llama.cpp writes one: F32 norms stored as w + 1, an F16 and Q8_0 matrices
    (``qtype``: another gguf-py quantisation for those). Returns the HF-convention values written (canonical names)."""
    qtype = Q.Q8_0 if qtype is None else qtype
    rng = np.random.default_rng(0)
    H, F, NH, KV, D, L, V = 64, 96, 2, 1, 32, 2, SMALL_VOCAB
    w = _writer(path, arch)
    keys = {
        "block_count": L, "context_length": 128, "embedding_length": H, "feed_forward_length": F,
        "attention.head_count": NH, "attention.head_count_kv": KV, "attention.key_length": D,
        "attention.value_length": D, "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6,
        "attention.sliding_window": 16,
    }
    for k, v in keys.items():
        if k == omit_key:
            continue
        full = f"{arch}.{k}"
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(full, v)
    want: dict[str, np.ndarray] = {}

    def put(gname: str, cname: str, a: np.ndarray, how: str = "f32", norm: bool = False):
        a = a.astype(np.float32)
        stored = a + 1.0 if norm else a
        if how == "f32":
            w.add_tensor(gname, stored)
            want[cname] = a
        elif how == "f16":
            w.add_tensor(gname, stored.astype(np.float16))
            want[cname] = stored.astype(np.float16).astype(np.float32)
        else:
            qd = quantize(stored, qtype)
            w.add_tensor(gname, qd, raw_dtype=qtype)
            want[cname] = ref_dequantize(qd, qtype).reshape(a.shape)

    put("token_embd.weight", "embed_tokens.weight", rng.standard_normal((V, H)), "q8")
    put("output_norm.weight", "norm.weight", rng.standard_normal(H) * 0.1, norm=True)
    for i in range(L):
        b = f"blk.{i}."
        c = f"layers.{i}."
        put(b + "attn_norm.weight", c + "input_layernorm.weight", rng.standard_normal(H) * 0.1, norm=True)
        put(b + "attn_q.weight", c + "self_attn.q_proj.weight", rng.standard_normal((NH * D, H)), "q8")
        put(b + "attn_k.weight", c + "self_attn.k_proj.weight", rng.standard_normal((KV * D, H)), "f16")
        put(b + "attn_v.weight", c + "self_attn.v_proj.weight", rng.standard_normal((KV * D, H)), "f32")
        put(b + "attn_output.weight", c + "self_attn.o_proj.weight", rng.standard_normal((H, NH * D)), "q8")
        put(b + "attn_q_norm.weight", c + "self_attn.q_norm.weight", rng.standard_normal(D) * 0.1, norm=True)
        put(b + "attn_k_norm.weight", c + "self_attn.k_norm.weight", rng.standard_normal(D) * 0.1, norm=True)
        put(b + "post_attention_norm.weight", c + "post_attention_layernorm.weight",
            rng.standard_normal(H) * 0.1, norm=True)
        put(b + "ffn_norm.weight", c + "pre_feedforward_layernorm.weight", rng.standard_normal(H) * 0.1, norm=True)
        put(b + "post_ffw_norm.weight", c + "post_feedforward_layernorm.weight",
            rng.standard_normal(H) * 0.1, norm=True)
        put(b + "ffn_gate.weight", c + "mlp.gate_proj.weight", rng.standard_normal((F, H)), "f16")
        put(b + "ffn_up.weight", c + "mlp.up_proj.weight", rng.standard_normal((F, H)), "q8")
        put(b + "ffn_down.weight", c + "mlp.down_proj.weight", rng.standard_normal((H, F)), "f32")
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(H, np.float32))
    if int_tensor:
        w.add_tensor("blk.0.attn_sinks.weight", np.zeros(H, np.int32))
    _finish(w)
    return want


_HF_NAMES_G1 = {"pre_feedforward_layernorm": "post_attention_layernorm"}


def _to_hf(canonical: str, model_type: str) -> str:
    """canonical -> the HF parameter name llama.cpp's converter sees (model. prefix; Gemma 1's norm name)."""
    name = canonical
    if model_type == "gemma":
        for a, b in _HF_NAMES_G1.items():
            name = name.replace(f".{a}.", f".{b}.")
    return "model." + name


def hf_fixture_to_gguf(src: Path, out: Path, matrices: str = "f32") -> None:
    """Convert a tiny HF fixture the way llama.cpp's convert_hf_to_gguf.py (conversion/gemma.py) does:
    the same metadata keys, names from gguf-py's TensorNameMap, +1 on Gemma 1-3 '*norm.weight', Gemma 4's
    rope_freqs / ffn_gate_inp.scale / ffn_down_exps.scale / layer_output_scale."""
    cfg = GemmaConfig.from_file(src)
    tensors = _text_only(load_hf_checkpoint(src, cfg.model_type))   # multimodal parts go to an mmproj GGUF
    arch = cfg.arch
    arch_enum = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3,
                 "gemma4": gguf.MODEL_ARCH.GEMMA4}[arch]
    L = cfg.num_hidden_layers
    w = _writer(out, arch, cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(L)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    swa = [cfg.is_sliding(i) for i in range(L)]
    if arch != "gemma4":
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim_)
        w.add_value_length(cfg.head_dim_)
        full = cfg.rope_parameters.get(FULL)
        w.add_rope_freq_base(full["rope_theta"])
        if arch == "gemma3":
            w.add_rope_freq_base_swa(cfg.rope_parameters[SLIDING]["rope_theta"])
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if arch in ("gemma2", "gemma3"):
            w.add_sliding_window(cfg.sliding_window_)
        if arch == "gemma3" and cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        shared = cfg.num_kv_shared_layers
        w.add_shared_kv_layers(shared)
        w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input or 0)
        w.add_sliding_window_pattern(swa)
        gh = cfg.global_head_dim or next(cfg.head_dim(i) for i in range(L) if not swa[i])
        w.add_key_length(gh)
        w.add_value_length(gh)
        w.add_key_length_swa(cfg.head_dim_)
        w.add_value_length_swa(cfg.head_dim_)
        w.add_feed_forward_length([cfg.intermediate(i) for i in range(L)] if cfg.use_double_wide_mlp
                                  else cfg.intermediate_size)
        kvs = [cfg.num_kv_heads(i) for i in range(L)]
        w.add_head_count_kv(kvs if len(set(kvs)) > 1 else kvs[0])
        w.add_rope_freq_base(cfg.rope_parameters[FULL]["rope_theta"])
        w.add_rope_freq_base_swa(cfg.rope_parameters[SLIDING]["rope_theta"])
        w.add_rope_dimension_count(gh)
        w.add_rope_dimension_count_swa(cfg.head_dim_)
        w.add_sliding_window(cfg.sliding_window_)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if cfg.enable_moe_block:
            w.add_expert_count(cfg.num_experts)
            w.add_expert_used_count(cfg.top_k_experts)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        prf = cfg.rope_parameters[FULL]["partial_rotary_factor"]
        n_rot = int(gh * prf / 2)
        w.add_tensor("rope_freqs.weight", np.array([1.0] * n_rot + [1e30] * (gh // 2 - n_rot), np.float32))
    name_map = gguf.get_tensor_name_map(arch_enum, L)
    for cname, a in tensors.items():
        a = np.asarray(a, np.float32)
        hf = _to_hf(cname, cfg.model_type)
        if cname.endswith("router.scale"):
            gname = f"blk.{cname.split('.')[1]}.ffn_gate_inp.scale"
        elif cname.endswith("router.per_expert_scale"):
            gname = f"blk.{cname.split('.')[1]}.ffn_down_exps.scale"
        else:
            base, suffix = (hf[:-len(".weight")], ".weight") if hf.endswith(".weight") else (hf, ".weight")
            mapped = name_map.get_name(base)
            assert mapped is not None, f"gguf-py has no llama.cpp name for {hf}"
            gname = mapped + suffix
        if arch != "gemma4" and gname.endswith("norm.weight"):
            a = a + 1.0
        if matrices == "q8" and a.ndim == 2 and a.shape[1] % 32 == 0 and "norm" not in gname:
            w.add_tensor(gname, quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        elif matrices == "f16" and a.ndim == 2 and "norm" not in gname:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, a)
    _finish(w)


_MM = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.", "multi_modal_projector.")


def _text_only(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not k.startswith(_MM)}


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    d = tmp_path / "wbcache"
    monkeypatch.setenv("WORKBENCH_CACHE", str(d))
    return d


# ----------------------------------------------------------------------------------------------- 270M
@pytest.fixture(scope="session")
def loaded270m(g270m):
    return load_gguf(g270m, progress=False)


def test_270m_config(loaded270m):
    cfg, _ = loaded270m
    assert cfg["model_type"] == "gemma3_text"
    assert cfg["num_hidden_layers"] == 18
    assert cfg["hidden_size"] == 640
    assert cfg["intermediate_size"] == 2048
    assert cfg["num_attention_heads"] == 4
    assert cfg["num_key_value_heads"] == 1
    assert cfg["head_dim"] == 256
    assert cfg["sliding_window"] == 512
    assert cfg["vocab_size"] == 262144
    assert cfg["max_position_embeddings"] == 32768
    assert cfg["rms_norm_eps"] == 1e-6
    assert cfg["query_pre_attn_scalar"] == 256
    assert cfg["layer_types"] == [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(18)]
    assert cfg["rope_parameters"] == {FULL: {"rope_type": "default", "rope_theta": 1e6},
                                      SLIDING: {"rope_type": "default", "rope_theta": 1e4}}
    assert cfg["final_logit_softcapping"] is None and cfg["attn_logit_softcapping"] is None
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 0)
    assert cfg["_gguf"]["architecture"] == "gemma3"
    assert cfg["_gguf"]["tensor_types"] == {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}
    json.dumps(cfg)                                   # plain JSON types only
    g = GemmaConfig.from_dict(cfg)
    assert g.attn_scale(0) == 256 ** -0.5
    assert g.rope(0).theta == 1e4 and g.rope(5).theta == 1e6


def test_270m_tensors(loaded270m):
    cfg, t = loaded270m
    H, F, D = 640, 2048, 256
    want = {"embed_tokens.weight": (262144, H), "norm.weight": (H,)}
    for i in range(18):
        p = f"layers.{i}."
        want.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "pre_feedforward_layernorm.weight": (H,), p + "post_feedforward_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (4 * D, H), p + "self_attn.k_proj.weight": (D, H),
            p + "self_attn.v_proj.weight": (D, H), p + "self_attn.o_proj.weight": (H, 4 * D),
            p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,),
            p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H), p + "mlp.down_proj.weight": (H, F),
        })
    assert {k: tuple(v.shape) for k, v in t.items()} == want
    assert all(v.dtype == np.float32 for v in t.values())
    assert all(np.isfinite(v).all() for k, v in t.items() if k != "embed_tokens.weight")


def test_270m_norms_are_hf_convention(g270m, loaded270m):
    """The file stores 1 + w (llama.cpp's converter); the loader returns w."""
    _, t = loaded270m
    g = read_gguf(g270m)
    mm = np.memmap(g270m, np.uint8, mode="r")
    for gname, cname in [("output_norm.weight", "norm.weight"),
                         ("blk.0.attn_norm.weight", "layers.0.input_layernorm.weight"),
                         ("blk.3.attn_q_norm.weight", "layers.3.self_attn.q_norm.weight"),
                         ("blk.17.post_ffw_norm.weight", "layers.17.post_feedforward_layernorm.weight")]:
        info = g.by_name[gname]
        raw = np.frombuffer(mm[info.offset:info.offset + info.nbytes], np.float32)
        np.testing.assert_array_equal(t[cname], raw - np.float32(1))


@pytest.fixture(scope="session")
def hf_export(g270m):
    """transformers' own dequantisation of the same GGUF (AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)),
    exported once to the shared float32 HF dir (~2 min the first time; reused while the GGUF's content is the same)."""
    pytest.importorskip("transformers", reason="transformers not installed (pip install gemma-workbench[reference])")
    pytest.importorskip("torch")
    from workbench.references.hf import DEFAULT_GGUF_CACHE, export_hf_dir_from_gguf
    return export_hf_dir_from_gguf(g270m, DEFAULT_GGUF_CACHE / f"{g270m.stem}-float32", "float32")


@pytest.mark.reference
def test_270m_matches_transformers(loaded270m, hf_export):
    _, t = loaded270m
    hf = load_hf_checkpoint(hf_export, "gemma3_text")
    assert set(hf) == set(t), sorted(set(hf) ^ set(t))
    # same dequantisation and the same norm shift: bit-identical, every tensor (all five ggml types)
    differ = [name for name in t if t[name].shape != hf[name].shape or not np.array_equal(t[name], hf[name])]
    assert not differ, {n: float(np.abs(t[n] - hf[n]).max()) for n in differ[:5]}


@pytest.mark.reference
def test_270m_config_matches_transformers(loaded270m, hf_export):
    cfg, _ = loaded270m
    ours = GemmaConfig.from_dict(cfg)
    theirs = GemmaConfig.from_file(hf_export)
    for attr in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim_", "sliding_window_", "layer_types", "query_pre_attn_scalar",
                 "final_logit_softcapping", "attn_logit_softcapping", "max_position_embeddings", "rope_parameters",
                 "tie_word_embeddings"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.skipif("torch:cpu" not in cpu_backends(), reason="torch not installed")
def test_270m_logits_match_transformers(g270m, hf_export):
    """End to end: GGUF -> this loader's config and tensors -> the torch backend, against transformers running the
    same GGUF (its float32 export): the config llama.cpp leaves implicit is the one HF uses."""
    import workbench as wb
    from workbench.references.hf import HFReference
    m = wb.load(g270m, backend="torch:cpu", dtype="float32", progress=False)
    ids = np.array([m.tokenizer.encode("The quick brown fox jumps over the lazy dog. In 1905 Einstein published")])
    ref = HFReference(str(hf_export), dtype="float32")
    want = np.asarray(ref.logits(ids))
    got = np.asarray(m.forward(ids).logits)
    assert rel_max(want, got) < 1e-5
    assert (want[0].argmax(-1) == got[0].argmax(-1)).all()


@pytest.fixture()
def big_tmp(tmp_path):
    """A temp dir removed right after the test (pytest would keep the last three runs' 1 GB caches)."""
    d = tmp_path / "big"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_270m_cache(g270m, big_tmp):
    cdir = big_tmp / "cache"
    t0 = time.perf_counter()
    cfg1, a = load_gguf(g270m, progress=False, cache_dir=cdir)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    cfg2, b = load_gguf(g270m, progress=False, cache_dir=cdir)
    warm = time.perf_counter() - t0
    print(f"270M Q4_K_M: first load {cold:.2f} s, cached load {warm:.3f} s")
    assert cfg1 == cfg2
    assert warm < 2.0 and warm < cold / 3, (cold, warm)
    for k in ("embed_tokens.weight", "layers.7.mlp.down_proj.weight", "layers.2.self_attn.k_norm.weight"):
        assert np.array_equal(a[k], b[k]), k
    assert isinstance(b["embed_tokens.weight"], np.memmap) and not b["embed_tokens.weight"].flags.writeable
    entries = [d for d in cdir.iterdir() if not d.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()


# ----------------------------------------------------------------------------------------------- round trips
def test_roundtrip_tiny_gemma3(tmp_path):
    p = tmp_path / "tiny.gguf"
    want = _tiny_gemma3(p)
    cfg, t = load_gguf(p, progress=False, cache=False)
    assert set(t) == set(want)
    for k, v in want.items():
        assert t[k].shape == v.shape, k
        tol = 1e-6 if "norm" in k else 0
        np.testing.assert_allclose(t[k], v, rtol=0, atol=tol, err_msg=k)
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 32
    assert cfg["layer_types"] == [SLIDING, SLIDING] and cfg["sliding_window"] == 16
    assert cfg["_gguf"]["tensor_types"] == {"F16": 4, "F32": 17, "Q8_0": 7}
    GemmaConfig.from_dict(cfg).validate()
    # dtypes
    _, t64 = load_gguf(p, dtype="float64", progress=False, cache=False)
    _, t16 = load_gguf(p, dtype="float16", progress=False, cache=False)
    _, tbf = load_gguf(p, dtype="bfloat16", progress=False, cache=False)
    assert t64["norm.weight"].dtype == np.float64 and t16["norm.weight"].dtype == np.float16
    assert tbf["norm.weight"].dtype == np.float32
    np.testing.assert_allclose(t64["layers.1.self_attn.q_norm.weight"], want["layers.1.self_attn.q_norm.weight"],
                               atol=1e-6)
    np.testing.assert_allclose(t16["layers.0.mlp.up_proj.weight"], want["layers.0.mlp.up_proj.weight"], rtol=1e-3,
                               atol=1e-3)


def test_cache_rebuilds_damaged_entries(tmp_path):
    p = tmp_path / "tiny.gguf"
    _tiny_gemma3(p)
    cdir = tmp_path / "cache"
    cfg, ref = load_gguf(p, progress=False, cache_dir=cdir)
    ref = {k: np.array(v) for k, v in ref.items()}
    (entry,) = [d for d in cdir.iterdir() if not d.name.startswith(".")]
    # an interrupted run leaves a temp dir behind: ignored, then swept
    stale = cdir / ".tmp-999999999-abc"
    stale.mkdir()
    (stale / "junk.npy").write_bytes(b"\x93NUMPY partial")
    # truncate one tensor file
    f = entry / "layers.0.mlp.up_proj.weight.npy"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match="damaged"):
        cfg2, t = load_gguf(p, progress=False, cache_dir=cdir)
    assert cfg2 == cfg and not stale.exists()
    for k in ref:
        np.testing.assert_array_equal(t[k], ref[k])
    # a manifest that is not JSON
    (entry / "manifest.json").write_text("{not json")
    with pytest.warns(UserWarning, match="damaged"):
        _, t = load_gguf(p, progress=False, cache_dir=cdir)
    np.testing.assert_array_equal(t["norm.weight"], ref["norm.weight"])
    # a missing tensor file
    (entry / "norm.weight.npy").unlink()
    with pytest.warns(UserWarning):
        _, t = load_gguf(p, progress=False, cache_dir=cdir)
    np.testing.assert_array_equal(t["norm.weight"], ref["norm.weight"])
    # touching the GGUF (new mtime) makes a new entry and drops the stale one
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    load_gguf(p, progress=False, cache_dir=cdir)
    assert len([d for d in cdir.iterdir() if not d.name.startswith(".")]) == 1


FIXTURE_NAMES = ["gemma1", "gemma2", "gemma3_text", "gemma3_nested", "gemma4_kv", "gemma4_e2b", "gemma4_moe",
                 "gemma4_bidir"]
# What GGUF cannot say: Gemma 2/3's query_pre_attn_scalar (llama.cpp derives it from the head size) and
# Gemma 4's bidirectional attention. Those fixtures are compared on everything else.
FORWARD_OK = {"gemma1", "gemma4_kv", "gemma4_e2b", "gemma4_moe"}


def _fixture_dir(name):
    d = FIXTURES / name
    if not (d / "model.safetensors").exists():
        pytest.skip(f"fixture {name} missing (python fixtures/make_fixtures.py)")
    return d


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_roundtrip(name, tmp_path, isolated_cache):
    src = _fixture_dir(name)
    out = tmp_path / f"{name}.gguf"
    hf_fixture_to_gguf(src, out)
    want_cfg = GemmaConfig.from_file(src)
    want = _text_only(load_hf_checkpoint(src, want_cfg.model_type))
    cfg_d, t = load_gguf(out, progress=False)
    got_cfg = GemmaConfig.from_dict(cfg_d, where=str(out))
    # tensors: same names, shapes and values (norms round-trip through +1 in float32)
    assert set(t) == set(want), sorted(set(t) ^ set(want))
    for k in want:
        assert t[k].shape == want[k].shape, k
        np.testing.assert_allclose(t[k], want[k], rtol=0, atol=2e-7 if "norm" in k else 0, err_msg=k)
    # config: every per-layer accessor the model reads
    L = want_cfg.num_hidden_layers
    assert got_cfg.arch == want_cfg.arch and got_cfg.num_hidden_layers == L
    for attr in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "layer_types",
                 "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings", "norm_offset",
                 "hidden_size_per_layer_input", "num_kv_shared_layers", "use_double_wide_mlp", "enable_moe_block",
                 "num_experts", "top_k_experts", "moe_intermediate_size", "attention_k_eq_v"):
        assert getattr(got_cfg, attr) == getattr(want_cfg, attr), attr
    assert got_cfg.rms_norm_eps == pytest.approx(want_cfg.rms_norm_eps, rel=1e-6)
    for i in range(L):
        assert got_cfg.head_dim(i) == want_cfg.head_dim(i), i
        assert got_cfg.num_kv_heads(i) == want_cfg.num_kv_heads(i), i
        assert got_cfg.rope(i) == want_cfg.rope(i), i
        assert got_cfg.kv_source(i) == want_cfg.kv_source(i), i
        assert got_cfg.k_eq_v(i) == want_cfg.k_eq_v(i), i
        assert got_cfg.intermediate(i) == want_cfg.intermediate(i), i
        if name != "gemma4_bidir":
            assert got_cfg.sliding_window(i) == want_cfg.sliding_window(i), i
        if want_cfg.arch in ("gemma2", "gemma3"):
            assert got_cfg.attn_scale(i) == pytest.approx(want_cfg.head_dim(i) ** -0.5)  # llama.cpp's rule
        else:
            assert got_cfg.attn_scale(i) == want_cfg.attn_scale(i)


@pytest.mark.skipif(not cpu_backends(), reason="no CPU backend (torch or mlx) installed")
@pytest.mark.parametrize("name", sorted(FORWARD_OK))
def test_fixture_gguf_forward_matches_hf(name, tmp_path, isolated_cache):
    import workbench as wb
    src = _fixture_dir(name)
    ref = dict(np.load(src / "reference.npz"))
    out = tmp_path / f"{name}.gguf"
    hf_fixture_to_gguf(src, out, matrices="f32")
    m = wb.load(out, backend=cpu_backends()[0], dtype="float32", progress=False)
    logits = m.forward(ref["input_ids"]).logits
    assert rel_max(ref["logits"], logits) < 1e-5


def test_fixture_roundtrip_quantized(tmp_path, isolated_cache):
    """Q8_0 / F16 matrices come back as gguf-py dequantises them."""
    src = _fixture_dir("gemma4_moe")
    for mode, qt in (("q8", Q.Q8_0), ("f16", Q.F16)):
        out = tmp_path / f"m-{mode}.gguf"
        hf_fixture_to_gguf(src, out, matrices=mode)
        _, t = load_gguf(out, progress=False, cache=False)
        want = load_hf_checkpoint(src, "gemma4_text")
        w = want["layers.1.self_attn.q_proj.weight"]
        exp = ref_dequantize(quantize(w, qt) if qt != Q.F16 else w.astype(np.float16).view(np.uint8), qt)
        np.testing.assert_array_equal(t["layers.1.self_attn.q_proj.weight"], exp.reshape(w.shape))
        np.testing.assert_allclose(t["layers.1.experts.gate_up_proj"], want["layers.1.experts.gate_up_proj"],
                                   atol=0.05)


# ----------------------------------------------------------------------------------------------- dequantisation
FAST_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16, Q.F16]


@pytest.mark.parametrize("qt", FAST_TYPES)
def test_dequantize_random_blocks_match_gguf_py(qt):
    """Every bit pattern: random bytes as blocks (NaN scales included) decode exactly as gguf-py decodes them."""
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = np.random.default_rng(int(qt) + 100).integers(0, 256, (16, 8 * size), dtype=np.uint8)
    with np.errstate(all="ignore"):
        want = ref_dequantize(raw, qt)
        got = dequantize_rows(raw, int(qt), qt.name, 8 * block)
    np.testing.assert_array_equal(got, want.reshape(got.shape))


@pytest.mark.parametrize("qt", FAST_TYPES)
def test_dequantize_matches_gguf_py(qt):
    rng = np.random.default_rng(int(qt))
    x = (rng.standard_normal((48, 512)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
    x[3] = 0.0
    if qt == Q.F16:
        raw = x.astype(np.float16).view(np.uint8)
    else:
        raw = quantize(x, qt)
    want = ref_dequantize(raw, qt)
    got = dequantize_rows(raw, int(qt), qt.name, 512)
    np.testing.assert_array_equal(got, want.reshape(got.shape))


# ----------------------------------------------------------------------------------------------- errors
def test_error_truncated(g270m, tmp_path):
    g = read_gguf(g270m)
    for n, what in ((g.data_start + 1000, "tensor"), (2_000_000, "metadata"), (10, "the tensor count")):
        bad = tmp_path / f"trunc{n}.gguf"
        with open(g270m, "rb") as f:
            bad.write_bytes(f.read(n))
        with pytest.raises(GGUFError, match="truncated") as e:
            load_gguf(bad, progress=False, cache=False)
        assert str(bad) in str(e.value) and what in str(e.value)


def test_error_truncated_names_the_tensor(tmp_path):
    p = tmp_path / "t.gguf"
    _tiny_gemma3(p)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(GGUFError, match=r"truncated file: tensor 'blk\.1\.") as e:
        load_gguf(bad, progress=False, cache=False)
    assert "cut.gguf" in str(e.value)


def test_error_bad_magic(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGML" + b"\x00" * 64)
    with pytest.raises(GGUFError, match="not a GGUF file") as e:
        load_gguf(p, progress=False, cache=False)
    assert "model.gguf" in str(e.value)
    p.write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(p, progress=False, cache=False)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")


def test_error_unsupported_arch(tmp_path):
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(GGUFError, match="unsupported architecture 'llama'") as e:
        load_gguf(p, progress=False, cache=False)
    assert "gemma, gemma2, gemma3, gemma4" in str(e.value) and "llama.gguf" in str(e.value)


def test_error_missing_metadata_key(tmp_path):
    p = tmp_path / "nokey.gguf"
    _tiny_gemma3(p, omit_key="attention.layer_norm_rms_epsilon")
    with pytest.raises(GGUFError, match="missing required metadata key 'gemma3.attention.layer_norm_rms_epsilon'"):
        load_gguf(p, progress=False, cache=False)


def test_error_unknown_tensor(tmp_path):
    p = tmp_path / "extra.gguf"
    _tiny_gemma3(p, extra_tensor="blk.0.ffn_mystery.weight")
    with pytest.raises(GGUFError, match="unknown tensor 'blk.0.ffn_mystery.weight'"):
        load_gguf(p, progress=False, cache=False)


def test_error_unsupported_tensor_type(tmp_path):
    p = tmp_path / "int.gguf"
    _tiny_gemma3(p, int_tensor=True)
    with pytest.raises(GGUFError, match="'blk.0.attn_sinks.weight'"):
        load_gguf(p, progress=False, cache=False)


def test_tokenizer_metadata_270m(g270m):
    m = gguf_tokenizer_metadata(g270m)
    assert len(m["tokens"]) == 262144 and m["model"] == "llama"
    assert (m["bos_id"], m["eos_id"], m["pad_id"], m["unk_id"], m["add_bos"]) == (2, 1, 0, 3, True)
    assert m["tokens"][106] == "<end_of_turn>" and m["token_types"][106] == 3
    assert m["scores"].shape == (262144,) and m["chat_template"] is None


def test_tokenizer_metadata_missing(tmp_path):
    p = tmp_path / "novocab.gguf"
    w = gguf.GGUFWriter(str(p), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens"):
        gguf_tokenizer_metadata(p)


# ------------------------------------------------------------------- the GGUFs run by llama.cpp itself
def _gguf_expressible(name: str, tmp_path: Path) -> Path:
    """The fixture with what a GGUF can say: Gemma 2/3's query_pre_attn_scalar set to the head dim (llama.cpp's
    rule for these sizes); everything else (weights, windows, softcaps, RoPE) unchanged."""
    d = tmp_path / f"{name}-gguf-expressible"
    shutil.copytree(_fixture_dir(name), d)
    c = json.loads((d / "config.json").read_text())
    t = c.get("text_config", c)
    if t.get("query_pre_attn_scalar"):
        t["query_pre_attn_scalar"] = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    (d / "config.json").write_text(json.dumps(c))
    return d


# gemma4_e2b (PLE + KV sharing) aborts inside llama-cpp-python 0.3.36's ggml, so it is compared with HF only
LLAMA_OK = ["gemma1", "gemma2", "gemma3_text", "gemma4_kv", "gemma4_moe"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", LLAMA_OK)
def test_fixture_gguf_runs_in_llamacpp(name, tmp_path, isolated_cache):
    """llama.cpp loads the converted tiny GGUF and its logits agree with our forward of the same file (llama.cpp
    runs its own kernels: ~3e-4..1.5e-3 relative with F32 weights and an F32 KV cache) and top-1 agrees at
    almost every position; a wrong norm offset, softcap or RoPE would give O(1)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install gemma-workbench[llamacpp])")
    import workbench as wb
    from workbench.references.llamacpp import LlamaCppReference
    out = tmp_path / f"{name}.gguf"
    hf_fixture_to_gguf(_gguf_expressible(name, tmp_path), out, matrices="f32")
    ids = np.random.default_rng(4).integers(7, SMALL_VOCAB, size=24).tolist()
    ours = wb.load(out, dtype="float32", progress=False).forward(ids).logits[0]
    ref = LlamaCppReference(out, n_ctx=64, n_threads=1, type_k=0, type_v=0)
    try:
        theirs = np.asarray(ref.logits(ids))
    finally:
        ref.close()
    assert rel_max(theirs, ours) < 5e-3
    assert np.mean(theirs.argmax(-1) == ours.argmax(-1)) >= 0.9


@pytest.mark.reference
@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_gguf_forward_of_gemma2_and_3_matches_transformers(name, tmp_path, isolated_cache):
    """The Gemma 2 (and 3) GGUF forward runs and equals HF transformers on the same GGUF-expressible checkpoint
    (FORWARD_OK leaves them out only because the committed dumps use query_pre_attn_scalar != head dim)."""
    pytest.importorskip("transformers", reason="transformers not installed (pip install gemma-workbench[reference])")
    import workbench as wb
    from workbench.references.hf import HFReference
    d = _gguf_expressible(name, tmp_path)
    out = tmp_path / f"{name}.gguf"
    hf_fixture_to_gguf(d, out, matrices="f32")
    ids = np.random.default_rng(6).integers(3, SMALL_VOCAB, size=(1, 24))
    want = HFReference(d, dtype="float64").logits(ids)
    for backend in cpu_backends():
        got = wb.load(out, backend=backend, dtype="float32", progress=False).forward(ids).logits
        assert rel_max(want, got) < 1e-5, backend
    # and the unmodified fixture's dump differs: the GGUF really cannot say query_pre_attn_scalar
    ref = dict(np.load(_fixture_dir(name) / "reference.npz"))
    got = wb.load(out, dtype="float32", progress=False).forward(ref["input_ids"]).logits
    assert rel_max(ref["logits"], got) > 1e-3


# ------------------------------------------------------------------- llama.cpp's own converter
def _llama_cpp_source() -> Path:
    """llama.cpp's tree (convert_hf_to_gguf.py + gguf-py) from the llama-cpp-python source distribution:
    $WORKBENCH_LLAMA_CPP_SRC, else the sdist cached by `pip download --no-deps --no-binary :all:
    llama-cpp-python -d ~/.cache/gemma-workbench/sdist` (extracted there on first use). Skips with how to get it."""
    import tarfile
    env = os.environ.get("WORKBENCH_LLAMA_CPP_SRC")
    if env:
        p = Path(env).expanduser()
        if not (p / "convert_hf_to_gguf.py").is_file():
            pytest.fail(f"WORKBENCH_LLAMA_CPP_SRC={env}: no convert_hf_to_gguf.py there")
        return p
    cache = Path.home() / ".cache" / "gemma-workbench" / "sdist"
    for tree in sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"), reverse=True):
        if (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py").is_dir():
            return tree
    for tgz in sorted(cache.glob("llama_cpp_python-*.tar.gz"), reverse=True):
        top = tgz.name[:-len(".tar.gz")]
        want = (f"{top}/vendor/llama.cpp/convert_hf_to_gguf.py", f"{top}/vendor/llama.cpp/gguf-py/",
                f"{top}/vendor/llama.cpp/conversion/")
        with tarfile.open(tgz) as tf:
            tf.extractall(cache, members=[m for m in tf.getmembers() if m.name.startswith(want)], filter="data")
        return cache / top / "vendor" / "llama.cpp"
    pytest.skip("llama.cpp's convert_hf_to_gguf.py not found: `pip download --no-deps --no-binary :all: "
                f"llama-cpp-python -d {cache}` (or set WORKBENCH_LLAMA_CPP_SRC to a llama.cpp checkout)")


def _tiny_sentencepiece(path: Path, vocab: int) -> None:
    """A sentencepiece model of exactly ``vocab`` pieces (the converter reads tokenizer.model for Gemma 1-3)."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece not installed (gemma-workbench[reference])")
    text = path.with_suffix(".txt")
    text.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i} while alpha beta gamma delta "
                              "sat on the mat" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=vocab,
                                   model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
                                   minloglevel=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma1", "gemma2"])
def test_llama_cpp_converter_output_loads_and_runs(name, tmp_path, isolated_cache):
    """Convert the tiny HF fixture with llama.cpp's own convert_hf_to_gguf.py (its gguf-py): our loader reads
    the same tensors and config as from the HF checkpoint, the forward equals HF transformers, and llama.cpp
    runs the file with logits close to ours. (Gemma 4's converter needs a tokenizer.json whose pre-tokenizer
    it recognises, which a tiny fixture cannot provide: Gemma 4 is covered by the in-test converter above.)"""
    import subprocess
    import sys
    import workbench as wb
    src = _llama_cpp_source()
    d = _gguf_expressible(name, tmp_path)
    _tiny_sentencepiece(d / "tokenizer.model", SMALL_VOCAB)
    out = tmp_path / f"{name}-llamacpp.gguf"
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(d), "--outfile", str(out),
                        "--outtype", "f32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want_cfg = GemmaConfig.from_file(d)
    want = _text_only(load_hf_checkpoint(d, want_cfg.model_type))
    cfg_d, t = load_gguf(out, progress=False)
    got_cfg = GemmaConfig.from_dict(cfg_d, where=str(out))
    assert set(t) == set(want), sorted(set(t) ^ set(want))
    for k in want:
        np.testing.assert_allclose(t[k], want[k], rtol=0, atol=2e-7 if "norm" in k else 0, err_msg=k)
    for attr in ("arch", "num_hidden_layers", "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
                 "num_attention_heads", "num_key_value_heads", "head_dim_", "sliding_window_", "norm_offset"):
        assert getattr(got_cfg, attr) == getattr(want_cfg, attr), attr
    # and the in-test converter writes the same tensors as llama.cpp's
    mine = tmp_path / f"{name}-test.gguf"
    hf_fixture_to_gguf(d, mine, matrices="f32")
    _, t2 = load_gguf(mine, progress=False)
    for k in want:
        np.testing.assert_array_equal(t2[k], t[k], err_msg=k)
    ids = np.random.default_rng(8).integers(7, SMALL_VOCAB, size=(1, 24))
    ours = wb.load(out, dtype="float32", progress=False).forward(ids).logits
    if have_transformers():
        from workbench.references.hf import HFReference
        assert rel_max(HFReference(d, dtype="float64").logits(ids), ours) < 1e-5
    try:
        from workbench.references.llamacpp import LlamaCppReference
        ref = LlamaCppReference(out, n_ctx=64, n_threads=1, type_k=0, type_v=0)
    except ImportError:
        return
    try:
        theirs = np.asarray(ref.logits(ids[0].tolist()))
    finally:
        ref.close()
    assert rel_max(theirs, ours[0]) < 5e-3


def have_transformers() -> bool:
    import importlib.util
    return importlib.util.find_spec("transformers") is not None

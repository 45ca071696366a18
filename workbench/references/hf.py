"""Hugging Face ``transformers`` as an independent reference for Gemma 1-4.

``HFReference(source)`` loads either an HF checkpoint directory (``config.json`` + safetensors; model types
``gemma``, ``gemma2``, ``gemma3_text``, ``gemma3`` (nested), ``gemma4_text``, ``gemma4`` (nested)) or a single
``.gguf`` file (transformers dequantises GGUF tensors to the requested dtype on load). By default
``attn_implementation="eager"``, eval mode, no grad.

Loading a GGUF through transformers is slow (its GGUF reader parses the 262k-entry vocabulary field by field,
three times: tokenizer, config, tensors; about 90 s for Gemma 3 270M on a 2-core CPU). Pass ``gguf_cache=True``
(or a directory) to dequantise once into an HF directory with :func:`export_hf_dir_from_gguf` and load from
there afterwards (a few seconds); the same directory feeds mlx-lm (see ``workbench.references.mlxlm``), so both
references see identical weights.

``transformers`` is imported lazily; without it the constructor raises ``ImportError`` with the install hint.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._timing import median_timings, require

INSTALL_HINT = "pip install gemma-workbench[reference]"
DEFAULT_GGUF_CACHE = Path(os.environ.get("WORKBENCH_HF_GGUF_CACHE", Path.home() / ".cache" / "gemma-workbench" / "hf-from-gguf"))
_EXPORT_MARKER = "workbench_export.json"


def _import_transformers():
    return require("HFReference", INSTALL_HINT, "torch", "transformers")[1]


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16",
               "fp64": "float64", "f64": "float64", "half": "float16", "float": "float32", "double": "float64"}
    name = aliases.get(name, name)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return dt


def _as_batch(ids) -> np.ndarray:
    """list[int] | np [T] | [B, T] (or a torch tensor) -> int64 [B, T]."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids, dtype=np.int64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"ids must be a non-empty [T] or [B, T] sequence of token ids, got shape {a.shape}")
    return a


def _is_gguf(source: Path) -> bool:
    return source.suffix.lower() == ".gguf" and source.is_file()


def _find_decoder_layers(model):
    """The text decoder's layer list: the ModuleList of ``*DecoderLayer`` modules outside vision/audio towers."""
    import torch

    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        if not name.endswith("layers") or any(k in name for k in ("vision", "audio", "multi_modal", "encoder")):
            continue
        if not type(mod[0]).__name__.endswith("DecoderLayer"):
            continue
        key = (0 if "language_model" in name else 1, name.count("."))
        if best is None or key < best[0]:
            best = (key, name, mod)
    if best is None:
        raise RuntimeError(f"no decoder layer list found in {type(model).__name__}")
    return best[2]


def _source_fingerprint(gguf: Path) -> dict:
    """Content fingerprint of a GGUF (size + SHA-256 of its first and last 4 MiB): copies of one file at different
    paths share an export, a changed file does not. (Path and mtime are recorded for information only.)"""
    import hashlib

    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    chunk = 4 << 20
    with open(gguf, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return {"size": size, "sha256_head_tail": h.hexdigest()}


def export_hf_dir_from_gguf(gguf_path, out_dir, dtype="float32", *, overwrite: bool = False) -> Path:
    """Dequantise a GGUF with transformers and write an HF checkpoint directory (safetensors + config + tokenizer).

    Idempotent: if ``out_dir`` already holds an export of the same content (size + head/tail SHA-256, so copies of
    one file at other paths count as the same) in the same dtype, it is reused. The GGUF ``quantization_config`` is dropped from the saved config, so the directory loads as a
    plain checkpoint (in transformers, mlx-lm, or our own loader). ``float32`` keeps the dequantised values exact.
    """
    transformers = _import_transformers()
    gguf = Path(gguf_path).expanduser()
    out = Path(out_dir).expanduser()
    if not _is_gguf(gguf):
        raise FileNotFoundError(f"not a .gguf file: {gguf}")
    tdt = _torch_dtype(dtype)
    want = {**_source_fingerprint(gguf), "dtype": str(tdt).replace("torch.", "")}

    def _matches() -> bool:
        try:
            have = json.loads((out / _EXPORT_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return all(have.get(k) == v for k, v in want.items())

    if not overwrite and _matches():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=tdt, attn_implementation="eager"
        )
        # transformers marks GGUF-loaded models as "quantized" (not serialisable); the tensors are plain dense
        # dequantised weights, so detach the quantizer and save them as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
        model.config.dtype = tdt
        model.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / _EXPORT_MARKER).write_text(json.dumps({**want, "source": str(gguf.resolve())}, indent=1))
        del model
        if not overwrite and _matches():  # another process finished the same export meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _run_hooked(run, handles, got: dict, n_layers: int) -> dict:
    """``run()`` (a forward) with the hooks ``handles`` in place, removed afterwards even on error; checks that the
    embedding's and every decoder layer's hook filled ``got`` and adds the forward's logits to it."""
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(n_layers) if f"blocks.{i}.hook_resid_post" not in got]
    if missing or "hook_embed" not in got:
        raise RuntimeError(f"decoder hooks did not fire for layers {missing}")
    got["logits"] = out.logits.detach().cpu()
    return got


class _Timer:
    """A ``generate`` streamer that timestamps each put(): the first put is the prompt, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class HFReference:
    """Gemma via Hugging Face transformers (eager attention, eval, no grad) as an independent reference.

    ``source``: an HF checkpoint directory or a ``.gguf`` file. ``gguf_cache``: for a GGUF source, ``None`` (load
    the GGUF directly), ``True`` (export once, in float32, to ``DEFAULT_GGUF_CACHE/<stem>-float32`` and load from
    there, cast to ``dtype``) or a cache directory to use instead of ``DEFAULT_GGUF_CACHE``.
    ``attn_implementation``: ``"eager"`` (the reference: every path in the model's own Python) or ``"sdpa"``
    (the throughput peers: torch's fused attention).
    """

    def __init__(self, source, dtype="float32", device="cpu", *, gguf_cache=None, attn_implementation="eager"):
        transformers = _import_transformers()
        import torch

        self.source = Path(source).expanduser()
        self.dtype = _torch_dtype(dtype)
        self.device = torch.device(device)
        self._tokenizer = None
        t0 = time.perf_counter()
        load_dir, gguf_file = self.source, None
        if _is_gguf(self.source):
            if gguf_cache:
                # Export in float32 (exact dequantised values) and cast on load.
                cache = DEFAULT_GGUF_CACHE if gguf_cache is True else Path(gguf_cache).expanduser()
                load_dir = export_hf_dir_from_gguf(self.source, cache / f"{self.source.stem}-float32", "float32")
            else:
                load_dir, gguf_file = self.source.parent, self.source.name
        elif not (self.source.is_dir() and (self.source / "config.json").is_file()):
            raise FileNotFoundError(f"{self.source} is neither an HF checkpoint directory (config.json) nor a .gguf file")
        self._load_dir, self._gguf_file = load_dir, gguf_file
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(load_dir), dtype=self.dtype, attn_implementation=attn_implementation, **kw
        )
        if hasattr(model, "set_experts_implementation"):
            # grouped_mm (the default for Gemma 4 MoE) has no float64 kernel; eager is the reference anyway
            try:
                model.set_experts_implementation("eager")
            except Exception:
                pass
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - t0
        self.config = self.model.config
        self.text_config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        self.layers = _find_decoder_layers(self.model)

    # ------------------------------------------------------------------ basics
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            transformers = _import_transformers()
            kw = {"gguf_file": self._gguf_file} if self._gguf_file else {}
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self._load_dir), **kw)
        return self._tokenizer

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    def _tensor(self, ids):
        import torch

        return torch.from_numpy(_as_batch(ids)).to(self.device)

    def _forward(self, ids):
        import torch

        x = self._tensor(ids)
        with torch.inference_mode():
            return self.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)

    # ------------------------------------------------------------------ activations
    def logits(self, ids) -> np.ndarray:
        """float32 logits [B, T, V] for every position (final soft-capping included, as HF applies it)."""
        out = self._forward(ids)
        return out.logits.float().cpu().numpy()

    def _capture(self, ids):
        """Run one forward; return (input to layer 0 [B,T,D], every layer's output [L,B,T,D]) as float32."""
        got_in: list = []
        got_out: dict[int, Any] = {}

        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            got_in.append(h.detach().float().cpu())

        def post_for(i):
            def post(mod, args, output):
                h = output[0] if isinstance(output, (tuple, list)) else output
                got_out[i] = h.detach().float().cpu()

            return post

        handles = [self.layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
        handles += [layer.register_forward_hook(post_for(i)) for i, layer in enumerate(self.layers)]
        try:
            self._forward(ids)
        finally:
            for h in handles:
                h.remove()
        missing = [i for i in range(len(self.layers)) if i not in got_out]
        if missing or not got_in:
            raise RuntimeError(f"decoder hooks did not fire for layers {missing}")
        return got_in[0].numpy(), np.stack([got_out[i].numpy() for i in range(len(self.layers))])

    def activations_decode(self, ids, start: int, *, sublayers: bool = True) -> dict[str, np.ndarray]:
        """Teacher-forced decode through HF's own KV cache: prefill ``ids[:, :start]``, then feed the tokens
        ``start..T-1`` one at a time; the same named points as :meth:`activations`, concatenated over the
        steps on axis 1 (so positions ``start..T-1``)."""
        import torch

        x = self._tensor(ids)
        T = x.shape[1]
        if not 0 < start < T:
            raise ValueError(f"start must be in (0, {T}), got {start}")
        with torch.inference_mode():
            out = self.model(input_ids=x[:, :start], attention_mask=torch.ones_like(x[:, :start]), use_cache=True)
            past = out.past_key_values
            steps = []
            for t in range(start, T):
                got, handles, logits = self._hooked(sublayers)
                try:
                    o = self.model(input_ids=x[:, t:t + 1], attention_mask=torch.ones_like(x[:, :t + 1]),
                                   past_key_values=past, use_cache=True,
                                   cache_position=torch.tensor([t], device=self.device))
                finally:
                    for h in handles:
                        h.remove()
                past = o.past_key_values
                got["logits"] = o.logits.detach().cpu()
                steps.append(got)
        return {k: self._np(torch.cat([s[k] for s in steps], dim=1)) for k in steps[0]}

    @staticmethod
    def _np(v):
        import torch
        # bfloat16/float16 values are exact in float32 (numpy has no bfloat16); float64 stays float64
        return (v.double() if v.dtype == torch.float64 else v.float()).numpy()

    def _hooked(self, sublayers: bool):
        got: dict[str, Any] = {}

        def keep(name):
            def post(mod, args, output):
                h = output[0] if isinstance(output, (tuple, list)) else output
                got[name] = h.detach().cpu()
            return post

        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            got.setdefault("hook_embed", h.detach().cpu())

        handles = [self.layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
        gemma1 = getattr(self.text_config, "model_type", "") == "gemma"
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(keep(f"blocks.{i}.hook_resid_post")))
            if not sublayers:
                continue
            attn = layer.self_attn if gemma1 else getattr(layer, "post_attention_layernorm", None)
            mlp = layer.mlp if gemma1 else getattr(layer, "post_feedforward_layernorm", None)
            if attn is not None:
                handles.append(attn.register_forward_hook(keep(f"blocks.{i}.hook_attn_out")))
            if mlp is not None:
                handles.append(mlp.register_forward_hook(keep(f"blocks.{i}.hook_mlp_out")))
        norm = self._final_norm()
        if norm is not None:
            handles.append(norm.register_forward_hook(keep("ln_final.hook_normalized")))
        return got, handles, None

    def activations(self, ids, *, sublayers: bool = True) -> dict[str, np.ndarray]:
        """One forward; the named points this model exposes through module hooks, in the model's own dtype
        (float64 for a float64 model: no cast to float32 on the way out), as numpy arrays keyed by the
        workbench's tap names: ``hook_embed`` (input to layer 0), ``blocks.{i}.hook_resid_post`` (each
        decoder layer's output), with ``sublayers`` also ``blocks.{i}.hook_attn_out`` / ``hook_mlp_out``
        (the attention and MLP branches as added to the residual: Gemma 1's self_attn / mlp outputs, Gemma
        2-4's post_attention_layernorm / post_feedforward_layernorm outputs), ``ln_final.hook_normalized``
        (the final norm) and ``logits`` (after the final softcap)."""
        got, handles, _ = self._hooked(sublayers)
        _run_hooked(lambda: self._forward(ids), handles, got, len(self.layers))
        return {k: self._np(v) for k, v in got.items()}

    def _final_norm(self):
        """The text decoder's final RMSNorm: the ``norm`` sibling of the decoder layer list."""
        for name, mod in self.model.named_modules():
            if getattr(mod, "layers", None) is self.layers:
                return getattr(mod, "norm", None)
        return None

    def embed(self, ids) -> np.ndarray:
        """The input to decoder layer 0 (scaled token embeddings for Gemma), float32 [B, T, D]."""
        return self._capture(ids)[0]

    def resid_post(self, ids) -> np.ndarray:
        """Every decoder layer's output (residual stream after the layer, before the final norm): [L, B, T, D]."""
        return self._capture(ids)[1]

    # ------------------------------------------------------------------ generation
    def eos_ids(self) -> list[int]:
        """End-of-generation ids (generation config, model config, tokenizer, ``<end_of_turn>``)."""
        ids: set[int] = set()

        def add(v):
            if v is None:
                return
            if isinstance(v, (list, tuple, set)):
                for x in v:
                    add(x)
            else:
                ids.add(int(v))

        gc = getattr(self.model, "generation_config", None)
        add(getattr(gc, "eos_token_id", None))
        add(getattr(self.text_config, "eos_token_id", None))
        try:
            tok = self.tokenizer
            add(tok.eos_token_id)
            eot = tok.convert_tokens_to_ids("<end_of_turn>")
            if isinstance(eot, int) and eot != tok.unk_token_id:
                ids.add(eot)
        except Exception:  # noqa: BLE001 - a tokenizer problem must not break generation
            pass
        return sorted(i for i in ids if 0 <= i < self.vocab_size)

    def _gen_kwargs(self, n: int, ignore_eos: bool) -> dict:
        kw: dict[str, Any] = dict(do_sample=False, max_new_tokens=n, num_beams=1, top_k=None, top_p=None,
                                  temperature=None)
        pad = getattr(getattr(self.model, "generation_config", None), "pad_token_id", None)
        if pad is None:
            pad = getattr(self.text_config, "pad_token_id", None)
        if pad is None:
            pad = (self.eos_ids() or [0])[0]
        kw["pad_token_id"] = pad
        if ignore_eos:
            # Like llama.cpp's --ignore-eos: end-of-generation tokens get -inf, generation runs to n tokens.
            kw["min_new_tokens"] = n
            eos = self.eos_ids()
            if eos:
                kw["suppress_tokens"] = eos
        return kw

    def generate_greedy(self, ids, max_new_tokens: int, ignore_eos: bool = False):
        """Greedy continuation; returns only the new ids (list[int], or list of lists for a batch of B > 1)."""
        import torch

        x = self._tensor(ids)
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                      **self._gen_kwargs(int(max_new_tokens), ignore_eos))
        new = out[:, x.shape[1]:].cpu().tolist()
        return new if _is_nested(ids) else new[0]

    # ------------------------------------------------------------------ throughput
    def _bench_prompt(self, prompt_len: int, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        hi = min(self.vocab_size, 200_000)
        ids = rng.integers(1000 if hi > 2000 else 3, hi, size=prompt_len, dtype=np.int64)
        bos = getattr(self.text_config, "bos_token_id", None)
        if bos is not None and prompt_len > 0:
            ids[0] = int(bos)
        return ids

    def _timed_generate(self, x, gen_len: int, extra: dict) -> tuple[float, float]:
        import torch

        timer = _Timer()
        kw = self._gen_kwargs(gen_len, ignore_eos=True)
        kw.update(extra)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), streamer=timer, **kw)
        t1 = time.perf_counter()
        n_new = out.shape[1] - x.shape[1]
        if n_new != gen_len:
            raise RuntimeError(f"generate produced {n_new} tokens, expected {gen_len}")
        # timer.times[0]: prompt pushed (before prefill); [1]: first new token (after prefill); [-1]: last token.
        t_first = timer.times[1] if len(timer.times) > 1 else t1
        prefill_s = t_first - t0
        decode_s = (t1 - t_first) / max(gen_len - 1, 1)
        return prefill_s, decode_s

    def _bench(self, x, gen_len: int, repeats: int, extra: dict) -> dict:
        # the warm-up is a full run: it pays for compilation, if any
        p_med, d_med = median_timings(lambda n: self._timed_generate(x, n, extra), gen_len, repeats, gen_len)
        return {
            "prefill_tok_s": x.shape[1] / p_med if p_med > 0 else float("inf"),
            "decode_tok_s": 1.0 / d_med if d_med > 0 else float("inf"),
            "prefill_s": p_med,
            "decode_s_per_tok": d_med,
        }

    def bench_decode(self, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3,
                     static_cache_compile: bool = False) -> dict:
        """Prefill and decode throughput of ``generate`` (greedy, EOS ignored, batch 1), medians after a warm-up.

        ``prefill_tok_s`` = prompt_len / (time to the first new token); ``decode_tok_s`` = 1 / mean time per
        further token. With ``static_cache_compile`` also measures generate with a static KV cache compiled by
        transformers itself (:func:`workbench.references.hf_static.bench_generate_static`); a failure lands in
        ``result["static_compile"]["error"]`` instead of raising.
        """
        import torch

        x = torch.from_numpy(self._bench_prompt(int(prompt_len))[None, :]).to(self.device)
        res: dict[str, Any] = {
            "engine": "transformers",
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "prompt_len": int(prompt_len),
            "gen_len": int(gen_len),
            "repeats": int(repeats),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        }
        res.update(self._bench(x, int(gen_len), repeats, {}))
        if static_cache_compile:
            from .hf_static import bench_generate_static
            try:
                res["static_compile"] = bench_generate_static(self, int(prompt_len), int(gen_len), repeats)
            except Exception as e:  # noqa: BLE001 - report, don't crash
                res["static_compile"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        return res


def _is_nested(ids) -> bool:
    if hasattr(ids, "ndim"):
        return ids.ndim == 2
    return isinstance(ids, (list, tuple)) and len(ids) > 0 and isinstance(ids[0], (list, tuple, np.ndarray))


# ---------------------------------------------------------------------------------------------- multimodal
class HFMultimodalReference:
    """Gemma 4 multimodal (``Gemma4ForConditionalGeneration``: vision tower + ``embed_vision``, audio tower +
    ``embed_audio``, text decoder) via Hugging Face transformers, fed *already preprocessed* media (pixel values
    and patch positions, log-mel features and frame mask, the expanded token ids): it checks the towers, the
    projectors and the decoder, not the preprocessing.

    ``dtype``: the dtype to run in (float64 for the anchor). Where HF cannot run a part in that dtype, that part
    alone falls back to float32 (``self.part_dtypes`` says which, ``self.fallback_reasons`` why): transformers
    5.24's audio attention casts q/k/v to float32 (``.float()``) but multiplies by a float64 ``per_dim_scale``,
    so a float64 audio tower raises "expected scalar type Float but found Double". ``float32_parts``: parts to
    run in float32 regardless ("vision", "audio"). The tower's input is cast to float32 and its output back to
    ``dtype`` on the way out, so the projectors and the decoder still run in ``dtype``.
    """

    PARTS = ("vision", "audio")

    def __init__(self, source, dtype="float64", *, float32_parts=()):
        _import_transformers()
        import torch
        from transformers import Gemma4ForConditionalGeneration

        self.source = Path(source).expanduser()
        if not (self.source.is_dir() and (self.source / "config.json").is_file()):
            raise FileNotFoundError(f"{self.source}: the multimodal reference needs an HF checkpoint directory "
                                    "(config.json + safetensors); GGUF files carry no vision/audio towers")
        self.dtype = _torch_dtype(dtype)
        t0 = time.perf_counter()
        self.model = Gemma4ForConditionalGeneration.from_pretrained(
            str(self.source), dtype=self.dtype, attn_implementation="eager").eval()
        self.load_seconds = time.perf_counter() - t0
        inner = self.model.model
        self.towers = {"vision": inner.vision_tower, "audio": inner.audio_tower}
        self.part_dtypes = {p: str(self.dtype).replace("torch.", "") for p, t in self.towers.items() if t is not None}
        self.fallback_reasons: dict[str, str] = {}
        self._cast_handles: list = []
        for p in float32_parts:
            if p not in self.PARTS:
                raise ValueError(f"float32_parts: unknown part {p!r}; use {self.PARTS}")
            if self.towers.get(p) is not None:
                self._to_float32(p, "asked for (float32_parts)")
        self.layers = _find_decoder_layers(self.model)


    def _to_float32(self, part: str, why: str):
        """Run one tower in float32: weights cast, inputs cast in, outputs cast back to the model dtype."""
        import torch
        tower, dt = self.towers[part], self.dtype
        if self.part_dtypes.get(part) == "float32":
            return
        tower.to(torch.float32)

        def pre(mod, args, kwargs):
            cast = lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
            return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

        def post(mod, args, kwargs, out):
            out.last_hidden_state = out.last_hidden_state.to(dt)
            return out
        self._cast_handles += [tower.register_forward_pre_hook(pre, with_kwargs=True),
                               tower.register_forward_hook(post, with_kwargs=True)]
        self.part_dtypes[part] = "float32"
        self.fallback_reasons[part] = why

    def _probe(self, part: str, inputs: dict):
        """Run the tower alone in the model dtype on a tiny input of the same kind (one pooling block of
        patches / a few frames: whether HF runs in a dtype does not depend on the size); where HF cannot,
        fall back to float32 for it."""
        import torch
        if self.part_dtypes.get(part) != str(self.dtype).replace("torch.", "") or self.dtype == torch.float32:
            return
        tower = self.towers[part]
        try:
            with torch.inference_mode():
                if part == "vision":
                    k = tower.config.pooling_kernel_size
                    pv = inputs["pixel_values"][:1, :k * k].clone()
                    gy, gx = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
                    pos = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)[None]
                    tower(pixel_values=pv, pixel_position_ids=pos)
                else:
                    n = min(inputs["input_features"].shape[1], 48)
                    tower(inputs["input_features"][:1, :n], torch.ones_like(inputs["input_features_mask"][:1, :n]))
        except RuntimeError as e:
            self._to_float32(part, f"HF's {part} tower does not run in {self.part_dtypes[part]}: "
                                   f"{type(e).__name__}: {e}".splitlines()[0][:200])

    def activations(self, input_ids, mm_token_type_ids, pixel_values=None, image_position_ids=None,
                    input_features=None, input_features_mask=None) -> dict[str, np.ndarray]:
        """One forward; returns HF's values at the workbench's tap names, as HF lays them out:
        ``vision.hook_patch_embed`` / ``vision.blocks.{i}.hook_resid_post`` [n_img, P, Dv] (padded patches
        included), ``vision.hook_pooled`` [n_img, S, Dv] (the pooler's output, before standardisation),
        ``vision.hook_out`` and ``embed_vision.hook_out`` [sum of soft tokens, D] (padding stripped, images
        concatenated), ``audio.hook_subsample`` / ``audio.blocks.{i}.hook_resid_post`` [n_aud, T, Da],
        ``audio.hook_out`` [n_aud, T, Do], ``embed_audio.hook_out`` [n_aud, T, D] (padded frames included;
        ``audio.mask`` [n_aud, T] says which are real), and the text decoder's ``hook_embed``,
        ``blocks.{i}.hook_attn_out`` / ``hook_mlp_out`` / ``hook_resid_post``, ``ln_final.hook_normalized``,
        ``logits`` [1, T, ...]."""
        import torch
        dt = self.dtype
        t = lambda a, d=None: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(d) if d else \
            torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        ids = t(_as_batch(input_ids))
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=t(mm_token_type_ids),
                      use_cache=False)
        if pixel_values is not None:
            inputs.update(pixel_values=t(pixel_values, dt), image_position_ids=t(image_position_ids))
            self._probe("vision", inputs)
        if input_features is not None:
            inputs.update(input_features=t(input_features, dt), input_features_mask=t(input_features_mask))
            self._probe("audio", inputs)
        got: dict[str, Any] = {}

        def keep(name, index=None):
            def post(mod, args, output):
                h = output[index] if index is not None else (
                    output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output))
                got[name] = h.detach().cpu()
            return post

        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            got.setdefault("hook_embed", h.detach().cpu())

        inner = self.model.model
        handles = []
        vt, at = inner.vision_tower, inner.audio_tower
        if pixel_values is not None and vt is not None:
            handles.append(vt.patch_embedder.register_forward_hook(keep("vision.hook_patch_embed")))
            for i, layer in enumerate(vt.encoder.layers):
                handles.append(layer.register_forward_hook(keep(f"vision.blocks.{i}.hook_resid_post")))
            handles.append(vt.pooler.register_forward_hook(keep("vision.hook_pooled", 0)))
            handles.append(vt.register_forward_hook(keep("vision.hook_out")))
            handles.append(inner.embed_vision.register_forward_hook(keep("embed_vision.hook_out")))
        if input_features is not None and at is not None:
            handles.append(at.subsample_conv_projection.register_forward_hook(keep("audio.hook_subsample", 0)))
            handles.append(at.subsample_conv_projection.register_forward_hook(keep("audio.mask", 1)))
            for i, layer in enumerate(at.layers):
                handles.append(layer.register_forward_hook(keep(f"audio.blocks.{i}.hook_resid_post")))
            handles.append(at.output_proj.register_forward_hook(keep("audio.hook_out")))
            handles.append(inner.embed_audio.register_forward_hook(keep("embed_audio.hook_out")))
        handles.append(self.layers[0].register_forward_pre_hook(pre, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(keep(f"blocks.{i}.hook_resid_post")))
            for mod, name in ((getattr(layer, "post_attention_layernorm", None), "hook_attn_out"),
                              (getattr(layer, "post_feedforward_layernorm", None), "hook_mlp_out")):
                if mod is not None:
                    handles.append(mod.register_forward_hook(keep(f"blocks.{i}.{name}")))
        norm = getattr(inner.language_model, "norm", None)
        if norm is not None:
            handles.append(norm.register_forward_hook(keep("ln_final.hook_normalized")))
        def run():
            with torch.inference_mode():
                return self.model(**inputs)
        _run_hooked(run, handles, got, len(self.layers))
        return {k: (v.numpy() if v.dtype == torch.bool else _np_out(v)) for k, v in got.items()}


def _np_out(v):
    """float64 stays float64; anything else (float32, bf16/f16: exact in float32) -> float32 numpy."""
    import torch
    return (v.double() if v.dtype == torch.float64 else v.float()).numpy()

"""Notebook support: ``run_notebook`` (papermill) and the small helpers the notebooks share.

The notebooks in ``notebooks/`` are thin: every cell calls into the library (``wb.compare``, ``wb.bench``,
``wb.load``) or into the helpers here. Nothing here touches a model's internals except through its public
surface — ``forward`` with taps and hooks, ``config``, ``tokenizer`` — plus one read of the final-norm
weight and the (tied) head, which the logit lens needs (``final_head``).

    from workbench.notebooks import run_notebook
    run_notebook("parity", {"model": "fixtures/gemma3_text", "prompt": [1, 2, 3, 4]})
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
DEFAULT_MODEL = "gemma3-270m"


class NotebookError(ValueError):
    """Unknown notebook, unknown parameter names, or no usable kernel."""


# ============================================================================ running notebooks
def available_notebooks() -> dict[str, Path]:
    """{name: path} of the notebooks shipped in notebooks/."""
    return {p.stem: p for p in sorted(NOTEBOOK_DIR.glob("*.ipynb"))}


def notebook_path(name: str | os.PathLike) -> Path:
    """A notebook name ("parity") or a path to an .ipynb file -> its path."""
    s = str(name)
    p = Path(os.path.expanduser(s))
    if s.endswith(".ipynb") or os.sep in s:
        if p.is_file():
            return p
        raise NotebookError(f"notebook {s!r}: no such file")
    nbs = available_notebooks()
    if s in nbs:
        return nbs[s]
    raise NotebookError(f"unknown notebook {s!r}; available: {', '.join(nbs) or '(none)'} "
                        f"(in {NOTEBOOK_DIR}), or pass a path to an .ipynb file")


def parameters_cell(path: str | os.PathLike) -> tuple[int, str]:
    """(index, source) of the one cell tagged ``parameters``."""
    nb = json.loads(Path(path).read_text())
    found = [(i, c) for i, c in enumerate(nb.get("cells", []))
             if "parameters" in (c.get("metadata", {}).get("tags") or [])]
    if len(found) != 1:
        raise NotebookError(f"{path}: expected exactly one cell tagged 'parameters', found {len(found)}")
    i, c = found[0]
    src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
    return i, src


def notebook_parameters(name: str | os.PathLike) -> dict:
    """The parameters of a notebook with their default values (literal defaults evaluated, others as source)."""
    _, src = parameters_cell(notebook_path(name))
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    try:
                        out[t.id] = ast.literal_eval(node.value)
                    except ValueError:
                        out[t.id] = ast.get_source_segment(src, node.value)
    return out


def _kernel_manager_class():
    """An AsyncKernelManager that runs a ``python``-spec kernel on this interpreter and lets it import
    workbench from this checkout (PYTHONPATH), whatever the working directory."""
    from jupyter_client.manager import AsyncKernelManager

    class WorkbenchKernelManager(AsyncKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            if cmd and Path(cmd[0]).name.startswith("python") and self.kernel_name == "python3":
                cmd[0] = sys.executable
            return cmd

        async def _async_pre_start_kernel(self, **kw):
            env = dict(kw.pop("env", None) or os.environ)
            pp = env.get("PYTHONPATH", "")
            if str(REPO_ROOT) not in pp.split(os.pathsep):
                env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
            env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
            kw["env"] = env
            return await super()._async_pre_start_kernel(**kw)

    return WorkbenchKernelManager


def kernel_python(kernel: str = "python3") -> str:
    """The interpreter the named kernel runs on when started by ``run_notebook``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel as e:
        raise NotebookError(f"no Jupyter kernel named {kernel!r}") from e
    exe = spec.argv[0]
    if kernel == "python3" and Path(exe).name.startswith("python"):
        return sys.executable
    if exe in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        return sys.executable   # jupyter_client substitutes the running interpreter for a bare name
    return exe


def ensure_kernel(kernel: str = "python3") -> str:
    """Make sure ``kernel`` exists; for python3, install ipykernel's spec into this environment when there
    is none. Returns the interpreter it runs on."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        if kernel != "python3":
            names = ", ".join(sorted(KernelSpecManager().find_kernel_specs())) or "(none)"
            raise NotebookError(f"no Jupyter kernel named {kernel!r}; installed: {names}")
        try:
            from ipykernel import kernelspec
        except ImportError as e:
            raise NotebookError("ipykernel is not installed: pip install 'gemma-workbench[notebooks]'") from e
        kernelspec.install(prefix=sys.prefix, kernel_name="python3")
    return kernel_python(kernel)


def run_notebook(name: str | os.PathLike, params: dict | None = None, output: str | os.PathLike | None = None,
                 kernel: str = "python3", cwd: str | os.PathLike | None = None, timeout: float | None = None,
                 log_output: bool = False, progress: bool = False) -> Path:
    """Execute notebooks/<name>.ipynb (or a path) with papermill and return the executed notebook's path.

    params: values for the names in the notebook's ``parameters`` cell (anything else is an error that
    lists the valid names). output: where to write the executed notebook (default
    ./out/notebooks/<name>-<timestamp>.ipynb). kernel: a Jupyter kernel name; "python3" runs on this
    interpreter. timeout: per-cell limit in seconds."""
    src = notebook_path(name)
    params = dict(params or {})
    valid = notebook_parameters(src)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise NotebookError(f"notebook {src.stem!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                            f"valid parameters: {', '.join(valid)}")
    try:
        import papermill as pm
    except ImportError as e:
        raise NotebookError("papermill is not installed: pip install 'gemma-workbench[notebooks]'") from e
    ensure_kernel(kernel)
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = Path("out") / "notebooks" / f"{src.stem}-{stamp}.ipynb"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(src), str(output), parameters=params, kernel_name=kernel,
                        progress_bar=progress, log_output=log_output, cwd=str(cwd) if cwd else None,
                        execution_timeout=timeout, kernel_manager_class=_kernel_manager_class())
    return output


# ============================================================================ parameters -> arguments
def default_backends() -> list[str]:
    """The backends usable here (``wb.backends.available()``)."""
    from .backends import base
    return list(base.available())


def as_list(v, default=None) -> list | None:
    """A parameter that may be given as a list, a comma string or None."""
    if v is None or v == "all":
        return default
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            return list(json.loads(s))
        return [x.strip() for x in s.split(",") if x.strip()]
    return list(v)


def as_prompt(prompt):
    """A parameter prompt: text, a list of token ids, or a JSON/comma string of ids -> text or list[int]."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        s = prompt.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                return [int(i) for i in json.loads(s)]
            except (ValueError, TypeError):
                return prompt
        if s and all(p.strip().lstrip("-").isdigit() for p in s.split(",")) and "," in s:
            return [int(p) for p in s.split(",")]
        return prompt
    return [int(i) for i in np.asarray(prompt).reshape(-1)]


def token_ids(model, prompt, max_tokens: int | None = None) -> list[int]:
    """Token ids for a prompt: ids pass through; text goes through the model's tokenizer."""
    p = as_prompt(prompt)
    if p is None:
        from .parity import DEFAULT_PROMPT
        p = DEFAULT_PROMPT
    if isinstance(p, str):
        if model.tokenizer is None:
            raise NotebookError(f"{getattr(model, 'source', 'this model')} has no tokenizer: pass the prompt as "
                                "token ids (a list of ints)")
        p = list(model.tokenizer.encode(p))
    return p[:max_tokens] if max_tokens else p


def token_labels(model, ids: Iterable[int]) -> list[str]:
    """Readable labels for token ids: the decoded piece where there is a tokenizer, else #id."""
    out = []
    tok = getattr(model, "tokenizer", None)
    for i in ids:
        i = int(i)
        s = None
        if tok is not None:
            try:
                s = tok.decode([i])
            except Exception:
                s = None
        out.append(repr(s)[1:-1] if s is not None else f"#{i}")
    return out


def output_dir(path) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def save_json(path, obj) -> Path:
    """JSON with numpy scalars/arrays and NaN made plain (NaN/inf -> null)."""
    def clean(o):
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating, float)):
            f = float(o)
            return f if np.isfinite(f) else None
        if isinstance(o, (np.bool_,)):
            return bool(o)
        return o
    p = Path(path)
    p.write_text(json.dumps(clean(obj), indent=1, default=str))
    return p


# ============================================================================ parity pictures
def parity_figures(frame, metric: str = "rel_max", tap: str = "hook_resid_post",
                   phase: str = "prefill") -> dict[str, object]:
    """Per-layer Δ heatmaps of a parity frame: layers x backends for ``tap`` and layers x taps per target
    (failing cells outlined, tolerance in the title). Returns {png filename: figure}."""
    from .parity import heatmap
    figs = {}
    df = frame[frame["layer"].notna()]
    if df.empty:
        return figs
    if (df["tap"] == tap).any():
        figs[f"parity_{phase}_{metric}_by_backend.png"] = heatmap(frame, metric=metric, by="backends", tap=tap,
                                                                   phase=phase)
    for (b, d), _ in df.groupby(["backend", "dtype"], sort=False):
        name = f"parity_{phase}_{metric}_{b.replace(':', '-')}_{d}.png"
        figs[name] = heatmap(frame, metric=metric, by="taps", backend=b, dtype=d, phase=phase)
    return figs


# ============================================================================ throughput pictures
def throughput_figure(frame, title: str | None = None):
    """Prefill and decode tokens/s per backend (bars) with the memory-bandwidth ceiling of decode marked:
    ceiling tok/s = bandwidth limit / bytes read per step (= decode tok/s x limit / achieved GB/s); a third
    panel shows achieved GB/s against the device limit. Log scale where the limit is decades away."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    df = frame[frame["status"] == "ok"].copy() if "status" in frame else frame.copy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    if df.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "no measured rows", ha="center", va="center")
            ax.set_axis_off()
        return fig
    if "impl" not in df:
        df["impl"] = "workbench"
    df["label"] = df["backend"] + "\n" + df["dtype"] + np.where(df["impl"] != "workbench", "\n(" + df["impl"] + ")", "")
    x = np.arange(len(df))
    colors = ["#4c72b0" if i == "workbench" else "#999999" for i in df["impl"]]
    fmt = FuncFormatter(lambda v, _: f"{v:g}")

    def panel(ax, values, limits, name, note=None):
        values = np.asarray(values, dtype=float)
        ax.bar(x, values, color=colors)
        lim = np.asarray([np.nan if v is None else float(v) for v in limits], dtype=float)
        if np.isfinite(lim).any():
            for xi, c in zip(x, lim):
                if np.isfinite(c):
                    ax.plot([xi - 0.4, xi + 0.4], [c, c], color="crimson", lw=2.2)
            ax.plot([], [], color="crimson", lw=2.2, label="bandwidth limit")
            ax.legend(loc="upper right", fontsize=8)
            pos = values[values > 0]
            if pos.size and np.nanmax(lim) / pos.min() > 30:
                ax.set_yscale("log")
            ax.set_ylim(top=np.nanmax(lim) * (3 if ax.get_yscale() == "log" else 1.15))
        elif np.isfinite(values).any():
            ax.set_ylim(top=np.nanmax(values) * 1.15)
        for xi, v, n in zip(x, values, note if note is not None else [None] * len(x)):
            if np.isfinite(v):
                ax.annotate(f"{v:.3g}" + (f"\n{n}" if n else ""), (xi, v), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        ax.yaxis.set_major_formatter(fmt)
        ax.set_title(name)
        ax.set_xticks(x, df["label"], fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    panel(axes[0], df["prefill_tok_s"], [None] * len(df), f"prefill (pp{int(df['prompt_len'].iloc[0])}) tok/s")
    frac = [f"{100 * f:.0f}% of limit" if f is not None and np.isfinite(float(f)) else None
            for f in (df["bw_fraction"] if "bw_fraction" in df else [None] * len(df))]
    panel(axes[1], df["decode_tok_s"], _decode_ceiling(df), f"decode (tg{int(df['gen_len'].iloc[0])}) tok/s", frac)
    panel(axes[2], df["gbps"] if "gbps" in df else np.full(len(df), np.nan),
          df["bw_limit_gbps"] if "bw_limit_gbps" in df else [None] * len(df), "decode achieved GB/s")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _decode_ceiling(df) -> list:
    out = []
    for _, r in df.iterrows():
        g, lim, tps = r.get("gbps"), r.get("bw_limit_gbps"), r.get("decode_tok_s")
        try:
            out.append(float(tps) * float(lim) / float(g) if g and lim and float(g) > 0 else None)
        except (TypeError, ValueError):
            out.append(None)
    return out


# ============================================================================ logit lens
def final_head(model) -> tuple[np.ndarray, np.ndarray]:
    """(final-norm scale, head [V, D]) as float32 numpy: the norm weight with Gemma's (1 + w) offset already
    applied (as the model keeps it), and lm_head or the tied embedding."""
    cache = getattr(model, "_nb_final_head", None)
    if cache is not None:
        return cache
    w, ops = model.w, model.ops
    norm = np.asarray(ops.numpy(w["norm.weight"]), dtype=np.float32)
    head = np.asarray(ops.numpy(w.get("lm_head.weight", w["embed_tokens.weight"])), dtype=np.float32)
    try:
        model._nb_final_head = (norm, head)
    except AttributeError:
        pass
    return norm, head


def unembed(model, resid: np.ndarray) -> np.ndarray:
    """ln_final + head (+ final softcap) applied in numpy to residual-stream vectors [..., D] -> logits."""
    cfg = model.config
    norm, head = final_head(model)
    x = np.asarray(resid, dtype=np.float32)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_norm_eps) * norm
    logits = x @ head.T
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = np.tanh(logits / cap) * cap
    return logits


def logit_lens(model, ids, k: int = 5, positions=None, layers=None, out=None):
    """Top-k tokens per layer: the final norm and the head applied to each layer's hook_resid_post.

    Returns a DataFrame (layer, position, rank, token_id, token, logit, prob); layer == n_layers is the
    model's own output (so the last lens layer matches the logits). ``out``: a forward output that already
    has blocks.*.hook_resid_post and logits (else one forward is run)."""
    import pandas as pd
    ids = token_ids(model, ids) if not isinstance(ids, np.ndarray) else ids.reshape(-1).tolist()
    L = model.config.num_hidden_layers
    if out is None:
        out = model.forward(ids, taps=["blocks.*.hook_resid_post"])
    T = len(ids)
    pos = list(range(T)) if positions is None else [p % T for p in np.atleast_1d(positions)]
    lay = list(range(L)) if layers is None else [int(i) for i in np.atleast_1d(layers)]
    rows = []
    for i in lay + [L]:
        if i == L:
            lg = np.asarray(out.logits, dtype=np.float32)[0, pos]
        else:
            lg = unembed(model, out.taps[f"blocks.{i}.hook_resid_post"][0, pos])
        z = lg - lg.max(-1, keepdims=True)
        pr = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        kk = min(k, lg.shape[-1])
        part = np.argpartition(-lg, kk - 1, axis=-1)[:, :kk]
        top = np.take_along_axis(part, np.argsort(-np.take_along_axis(lg, part, -1), axis=-1), -1)
        for j, p in enumerate(pos):
            labels = token_labels(model, top[j])
            for r, t in enumerate(top[j]):
                rows.append(dict(layer=i, position=p, rank=r, token_id=int(t), token=labels[r],
                                 logit=float(lg[j, t]), prob=float(pr[j, t])))
    return pd.DataFrame(rows)


@contextlib.contextmanager
def _quiet_glyphs():
    """Token labels may hold characters the default font lacks (CJK ...): drawn as boxes, without warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font")
        yield


def lens_table(lens, position: int, value: str = "token"):
    """layers x rank table of the lens at one position (token labels with probabilities)."""
    d = lens[lens["position"] == position].copy()
    d["cell"] = d["token"] + " (" + (100 * d["prob"]).round(1).astype(str) + "%)"
    t = d.pivot(index="layer", columns="rank", values="cell" if value == "token" else value)
    t.index = [("out" if i == lens["layer"].max() else str(i)) for i in t.index]
    return t


def lens_figure(lens, labels=None, title: str = "logit lens: top-1 token per layer"):
    """A layers x positions grid of the top-1 token, coloured by its probability; ``labels``: the input
    tokens, shown under the positions."""
    import matplotlib.pyplot as plt
    top = lens[lens["rank"] == 0]
    piv_p = top.pivot(index="layer", columns="position", values="prob")
    piv_t = top.pivot(index="layer", columns="position", values="token")
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * piv_p.shape[1], 0.9 + 0.3 * piv_p.shape[0]))
    im = ax.imshow(piv_p.to_numpy(float), aspect="auto", cmap="Blues", vmin=0, vmax=1)
    for (yy, xx), t in np.ndenumerate(piv_t.to_numpy()):
        ax.text(xx, yy, str(t)[:8], ha="center", va="center", fontsize=7,
                color="white" if piv_p.to_numpy(float)[yy, xx] > 0.6 else "black")
    Lmax = lens["layer"].max()
    ax.set_yticks(range(piv_p.shape[0]), ["out" if i == Lmax else str(i) for i in piv_p.index])
    ax.set_xticks(range(piv_p.shape[1]), [f"{c}\n{str(labels[c])[:8]}" if labels is not None and c < len(labels)
                                          else str(c) for c in piv_p.columns], fontsize=7)
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer (resid_post)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="p(top-1)")
    with _quiet_glyphs():
        fig.tight_layout()
    return fig


# ============================================================================ attention
def attention_patterns(model, ids, layers=None) -> dict[int, np.ndarray]:
    """{layer: pattern [H, T, S]} from blocks.{i}.attn.hook_pattern (batch 0)."""
    L = model.config.num_hidden_layers
    lay = range(L) if layers is None else [int(i) for i in np.atleast_1d(layers)]
    out = model.forward(token_ids(model, ids), taps=[f"blocks.{i}.attn.hook_pattern" for i in lay])
    return {i: out.taps[f"blocks.{i}.attn.hook_pattern"][0] for i in lay}


def pattern_figure(pattern: np.ndarray, labels=None, title: str = "attention pattern", query: int | None = None):
    """One small map per head: rows = query positions, columns = key positions (token labels on the axes
    when there are few tokens); ``query`` marks a row."""
    import matplotlib.pyplot as plt
    H, T = pattern.shape[0], pattern.shape[1]
    show = labels is not None and len(labels) == T and T <= 32
    size = 2.4 if not show else 3.2
    fig, axes = plt.subplots(1, H, figsize=(size * H + 0.8, size + (0.9 if show else 0.3)), squeeze=False)
    for h in range(H):
        ax = axes[0, h]
        ax.imshow(pattern[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=9)
        if show:
            short = [str(t)[:8] for t in labels]
            ax.set_xticks(range(pattern.shape[2] if pattern.shape[2] == T else 0),
                          short if pattern.shape[2] == T else [], rotation=90, fontsize=6)
            ax.set_yticks(range(T), short if h == 0 else [""] * T, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        if query is not None:
            ax.axhline(query % T, color="red", lw=0.8)
    fig.suptitle(title, fontsize=10)
    with _quiet_glyphs():
        fig.tight_layout()
    return fig


def patching_figure(curves: dict, labels=None, position: int | None = None):
    """{backend: patching_sweep frame} as one line per backend (they should lie on top of each other)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for i, (b, df) in enumerate(curves.items()):
        ax.plot(df["layer"], df["restored"], marker="o", ms=4 + 3 * (len(curves) - 1 - i), label=b, alpha=0.8)
    first = next(iter(curves.values()))
    ax.set_xticks(list(first["layer"]))
    ax.set_xlabel(f"layer patched ({first['tap'].iloc[0]} at the corrupted position)")
    ax.set_ylabel("share of the corruption's KL")
    ax.grid(alpha=0.3)
    ax.legend()
    what = f"token {position}" + (f" {labels[position]!r}" if labels is not None and position is not None else "")
    ax.set_title(f"activation patching: {what} corrupted", fontsize=10)
    with _quiet_glyphs():
        fig.tight_layout()
    return fig


# ============================================================================ interventions
def ablation_hook(mode: str = "zero", positions=None, heads=None) -> Callable:
    """A hook that ablates its point: mode "zero" or "mean" (mean over positions), optionally only at some
    positions (axis 1) and, for attn.hook_z/q/k/v ([B, T, H, D]), some heads (axis 2). Plain numpy, so the
    same function works on every backend."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablation mode {mode!r}: use 'zero' or 'mean'")

    def hook(x, name):
        y = np.asarray(x)
        if heads is not None and y.ndim != 4:
            raise ValueError(f"heads= needs a [B, T, H, D] point (attn.hook_z/q/k/v), not {name}")
        mask = np.ones(y.shape[:3] if heads is not None else y.shape[:2], dtype=bool)
        if positions is not None:
            keep = np.zeros(y.shape[1], dtype=bool)
            keep[np.atleast_1d(positions)] = True
            mask &= keep.reshape((1, -1) + (1,) * (mask.ndim - 2))
        if heads is not None:
            hk = np.zeros(y.shape[2], dtype=bool)
            hk[np.atleast_1d(heads)] = True
            mask &= hk.reshape(1, 1, -1)
        mask = mask.reshape(mask.shape + (1,) * (y.ndim - mask.ndim))
        fill = 0.0 if mode == "zero" else y.mean(axis=1, keepdims=True)
        return np.where(mask, fill, y).astype(y.dtype)
    hook.__qualname__ = f"ablation_hook({mode!r}, positions={positions}, heads={heads})"
    return hook


def patch_hook(source: np.ndarray, positions=None) -> Callable:
    """Activation patching: replace the point's value (at ``positions``, or everywhere) with ``source``
    (the same point tapped on another input)."""
    src = np.asarray(source)

    def hook(x, name):
        if src.shape != x.shape:
            raise ValueError(f"patch for {name}: source shape {src.shape} != {x.shape}")
        y = np.array(x, copy=True)
        if positions is None:
            y[...] = src
        else:
            p = np.atleast_1d(positions)
            y[:, p] = src[:, p]
        return y
    return hook


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logsm(np.asarray(p_logits, np.float64)), logsm(np.asarray(q_logits, np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def intervention(models: dict, ids, hooks: dict, position: int = -1):
    """Run the same hooks on every model (one per backend) and measure their effect.

    Returns (per_backend DataFrame, cross DataFrame, logits dict). per_backend: the effect of the hooks on
    each backend (max|Δlogit| at ``position``, KL(clean‖hooked), top-1 before/after). cross: for each pair of
    backends, how far apart their hooked logits and their effects (hooked - clean) are — an intervention
    written once in numpy should give the same answer everywhere, up to float32 rounding."""
    import pandas as pd
    rows, logits = [], {}
    ids_l = None
    for b, m in models.items():
        ids_l = token_ids(m, ids) if ids_l is None else ids_l
        last = position % len(ids_l) == len(ids_l) - 1      # only the last position's logits are needed
        p = -1 if last else position
        clean = np.asarray(m.forward(ids_l, last_only=last).logits, np.float64)[0, p]
        hooked = np.asarray(m.forward(ids_l, hooks=hooks, last_only=last).logits, np.float64)[0, p]
        logits[b] = (clean, hooked)
        rows.append(dict(backend=b, dtype=m.dtype, hooks=", ".join(hooks), position=position % len(ids_l),
                         effect_max_abs=float(np.abs(hooked - clean).max()), kl=_kl(clean, hooked),
                         top1_clean=int(np.argmax(clean)), top1_hooked=int(np.argmax(hooked)),
                         top1_changed=bool(np.argmax(clean) != np.argmax(hooked))))
    cross = []
    names = list(models)
    for a_i in range(len(names)):
        for b_i in range(a_i + 1, len(names)):
            a, b = names[a_i], names[b_i]
            (ca, ha), (cb, hb) = logits[a], logits[b]
            ea, eb = ha - ca, hb - cb
            scale = max(np.abs(ha).max(), 1e-30)
            escale = max(np.abs(ea).max(), 1e-30)
            cross.append(dict(a=a, b=b, hooked_max_abs=float(np.abs(ha - hb).max()),
                              hooked_rel=float(np.abs(ha - hb).max() / scale),
                              effect_max_abs=float(np.abs(ea - eb).max()),
                              effect_rel=float(np.abs(ea - eb).max() / escale),
                              same_top1=bool(np.argmax(ha) == np.argmax(hb))))
    return pd.DataFrame(rows), pd.DataFrame(cross), logits


def patching_sweep(model, clean_ids, corrupt_ids, tap: str = "hook_resid_pre", position: int | None = None):
    """Activation patching over layers: for each layer, patch ``blocks.{i}.<tap>`` of the clean run (at
    ``position``, default all) with the corrupted run's value; report KL(clean‖patched) at the last position
    and how much of the corrupted run's shift it restores (1 = patched output equals the corrupted one)."""
    import pandas as pd
    L = model.config.num_hidden_layers
    clean_ids, corrupt_ids = token_ids(model, clean_ids), token_ids(model, corrupt_ids)
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError("clean and corrupted prompts must have the same length")
    names = [f"blocks.{i}.{tap}" for i in range(L)]
    cor = model.forward(corrupt_ids, taps=names, last_only=True)
    clean = np.asarray(model.forward(clean_ids, last_only=True).logits, np.float64)[0, -1]
    corrupt = np.asarray(cor.logits, np.float64)[0, -1]
    base = _kl(clean, corrupt)
    rows = []
    for i, n in enumerate(names):
        out = model.forward(clean_ids, hooks={n: patch_hook(cor.taps[n], positions=position)}, last_only=True)
        pl = np.asarray(out.logits, np.float64)[0, -1]
        kl = _kl(clean, pl)
        rows.append(dict(layer=i, tap=tap, position=position, kl_clean_patched=kl, kl_clean_corrupt=base,
                         restored=kl / base if base > 0 else float("nan"), top1=int(np.argmax(pl))))
    return pd.DataFrame(rows)


# ============================================================================ models and per-layer Δ
_MODEL_CACHE: dict = {}


def load_models(source, backends, dtype: str = "float32") -> dict:
    """{backend: model} for one source and dtype, cached per (source, backend, dtype)."""
    from .loader import load
    out = {}
    for b in backends:
        key = (str(source), b, dtype)
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load(source, backend=b, dtype=dtype, progress=False)
        out[b] = _MODEL_CACHE[key]
    return out


EXPLORE_TAPS = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.*.attn.hook_q", "blocks.*.attn.hook_k",
                "blocks.*.attn.hook_v", "blocks.*.attn.hook_z", "blocks.*.hook_attn_out", "blocks.*.hook_resid_mid",
                "blocks.*.mlp.hook_post", "blocks.*.hook_mlp_out", "blocks.*.hook_resid_post",
                "ln_final.hook_normalized", "logits"]


def choose_layer(cfg, layer) -> int:
    L = cfg.num_hidden_layers
    return L // 2 if layer is None else int(layer) % L


# ============================================================================ the interactive explorer
def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    with _quiet_glyphs():
        fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


class LayerExplorer:
    """ipywidgets explorer: model / backend / dtype pickers, layer slider, tap and token selectors.

    Shows the per-layer Δ heatmap across backends (from a parity frame; recomputed with wb.compare when
    the model or dtype changes), the logit lens at the selected token, the attention pattern of the selected
    layer, and an ablation control whose hook runs on every backend with the cross-backend difference.

    Pictures and tables live in Image and HTML widgets whose values ``render()`` replaces — no Output widget,
    so a headless run (papermill/nbclient, which has to mimic Output widgets) just records the initial state
    drawn by the constructor. ``error`` holds the traceback of a failed render (None when it drew)."""

    METRICS = ["rel_max", "rel_l2", "nmse", "max_abs"]

    def __init__(self, source, backends, dtype, ids, frame=None, layer=None, tap="hook_resid_post",
                 token=-1, k=5, models_choices=None, references=()):
        import ipywidgets as W
        self.source, self.backends, self.dtype = str(source), list(backends), dtype
        self.ids = list(ids)
        self.k = k
        self.references = references
        self.error = None
        self.last: dict = {}
        self._frames = {}
        if frame is not None:
            self._frames[(self.source, dtype)] = frame
        models = self._models()
        cfg = next(iter(models.values())).config
        L = cfg.num_hidden_layers
        self.labels = token_labels(next(iter(models.values())), self.ids)
        choices = list(dict.fromkeys([self.source] + list(models_choices or [])))
        from .backends.base import DTYPES
        self.w_model = W.Dropdown(options=choices, value=self.source, description="model")
        self.w_backend = W.Dropdown(options=self.backends, value=self.backends[0], description="backend")
        self.w_dtype = W.Dropdown(options=[d for d in DTYPES if d != "float64"], value=dtype, description="dtype")
        self.w_layer = W.IntSlider(value=choose_layer(cfg, layer), min=0, max=L - 1, description="layer",
                                   continuous_update=False)
        taps = ["hook_resid_post", "hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_mid",
                "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "mlp.hook_post"]
        self.w_tap = W.Dropdown(options=taps, value=tap if tap in taps else taps[0], description="tap")
        self.w_token = W.Dropdown(options=[(f"{i}: {t}", i) for i, t in enumerate(self.labels)],
                                  value=int(token) % len(self.ids), description="token")
        self.w_metric = W.Dropdown(options=self.METRICS, value="rel_max", description="metric")
        self.w_ablate = W.Dropdown(options=["none", "zero", "mean"], value="zero", description="ablate")
        self.w_ablate_tap = W.Dropdown(options=["hook_mlp_out", "hook_attn_out", "hook_resid_post",
                                                "mlp.hook_post", "attn.hook_z"], value="hook_mlp_out",
                                       description="at")
        self.status = W.HTML()
        self.img_heatmap = W.Image(format="png")
        self.img_pattern = W.Image(format="png")
        self.html_lens = W.HTML()
        self.html_ablation = W.HTML()
        for w in (self.w_model, self.w_backend, self.w_dtype, self.w_layer, self.w_tap, self.w_token,
                  self.w_metric, self.w_ablate, self.w_ablate_tap):
            w.observe(self._on_change, names="value")
        self.widget = W.VBox([
            W.HBox([self.w_model, self.w_backend, self.w_dtype]),
            W.HBox([self.w_layer, self.w_tap, self.w_token]),
            W.HBox([self.w_metric, self.w_ablate, self.w_ablate_tap]),
            self.status,
            W.HBox([self.img_heatmap, self.html_lens]),
            self.img_pattern,
            self.html_ablation])
        self.render()

    # ---------------------------------------------------------------- data
    def _models(self, source=None, dtype=None):
        return load_models(source or self.source, self.backends, dtype or self.dtype)

    def frame(self, source=None, dtype=None):
        """The per-layer parity frame of (source, dtype) over the explorer's backends (cached)."""
        key = (source or self.source, dtype or self.dtype)
        if key not in self._frames:
            from .parity import compare
            rep = compare(key[0], backends=self.backends, dtypes=[key[1]], prompt=self.ids, taps=EXPLORE_TAPS,
                          decode_steps=0, references=self.references, store=False, progress=False)
            self._frames[key] = rep.to_frame()
        return self._frames[key]

    def _on_change(self, change):
        if getattr(self, "_quiet", False):
            return
        if change["owner"] is self.w_model or change["owner"] is self.w_dtype:
            self.source, self.dtype = self.w_model.value, self.w_dtype.value
            if change["owner"] is self.w_model:
                self._quiet = True
                try:
                    self._adapt_to_model()
                except Exception as e:
                    self.status.value = f"<span style='color:crimson'>{type(e).__name__}: {e}</span>"
                    return
                finally:
                    self._quiet = False
        self.render()

    def _adapt_to_model(self):
        """A new model: the layer slider follows its depth; token ids outside its vocabulary wrap around."""
        self.status.value = f"<i>loading {self.source} ...</i>"
        m = next(iter(self._models().values()))
        L, V = m.config.num_hidden_layers, m.config.vocab_size
        if any(i >= V for i in self.ids):
            self.ids = [i % V for i in self.ids]
            self.status.value = f"<i>token ids taken modulo the vocabulary ({V})</i>"
        self.labels = token_labels(m, self.ids)
        pos = self.w_token.value
        self.w_token.options = [(f"{i}: {t}", i) for i, t in enumerate(self.labels)]
        self.w_token.value = pos % len(self.ids)
        self.w_layer.value = min(self.w_layer.value, L - 1)
        self.w_layer.max = L - 1

    # ---------------------------------------------------------------- drawing
    def render(self) -> dict:
        """Draw the current selection into the widgets; returns (and keeps in ``last``) what was shown."""
        from .parity import heatmap
        layer, tap, pos = self.w_layer.value, self.w_tap.value, self.w_token.value
        backend, metric = self.w_backend.value, self.w_metric.value
        self.error = None
        self.status.value = "<i>computing ...</i>"
        try:
            models = self._models()
            m = models[backend]
            fig = heatmap(self.frame(), metric=metric, by="backends", tap=tap, phase="prefill")
            fig.axes[0].axhline(layer, color="lime", lw=1.2, ls="--")
            self.img_heatmap.value = figure_png(fig)
            lens = logit_lens(m, self.ids, k=self.k, positions=[pos])
            self.html_lens.value = (f"<b>logit lens</b> ({backend} {self.dtype}) at token {pos} "
                                    f"<code>{self.labels[pos]}</code>; selected layer {layer}"
                                    + lens_table(lens, pos).to_html())
            pat = attention_patterns(m, self.ids, layers=[layer])[layer]
            self.img_pattern.value = figure_png(pattern_figure(pat, title=f"layer {layer} attention ({backend})",
                                                              query=pos))
            self.last = dict(layer=layer, tap=tap, token=pos, backend=backend, metric=metric,
                             lens_top1=lens[lens["rank"] == 0][["layer", "token_id"]].values.tolist())
            if self.w_ablate.value != "none":
                name = f"blocks.{layer}.{self.w_ablate_tap.value}"
                per, cross, _ = intervention(models, self.ids, {name: ablation_hook(self.w_ablate.value)},
                                             position=pos)
                self.html_ablation.value = (f"<b>{self.w_ablate.value}-ablation of <code>{name}</code></b> — the "
                                            "same numpy hook on every backend" + per.to_html(index=False)
                                            + ("<b>difference between backends</b>" + cross.to_html(index=False)
                                               if len(cross) else ""))
                self.last["ablation"] = dict(point=name, per_backend=per.to_dict("records"),
                                             cross=cross.to_dict("records"))
            else:
                self.html_ablation.value = ""
            self.status.value = ""
        except Exception as e:  # keep the UI alive; show the problem (and keep it for a headless check)
            import traceback
            self.error = "".join(traceback.format_exception(e))
            self.status.value = f"<span style='color:crimson'>{type(e).__name__}: {e}</span>"
        return self.last

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


def explorer(*args, **kw) -> LayerExplorer:
    return LayerExplorer(*args, **kw)


def model_choices() -> list[str]:
    """Registered model names and the fixture checkpoints of this checkout (for the model picker)."""
    out = []
    try:
        from .weights import registry
        out += list(registry.names())
    except Exception:
        pass
    fx = REPO_ROOT / "fixtures"
    if fx.is_dir():
        out += [str(p) for p in sorted(fx.iterdir()) if (p / "config.json").exists()]
    return out


# ============================================================================ history across runs
def open_store(db=None):
    from . import runs
    return runs.RunStore(db)


def bench_history(store, model: str | None = None, threshold: float = 0.10, metric: str = "decode_tok_s"):
    """One row per (bench run, backend, dtype, impl) with ``metric`` over time, and ``regression`` flagged
    where a point falls more than ``threshold`` below the best earlier point of the same series (same model,
    backend, dtype, impl, prompt_len, gen_len)."""
    import pandas as pd
    runs_df = store.list(kind="bench", model=model) if model else store.list(kind="bench")
    parts = []
    for rid in (runs_df["run_id"] if len(runs_df) else []):
        try:
            run = store.load(rid)
        except Exception:
            continue
        rows = run.rows
        if rows is None or len(rows) == 0 or metric not in rows:
            continue
        r = rows[rows["status"] == "ok"].copy() if "status" in rows else rows.copy()
        r["run_id"] = rid
        r["model"] = run.meta.get("model")
        r["created_at"] = run.meta.get("created_at")
        parts.append(r)
    if not parts:
        return pd.DataFrame(columns=["run_id", "created_at", "model", "backend", "dtype", "impl", metric,
                                     "series", "best_before", "change", "regression"])
    h = pd.concat(parts, ignore_index=True)
    if "impl" not in h:
        h["impl"] = "workbench"
    h["created_at"] = pd.to_datetime(h["created_at"], utc=True, errors="coerce", format="mixed")
    h = h.sort_values("created_at", kind="stable").reset_index(drop=True)
    key = ["model", "backend", "dtype", "impl"] + [c for c in ("prompt_len", "gen_len") if c in h]
    h["series"] = h["backend"] + " " + h["dtype"] + np.where(h["impl"] != "workbench", " (" + h["impl"] + ")", "")
    h["best_before"] = h.groupby(key, dropna=False)[metric].transform(lambda s: s.shift(1).cummax())
    h["change"] = h[metric] / h["best_before"] - 1.0
    h["regression"] = (h["change"] < -threshold).fillna(False).astype(bool)
    return h


def history_figure(hist, metric: str = "decode_tok_s", title: str | None = None):
    """decode tok/s per series over time; regressions (vs the best earlier run) as red crosses."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.2))
    if hist is None or hist.empty:
        ax.text(0.5, 0.5, "no benchmark history", ha="center", va="center")
        ax.set_axis_off()
        return fig
    for s, g in hist.groupby("series"):
        ax.plot(g["created_at"], g[metric], marker="o", label=s)
    bad = hist[hist["regression"]]
    if len(bad):
        ax.scatter(bad["created_at"], bad[metric], marker="x", s=90, color="crimson", zorder=5, label="regression")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"{metric} across runs", fontsize=10)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def save_figures(figs: dict, out_dir, show: bool = True) -> list[Path]:
    """Save {filename: figure} as PNGs into out_dir, close them, and (in a notebook) display the PNGs."""
    import matplotlib.pyplot as plt
    od = output_dir(out_dir)
    paths = []
    for name, fig in figs.items():
        p = od / name
        with _quiet_glyphs():
            fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    if show:
        try:
            from IPython.display import Image, display
            for p in paths:
                display(Image(filename=str(p)))
        except ImportError:
            pass
    return paths


def run_bench(*args, **kwargs):
    """``wb.bench`` — robust to ``workbench.bench`` (the submodule) having replaced the function of the same
    name on the package once it was imported (a second ``wb.bench(...)`` in one process would then fail)."""
    import workbench as wb
    fn = wb.bench
    if not callable(fn):
        fn = fn.bench
    return fn(*args, **kwargs)

"""The layer explorer: an ipywidgets UI over one model on several backends (notebooks/explore_layers.ipynb).

Model / backend / dtype pickers, a prompt box (kept per model), layer slider, tap and token selectors; it shows
the per-layer Δ across backends (a parity frame, cached per model, dtype and prompt), the logit lens at the
selected token, the attention pattern of the selected layer with token labels, a zero/mean ablation whose
numpy hook runs on every backend (with the cross-backend difference), and activation patching from a clean
run into a corrupted one, per layer, measured on a logit difference.

Every control's callback is a plain method, so the logic runs (and is tested) without a browser: set a
widget's ``value`` and the explorer re-renders; ``last`` holds what was shown and ``error`` the traceback of a
failed render.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

from . import interp, plots

REPO_ROOT = Path(__file__).resolve().parent.parent

EXPLORE_TAPS = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.*.attn.hook_q", "blocks.*.attn.hook_k",
                "blocks.*.attn.hook_v", "blocks.*.attn.hook_z", "blocks.*.hook_attn_out", "blocks.*.hook_resid_mid",
                "blocks.*.mlp.hook_post", "blocks.*.hook_mlp_out", "blocks.*.hook_resid_post",
                "ln_final.hook_normalized", "logits"]
PATCH_TAPS = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
FALLBACK_PROMPT_LEN = 16


# ============================================================================ progress of long steps
class StepProgress:
    """Progress of a few long steps (loading a model per backend, a parity run): a bar and a line of text,
    displayed at once in a notebook (before the widget it precedes exists); plain lines on stderr elsewhere.
    ``steps`` keeps (message, seconds since start) of every step."""

    def __init__(self, total: int, title: str = "", show: bool = True):
        self.total, self.title, self.i = max(1, int(total)), title, 0
        self.t0 = time.perf_counter()
        self.steps: list[tuple[str, float]] = []
        self.widget = None
        try:
            import ipywidgets as W
            self.bar = W.FloatProgress(value=0, min=0, max=self.total, description=title[:20],
                                       layout=W.Layout(width="320px"))
            self.label = W.HTML("<i>starting ...</i>")
            self.widget = W.HBox([self.bar, self.label])
        except ImportError:
            self.bar = self.label = None
        self.shown = False
        if show:
            self.show()

    def show(self):
        if self.widget is None or not _in_notebook():
            return
        from IPython.display import display
        display(self.widget)
        self.shown = True

    def step(self, what: str):
        """Start the next step (the bar shows how many are done, the text what runs now)."""
        t = time.perf_counter() - self.t0
        self.steps.append((what, t))
        self.i = min(self.i + 1, self.total)
        msg = f"[{self.i}/{self.total}] {what} ({t:.1f}s)"
        if self.label is not None:
            self.bar.max = max(self.bar.max, self.i)
            self.bar.value = self.i - 1
            self.label.value = f"<i>{msg} ...</i>"
        if not self.shown:
            print(msg, file=sys.stderr, flush=True)

    def stage(self, name: str):
        """Start the next step and return a ``fn(i, n, what)`` progress callback for a library call that
        reports its own sub-steps (``wb.compare(..., progress=p.stage("parity"))``): the bar moves within the
        step, the text says which sub-step finished."""
        self.step(name)
        base = self.i - 1

        def sub(i, n, what):
            t = time.perf_counter() - self.t0
            self.steps.append((f"{name}: {what}", t))
            if self.label is not None:
                self.bar.value = base + min(1.0, i / max(1, n))
                self.label.value = f"<i>[{self.i}/{self.total}] {name}: {i}/{n} done ({what}) ({t:.1f}s) ...</i>"
            if not self.shown:
                print(f"  {name} [{i}/{n}] {what} ({t:.1f}s)", file=sys.stderr, flush=True)
        return sub

    def done(self, what: str = "ready"):
        t = time.perf_counter() - self.t0
        self.steps.append((what, t))
        if self.label is not None:
            self.bar.value = self.bar.max
            self.bar.bar_style = "success"
            self.label.value = f"{what} ({t:.1f}s)"
        if not self.shown:
            print(f"{what} ({t:.1f}s)", file=sys.stderr, flush=True)

    def __call__(self, what: str):
        self.step(what)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
        ip = get_ipython()
        return ip is not None and hasattr(ip, "kernel")
    except ImportError:
        return False


# ============================================================================ models
_MODEL_CACHE: dict = {}


def load_models(source, backends, dtype: str = "float32", progress=None) -> dict:
    """{backend: model} for one source and dtype, cached per (source, backend, dtype). ``progress``: a
    callable told ``"loading <source> on <backend> (<dtype>)"`` before each load that is not cached."""
    from .loader import load
    out = {}
    for b in backends:
        key = (str(source), b, dtype)
        if key not in _MODEL_CACHE:
            if progress is not None:
                progress(f"loading {source} on {b} ({dtype})")
            _MODEL_CACHE[key] = load(source, backend=b, dtype=dtype, progress=False)
        out[b] = _MODEL_CACHE[key]
    return out


def choose_layer(cfg, layer) -> int:
    L = cfg.num_hidden_layers
    return L // 2 if layer is None else int(layer) % L


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


def prompt_text(ids, text: str | None = None) -> str:
    """What the prompt box shows: the user's text where there is one, else the ids comma-separated."""
    return text if text is not None else ", ".join(str(int(i)) for i in ids)


def _parse_token(model, s: str) -> int | None:
    """A target/foil token typed by the user: blank (None: the default), an id (``123`` or ``#123``), or a
    text that is exactly one token under the model's tokenizer."""
    raw = s or ""
    s = raw.strip()
    if not s:
        return None
    if s.lstrip("#").isdigit():
        i = int(s.lstrip("#"))
        if not 0 <= i < model.config.vocab_size:
            raise interp.PromptError(f"token id {i} is outside the vocabulary [0, {model.config.vocab_size})")
        return i
    if model.tokenizer is None:
        raise interp.PromptError(f"{s!r}: this model has no tokenizer, give a token id")
    ids = list(model.tokenizer.encode(raw))       # as typed: " Berlin" and "Berlin" are different tokens
    ids = [i for i in ids if i != getattr(model.config, "bos_token_id", None)]
    if len(ids) != 1:
        raise interp.PromptError(f"{raw!r} is {len(ids)} tokens, not one: {ids}")
    return ids[0]


# ============================================================================ the interactive explorer
class LayerExplorer:
    """ipywidgets explorer over one source on ``backends`` (see the module docstring).

    source/backends/dtype: the first model shown. ids: its prompt (token ids, or text when the model has a
    tokenizer; ``prompt`` is the same argument by name). frame: a parity frame of exactly this (source, dtype,
    prompt), to skip one compare. The prompt is kept per model: switching to a model that cannot take it
    (ids outside its vocabulary, text without a tokenizer) gives that model its own prompt, and switching back
    restores the user's. progress: a StepProgress (or callable) told about slow steps before the widget
    exists; afterwards the status line shows them."""

    METRICS = ["rel_max", "rel_l2", "nmse", "max_abs"]
    TAPS = ["hook_resid_post", "hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_mid",
            "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "mlp.hook_post"]
    ABLATE_TAPS = ["hook_mlp_out", "hook_attn_out", "hook_resid_post", "mlp.hook_post", "attn.hook_z"]

    def __init__(self, source, backends, dtype, ids=None, frame=None, layer=None, tap="hook_resid_post",
                 token=-1, k=5, models_choices=None, references=(), prompt=None, progress=None,
                 patching: bool = False, patch_tap: str = "hook_resid_pre", corrupt_position=None,
                 ablate: str = "zero", ablate_tap: str = "hook_mlp_out"):
        import ipywidgets as W
        from .backends.base import DTYPES
        self.source, self.backends, self.dtype = str(source), list(backends), dtype
        self.k, self.references = k, references
        self.error = None
        self.last: dict = {}
        self._progress = progress
        self._frames: dict = {}
        self._patches: dict = {}
        self._prompts: dict[str, list[int]] = {}      # the prompt of each model, as the user left it
        self._texts: dict[str, str | None] = {}       # the text it came from (None: given as ids)
        self._quiet = False
        m = self._first_model()
        given = prompt if prompt is not None else ids
        if given is None and m.tokenizer is None:
            given = list(range(3, 3 + min(FALLBACK_PROMPT_LEN, m.config.vocab_size - 3)))
        self._set_prompt(self.source, m, given)
        if frame is not None:
            self._frames[(self.source, dtype, tuple(self.ids))] = frame
        cfg = m.config
        L = cfg.num_hidden_layers
        self.labels = interp.token_labels(m, self.ids)
        choices = list(dict.fromkeys([self.source] + [str(c) for c in (models_choices or [])]))
        self.w_model = W.Dropdown(options=choices, value=self.source, description="model")
        self.w_backend = W.Dropdown(options=self.backends, value=self.backends[0], description="backend")
        self.w_dtype = W.Dropdown(options=[d for d in DTYPES if d != "float64"], value=dtype, description="dtype")
        self.w_prompt = W.Text(value=prompt_text(self.ids, self._texts[self.source]), description="prompt",
                               continuous_update=False, layout=W.Layout(width="720px"))
        self.w_layer = W.IntSlider(value=choose_layer(cfg, layer), min=0, max=L - 1, description="layer",
                                   continuous_update=False)
        self.w_tap = W.Dropdown(options=self.TAPS, value=tap if tap in self.TAPS else self.TAPS[0], description="tap")
        self.w_token = W.Dropdown(options=self._token_options(), value=int(token) % len(self.ids),
                                  description="token")
        self.w_metric = W.Dropdown(options=self.METRICS, value="rel_max", description="metric")
        self.w_ablate = W.Dropdown(options=["none", "zero", "mean"], value=ablate, description="ablate")
        self.w_ablate_tap = W.Dropdown(options=self.ABLATE_TAPS, value=ablate_tap, description="at")
        self.w_patch = W.Checkbox(value=bool(patching), description="activation patching", indent=False)
        self.w_patch_tap = W.Dropdown(options=PATCH_TAPS, value=patch_tap if patch_tap in PATCH_TAPS else PATCH_TAPS[0],
                                      description="patch")
        cpos = len(self.ids) // 2 if corrupt_position is None else int(corrupt_position) % len(self.ids)
        self.w_corrupt = W.Dropdown(options=self._token_options(), value=cpos, description="corrupt")
        self.w_target = W.Text(value="", placeholder="default: clean top-1", description="target",
                               continuous_update=False)
        self.w_foil = W.Text(value="", placeholder="default: corrupted top-1", description="foil",
                             continuous_update=False)
        self.status = W.HTML()
        self.img_heatmap = W.Image(format="png")
        self.img_pattern = W.Image(format="png")
        self.img_patch = W.Image(format="png")
        self.html_lens = W.HTML()
        self.html_ablation = W.HTML()
        self.html_patch = W.HTML()
        for w in self._controls():
            w.observe(self._on_change, names="value")
        self.widget = W.VBox([
            W.HBox([self.w_model, self.w_backend, self.w_dtype]),
            self.w_prompt,
            W.HBox([self.w_layer, self.w_tap, self.w_token]),
            W.HBox([self.w_metric, self.w_ablate, self.w_ablate_tap]),
            W.HBox([self.w_patch, self.w_patch_tap, self.w_corrupt, self.w_target, self.w_foil]),
            self.status,
            W.HBox([self.img_heatmap, self.html_lens]),
            self.img_pattern,
            self.html_ablation,
            W.HBox([self.img_patch, self.html_patch])])
        self.widget.add_class("wb-layer-explorer")
        self.render()

    def _controls(self):
        return (self.w_model, self.w_backend, self.w_dtype, self.w_prompt, self.w_layer, self.w_tap, self.w_token,
                self.w_metric, self.w_ablate, self.w_ablate_tap, self.w_patch, self.w_patch_tap, self.w_corrupt,
                self.w_target, self.w_foil)

    # ---------------------------------------------------------------- data
    def _say(self, what: str):
        """A slow step: to the progress given at construction until the widget exists, then the status line."""
        if hasattr(self, "status"):
            self.status.value = f"<i>{what} ...</i>"
        elif self._progress is not None:
            self._progress(what)

    def _models(self, source=None, dtype=None):
        return load_models(source or self.source, self.backends, dtype or self.dtype, progress=self._say)

    def _first_model(self, source=None):
        return self._models(source)[self.backends[0]]

    @property
    def ids(self) -> list[int]:
        """The current model's prompt (token ids)."""
        return self._prompts[self.source]

    def _set_prompt(self, source, model, prompt):
        """Make ``prompt`` (text or ids) the prompt of ``source``; a clear error when the model cannot take
        it (text without a tokenizer, ids outside the vocabulary)."""
        p = interp.as_prompt(prompt)
        text = p if isinstance(p, str) else None
        ids = interp.token_ids(model, p)
        if not ids:
            raise interp.PromptError("the prompt is empty")
        V = model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise interp.PromptError(f"token id(s) {bad[:5]} outside the vocabulary of {source} [0, {V})")
        self._prompts[source], self._texts[source] = list(ids), text

    def _prompt_for_new_model(self, source, model) -> str:
        """A first prompt for a model the user has not given one: the current text when the new model has a
        tokenizer, the current ids when they fit its vocabulary, else ids 3, 4, ... of a fixed length (a
        model without a tokenizer takes ids only). Returns what the status line should say."""
        text, ids = self._texts.get(self.source), self.ids
        if text is not None and model.tokenizer is not None:
            self._set_prompt(source, model, text)
            return ""
        if text is None and all(i < model.config.vocab_size for i in ids):
            self._set_prompt(source, model, ids)
            return ""
        n = min(FALLBACK_PROMPT_LEN, model.config.vocab_size - 3)
        self._set_prompt(source, model, list(range(3, 3 + n)))
        why = "has no tokenizer" if model.tokenizer is None else f"has a vocabulary of {model.config.vocab_size}"
        return (f"{source} {why}: it gets its own prompt (token ids 3..{2 + n}); type another in the prompt box. "
                f"The prompt of {self.source} is kept for when you switch back.")

    def frame(self, source=None, dtype=None, ids=None):
        """The per-layer parity frame of (source, dtype, prompt) over the explorer's backends (cached)."""
        source, dtype = source or self.source, dtype or self.dtype
        ids = list(ids if ids is not None else self._prompts[source])
        key = (source, dtype, tuple(ids))
        if key not in self._frames:
            from .parity import compare
            what = f"comparing {source} ({dtype}) on {', '.join(self.backends)} with float64"
            self._say(what)
            rep = compare(source, backends=self.backends, dtypes=[dtype], prompt=ids, taps=EXPLORE_TAPS,
                          decode_steps=0, references=self.references, store=False,
                          progress=lambda i, n, done: self._say(f"{what}: {i}/{n} done ({done})"))
            self._frames[key] = rep.to_frame()
        return self._frames[key]

    def _token_options(self):
        return [(f"{i}: {t}", i) for i, t in enumerate(self.labels)]

    # ---------------------------------------------------------------- callbacks
    def _on_change(self, change):
        if self._quiet:
            return
        owner = change["owner"]
        try:
            self._quiet = True
            if owner is self.w_model:
                self._switch_model(self.w_model.value)
            elif owner is self.w_dtype:
                self.dtype = self.w_dtype.value
            elif owner is self.w_prompt:
                self._set_prompt(self.source, self._first_model(), self.w_prompt.value)
                self._sync_prompt_widgets()
        except Exception as e:
            self.error = "".join(traceback.format_exception(e))
            self.status.value = f"<span style='color:crimson'>{type(e).__name__}: {e}</span>"
            return
        finally:
            self._quiet = False
        note = getattr(self, "_note", "")
        self._note = ""
        self.render()
        if note and not self.error:
            self.status.value = f"<i>{note}</i>"

    def _switch_model(self, source):
        """A new model: its own remembered prompt (or a first one it can take), the layer slider follows its
        depth."""
        self._say(f"loading {source}")
        m = self._first_model(source)
        note = ""
        if source not in self._prompts:
            note = self._prompt_for_new_model(source, m)
        self.source = source
        self._note = note
        self._sync_prompt_widgets()
        L = m.config.num_hidden_layers
        if self.w_layer.value > L - 1:
            self.w_layer.value = L - 1
        self.w_layer.max = L - 1

    def _sync_prompt_widgets(self):
        """Prompt box, token labels and position pickers after the prompt (or the model) changed."""
        m = self._first_model()
        self.labels = interp.token_labels(m, self.ids)
        self.w_prompt.value = prompt_text(self.ids, self._texts[self.source])
        T = len(self.ids)
        for w in (self.w_token, self.w_corrupt):
            pos = w.value if w.value is not None else T - 1
            w.options = self._token_options()
            w.value = min(pos, T - 1)

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
            ids, labels = self.ids, self.labels
            fig = heatmap(self.frame(), metric=metric, by="backends", tap=tap, phase="prefill")
            fig.axes[0].axhline(layer, color="lime", lw=1.2, ls="--")
            self.img_heatmap.value = plots.figure_png(fig)
            lens = interp.logit_lens(m, ids, k=self.k, positions=[pos])
            self.html_lens.value = (f"<b>logit lens</b> ({backend} {self.dtype}) at token {pos} "
                                    f"<code>{labels[pos]}</code>; selected layer {layer}"
                                    + interp.lens_table(lens, pos).to_html())
            pat = interp.attention_patterns(m, ids, layers=[layer])[layer]
            self.img_pattern.value = plots.figure_png(plots.pattern_figure(
                pat, labels, title=f"layer {layer} attention ({backend})", query=pos))
            self.last = dict(model=self.source, token_ids=list(ids), labels=list(labels), layer=layer, tap=tap,
                             token=pos, backend=backend, metric=metric,
                             lens_top1=lens[lens["rank"] == 0][["layer", "token_id"]].values.tolist(),
                             pattern_labels=list(labels))
            self._render_ablation(models, layer, pos)
            self._render_patching(models)
            self.status.value = ""
        except Exception as e:  # keep the UI alive; show the problem (and keep it for a headless check)
            self.error = "".join(traceback.format_exception(e))
            self.status.value = f"<span style='color:crimson'>{type(e).__name__}: {e}</span>"
        return self.last

    def _render_ablation(self, models, layer, pos):
        if self.w_ablate.value == "none":
            self.html_ablation.value = ""
            return
        name = f"blocks.{layer}.{self.w_ablate_tap.value}"
        per, cross, _ = interp.intervention(models, self.ids, {name: interp.ablation_hook(self.w_ablate.value)},
                                            position=pos)
        cols = ["backend", "dtype", "position", "token", "effect_max_abs", "kl", "top1_clean_token",
                "top1_hooked_token", "top1_changed"]
        self.html_ablation.value = (f"<b>{self.w_ablate.value}-ablation of <code>{name}</code></b> — the same "
                                    "numpy hook on every backend; next token at position "
                                    f"{pos} <code>{self.labels[pos]}</code>"
                                    + per[cols].to_html(index=False)
                                    + ("<b>difference between backends</b>" + cross.to_html(index=False)
                                       if len(cross) else ""))
        self.last["ablation"] = dict(point=name, per_backend=per.to_dict("records"), cross=cross.to_dict("records"))

    def _render_patching(self, models):
        if not self.w_patch.value:
            self.img_patch.value, self.html_patch.value = b"", ""
            self.last.pop("patching", None)
            return
        m0 = models[self.backends[0]]
        cpos, ptap = self.w_corrupt.value, self.w_patch_tap.value
        corrupt = interp.corrupt_prompt(self.ids, cpos, m0.config.vocab_size)
        target, foil = _parse_token(m0, self.w_target.value), _parse_token(m0, self.w_foil.value)
        if target is None or foil is None:
            t, f = interp.logit_pair(m0, self.ids, corrupt)
            target, foil = (t if target is None else target), (f if foil is None else foil)
        key = (self.source, self.dtype, tuple(self.ids), cpos, ptap, target, foil)
        if key not in self._patches:
            self._say(f"patching {ptap} from the clean into the corrupted run, layer by layer")
            self._patches[key] = {b: interp.patch_logit_diff(m, self.ids, corrupt, target=target, foil=foil,
                                                             tap=ptap, position=cpos) for b, m in models.items()}
        curves = self._patches[key]
        tl, fl = interp.token_labels(m0, [target, foil])
        c_lab = interp.token_labels(m0, [corrupt[cpos]])[0]
        title = (f"patching {ptap} clean→corrupted at {cpos}: {self.labels[cpos]!r}→{c_lab!r}\n"
                 f"logit diff {tl!r} − {fl!r} at the last position")
        self.img_patch.value = plots.figure_png(plots.patching_figure(curves, self.labels, cpos, title=title))
        first = next(iter(curves.values()))
        tbl = first[["layer", "logit_diff", "restored"]].copy()
        for b, df in curves.items():
            tbl[f"restored {b}"] = df["restored"].to_numpy()
        self.html_patch.value = (f"<b>activation patching</b>: token {cpos} <code>{self.labels[cpos]}</code> → "
                                 f"<code>{c_lab}</code>; logit diff <code>{tl}</code> − <code>{fl}</code>: clean "
                                 f"{first['clean_diff'].iloc[0]:.3f}, corrupted {first['corrupt_diff'].iloc[0]:.3f}"
                                 + tbl.drop(columns=["restored"]).to_html(index=False, float_format="%.3f"))
        self.last["patching"] = dict(tap=ptap, position=cpos, corrupt_ids=corrupt, target=target, foil=foil,
                                     target_token=tl, foil_token=fl,
                                     curves={b: df.to_dict("records") for b, df in curves.items()})

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


def explorer(*args, **kw) -> LayerExplorer:
    return LayerExplorer(*args, **kw)

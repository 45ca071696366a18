"""Notebook support: running the shipped notebooks with papermill, and the helpers their cells share.

The notebooks in ``notebooks/`` are thin: every cell calls into the library (``wb.compare``, ``wb.bench``,
``wb.load``) or into helpers, which live by concern and are re-exported here (``nb.logit_lens`` etc. keep
working):

* ``workbench.interp``   — prompts, logit lens, attention patterns, ablation and patching hooks and their effects;
* ``workbench.plots``    — the figures (heatmaps per target, throughput, lens, attention, patching, history);
* ``workbench.explorer`` — the ipywidgets layer explorer and its model cache;
* here                   — papermill (parameters, kernel, errors), parameter parsing, output folders, bench history.

Executed notebooks and their pictures go under the user data dir (``output_root()``), never into the
checkout, unless ``output``/``output_dir`` say otherwise.

    from workbench.notebooks import run_notebook
    run_notebook("parity", {"model": "fixtures/gemma3_text", "prompt": [1, 2, 3, 4]})
"""
from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .explorer import (_MODEL_CACHE, EXPLORE_TAPS, LayerExplorer, StepProgress, choose_layer, explorer,  # noqa: F401
                       load_models, model_choices)
from .interp import (PromptError, ablation_hook, as_prompt, attention_patterns, corrupt_prompt,  # noqa: F401
                     intervention, lens_table, logit_diff, logit_lens, logit_pair, patch_hook,
                     patch_logit_diff, patching_sweep, token_ids, token_labels, unembed)
from .plots import (_quiet_glyphs, figure_png, history_figure, lens_figure, parity_figures,  # noqa: F401
                    patching_figure, pattern_figure, save_figures, throughput_figure)

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
DEFAULT_MODEL = "gemma3-270m"


class NotebookError(ValueError):
    """Unknown notebook, unknown parameter names, or no usable kernel."""


class NotebookCellError(NotebookError):
    """A cell of an executed notebook raised: the cell's source and the error, without the kernel's traceback
    (kept in ``traceback``; the executed notebook with every output so far is at ``output``)."""

    def __init__(self, notebook: str, cell_index: int, exec_count, source: str, ename: str, evalue: str,
                 traceback: list[str], output: Path):
        self.notebook, self.cell_index, self.exec_count = notebook, cell_index, exec_count
        self.source, self.ename, self.evalue = source, ename, evalue
        self.traceback, self.output = traceback, output
        src = "\n".join("    " + line for line in (source or "").rstrip().splitlines())
        super().__init__(f"notebook {notebook!r} failed in cell {cell_index} of the executed notebook (In [{exec_count}]):\n{src}\n"
                         f"{ename}: {evalue}\n(the executed notebook, outputs so far: {output})")


# ============================================================================ running notebooks
def available_notebooks() -> dict[str, Path]:
    """{name: path} of the shipped notebooks (``workbench.resources``: the wheel's package data or the
    checkout's notebooks/)."""
    from . import resources
    try:
        return resources.notebooks()
    except resources.ResourceError:
        return {}


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
    from . import resources
    try:
        where = resources.notebook_dir()
    except resources.ResourceError as e:
        where = e
    raise NotebookError(f"unknown notebook {s!r}; available: {', '.join(nbs) or '(none)'} "
                        f"(in {where}), or pass a path to an .ipynb file")


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
    return notebook_parameters_from_source(src)


def notebook_parameters_from_source(src: str) -> dict:
    """The names assigned in a parameters cell's source, with their literal values (else their source)."""
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


def user_data_dir() -> Path:
    """``<user data dir>/gemma-workbench``: ``$XDG_DATA_HOME`` (default ``~/.local/share``) on Linux,
    ``~/Library/Application Support`` on macOS, ``%LOCALAPPDATA%`` on Windows (where the results store lives
    by default, see ``workbench.runs.default_path``)."""
    home, xdg = Path.home(), os.environ.get("XDG_DATA_HOME")
    base = {"darwin": home / "Library" / "Application Support",
            "win32": Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")}.get(
        sys.platform, Path(xdg) if xdg and os.path.isabs(xdg) else home / ".local" / "share")
    return base / "gemma-workbench"


def output_root() -> Path:
    """Where executed notebooks and their pictures go by default: ``<user data dir>/gemma-workbench/notebooks``."""
    return user_data_dir() / "notebooks"


def run_notebook(name: str | os.PathLike, params: dict | None = None, output: str | os.PathLike | None = None,
                 kernel: str = "python3", cwd: str | os.PathLike | None = None, timeout: float | None = None,
                 log_output: bool = False, progress: bool = False) -> Path:
    """Execute notebooks/<name>.ipynb (or a path) with papermill and return the executed notebook's path.

    params: values for the names in the notebook's ``parameters`` cell (anything else is an error that
    lists the valid names). output: where to write the executed notebook (default
    ``output_root()/<name>-<timestamp>.ipynb``); its pictures go to the folder of the same name beside it
    unless ``output_dir`` is given. kernel: a Jupyter kernel name; "python3" runs on this interpreter.
    timeout: per-cell limit in seconds. A cell that raises -> NotebookCellError (its source and the error)."""
    src = notebook_path(name)
    params = dict(params or {})
    valid = notebook_parameters(src)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise NotebookError(f"notebook {src.stem!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                            f"valid parameters: {', '.join(valid)}")
    try:
        import papermill as pm
        from papermill.exceptions import PapermillExecutionError
    except ImportError as e:
        raise NotebookError("papermill is not installed: pip install 'gemma-workbench[notebooks]'") from e
    ensure_kernel(kernel)
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = output_root() / f"{src.stem}-{stamp}.ipynb"
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    if "output_dir" in valid and params.get("output_dir") is None:
        params["output_dir"] = str(output.with_suffix(""))
    try:
        pm.execute_notebook(str(src), str(output), parameters=params, kernel_name=kernel,
                            progress_bar=progress, log_output=log_output, cwd=str(cwd) if cwd else None,
                            execution_timeout=timeout, kernel_manager_class=_kernel_manager_class())
    except PapermillExecutionError as e:
        raise NotebookCellError(src.stem, e.cell_index, e.exec_count, e.source, e.ename, e.evalue,
                                e.traceback, output) from None
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


def output_dir(path=None, name: str = "notebook") -> Path:
    """The folder a notebook writes its pictures to (created): ``path``, or ``output_root()/<name>`` when
    path is None."""
    p = Path(path).expanduser() if path is not None else output_root() / name
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


# ============================================================================ progress of a library run
def progress_bar(title: str = "run"):
    """A ``progress=`` callback for ``wb.compare`` / ``wb.bench`` / ``wb.diverge`` in a notebook cell
    (``fn(done, total, what)``, see ``workbench.progress``): a widget bar with the step that just finished, shown
    in the cell; where there is no notebook frontend (a script), "title [i/N] what" lines on stderr instead."""
    return StepProgress(1, title).stage(title)


# ============================================================================ history across runs
# TODO(issue 18): bench history belongs to workbench.bench; it stays here until bench.py (owned by the decode
# work) takes it. dashboards/_logic.py imports it from here.
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


def run_bench(*args, **kwargs):
    """``workbench.bench.bench`` — taken from the module, so it works even where the package attribute
    ``wb.bench`` has become the submodule (a reloaded ``workbench.bench``)."""
    from .bench import bench
    return bench(*args, **kwargs)

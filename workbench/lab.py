"""``workbench lab``: JupyterLab on the layer explorer, bound to loopback, without dirtying the checkout.

The server runs on a *working copy* of the shipped notebook under the user data dir
(``<user data dir>/gemma-workbench/lab/``), so outputs, autosaves and ``.ipynb_checkpoints/`` land there, not
in ``notebooks/``. The working copy is made once and then kept (your edits survive a restart); ``fresh=True``
(``--fresh``) starts over from the shipped notebook, and parameters (``-p NAME VALUE``) write a fresh copy
with a papermill-style "injected-parameters" cell after the notebook's parameters cell.

    workbench lab                                   # http://127.0.0.1:8888/lab/tree/explore_layers.ipynb?token=...
    workbench lab --port 9000 -p model '"fixtures/gemma3_text"' -p prompt '[3, 4, 5, 6, 7, 8]'

From Python (the browser test does this): ``server = start(params=..., workdir=tmp)``, then ``server.url``;
``server.stop()``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_NOTEBOOK = "explore_layers"
DEFAULT_PORT = 8888
HOST = "127.0.0.1"


class LabError(RuntimeError):
    """JupyterLab missing, a port that is taken, or a server that did not come up."""


def workdir_default() -> Path:
    """``<user data dir>/gemma-workbench/lab``: where the working copies live."""
    from .notebooks import user_data_dir
    return user_data_dir() / "lab"


def shipped_notebook(name: str = DEFAULT_NOTEBOOK) -> Path:
    """The shipped notebook (from the installed package or the checkout)."""
    from .notebooks import notebook_path
    return notebook_path(name)


def _inject(nbj: dict, params: dict) -> dict:
    """Add an ``injected-parameters`` cell after the cell tagged ``parameters`` (what papermill does), so
    the notebook runs with these values from "Run All". Unknown names are an error listing the valid ones."""
    from .notebooks import NotebookError
    cells = nbj["cells"]
    idx = [i for i, c in enumerate(cells) if "parameters" in (c.get("metadata", {}).get("tags") or [])]
    if len(idx) != 1:
        raise NotebookError(f"expected exactly one cell tagged 'parameters', found {len(idx)}")
    from .notebooks import notebook_parameters_from_source
    valid = notebook_parameters_from_source("".join(cells[idx[0]]["source"]))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise NotebookError(f"the notebook has no parameter(s) {', '.join(map(repr, unknown))}; valid parameters: "
                            f"{', '.join(valid)}")
    # the kernel runs in the working copy's folder: paths relative to here (-p model fixtures/x) made absolute
    params = {k: os.path.abspath(v) if isinstance(v, str) and not os.path.isabs(v) and os.path.exists(v) else v
              for k, v in params.items()}
    src = "# Parameters (workbench lab -p)\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items()) + "\n"
    cell = {"cell_type": "code", "execution_count": None, "id": "injected-parameters",
            "metadata": {"tags": ["injected-parameters"]}, "outputs": [], "source": src.splitlines(True)}
    cells[:] = [c for c in cells if "injected-parameters" not in (c.get("metadata", {}).get("tags") or [])]
    cells.insert(idx[0] + 1, cell)
    return nbj


def prepare(notebook: str = DEFAULT_NOTEBOOK, workdir: str | os.PathLike | None = None, params: dict | None = None,
            fresh: bool = False) -> tuple[Path, str]:
    """The working copy of ``notebook`` in ``workdir`` (made when missing, when ``fresh``, or when ``params``
    are given). Returns (path, what happened) — "kept", "copied" or "parameterized"."""
    src = shipped_notebook(notebook)
    wd = Path(workdir).expanduser() if workdir is not None else workdir_default()
    wd.mkdir(parents=True, exist_ok=True)
    dst = wd / src.name
    if params:
        nbj = _inject(json.loads(src.read_text()), params)
        dst.write_text(json.dumps(nbj, indent=1, ensure_ascii=False) + "\n")
        return dst, "parameterized"
    if dst.exists() and not fresh:
        return dst, "kept"
    shutil.copyfile(src, dst)
    return dst, "copied"


def headless() -> bool:
    """No display to open a browser on (Linux without $DISPLAY/$WAYLAND_DISPLAY, or an SSH session)."""
    if os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_TTY"):
        return True
    if sys.platform.startswith("linux"):
        return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return False


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(workdir: Path, notebook: str, port: int, token: str, open_browser: bool) -> list[str]:
    """The ``python -m jupyterlab`` command line: loopback only, this port only (no silent move to another),
    the token given, the working folder as the root, no news feed or update checks (no network)."""
    return [sys.executable, "-m", "jupyterlab", notebook,
            f"--ServerApp.ip={HOST}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={workdir}", f"--IdentityProvider.token={token}",
            f"--ServerApp.open_browser={open_browser}", "--ServerApp.allow_remote_access=False",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
            "--LabServerApp.open_browser=" + str(open_browser)] + (["--allow-root"] if _is_root() else [])


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def server_env(extra: dict | None = None) -> dict:
    """The server's (and so its kernels') environment: this checkout importable, inline matplotlib."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    pp = env.get("PYTHONPATH", "")
    if (Path(root) / "workbench").is_dir() and root not in pp.split(os.pathsep):
        env["PYTHONPATH"] = root + (os.pathsep + pp if pp else "")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env.update(extra or {})
    return env


def _require_jupyterlab():
    try:
        import jupyterlab  # noqa: F401
    except ImportError as e:
        raise LabError("JupyterLab is not installed: pip install 'gemma-workbench[notebooks]' "
                       "(or .venv/bin/pip install jupyterlab)") from e
    from .notebooks import ensure_kernel
    ensure_kernel("python3")


@dataclass
class LabServer:
    proc: subprocess.Popen
    url: str
    base: str
    token: str
    notebook: Path
    log: Path | None = None
    extra: dict = field(default_factory=dict)

    def wait_ready(self, timeout: float = 120.0):
        """Until the server answers /api/status with the token (LabError with the log's tail if it exits)."""
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise LabError(f"JupyterLab exited with {self.proc.returncode}" + self._tail())
            try:
                req = urllib.request.Request(self.base + "api/status", headers={"Authorization": f"token {self.token}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.time() - t0 > timeout:
                raise LabError(f"JupyterLab did not answer on {self.base} within {timeout:.0f} s" + self._tail())
            time.sleep(0.5)

    def _tail(self) -> str:
        if self.log and self.log.exists():
            return ":\n" + self.log.read_text(errors="replace")[-3000:]
        return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start(notebook: str = DEFAULT_NOTEBOOK, port: int | None = None, workdir=None, params: dict | None = None,
          fresh: bool = False, open_browser: bool = False, token: str | None = None, log: Path | None = None,
          env: dict | None = None) -> LabServer:
    """Start JupyterLab on the working copy of ``notebook`` (see ``prepare``); returns at once (call
    ``wait_ready``). port None: a free one. log: the server's stdout/stderr go there (else inherited)."""
    _require_jupyterlab()
    path, _ = prepare(notebook, workdir, params, fresh)
    port = free_port() if port is None else int(port)
    if not port_free(port):
        raise LabError(f"port {port} on {HOST} is taken (another JupyterLab?): pass --port N, or --port 0 for any "
                       "free port")
    token = token or secrets.token_hex(24)
    cmd = command(path.parent, path.name, port, token, open_browser)
    out = open(log, "w") if log else None
    try:
        proc = subprocess.Popen(cmd, cwd=str(path.parent), env=server_env(env), stdout=out,
                                stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()
    base = f"http://{HOST}:{port}/"
    url = f"{base}lab/tree/{path.name}?token={token}"
    return LabServer(proc=proc, url=url, base=base, token=token, notebook=path, log=log)


def main(notebook: str = DEFAULT_NOTEBOOK, port: int = DEFAULT_PORT, params: dict | None = None,
         fresh: bool = False, browser: bool | None = None, workdir=None) -> int:
    """``workbench lab``: start, print the URL, serve until Ctrl-C."""
    if port == 0:
        port = free_port()
    elif not port_free(port):
        p2 = free_port()
        print(f"port {port} is taken; using {p2} (pass --port to choose)", file=sys.stderr)
        port = p2
    open_browser = (not headless()) if browser is None else browser
    path, how = prepare(notebook, workdir, params, fresh)
    print({"kept": f"working copy (your edits kept; --fresh starts over from the shipped notebook): {path}",
           "copied": f"working copy of the shipped notebook: {path}",
           "parameterized": f"working copy with the given parameters: {path}"}[how])
    server = start(notebook, port=port, workdir=path.parent, params=None, open_browser=open_browser)

    def on_term(signum, frame):     # `kill` of this process stops the server too (the finally below)
        raise SystemExit(128 + signum)
    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:              # not the main thread
        pass
    try:
        server.wait_ready(timeout=180)
        print("\nJupyterLab is running on loopback only. Open:\n\n    " + server.url + "\n")
        print("Run all cells (Run > Run All Cells) to start the explorer; Ctrl-C here stops the server.", flush=True)
        return server.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


# ============================================================================ the CLI subcommand
def add_cli(sub):
    """``workbench lab`` (cli.SUBCOMMANDS)."""
    p = sub.add_parser("lab", help="JupyterLab on the layer explorer (notebooks/explore_layers.ipynb), loopback only",
                       description="Open JupyterLab on a working copy of a shipped notebook (default: the layer "
                       "explorer) kept under the user data dir, so outputs and autosaves never touch the checkout.")
    p.add_argument("notebook", nargs="?", default=DEFAULT_NOTEBOOK,
                   help="explore_layers (default) | parity | throughput")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1 (default %(default)s; 0: any "
                   "free port; a taken port moves to a free one)")
    p.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="notebook parameter (JSON or string), e.g. -p model fixtures/gemma3_text -p prompt '[3,4,5]'")
    p.add_argument("--fresh", action="store_true", help="start over from the shipped notebook (your working copy "
                   "is replaced)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-browser", dest="browser", action="store_false", default=None,
                   help="do not open a browser (the default where there is no display)")
    g.add_argument("--browser", dest="browser", action="store_true", help="open a browser")
    p.add_argument("--workdir", default=None, help=f"folder of the working copies (default {workdir_default()})")
    p.set_defaults(fn=cmd_lab)
    return p


def cmd_lab(args) -> int:
    from .notebooks import NotebookError
    params = {}
    for k, v in (args.p or []):
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    try:
        return main(args.notebook, port=args.port, params=params or None, fresh=args.fresh, browser=args.browser,
                    workdir=args.workdir)
    except (LabError, NotebookError) as e:
        print(f"workbench lab: error: {e}", file=sys.stderr)
        return 2

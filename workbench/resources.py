"""Where the files shipped beside the code live: the Streamlit dashboard and the notebooks.

Their sources stay at the top of the checkout (``dashboards/``, ``notebooks/``). A wheel carries copies as
package data under ``workbench/_data/`` (see ``[tool.setuptools.package-dir]`` in pyproject.toml); a checkout
or an editable install reads the top-level folders. One lookup order, used by ``workbench dashboard``,
``workbench notebooks run`` and the lab:

1. ``$WORKBENCH_DATA_DIR/<kind>`` if that variable is set (a folder holding ``dashboards/`` and ``notebooks/``);
2. the package data of the installed package (``workbench/_data/<kind>``);
3. the checkout the package was imported from (``<repo>/<kind>``).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DATA_DIR = PACKAGE_DIR / "_data"
DASHBOARD_APP = "parity.py"


class ResourceError(FileNotFoundError):
    """A shipped file (dashboard, notebook) is missing from this installation."""


def _candidates(kind: str) -> list[Path]:
    out = []
    env = os.environ.get("WORKBENCH_DATA_DIR")
    if env:
        out.append(Path(env).expanduser() / kind)
    out += [DATA_DIR / kind, REPO_ROOT / kind]
    return out


def _folder(kind: str, marker: str) -> Path:
    tried = _candidates(kind)
    for d in tried:
        if any(d.glob(marker)):
            return d
    raise ResourceError(f"no {kind}/ with {marker} in this installation of gemma-workbench (looked in "
                        + ", ".join(map(str, tried)) + "); reinstall the package (pip install gemma-workbench) "
                        "or set WORKBENCH_DATA_DIR to a folder holding dashboards/ and notebooks/")


def dashboard_dir() -> Path:
    """The folder holding the dashboard app (``parity.py``) and its ``_logic.py``."""
    return _folder("dashboards", DASHBOARD_APP)


def dashboard_path() -> Path:
    """The Streamlit app to run: ``streamlit run <dashboard_path()>``."""
    return dashboard_dir() / DASHBOARD_APP


def notebook_dir() -> Path:
    """The folder holding the shipped notebooks (``parity.ipynb``, ``throughput.ipynb``, ``explore_layers.ipynb``)."""
    return _folder("notebooks", "*.ipynb")


def notebooks() -> dict[str, Path]:
    """{name: path} of the shipped notebooks."""
    return {p.stem: p for p in sorted(notebook_dir().glob("*.ipynb"))}


def notebook_path(name: str) -> Path:
    """The shipped notebook ``name`` ("parity", or "parity.ipynb"); unknown -> ResourceError listing the names."""
    stem = str(name)[:-len(".ipynb")] if str(name).endswith(".ipynb") else str(name)
    nbs = notebooks()
    if stem in nbs:
        return nbs[stem]
    raise ResourceError(f"unknown notebook {name!r}; available: {', '.join(nbs) or '(none)'} (in {notebook_dir()})")

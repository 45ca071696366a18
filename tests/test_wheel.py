"""An installed wheel works away from the checkout: build the wheel (non-editable), install it into a fresh venv,
and from a directory outside the checkout run ``workbench notebooks run parity`` and ``workbench dashboard``
(Streamlit health endpoint, then the installed app script run headless by Streamlit's AppTest).

The fresh venv gets the heavy dependencies (torch, streamlit, papermill ...) from the project venv through a
.pth line (its site-packages appended to sys.path, after the fresh venv's own), and the wheel with --no-deps: the
package itself, its code and its package data, come only from the wheel. A path line in a .pth file does not
run the .pth files of the folder it adds, so the project's editable install stays invisible.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, fixture_dir, have

pytestmark = pytest.mark.skipif(not have("torch") or not have("setuptools"),
                                reason="needs torch and setuptools (the build backend) in the project venv")

SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "workbench", "dashboards", "notebooks"]


def _run(cmd, timeout=300, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, env, cwd outside the checkout) with the freshly built wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "out")
    for name in SOURCES:   # a copy of the sources: the build writes build/ and *.egg-info next to them
        p = ROOT / name
        if not p.exists():
            continue
        (shutil.copytree(p, src / name, ignore=ignore) if p.is_dir() else shutil.copy2(p, src / name))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)])
    wheels = list((tmp / "dist").glob("gemma_workbench-*.whl"))
    assert len(wheels) == 1, wheels
    import zipfile
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    shipped = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "dashboards").rglob("*.py"))
               if "__pycache__" not in p.parts]        # the app, its logic modules and its pages
    shipped += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "notebooks").glob("*.ipynb"))]
    assert "dashboards/parity.py" in shipped and "notebooks/parity.ipynb" in shipped
    for f in ["workbench/_data/" + s for s in shipped] + ["workbench/resources.py"]:
        assert f in names, f"{f} is not in {wheels[0].name}"

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    vpy = venv / "bin" / "python"
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps", str(wheels[0])])

    away = tmp / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "WORKBENCH_"))}
    env.update(WORKBENCH_DB=str(tmp / "runs.sqlite"), PATH=str(venv / "bin") + os.pathsep + env.get("PATH", ""),
               MPLBACKEND="Agg")
    where = _run([str(vpy), "-c", "import workbench, workbench.resources as r; print(workbench.__file__); "
                  "print(r.dashboard_path()); print(r.notebook_path('parity'))"], env=env, cwd=away).stdout.split()
    for p in where:   # code and data from the wheel, nothing from the checkout
        assert Path(p).is_relative_to(site), f"{p} is not from the installed wheel ({site})"
    return vpy, env, away


def test_wheel_runs_the_parity_notebook_outside_the_checkout(installed):
    vpy, env, away = installed
    out = away / "parity-run.ipynb"
    params = ["-p", "model", str(fixture_dir("gemma3_text")), "-p", "backends", '["torch:cpu"]',
              "-p", "dtypes", '["float32"]', "-p", "prompt", "[1, 2, 3, 4, 5, 6]"]
    r = _run([str(vpy.parent / "workbench"), "notebooks", "run", "parity", *params, "-o", str(out)], env=env,
             cwd=away, timeout=400)
    assert f"executed -> {out}" in r.stdout
    nb = json.loads(out.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "torch:cpu" in text
    assert not (ROOT / "out").exists() or not any((ROOT / "out").glob("**/parity-run*"))


def test_wheel_serves_the_dashboard_outside_the_checkout(installed):
    vpy, env, away = installed
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    log = away / "dashboard.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(vpy.parent / "workbench"), "dashboard", "--headless", "--port", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=away, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, f"workbench dashboard exited with {proc.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"no health answer within 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        assert "/_data/dashboards/parity.py" in log.read_text()
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=5)
    # the health endpoint says the server is up; the app script itself (and its _logic import) runs here
    code = ("from streamlit.testing.v1 import AppTest; import workbench.resources as r\n"
            "at = AppTest.from_file(str(r.dashboard_path()), default_timeout=120); at.run()\n"
            "assert not at.exception, [e.value for e in at.exception]\n"
            "print('TITLE', at.title[0].value)\n")
    r = _run([str(vpy), "-c", code], env=env, cwd=away, timeout=200)
    assert "TITLE Gemma Workbench" in r.stdout

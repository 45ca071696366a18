"""What the browser tests share: Debian chromium + chromedriver through selenium, the dashboard served by
`streamlit run dashboards/parity.py` on 127.0.0.1 (waited for on its health endpoint), and a patient wait that
leaves a screenshot when it times out."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
OUT = ROOT / "out"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def streamlit_dashboard(db, log):
    """The dashboard on a free loopback port, its store from --db (not WORKBENCH_DB); yields its URL."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORKBENCH_DB", None)       # the app must take the store from --db
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboards" / "parity.py"),
           "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--", "--db", str(db)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"streamlit did not answer on {url} within 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def chromium(window: str = "1600,2000", profile_prefix: str = "wb-chromium-"):
    """Headless Debian chromium with a throw-away profile, driven by selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix=profile_prefix)
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
              "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
              f"--window-size={window}"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(drv, what, fn, timeout=90, shot="dashboard-timeout.png"):
    """fn() until it is truthy (stale elements while Streamlit re-renders count as not yet); on timeout a
    screenshot under out/ and a failure naming what was awaited."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = fn()
            if v:
                return v
        except Exception:   # stale elements while Streamlit re-renders
            pass
        time.sleep(0.5)
    OUT.mkdir(exist_ok=True)
    drv.save_screenshot(str(OUT / shot))
    pytest.fail(f"timed out waiting for {what} (screenshot: out/{shot})")

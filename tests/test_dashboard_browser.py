"""The dashboard in a real browser: `streamlit run dashboards/parity.py` on 127.0.0.1 with a store of runs,
driven by Debian chromium through selenium. Screenshots go to out/ (kept for the report)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from conftest import ROOT, cpu_backends, fixture_dir, have

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
OUT = ROOT / "out"
PROMPT = list(range(3, 19))


def _requirements():
    if not have("selenium"):
        pytest.skip("selenium is not installed (pip install selenium)")
    if not have("streamlit") or not have("altair"):
        pytest.skip("streamlit/altair not installed: pip install 'gemma-workbench[dashboard]'")
    if not CHROMIUM:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    if not CHROMEDRIVER:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    if not cpu_backends():
        pytest.skip("neither torch nor mlx is installed")


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    _requirements()
    import workbench as wb
    from workbench.bench import bench
    path = tmp_path_factory.mktemp("browser") / "runs.sqlite"
    fx = str(fixture_dir("gemma3_text"))
    bk = cpu_backends()
    wb.compare(fx, backends=bk, dtypes=["float32", "bfloat16"], prompt=PROMPT, references=(), db=path, progress=False)
    wb.compare(fx, backends=bk, dtypes=["float32"], prompt=PROMPT, references=(), db=path, progress=False,
               fault={"backend": bk[-1], "layer": 3, "tap": "hook_mlp_out", "scale": 1e-2})
    for _ in range(2):
        bench(fx, backends=bk, dtypes=["float32"], prompt_len=16, gen_len=8, repeats=1, db=path, progress=False)
    return path


@pytest.fixture(scope="module")
def server(db, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
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


@pytest.fixture(scope="module")
def browser():
    _requirements()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="wb-chromium-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
              "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
              "--window-size=1600,2000"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(drv, what, fn, timeout=90):
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
    drv.save_screenshot(str(OUT / "dashboard-timeout.png"))
    pytest.fail(f"timed out waiting for {what} (screenshot: out/dashboard-timeout.png)")


def test_dashboard_renders_in_chromium(server, browser):
    from selenium.webdriver.common.by import By
    drv = browser
    drv.get(server)
    _wait(drv, "the heading", lambda: "Gemma Workbench" in drv.find_element(By.TAG_NAME, "h1").text)
    # the heatmaps are matplotlib images; the throughput bars and history are Vega-Lite charts
    _wait(drv, "the heatmap images", lambda: sum(i.size["height"] > 100 and i.get_attribute("complete") == "true"
                                                for i in drv.find_elements(By.CSS_SELECTOR,
                                                                           '[data-testid="stImage"] img')) >= 2)
    _wait(drv, "the 'First divergence' box",
          lambda: any("First divergence" in e.text for e in drv.find_elements(By.CSS_SELECTOR,
                                                                              '[data-testid="stAlert"]')))
    assert not drv.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    OUT.mkdir(exist_ok=True)
    drv.save_screenshot(str(OUT / "dashboard-parity.png"))

    tab = _wait(drv, "the Throughput tab", lambda: [b for b in drv.find_elements(By.CSS_SELECTOR, '[role="tab"]')
                                                     if "Throughput" in b.text])
    tab[0].click()
    _wait(drv, "the throughput charts", lambda: sum(c.is_displayed() and c.size["height"] > 100
                                                    for c in drv.find_elements(By.CSS_SELECTOR,
                                                                               '[data-testid="stVegaLiteChart"]')) >= 4)
    # charts are drawn into canvas/svg by vega-embed
    _wait(drv, "drawn charts", lambda: len([c for c in drv.find_elements(By.CSS_SELECTOR,
                                                                          '[data-testid="stVegaLiteChart"] canvas, '
                                                                          '[data-testid="stVegaLiteChart"] svg')
                                            if c.is_displayed()]) >= 4)
    time.sleep(1.0)   # let vega finish its transitions before the picture
    assert not drv.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    drv.save_screenshot(str(OUT / "dashboard-throughput.png"))
    assert (OUT / "dashboard-parity.png").stat().st_size > 20_000
    assert (OUT / "dashboard-throughput.png").stat().st_size > 20_000

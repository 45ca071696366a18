"""The dashboard in a real browser: `streamlit run dashboards/parity.py` on 127.0.0.1 with a store of runs,
driven by Debian chromium through selenium. Screenshots go to out/ (kept for the report)."""
from __future__ import annotations

import time

import pytest

from _browser import CHROMEDRIVER, CHROMIUM, OUT, chromium, streamlit_dashboard, wait
from conftest import cpu_backends, fixture_dir, have

pytestmark = pytest.mark.browser

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
    with streamlit_dashboard(db, tmp_path_factory.mktemp("streamlit") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    _requirements()
    with chromium(window="1600,2000", profile_prefix="wb-chromium-") as drv:
        yield drv


def _wait(drv, what, fn, timeout=90):
    return wait(drv, what, fn, timeout=timeout, shot="dashboard-timeout.png")


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

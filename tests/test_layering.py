"""The import layering of ``workbench/`` (and the faces in ``dashboards/``), read statically with ``ast``.

Layers, lowest first; a module may import its own layer and those below, never one above:

  foundation  config, weights/*, tokenizer, resources          (files, names, the run-independent ground)
  backends    backends/*                                       (ops on torch / MLX; the fused decode kernels)
  model       model/*                                          (the one Gemma forward pass, cache, taps)
  engines     generate, decode/*, multimodal/*, loader, lm, references/*   (what drives a model)
  analysis    parity, bench, interp, plots, runs, ...          (what measures and stores runs)
  faces       cli, __main__, notebooks*, the ``workbench`` package front, dashboards/*

and one rule across layers: faces use ``workbench.backends`` (the package, ``base``, ``protocol``) but never a
backend's implementation modules (``torch``, ``mlx``, their ``*_media`` mixins, ``triton_decode``,
``mlx_cuda_decode``, ``mlx_cuda_persist``, ``cpu_gemv``).

And the model code (``model/``, ``multimodal/``) is framework-free: no torch/mlx import, no branch on
``ops.framework`` — it is written against ``workbench/backends/protocol.py``.

Every import counts, at module level or inside a function (a function-level import is how an upward
dependency hides). Today's violations and the edges that close today's import cycles are listed below, each with a comment; the test
fails on any NEW one and also when a listed one has gone (delete its line: the lists only shrink). A new
module that matches no layer fails too, with the line to add.
"""
from __future__ import annotations

import ast
import fnmatch
import pathlib
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = ("foundation", "backends", "model", "engines", "analysis", "faces")
RANK = {n: i for i, n in enumerate(LAYERS)}

# module-name patterns -> layer; first match wins (fnmatch on the dotted name)
LAYER_OF = [
    ("workbench.config", "foundation"),
    ("workbench.weights", "foundation"),
    ("workbench.weights.*", "foundation"),
    ("workbench.tokenizer", "foundation"),
    ("workbench.resources", "foundation"),
    ("workbench.backends", "backends"),
    # the decode kernels' input contract (weights by role, per-layer flags, cache buffers): the model builds it,
    # the kernels read it; a dataclass module that imports nothing above the backends
    ("workbench.decode.plan", "backends"),
    ("workbench.backends.*", "backends"),
    ("workbench.model", "model"),
    ("workbench.model.*", "model"),
    ("workbench.generate", "engines"),
    ("workbench.decode", "engines"),
    ("workbench.decode.*", "engines"),
    ("workbench.multimodal", "engines"),
    ("workbench.multimodal.*", "engines"),
    ("workbench.loader", "engines"),
    ("workbench.lm", "engines"),
    ("workbench.make_random", "engines"),     # writes random checkpoints from model.gemma.expected_shapes
    ("workbench.references", "engines"),
    ("workbench.references.*", "engines"),
    ("workbench.parity", "analysis"),
    ("workbench.parity.*", "analysis"),
    ("workbench.parity_metrics", "analysis"),     # parity's statistics on the target's device
    ("workbench.bench", "analysis"),
    ("workbench.bench.*", "analysis"),
    ("workbench.diverge", "analysis"),
    ("workbench.interp", "analysis"),
    ("workbench.interp.*", "analysis"),
    ("workbench.plots", "analysis"),
    ("workbench.runs", "analysis"),
    ("workbench.progress", "analysis"),
    ("workbench.reference_artifact", "analysis"),
    ("workbench.distributed", "analysis"),     # tensor-parallel ops/model and its compare/export entry points
    # wb.compare's dispatch (against= / world=) and `workbench reference export [--nproc]`: above parity,
    # reference_artifact and distributed in the analysis layer (REFERENCE_STACK below keeps it there)
    ("workbench.comparison", "analysis"),
    ("workbench.cli", "faces"),
    ("workbench.__main__", "faces"),
    ("workbench.notebooks", "faces"),
    ("workbench.notebooks.*", "faces"),
    ("workbench.explorer", "faces"),
    ("workbench.lab", "faces"),
    ("workbench.runs_cli", "faces"),
    ("workbench.widgets", "faces"),
    ("workbench.widget", "faces"),
    ("workbench", "faces"),            # the package front: wb.load / wb.compare / wb.bench
    ("dashboards", "faces"),
    ("dashboards.*", "faces"),
]

# a backend's implementation modules: nothing in faces may import them
BACKEND_INTERNALS = ("workbench.backends.torch", "workbench.backends.mlx", "workbench.backends.triton_decode",
                     "workbench.backends.mlx_cuda_decode", "workbench.backends.mlx_cuda_persist",
                     "workbench.backends.cpu_gemv",
                     "workbench.backends.torch_media", "workbench.backends.mlx_media")

# (importer, imported): why it is there today. Fix the import, then delete the line.
KNOWN_VIOLATIONS: dict = {
}

# Import cycles, each named by the edge that closes it (every edge counted, lazy ones too): without these edges
# the graph must be acyclic, and each listed edge must still close a cycle (else delete it).
KNOWN_CYCLE_EDGES: dict = {
}


# Inside the analysis layer, the reference's three homes and the dispatch above them, lowest first: each may import
# those before it, never one after, and only the faces import the dispatch (it alone chooses between a reference run
# here, a stored artifact and a sharded one: the lower three take already-resolved objects).
REFERENCE_STACK = ("workbench.parity", "workbench.reference_artifact", "workbench.distributed",
                   "workbench.comparison")


def stack_violations(g) -> list[str]:
    """Imports that go up REFERENCE_STACK, and imports of its top by anything but a face."""
    out = []
    for a, deps in g.items():
        for b in deps:
            if a in REFERENCE_STACK and b in REFERENCE_STACK and REFERENCE_STACK.index(b) > REFERENCE_STACK.index(a):
                out.append(f"{a} imports {b} (above it in REFERENCE_STACK)")
            elif b == REFERENCE_STACK[-1] and a not in REFERENCE_STACK and layer(a) != "faces":
                out.append(f"{a} ({layer(a)}) imports {b} (only the faces use the dispatch)")
    return sorted(out)


# The model code is written once against the ops protocol: no torch/mlx import and no branch on ``.framework`` in
# these packages. Today's exceptions, per module: (framework imports, framework branches). Shrink-only, like above.
FRAMEWORK_FREE = ("workbench.model", "workbench.model.*", "workbench.multimodal", "workbench.multimodal.*")
KNOWN_FRAMEWORK_CODE = {
    "workbench.model.cache": ({"torch", "mlx"}, 4,
                              "slot writes (index_copy_ / slice assignment), the ring gather and the device-position "
                              "copy; the gather is ops.take now, the writes need one op (e.g. write_slots)"),
    "workbench.model.gemma": (set(), 3,
                              "_moe: sum keepdim/keepdims and the expert mask cast; one arm serves both frameworks "
                              "(torch accepts keepdims=; ops.cast(sel, None)), one branch has identical arms"),
}


def framework_code(root: pathlib.Path = ROOT) -> dict[str, tuple[set, int, list]]:
    """{module: ({frameworks imported}, number of comparisons on a ``.framework`` attribute, [lines])} over the
    framework-free packages (modules with neither are left out)."""
    out = {}
    for m, p in _modules(root).items():
        if not any(fnmatch.fnmatchcase(m, pat) for pat in FRAMEWORK_FREE):
            continue
        fws, n, lines = set(), 0, []
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for nm in names:
                top = nm.split(".")[0]
                if top in ("torch", "mlx"):
                    fws.add(top)
                    lines.append(f"{p.relative_to(root).as_posix()}:{node.lineno} import {nm}")
            if isinstance(node, ast.Compare) and any(
                    isinstance(x, ast.Attribute) and x.attr == "framework" for x in [node.left, *node.comparators]):
                n += 1
                lines.append(f"{p.relative_to(root).as_posix()}:{node.lineno} branch on .framework")
        if fws or n:
            out[m] = (fws, n, lines)
    return out


# ------------------------------------------------------------------------------------------------ the graph
def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for top in ("workbench", "dashboards"):
        for p in sorted((root / top).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _resolve(importer: str, is_pkg: bool, node: ast.AST, mods: dict) -> list[tuple[str, int]]:
    """The workbench/dashboards modules an import statement names, with its line."""
    def known(name):
        # the longest prefix of ``name`` that is one of our modules
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            cand = ".".join(parts[:k])
            if cand in mods:
                return cand
        return None

    found = []
    if isinstance(node, ast.Import):
        for a in node.names:
            m = known(a.name)
            if m:
                found.append(m)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = importer.split(".") if is_pkg else importer.split(".")[:-1]
            if node.level > 1:
                base = base[:-(node.level - 1)]
            b = ".".join(base + ([node.module] if node.module else []))
        else:
            b = node.module or ""
        for a in node.names:
            sub = f"{b}.{a.name}"
            m = sub if sub in mods else known(b)
            if m:
                found.append(m)
    return [(m, node.lineno) for m in found if m != importer]


def import_graph(root: pathlib.Path = ROOT) -> tuple[dict[str, dict[str, int]], dict[str, pathlib.Path]]:
    """{importer: {imported: first line}} over workbench/ and dashboards/."""
    mods = _modules(root)
    g: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m, p in mods.items():
        tree = ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for dst, line in _resolve(m, p.name == "__init__.py", node, mods):
                    g[m].setdefault(dst, line)
    return g, mods


def layer(mod: str) -> str | None:
    for pat, name in LAYER_OF:
        if fnmatch.fnmatchcase(mod, pat):
            return name
    return None


def violations(g) -> dict[tuple[str, str], str]:
    out = {}
    for a, deps in g.items():
        la = layer(a)
        for b in deps:
            lb = layer(b)
            if la is None or lb is None:
                continue
            if RANK[lb] > RANK[la]:
                out[(a, b)] = f"{la} imports {lb}"
            elif la == "faces" and b in BACKEND_INTERNALS:
                out[(a, b)] = "a face imports a backend's implementation module"
    return out


def _reaches(g, src: str, dst: str, skip=frozenset()) -> list[str] | None:
    """A path src -> ... -> dst (list of modules) not using the edges in ``skip``, or None."""
    prev, todo = {src: None}, [src]
    while todo:
        v = todo.pop()
        if v == dst:
            path = []
            while v is not None:
                path.append(v)
                v = prev[v]
            return path[::-1]
        for w in sorted(g.get(v, ())):
            if w not in prev and (v, w) not in skip:
                prev[w] = v
                todo.append(w)
    return None


def cycles(g, skip=frozenset()) -> list[list[str]]:
    """One cycle (a -> ... -> a) per edge that closes one, ignoring the edges in ``skip``."""
    out = []
    for a in sorted(g):
        for b in sorted(g[a]):
            if (a, b) in skip:
                continue
            back = _reaches(g, b, a, skip | {(a, b)})
            if back is not None:
                out.append([a] + back)
    return out


def summary(g) -> str:
    """Layer-to-layer edge counts and each module's layer, for the test log."""
    by = defaultdict(int)
    for a, deps in g.items():
        for b in deps:
            by[(layer(a), layer(b))] += 1
    lines = ["import graph: %d modules, %d edges" % (len(g), sum(len(d) for d in g.values()))]
    for la in LAYERS:
        row = [f"{lb}:{by[(la, lb)]}" for lb in LAYERS if by[(la, lb)]]
        mods = sorted(m for m in g if layer(m) == la)
        lines.append(f"  {la:10s} ({len(mods)} modules) -> " + ", ".join(row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ tests
def test_every_module_has_a_layer():
    g, mods = import_graph()
    missing = sorted(m for m in g if layer(m) is None)
    assert not missing, (f"modules with no layer: {missing}; add a line to LAYER_OF in {__file__} "
                         f"(one of {LAYERS})")


def test_no_new_layering_violation_and_known_ones_still_listed():
    g, mods = import_graph()
    print("\n" + summary(g))
    found = violations(g)
    for (a, b), why in sorted(found.items()):
        mark = "known" if (a, b) in KNOWN_VIOLATIONS else "NEW"
        print(f"  {mark}: {a} -> {b} ({why}; {mods[a].relative_to(ROOT)}:{g[a][b]})")
    new = {k: v for k, v in found.items() if k not in KNOWN_VIOLATIONS}
    assert not new, "new layering violation(s): " + "; ".join(
        f"{a} imports {b} at {mods[a].relative_to(ROOT)}:{g[a][b]} ({why})" for (a, b), why in sorted(new.items()))
    gone = sorted(set(KNOWN_VIOLATIONS) - set(found))
    assert not gone, (f"fixed: {gone} no longer happen — delete them from KNOWN_VIOLATIONS in {__file__} "
                      "(the list only shrinks)")


def test_no_new_import_cycle_and_known_ones_still_listed():
    g, mods = import_graph()
    for (a, b), why in sorted(KNOWN_CYCLE_EDGES.items()):
        back = _reaches(g, b, a) if b in g.get(a, {}) else None
        print(f"  known cycle: {a} -> {' -> '.join(back) if back else '(gone)'} ({why})")
    new = cycles(g, skip=frozenset(KNOWN_CYCLE_EDGES))
    assert not new, "new import cycle(s) (lazy imports included): " + "; ".join(" -> ".join(c) for c in new)
    gone = [(a, b) for a, b in KNOWN_CYCLE_EDGES if b not in g.get(a, {}) or _reaches(g, b, a) is None]
    assert not gone, (f"{gone} no longer close an import cycle — delete them from KNOWN_CYCLE_EDGES in "
                      f"{__file__} (the list only shrinks)")


def test_reference_stack_is_ordered():
    g, mods = import_graph()
    assert all(m in g for m in REFERENCE_STACK), [m for m in REFERENCE_STACK if m not in g]
    bad = stack_violations(g)
    assert not bad, "; ".join(bad)


def test_model_code_is_framework_free_except_known():
    found = framework_code()
    for m, (fws, n, lines) in sorted(found.items()):
        print(f"  {m}: imports {sorted(fws) or 'none'}, {n} framework branch(es)")
    worse = {m: v[2] for m, v in found.items()
             if m not in KNOWN_FRAMEWORK_CODE or not v[0] <= KNOWN_FRAMEWORK_CODE[m][0] or v[1] >
             KNOWN_FRAMEWORK_CODE[m][1]}
    assert not worse, ("framework code in the model/multimodal packages (write it against the ops protocol, "
                       "workbench/backends/protocol.py, adding an op if needed): " +
                       "; ".join(l for ls in worse.values() for l in ls))
    better = {m: (sorted(KNOWN_FRAMEWORK_CODE[m][0]), KNOWN_FRAMEWORK_CODE[m][1], sorted(found.get(m, (set(), 0))[0]),
                  found.get(m, (set(), 0))[1]) for m in KNOWN_FRAMEWORK_CODE
              if found.get(m, (set(), 0))[:2] != KNOWN_FRAMEWORK_CODE[m][:2]}
    assert not better, (f"less framework code than KNOWN_FRAMEWORK_CODE lists (listed vs found): {better} — update "
                        f"it in {__file__} (the list only shrinks)")


def test_checker_sees_what_it_claims(tmp_path):
    """The checker on a made-up tree: an upward import inside a function, a face reaching a backend's
    internals, and a two-module cycle are all found; the allowed downward imports are not flagged."""
    pkg = tmp_path / "workbench"
    for d in ("model", "backends"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from . import cli\n")
    (pkg / "config.py").write_text("")
    (pkg / "generate.py").write_text("from .model.gemma import Gemma\n")
    (pkg / "model" / "gemma.py").write_text("from ..config import X\ndef f():\n    from ..generate import g\n")
    (pkg / "backends" / "cpu_gemv.py").write_text("")
    (pkg / "cli.py").write_text("from .backends import cpu_gemv\nimport workbench.model.gemma\n")
    (tmp_path / "dashboards").mkdir()
    g, _ = import_graph(tmp_path)
    assert g["workbench.model.gemma"] == {"workbench.config": 1, "workbench.generate": 3}
    v = violations(g)
    assert set(v) == {("workbench.model.gemma", "workbench.generate"),
                      ("workbench.cli", "workbench.backends.cpu_gemv")}, v
    assert cycles(g) == [["workbench.generate", "workbench.model.gemma", "workbench.generate"],
                         ["workbench.model.gemma", "workbench.generate", "workbench.model.gemma"]]
    assert cycles(g, skip=frozenset({("workbench.model.gemma", "workbench.generate")})) == []
    for name, body in (("parity", "def compare(against=None):\n    from .comparison import compare\n"),
                       ("reference_artifact", "from .parity import compare\n"), ("distributed", ""),
                       ("comparison", "from . import distributed, parity, reference_artifact\n"),
                       ("bench", "from .comparison import compare\n")):
        (pkg / f"{name}.py").write_text(body)
    g, _ = import_graph(tmp_path)
    assert stack_violations(g) == ["workbench.bench (analysis) imports workbench.comparison (only the faces use the "
                                   "dispatch)", "workbench.parity imports workbench.comparison (above it in "
                                   "REFERENCE_STACK)"]
    (pkg / "model" / "cache.py").write_text("import torch\ndef f(ops):\n    if ops.framework == 'mlx':\n"
                                            "        import mlx.core as mx\n    return 'torch' != ops.framework\n")
    fc = framework_code(tmp_path)
    assert set(fc) == {"workbench.model.cache"} and fc["workbench.model.cache"][:2] == ({"torch", "mlx"}, 2), fc

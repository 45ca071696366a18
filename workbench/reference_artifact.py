"""One reference for many machines: ``workbench reference export`` writes the float64 reference's taps to a
portable file; ``workbench parity --against FILE`` compares local backends with it.

The artifact (``.wbref``) is ONE safetensors file: every chosen tap of the reference's prefill pass and the
logits, in float64, under their tap names; its ``__metadata__["wbref"]`` is the JSON manifest — format
version, model name, reference (backend:dtype, and the number of ranks when it was sharded), prompt and token
ids, tap patterns, decode steps, the hashes of the weights / config / tokenizer, versions and machine. It is
written to ``FILE.partial`` and renamed, so a crash never leaves a truncated artifact under the final name.

Importing: the local model's hashes must equal the artifact's (same weights, same config, same tokenizer)
or :class:`ArtifactMismatch` says which one differs; then every local backend x dtype runs the same token
ids and its taps are compared with the stored ones — prefill per tap, and decode steps (the last N tokens fed
through the KV cache, compared with the reference's prefill taps at those positions), exactly as
``wb.compare`` does, so the rows, the report and the stored run are the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "workbench-reference/1"
_SAMPLE = 1 << 20          # 1 MiB chunks for the sampled hash of large files
_FULL_HASH_MAX = 64 << 20  # files up to 64 MiB are hashed whole


class ArtifactError(ValueError):
    """An artifact that cannot be read (not a .wbref, wrong format version, truncated)."""


class ArtifactMismatch(ArtifactError):
    """The artifact was made from other weights, config or tokenizer than the local model."""


# ------------------------------------------------------------------------------------------------ hashes
def _file_digest(h, p: Path):
    st = p.stat()
    h.update(p.name.encode())
    h.update(str(st.st_size).encode())
    with open(p, "rb") as f:
        if st.st_size <= _FULL_HASH_MAX:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
            return
        # large: the safetensors header (names, shapes, offsets) whole + 64 evenly spaced 1 MiB samples
        head = f.read(8)
        h.update(head)
        if p.suffix == ".safetensors":
            n = int.from_bytes(head, "little")
            if n < st.st_size:
                h.update(f.read(n))
        for k in range(64):
            f.seek((st.st_size - _SAMPLE) * k // 63)
            h.update(f.read(_SAMPLE))


def weights_hash(path: Path) -> str:
    """sha256 over the weight files (whole up to 64 MiB, else header + 64 spaced 1 MiB samples)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".gguf"))
    h = hashlib.sha256(b"wbref-weights-v1")
    for f in files:
        _file_digest(h, f)
    return h.hexdigest()


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg.raw, sort_keys=True, default=str).encode()).hexdigest()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_hash(path: Path) -> str | None:
    """sha256 of the tokenizer files of a checkpoint dir; a .gguf carries its tokenizer inside the weights
    (covered by the weight hash); None when there is no tokenizer."""
    p = Path(path)
    if p.is_file():
        return "in-weights"
    files = [p / n for n in _TOKENIZER_FILES if (p / n).exists()]
    if not files:
        return None
    h = hashlib.sha256(b"wbref-tokenizer-v1")
    for f in files:
        _file_digest(h, f)
    return h.hexdigest()


def local_hashes(path: Path, cfg) -> dict:
    return dict(weights=weights_hash(path), config=config_hash(cfg), tokenizer=tokenizer_hash(path))


def _versions() -> dict:
    from importlib import metadata
    out = {"python": platform.python_version()}
    for pkg in ("gemma-workbench", "numpy", "torch", "safetensors", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------------ file
@dataclass
class Artifact:
    path: Path
    manifest: dict
    taps: dict[str, np.ndarray]       # prefill taps + "logits", float64

    label: str | None = None           # how a report names this reference (ends in ":<dtype>")

    @property
    def token_ids(self) -> list[int]:
        return list(self.manifest["token_ids"])

    def reference_taps(self, path, cfg) -> dict[str, np.ndarray]:
        """The stored taps, after :func:`check_matches` (raises ArtifactMismatch)."""
        check_matches(self, Path(path), cfg)
        return dict(self.taps)


def write(out, taps: dict[str, np.ndarray], manifest: dict) -> Path:
    """Write taps (float64) + manifest atomically (OUT.partial, then rename)."""
    from safetensors.numpy import save_file
    out = Path(os.path.expanduser(str(out)))
    if out.is_dir():
        raise ArtifactError(f"{out} is a directory; give a file name such as ref.wbref")
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float64)) for k, v in taps.items()}
    m = dict(manifest, format=FORMAT, tensors=sorted(arrays),
             shapes={k: list(v.shape) for k, v in arrays.items()})
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(arrays, str(tmp), metadata={"wbref": json.dumps(m, default=_json_default)})
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read(path) -> Artifact:
    from safetensors import SafetensorError, safe_open
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ArtifactError(f"reference artifact {p}: no such file")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            if "wbref" not in meta:
                raise ArtifactError(f"{p}: a safetensors file but not a workbench reference artifact "
                                    "(no 'wbref' manifest in its metadata)")
            man = json.loads(meta["wbref"])
            if man.get("format") != FORMAT:
                raise ArtifactError(f"{p}: artifact format {man.get('format')!r}; this workbench reads {FORMAT!r}")
            taps = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ArtifactError(f"{p}: not a readable reference artifact ({e})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p}: malformed manifest ({e})") from None
    missing = sorted(set(man.get("tensors", [])) - set(taps))
    if missing:
        raise ArtifactError(f"{p}: manifest lists taps the file does not hold: {missing[:5]}")
    return Artifact(p, man, taps)


def check_matches(art: Artifact, path: Path, cfg) -> dict:
    """Refuse (ArtifactMismatch) unless the local model's weights, config and tokenizer hash as the
    artifact's; returns the local hashes."""
    loc = local_hashes(path, cfg)
    want = art.manifest.get("hashes", {})
    bad = []
    for k in ("weights", "config", "tokenizer"):
        a, b = want.get(k), loc.get(k)
        if k == "tokenizer" and (a is None or b is None):
            if a != b:
                bad.append(f"tokenizer: artifact {'has none' if a is None else a[:16]}, local "
                           f"{'has none' if b is None else b[:16]}")
            continue
        if a != b:
            bad.append(f"{k}: artifact {str(a)[:16]}…, local {str(b)[:16]}…")
    if bad:
        raise ArtifactMismatch(
            f"{art.path}: made from model {art.manifest.get('model')!r} on {art.manifest.get('machine', {}).get('node')}"
            f", whose hashes differ from the local model {path}: " + "; ".join(bad)
            + " — compare against the same checkpoint (or export a new reference here)")
    return loc


# ------------------------------------------------------------------------------------------------ export
def _ids_for(prompt, tok, max_tokens: int, source) -> list[int]:
    from .parity import _prompt_ids
    return _prompt_ids(prompt, tok, max_tokens, source)


def manifest_for(source, path, cfg, tok, prompt, ids, taps, reference, decode_steps, world, tap_names) -> dict:
    return dict(model=str(source), source=str(path), arch=cfg.arch, reference=reference, world=int(world),
                prompt=prompt if isinstance(prompt, str) else None, token_ids=[int(i) for i in ids],
                taps=list(taps), tap_names=list(tap_names), decode_steps=int(decode_steps),
                hashes=local_hashes(Path(path), cfg), versions=_versions(),
                machine=dict(node=platform.node(), system=platform.system(), machine=platform.machine(),
                             processor=platform.processor()),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def export(source, out, prompt=None, taps=None, reference: str = "torch:cpu:float64", decode_steps: int = 4,
           max_tokens: int = 64, world: int = 1, progress: bool = True) -> Path:
    """Run the reference once and write its taps. ``world`` > 1 shards it over that many processes
    (torchrun; see workbench.distributed)."""
    from .parity import ANCHOR_TAPS, DEFAULT_TAPS
    taps = list(taps or DEFAULT_TAPS)
    want = list(dict.fromkeys(taps + ANCHOR_TAPS))    # the anchor can then run where the artifact is used
    if world > 1:
        from .distributed import export_sharded
        return export_sharded(source, out, prompt=prompt, taps=taps, reference=reference,
                              decode_steps=decode_steps, max_tokens=max_tokens, world=world, progress=progress)
    from . import backends as _bk
    from .loader import read_source
    from .model.gemma import Gemma
    cfg, tensors, path, tok = read_source(source, dtype="float64", progress=progress)
    ids = _ids_for(prompt, tok, max_tokens, source)
    b, d = _split_ref(reference)
    t0 = time.perf_counter()
    m = Gemma(cfg, tensors, _bk.get_ops(b, d), where=str(path))
    o = m.forward(np.asarray(ids, dtype=np.int64)[None], taps=want)
    got = dict(o.taps)
    got["logits"] = o.logits
    man = manifest_for(source, path, cfg, tok, prompt, ids, taps, reference, decode_steps, 1, got)
    man["seconds"] = round(time.perf_counter() - t0, 3)
    return write(out, got, man)


def _split_ref(reference: str) -> tuple[str, str]:
    from .parity import _split_reference
    return _split_reference(reference)


# ------------------------------------------------------------------------------------------------ compare
def target_rows(build, targets, ids_arr, taps, ref_taps, decode_steps, tolerances, order_of, fault=None,
                prog=None, make_ops=None):
    """The per-target part of a comparison: ``wb.compare``'s own loop (``parity.target_rows``: a model from
    ``build(ops)`` per backend x dtype, its prefill taps and ``decode_steps`` cached decode steps, rows against
    ``ref_taps``, flat tolerances). ``make_ops(backend, dtype)``: the ops to build on (default
    ``backends.get_ops``). Returns (rows, skipped, devices)."""
    from .parity import target_rows as _loop
    rows, skipped, devices, _ = _loop(build, targets, ids_arr, taps, ref_taps, order_of, decode_steps=decode_steps,
                                      tolerances=tolerances, fault=fault, prog=prog, make_ops=make_ops)
    return rows, skipped, devices


def finish_report(rows, meta, skipped, store: bool, db, tolerances=None, fault=None, anchor_info=None):
    """A ParityReport from rows + meta, stored like ``wb.compare``'s runs (same kind, same meta keys)."""
    from .parity import ParityReport, _jsonable
    meta["anchor"] = anchor_info
    rep = ParityReport(rows=rows, meta=meta, skipped=skipped, anchor_info=anchor_info)
    meta["passed"] = rep.passed
    if store:
        from . import runs
        rep.run_id = runs.save_run("parity", meta, rows, db=db, devices=meta.get("devices", {}),
                                   params=dict(decode_steps=meta.get("decode_steps"), taps=meta.get("taps"),
                                               tolerances=_jsonable(tolerances), fault=fault))
    return rep


def resolve_against(against, world, source, prompt, taps, decode_steps, reference, max_tokens, progress):
    """For ``wb.compare(against=FILE)`` / ``wb.compare(world=N)``: the Artifact (read, or made now by N ranks),
    and the (source, prompt, taps, reference label) the comparison runs with. The hashes are checked by
    ``Artifact.reference_taps`` once the local model is read."""
    if world > 1:
        if against is not None:
            raise ValueError("compare: give against= (a stored reference) or world= (shard the reference), not both")
        import shutil
        import tempfile
        td = tempfile.mkdtemp(prefix="wb-tpref-")
        try:
            p = export(source, Path(td) / "ref.wbref", prompt=prompt, taps=taps, reference=reference,
                       decode_steps=decode_steps, max_tokens=max_tokens, world=world, progress=progress)
            art = read(p)
        finally:
            shutil.rmtree(td, ignore_errors=True)
        art.label = f"{world} ranks x {reference}"
    else:
        art = against if hasattr(against, "manifest") else read(against)   # (an Artifact, also from __main__)
        if prompt is not None and [int(i) for i in np.asarray(prompt).reshape(-1)] != art.token_ids \
                if not isinstance(prompt, str) else prompt != art.manifest.get("prompt"):
            raise ValueError(f"{art.path}: the artifact fixes the prompt ({len(art.token_ids)} tokens); "
                             "leave prompt unset to use it")
        art.label = f"{art.path.name} <- {art.manifest['reference']}"
        if source is None:
            source = art.manifest["model"]
    taps = list(taps or art.manifest["taps"])
    return art, source, art.token_ids, taps, art.label


def compare_against(against, source=None, **kw):
    """``wb.compare(source, against=FILE, ...)``: local backends x dtypes against a reference artifact, with
    wb.compare's own engine (same rows, anchor, budgets, stored run)."""
    from .parity import compare
    return compare(source, against=against, **kw)


# ------------------------------------------------------------------------------------------------ CLI
def add_export_arguments(p):
    from .parity import DEFAULT_TAPS
    p.add_argument("--model", required=True, help="HF dir, .gguf, or registered name")
    p.add_argument("-o", "--output", required=True, help="artifact file to write, e.g. ref.wbref")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of a text prompt")
    p.add_argument("--taps", default=None, help=f"comma list of tap patterns (default {','.join(DEFAULT_TAPS)})")
    p.add_argument("--reference", default="torch:cpu:float64")
    p.add_argument("--decode-steps", type=int, default=4, help="decode steps parity --against runs by default")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--nproc", type=int, default=1, help="shard the reference over N processes (torchrun)")


def cmd_export(args) -> int:
    prompt = args.prompt
    if args.prompt_ids:
        prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    taps = [t for t in args.taps.split(",") if t] if args.taps else None
    out = export(args.model, args.output, prompt=prompt, taps=taps, reference=args.reference,
                 decode_steps=args.decode_steps, max_tokens=args.max_tokens, world=args.nproc)
    art = read(out)
    print(f"wrote {out}: {len(art.taps)} taps of {art.manifest['reference']} over "
          f"{len(art.token_ids)} tokens ({out.stat().st_size / 1e6:.1f} MB), weights "
          f"{art.manifest['hashes']['weights'][:16]}")
    return 0


def add_cli(sub):
    """``workbench reference export --model M -o ref.wbref`` (compare with ``workbench parity --against``)."""
    r = sub.add_parser("reference", help="export the float64 reference's taps for other machines")
    rs = r.add_subparsers(dest="refcmd", required=True)
    e = rs.add_parser("export", help="run the reference once, write its taps + manifest (one .wbref file)")
    add_export_arguments(e)
    e.set_defaults(fn=cmd_export)
    return r


def main(argv=None) -> int:
    """``python -m workbench.reference_artifact export|compare ...`` (the same as ``workbench reference
    export`` / ``workbench parity --against``)."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="workbench reference")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    add_export_arguments(e)
    e.set_defaults(fn=cmd_export)
    c = sub.add_parser("compare")
    c.add_argument("against")
    c.add_argument("--model", default=None)
    c.add_argument("--backends", default="all")
    c.add_argument("--dtypes", default="float32")
    c.add_argument("--decode-steps", type=int, default=None)
    c.add_argument("--db", default=None)
    c.add_argument("--no-store", action="store_true")
    c.add_argument("--no-anchor", action="store_true")
    c.add_argument("--json", default=None)
    c.set_defaults(fn=lambda a: _cmd_compare(a))
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"workbench reference {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _cmd_compare(a) -> int:
    kw = dict(backends=a.backends, dtypes=a.dtypes, db=a.db, store=not a.no_store, anchor=not a.no_anchor)
    art = read(a.against)
    kw["decode_steps"] = a.decode_steps if a.decode_steps is not None else art.manifest.get("decode_steps", 4)
    rep = compare_against(art, source=a.model, **kw)
    print(rep.summary())
    if a.json:
        rep.to_frame().to_json(a.json, orient="records", indent=1, double_precision=15)
    return 0 if rep.passed else 1


if __name__ == "__main__":
    import sys
    sys.exit(main())

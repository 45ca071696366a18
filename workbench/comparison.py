"""``wb.compare`` and ``workbench reference``: the dispatch above the three ways a reference is had.

    parity.compare              the engine: the reference run here (or given), the anchor, every target's rows
    reference_artifact          the .wbref file: write / read / hash-check, and the one-process export
    distributed                 the reference (and targets) sharded over torchrun processes

This module sits above all three and is the only one that chooses between them: ``against=FILE`` is read here,
``world=N`` runs the sharded export here, and either way ``parity.compare`` is handed the resolved
:class:`~workbench.reference_artifact.Artifact` (so parity knows nothing of files or ranks, and neither
reference_artifact nor distributed calls back up into the dispatch). ``workbench reference export`` (and
``--nproc N``) is here for the same reason.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import parity
from . import reference_artifact as ra


def compare(source="gemma3-270m", backends=None, dtypes=None, reference: str = "torch:cpu:float64",
            prompt: str | list[int] | None = None, taps=None, decode_steps: int = 4, references="auto",
            tolerances: dict | None = None, db=None, store: bool = True, progress=True,
            fault: dict | None = None, max_tokens: int = 64, images=None, audio=None, anchor: bool = True,
            decode: str = "plain", budgets: bool = True, against=None,
            world: int = 1) -> parity.ParityReport:
    """``wb.compare``: every backend x dtype against the reference, tap by tap and layer by layer — the
    engine and every parameter but the two below are :func:`workbench.parity.compare`'s (see its docstring).

    against: a reference artifact (``workbench reference export``; a path or an Artifact) is the reference, once
    its weight/config/tokenizer hashes match the local model's; its prompt and taps are the comparison's (a
    different ``prompt`` is refused), and ``source`` defaults to the model it names. world=N: the reference
    sharded over N torchrun processes (workbench.distributed: gloo on CPUs, NCCL for torch:cuda), written to a
    temporary artifact; the targets and the anchor run here."""
    art = None
    if against is not None or world > 1:
        art, source, prompt, taps, reference = resolve_against(against, world, source, prompt, taps, decode_steps,
                                                               reference, max_tokens, progress is True)
    return parity.compare(source, backends=backends, dtypes=dtypes, reference=reference, prompt=prompt, taps=taps,
                          decode_steps=decode_steps, references=references, tolerances=tolerances, db=db,
                          store=store, progress=progress, fault=fault, max_tokens=max_tokens, images=images,
                          audio=audio, anchor=anchor, decode=decode, budgets=budgets, against=art)


def resolve_against(against, world, source, prompt, taps, decode_steps, reference, max_tokens, progress):
    """For ``compare(against=FILE)`` / ``compare(world=N)``: the Artifact (read, or made now by N ranks), and the
    (source, prompt, taps, reference label) the comparison runs with. The hashes are checked by
    ``Artifact.reference_taps`` once the local model is read."""
    if world > 1:
        if against is not None:
            raise ValueError("compare: give against= (a stored reference) or world= (shard the reference), not both")
        td = tempfile.mkdtemp(prefix="wb-tpref-")
        try:
            p = export(source, Path(td) / "ref.wbref", prompt=prompt, taps=taps, reference=reference,
                       decode_steps=decode_steps, max_tokens=max_tokens, world=world, progress=progress)
            art = ra.read(p)
        finally:
            shutil.rmtree(td, ignore_errors=True)
        art.label = f"{world} ranks x {reference}"
    else:
        art = against if isinstance(against, ra.Artifact) else ra.read(against)
        if prompt is not None and [int(i) for i in np.asarray(prompt).reshape(-1)] != art.token_ids \
                if not isinstance(prompt, str) else prompt != art.manifest.get("prompt"):
            raise ValueError(f"{art.path}: the artifact fixes the prompt ({len(art.token_ids)} tokens); "
                             "leave prompt unset to use it")
        art.label = f"{art.path.name} <- {art.manifest['reference']}"
        if source is None:
            source = art.manifest["model"]
    taps = list(taps or art.manifest["taps"])
    return art, source, art.token_ids, taps, art.label


def export(source, out, prompt=None, taps=None, reference: str = "torch:cpu:float64", decode_steps: int = 4,
           max_tokens: int = 64, world: int = 1, progress: bool = True) -> Path:
    """``workbench reference export``: run the reference once and write its taps (one process:
    :func:`workbench.reference_artifact.export`; ``world`` > 1: sharded over that many torchrun processes,
    :func:`workbench.distributed.export_sharded`)."""
    if world > 1:
        from .distributed import export_sharded    # torch.distributed: imported only when sharding
        return export_sharded(source, out, prompt=prompt, taps=taps, reference=reference,
                              decode_steps=decode_steps, max_tokens=max_tokens, world=world, progress=progress)
    return ra.export(source, out, prompt=prompt, taps=taps, reference=reference, decode_steps=decode_steps,
                     max_tokens=max_tokens, progress=progress)


# ------------------------------------------------------------------------------------------------ CLI
def add_export_arguments(p):
    p.add_argument("--model", required=True, help="HF dir, .gguf, or registered name")
    p.add_argument("-o", "--output", required=True, help="artifact file to write, e.g. ref.wbref")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of a text prompt")
    p.add_argument("--taps", default=None,
                   help=f"comma list of tap patterns (default {','.join(parity.DEFAULT_TAPS)})")
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
    art = ra.read(out)
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
    """``python -m workbench.comparison export|compare ...`` (the same as ``workbench reference export`` /
    ``workbench parity --against``, except that ``compare`` takes its decode steps from the artifact by default
    and writes the rows' JSON at full precision)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m workbench.comparison")
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
    c.set_defaults(fn=_cmd_compare)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"workbench reference {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def _cmd_compare(a) -> int:
    art = ra.read(a.against)
    steps = a.decode_steps if a.decode_steps is not None else art.manifest.get("decode_steps", 4)
    rep = compare(a.model, backends=a.backends, dtypes=a.dtypes, decode_steps=steps, db=a.db, store=not a.no_store,
                  anchor=not a.no_anchor, against=art)
    print(rep.summary())
    if a.json:
        rep.to_frame().to_json(a.json, orient="records", indent=1, double_precision=15)
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())

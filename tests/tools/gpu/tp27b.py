#!/usr/bin/env python3
"""Issue 17: the float64 reference of a large Gemma sharded over several GPUs (tensor parallel, NCCL), and
torch:cuda bfloat16 on ONE GPU compared with it per layer, prefill and cached decode steps.

    python3 tests/tools/gpu/tp27b.py --model gemma3-27b --nproc 2 --out $OUT        (nvidia-h200-x2)
    python3 tests/tools/gpu/tp27b.py --model gemma4-31b --nproc 4 --out $OUT        (nvidia-h200-x4)

Steps, each timed and printed as it goes: (1) ``workbench make-random MODEL`` (released config, seeded random
bfloat16 weights) onto the local disk; (2) ``workbench reference export --nproc N --reference
torch:cuda:float64``: each rank reads only its shard, the float64 forward runs over N GPUs with NCCL
all-reduces, rank 0 writes the taps (three passes: cold, warm, and one with every collective bracketed by
device syncs for the all-reduce time share); (3) ``wb.compare(against=the artifact)`` with torch:cuda bfloat16
on GPU 0 (prefill + decode steps, per tap and layer). Writes OUT/tp.md (tables) and OUT/tp.json (everything),
OUT/runs.sqlite (the stored parity run, for the dashboard). Keep NVLink multicast off (tp27b.sh sets it).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gib(b):
    return f"{b / 2**30:.1f}" if b is not None else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-27b")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--dtypes", default="bfloat16", help="target dtypes on one GPU (comma list)")
    ap.add_argument("--disk", default=os.environ.get("WB_DISK", "/tmp/wb-scale"))
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--cpu", action="store_true", help="dry run of the same steps on the CPU (gloo; float32 target)")
    ap.add_argument("--overrides", default=None, help="JSON config overrides for make-random (dry runs: shrink it)")
    a = ap.parse_args(argv)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np
    import torch

    ngpu = a.nproc if a.cpu else torch.cuda.device_count()
    names = ["cpu"] * ngpu if a.cpu else [torch.cuda.get_device_name(i) for i in range(ngpu)]
    dev = "cpu" if a.cpu else "cuda"
    log(f"torch {torch.__version__}, {ngpu} GPU(s): {names}; NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
    if os.environ.get("NCCL_NVLS_ENABLE") != "0" and not a.cpu:
        print("refusing to run: NVLink multicast must stay off (NCCL_NVLS_ENABLE=0; run through tp27b.sh)")
        return 2
    if ngpu < a.nproc:
        print(f"needs {a.nproc} GPUs for the sharded reference, found {ngpu}: not run")
        return 2
    res: dict = dict(model=a.model, nproc=a.nproc, gpus=names, torch=torch.__version__, tokens=a.tokens)

    # (1) the checkpoint
    from workbench import make_random as mr
    disk = pathlib.Path(a.disk)
    disk.mkdir(parents=True, exist_ok=True)
    ck = disk / a.model
    du = shutil.disk_usage(disk)
    log(f"disk {disk}: {du.free / 1e9:.0f} GB free; {a.model}: {mr.count_params(a.model) / 1e9:.2f}B parameters")
    t0 = time.perf_counter()
    if not (ck / "config.json").exists():
        mr.make_random(a.model, ck, seed=0, dtype="bfloat16",
                       overrides=json.loads(a.overrides) if a.overrides else None)
    res["make_random_s"] = time.perf_counter() - t0
    log(f"make-random: {res['make_random_s']:.0f} s")

    # (2) the sharded float64 reference
    from workbench import distributed as D
    from workbench import reference_artifact as ra
    cfg = D.read_config(ck)[0]
    ids = [int(i) for i in np.random.default_rng(0).integers(0, cfg.vocab_size, a.tokens)]
    ref = disk / f"{a.model}-tp{a.nproc}.wbref"
    t0 = time.perf_counter()
    D.export_sharded(ck, ref, prompt=ids, reference=f"torch:{dev}:float64", decode_steps=a.decode_steps,
                     world=a.nproc, progress=True, timing=True)
    res["export_wall_s"] = time.perf_counter() - t0
    art = ra.read(ref)
    res["ranks"] = art.manifest["ranks"]
    log(f"reference export over {a.nproc} GPUs: {res['export_wall_s']:.0f} s wall (torchrun start, load, 3 passes)")

    # (3) bfloat16 (and any other dtypes) on one GPU against it
    import workbench as wb
    if not a.cpu:
        torch.cuda.reset_peak_memory_stats(0)
    t0 = time.perf_counter()
    rep = wb.compare(ck, backends=f"torch:{dev}", dtypes=a.dtypes, against=art, decode_steps=a.decode_steps,
                     references=(), anchor=False, budgets=False, db=str(out / "runs.sqlite"), progress=True)
    res["target_wall_s"] = time.perf_counter() - t0
    res["target_gpu_peak"] = None if a.cpu else int(torch.cuda.max_memory_allocated(0))
    res["summary"] = rep.summary()
    res["rows"] = rep.rows
    res["run_id"] = rep.run_id
    print(rep.summary(), flush=True)

    # tables
    L = []
    L.append(f"### {a.model} float64 reference over {a.nproc} x {names[0]} (NCCL, NVLS off) vs torch:cuda "
             f"{a.dtypes} on one GPU\n")
    L.append(f"{mr.count_params(json.loads((ck / 'config.json').read_text())) / 1e9:.2f}B parameters, {a.tokens} prompt tokens, {a.decode_steps} decode "
             f"steps; make-random {res['make_random_s']:.0f} s; export wall {res['export_wall_s']:.0f} s; target "
             f"compare wall {res['target_wall_s']:.0f} s, target GPU peak {gib(res['target_gpu_peak'])} GiB\n")
    L.append("| rank | weights GiB | GPU peak GiB | host peak RSS GiB | load s | forward s (cold) | forward s (warm) "
             "| all-reduce/gather s (timed pass) | share of the timed pass | collectives |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["ranks"]:
        share = r["comm_s"] / r["timed_forward_s"] if r.get("timed_forward_s") else float("nan")
        L.append(f"| {r['rank']} | {gib(r['weight_bytes'])} | {gib(r.get('gpu_peak'))} | {gib(r['peak_rss'])} | "
                 f"{r['load_s']:.1f} | {r['forward_s']:.2f} | {r.get('warm_forward_s', float('nan')):.2f} | "
                 f"{r['comm_s']:.3f} | {100 * share:.1f}% | {r['comm_calls']} ({r['comm_bytes'] / 1e6:.0f} MB) |")
    L.append("")
    for d in a.dtypes.split(","):
        for ph in ("prefill", "decode"):
            rows = [r for r in rep.rows if r["dtype"] == d and r["phase"] == ph]
            if not rows:
                continue
            L.append(f"\n{d} {ph}: per-layer relative max error (max|d| / max|ref|) vs the float64 reference\n")
            L.append("| layer | attn_out | mlp_out | resid_post |")
            L.append("|---|---|---|---|")
            by = {(r["tap"], r["layer"]): r["rel_max"] for r in rows}
            for i in range(cfg.num_hidden_layers):
                L.append(f"| {i} | " + " | ".join(f"{by.get((t, i), float('nan')):.2e}"
                                                  for t in ("hook_attn_out", "hook_mlp_out", "hook_resid_post")) + " |")
            lg = [r for r in rows if r["tap"] == "logits"]
            if lg:
                L.append(f"| logits | rel max {lg[0]['rel_max']:.2e}, top-1 agreement {lg[0].get('top1')} | | |")
    md = "\n".join(L)
    print(md, flush=True)
    (out / "tp.md").write_text(md + "\n\n```\n" + rep.summary() + "\n```\n")
    (out / "tp.json").write_text(json.dumps(res, default=str, indent=1))
    if not a.cpu:
        subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""``workbench bench --backends mlx:gpu --dtypes bfloat16,float32 --peers`` on the card, as a user types it (issue 19):
the workbench rows (the public engine: the route ``m.generate`` runs) and mlx-lm in the same call.

    python3 tests/tools/gpu/mlxpeers_bench.py [--out DIR] [--prompt-len 512] [--gen-len 256]

On a random checkpoint of the Gemma 3 270M config. Writes DIR/mlxpeers.md.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decode_bench as db  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db.OUTFILE = out / "mlxpeers.md"
    ckpt = db.make("gemma3-270m", pathlib.Path("/tmp/wb-decode/g270m"))
    cmd = [sys.executable, "-m", "workbench", "bench", "--model", str(ckpt), "--backends", "mlx:gpu", "--dtypes",
           args.dtypes, "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--peers", "--no-store"]
    env = dict(os.environ)
    db.say(f"# {' '.join(cmd[1:])} on {db.card()}\n")
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
    db.say("```\n" + r.stdout[-8000:] + "\n```")
    if r.returncode:
        db.say("stderr:\n```\n" + r.stderr[-3000:] + "\n```")
    db.say(f"rc {r.returncode}, {time.perf_counter() - t:.0f} s")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())

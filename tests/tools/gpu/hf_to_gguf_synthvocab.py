#!/usr/bin/env python3
"""llama.cpp's own ``convert_hf_to_gguf.py`` on a tokenizer-less checkpoint (``workbench make-random`` writes
weights and config.json only), with a synthetic vocabulary: ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>`` (ids 0-3,
control tokens, as in Gemma's vocabulary) and ``<tN>`` for every other id, sentencepiece-style ("llama" tokenizer
model). The weights and every other GGUF field are written by llama.cpp's converter itself, unchanged; only
``set_vocab`` is fed made-up token strings, which is all llama-bench needs (it runs random ids).

    python3 tests/tools/gpu/hf_to_gguf_synthvocab.py LLAMA_CPP_DIR MODEL_DIR --outtype f16 --outfile OUT.gguf

LLAMA_CPP_DIR: llama.cpp's source tree (the llama-cpp-python sdist's vendor/llama.cpp), holding
convert_hf_to_gguf.py, conversion/ and gguf-py/. Needs torch and numpy (and ``gguf``: gguf-py from that tree is
used first, a carried ``gguf`` wheel otherwise).
"""
from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, model = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        print(f"hf_to_gguf_synthvocab: no convert_hf_to_gguf.py in {src}", file=sys.stderr)
        return 2
    if not (model / "config.json").is_file():
        print(f"hf_to_gguf_synthvocab: {model} has no config.json", file=sys.stderr)
        return 2
    sys.path.insert(0, str(src))
    if (src / "gguf-py").is_dir():
        sys.path.insert(1, str(src / "gguf-py"))
    import conversion.base as base  # noqa: E402  (llama.cpp's converter package)

    def synthetic(self):
        n = int(self.find_hparam(["vocab_size"]))
        toks = [b"<pad>", b"<eos>", b"<bos>", b"<unk>"] + [f"<t{i}>".encode() for i in range(4, n)]
        control = base.SentencePieceTokenTypes.CONTROL
        types = [control, control, control, base.SentencePieceTokenTypes.UNKNOWN] + \
            [base.SentencePieceTokenTypes.NORMAL] * (n - 4)
        return toks[:n], [0.0] * n, types[:n]

    base.TextModel._create_vocab_sentencepiece = synthetic
    placeholder = model / "tokenizer.model"      # makes Gemma's set_vocab take the sentencepiece branch
    made = not placeholder.exists()
    if made:
        placeholder.write_bytes(b"")
    try:
        sys.argv = [str(script), str(model)] + sys.argv[3:]
        import runpy
        runpy.run_path(str(script), run_name="__main__")
    finally:
        if made:
            placeholder.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

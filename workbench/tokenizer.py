"""Gemma tokenizers over Hugging Face ``tokenizers`` (no transformers needed).

``Tokenizer.from_gguf(path)`` rebuilds, from the vocabulary inside a GGUF, the same ``tokenizers.Tokenizer`` that
transformers builds for that file (``AutoTokenizer.from_pretrained(dir, gguf_file=name)``; transformers 5:
``integrations/gguf/gguf_tokenizer_mapping.py`` -> ``gemma_tokenizer`` + ``GemmaTokenizer`` +
``add_gguf_special_tokens`` + ``TokenizersBackend.update_post_processor``):

* SentencePiece vocabularies (``tokenizer.ggml.model == "llama"``) of gemma/gemma2/gemma3: tokens made only of
  spaces (stored as real spaces, e.g. ``"  "``) are respelled ``"▁▁"``; the file has no merges, so they are
  rebuilt from the vocabulary (``generate_merges``) ranked by the token's position in the file (Gemma's scores
  do not follow merge order). Gemma 4 files (``"gemma4"``) carry their merges.
* a BPE model (byte fallback, ``fuse_unk``), normalizer ``Replace(" ", "▁")``, pre-tokenizer
  ``Split(" ", merged_with_previous)``, decoder ``Replace("▁", " ") + ByteFallback + Fuse``;
* added tokens: the named specials (pad/eos/bos/unk/mask), every CONTROL token (type 3) as a special token and
  every USER_DEFINED token (type 4) that is in the vocabulary as a plain added token, all ``normalized=False``;
* post-processor ``TemplateProcessing("<bos> $A")`` when the file asks for a BOS.

Rebuilding the merge table takes a few seconds; it is cached (token-id pairs, ``.npy``) under
``$WORKBENCH_CACHE/tokenizers`` (default ``~/.cache/gemma-workbench/tokenizers``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Tokenizer", "generate_merges"]

_SPM_SPACE = "\u2581"
_CACHE_VERSION = 1
CONTROL, USER_DEFINED = 3, 4


def _cache_root() -> Path:
    from .weights.registry import cache_root
    return cache_root() / "tokenizers"


def generate_merges(vocab: dict[str, int], vocab_scores: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """transformers' ``generate_merges``: every split of every token into two vocabulary pieces, ordered by the
    token's score (descending when scores are given, else by id), then longer left/right pieces first."""
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if reverse else vocab
    vget = vocab.get
    out: list[tuple[str, str, float]] = []
    for merge, score in scores.items():
        n = len(merge)
        if n < 2:
            continue
        local = []
        for k in range(1, n):
            li = vget(merge[:k])
            if li is None:
                continue
            ri = vget(merge[k:])
            if ri is None:
                continue
            local.append((li, ri, k))
        if len(local) > 1:
            local.sort()
        for _, _, k in local:
            out.append((merge[:k], merge[k:], score))
    out.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=reverse)
    return [(a, b) for a, b, _ in out]


def _ranked_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """``generate_merges(vocab, {piece: -index})`` without the sorts: with one distinct score per piece the
    result is every piece in score order (file order) with its splits longest-left-part first."""
    ranked = {}
    for i, t in enumerate(pieces):       # dict semantics of {t: -i}: last index wins, first position kept
        ranked[t] = i
    out: list[tuple[str, str]] = []
    app = out.append
    for t in sorted(ranked, key=ranked.__getitem__):
        for k in range(len(t) - 1, 0, -1):
            left = t[:k]
            if left in vocab:
                right = t[k:]
                if right in vocab:
                    app((left, right))
    return out


def _merges_from_ids(pieces: list[str], ids: np.ndarray) -> list[tuple[str, str]]:
    get = pieces.__getitem__
    return list(zip(map(get, ids[:, 0].tolist()), map(get, ids[:, 1].tolist())))


def _vocab_and_merges(meta: dict, cached_merges: "np.ndarray | None" = None):
    """(pieces, vocab, merges, generated) as transformers builds them for this GGUF vocabulary."""
    arch, model = meta.get("architecture"), meta.get("model")
    tokens: list[str] = list(meta["tokens"])
    if model == "llama" and arch in ("gemma", "gemma2", "gemma3"):
        pieces = [_SPM_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(pieces)}
        if cached_merges is not None:
            merges = _merges_from_ids(pieces, cached_merges)
        else:
            merges = _ranked_merges(pieces, vocab)
        return pieces, vocab, merges, True
    if model in ("llama", "gemma4"):
        vocab = {t: i for i, t in enumerate(tokens)}
        if meta.get("merges"):
            return tokens, vocab, [tuple(m.split(" ")) for m in meta["merges"]], False
        if cached_merges is not None:
            return tokens, vocab, _merges_from_ids(tokens, cached_merges), True
        scores = meta.get("scores")
        scores = scores.tolist() if scores is not None else [0.0] * len(tokens)
        return tokens, vocab, generate_merges(vocab, dict(zip(tokens, scores))), True
    raise ValueError(f"GGUF tokenizer model {model!r} (architecture {arch!r}) is not supported; "
                     "Gemma files use 'llama' (SentencePiece) or 'gemma4'")


def _gguf_add_bos(meta: dict) -> bool:
    add_bos = meta.get("add_bos")
    if meta.get("model") == "llama" and add_bos is None:
        return True             # llama.cpp's default for SentencePiece vocabularies
    if meta.get("model") == "gemma4":
        return False            # transformers follows the reference tokenizer (the chat template writes <bos>)
    return bool(add_bos)


def _build_from_gguf_metadata(meta: dict, vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The tokenizers.Tokenizer transformers builds for this GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens: list[str] = meta["tokens"]

    def tok_str(key, default):
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else default

    unk = tok_str("unk_id", "<unk>")
    # GemmaTokenizer(vocab, merges) builds its BPE with its default unk_token "<unk>" (the file's unk id only names
    # the special token); byte fallback makes it all but unused
    tk = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None,
                         byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tk.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.normalizer = normalizers.Replace(" ", _SPM_SPACE)

    # named special tokens (GemmaTokenizer / TokenizersBackend), then CONTROL and USER_DEFINED tokens. (transformers
    # would append a missing named token, e.g. "<mask>", as a new id; here only tokens of the vocabulary are marked.)
    named = [tok_str("bos_id", "<bos>"), tok_str("eos_id", "<eos>"), unk, tok_str("pad_id", "<pad>"), "<mask>"]
    special_text = [t for t in dict.fromkeys(named) if t in vocab]
    types = meta.get("token_types") or []
    special_text += [t for t, ty in zip(tokens, types) if ty == CONTROL]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_text])
    known = set(special_text)
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
            if ty == USER_DEFINED and (t in vocab or t in known)]
    if user:
        tk.add_tokens(user)

    add_bos = _gguf_add_bos(meta)
    bos = tok_str("bos_id", None)
    if add_bos and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(meta["bos_id"]))])
    else:
        tk.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tk


class Tokenizer:
    """Encode/decode, special ids and Gemma's chat template over a ``tokenizers.Tokenizer``."""

    def __init__(self, hf_tokenizer, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = True,
                 chat_template: str | None = None, source: str | None = None):
        self._tok = hf_tokenizer
        self._vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        find = hf_tokenizer.token_to_id
        self.bos_id = bos_id if bos_id is not None else find("<bos>")
        self.eos_id = eos_id if eos_id is not None else find("<eos>")
        self.pad_id = pad_id if pad_id is not None else find("<pad>")
        self.unk_id = unk_id if unk_id is not None else find("<unk>")
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.source = source
        stops = [self.eos_id] + [find(t) for t in ("<end_of_turn>", "<turn|>")]
        self.stop_ids: list[int] = [i for i in dict.fromkeys(stops) if i is not None]
        self._gemma4_chat = find("<|turn>") is not None and find("<turn|>") is not None
        self._special_ids = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face ``tokenizer.json`` (special tokens and the chat template from a ``tokenizer_config.json``
        beside it, when there is one)."""
        from tokenizers import Tokenizer as HFTokenizer
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no tokenizer.json here")
        try:
            tk = HFTokenizer.from_file(str(p))
        except Exception as e:
            raise ValueError(f"{p}: not a valid tokenizers JSON file ({e})") from None
        conf: dict = {}
        cfile = p.parent / "tokenizer_config.json"
        if cfile.is_file():
            try:
                conf = json.loads(cfile.read_text())
            except (OSError, ValueError):
                conf = {}
        template = conf.get("chat_template")
        jinja = p.parent / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()

        def tid(name):
            t = conf.get(name)
            if isinstance(t, dict):
                t = t.get("content")
            return tk.token_to_id(t) if isinstance(t, str) else None

        return cls(tk, bos_id=tid("bos_token"), eos_id=tid("eos_token"), pad_id=tid("pad_token"),
                   unk_id=tid("unk_token"), add_bos=bool(conf.get("add_bos_token", True)),
                   chat_template=template if isinstance(template, str) else None, source=str(p))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, cache: bool = True) -> "Tokenizer":
        """The tokenizer inside a GGUF, built the way transformers builds it (see the module docstring). The
        rebuilt merge table is cached (keyed by the file's size, mtime and head/tail hash); ``cache=False`` skips
        the cache. Raises GGUFError when the file has no vocabulary."""
        from .weights.gguf import gguf_tokenizer_metadata
        p = Path(path).expanduser()
        meta = gguf_tokenizer_metadata(p)
        key = hashlib.sha256(json.dumps({**meta["fingerprint"], "v": _CACHE_VERSION}, sort_keys=True).encode())
        cfile = _cache_root() / f"{_safe(p.stem)}-merges-{key.hexdigest()[:20]}.npy"
        cached = None
        if cache and cfile.is_file():
            try:
                cached = np.load(cfile, allow_pickle=False)
                n = len(meta["tokens"])
                if cached.ndim != 2 or cached.shape[1] != 2 or cached.size and not (0 <= cached.min() and
                                                                                   cached.max() < n):
                    cached = None
            except Exception:
                cached = None
        pieces, vocab, merges, generated = _vocab_and_merges(meta, cached)
        if cache and generated and cached is None:
            try:
                ids = np.array([(vocab[a], vocab[b]) for a, b in merges], dtype=np.int32).reshape(-1, 2)
                cfile.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=cfile.parent)
                try:
                    with os.fdopen(fd, "wb") as f:
                        np.save(f, ids)
                    os.replace(tmp, cfile)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            except (OSError, KeyError):
                pass
        tk = _build_from_gguf_metadata(meta, vocab, merges)
        return cls(tk, bos_id=meta["bos_id"], eos_id=meta["eos_id"], pad_id=meta["pad_id"], unk_id=meta["unk_id"],
                   add_bos=_gguf_add_bos(meta), chat_template=meta.get("chat_template"), source=str(p))

    @classmethod
    def from_source(cls, path: str | os.PathLike) -> "Tokenizer | None":
        """An HF checkpoint dir (its tokenizer.json), a tokenizer.json, or a .gguf. None when the source carries
        no tokenizer (a dir without tokenizer.json, a GGUF without a vocabulary)."""
        p = Path(path).expanduser()
        if p.is_dir():
            return cls.from_file(p / "tokenizer.json") if (p / "tokenizer.json").is_file() else None
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory")
        if p.suffix.lower() == ".gguf":
            from .weights.gguf import read_gguf
            md = read_gguf(p).metadata
            if not md.get("tokenizer.ggml.tokens"):
                return None
            return cls.from_gguf(p)
        if p.suffix.lower() == ".json":
            return cls.from_file(p)
        raise ValueError(f"{p}: not a tokenizer source (expected an HF checkpoint dir, tokenizer.json or .gguf)")

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self._vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"stop_ids={self.stop_ids}, source={self.source!r})")

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _check_ids(self, ids) -> list[int]:
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise ValueError(f"decode takes one sequence of token ids, got shape {arr.shape}")
        out = []
        for x in arr.reshape(-1).tolist():
            if isinstance(x, float) and not float(x).is_integer():
                raise ValueError(f"token id {x!r} is not an integer")
            i = int(x)
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is out of range for this tokenizer (vocab_size {self._vocab_size}; "
                                 f"valid ids are 0..{self._vocab_size - 1})")
            out.append(i)
        return out

    def id_to_piece(self, i: int) -> str:
        (i,) = self._check_ids([i])
        return self._tok.id_to_token(i)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (special-token text such as ``<start_of_turn>`` becomes its token), with the BOS
        id first when ``add_bos``."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        return [([self.bos_id] if add_bos and self.bos_id is not None else []) + e.ids
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(self._check_ids(list(ids) if not isinstance(ids, np.ndarray) else ids),
                                skip_special_tokens=skip_special_tokens)

    def is_special(self, i: int) -> bool:
        return int(i) in self._special_ids

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Gemma's chat format as text (starting with the BOS token's text).

        Gemma 1-3 (Gemma 3's template): ``<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n``;
        a leading system message is prepended to the first user turn followed by a blank line; role "assistant" is
        written "model"; roles must alternate user/model starting with user; message text is stripped. Gemma 4 vocabularies use ``<|turn>``/``<turn|>``
        with a native system turn."""
        msgs = _check_messages(messages)
        bos = self._tok.id_to_token(self.bos_id) if self.bos_id is not None else ""
        if self._gemma4_chat:
            return _gemma4_chat(msgs, bos, add_generation_prompt)
        return _gemma_chat(msgs, bos, add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template; its leading ``<bos>`` text is the only BOS (none is added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


def _safe(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:60] or "tokenizer"


def _content_text(content, image_token: str) -> str:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, (list, tuple)):
        parts = []
        for item in content:
            if not isinstance(item, dict) or "type" not in item:
                raise ValueError(f"message content items must be dicts with a 'type', got {item!r}")
            if item["type"] == "text":
                parts.append(str(item.get("text", "")).strip())
            elif item["type"] == "image":
                parts.append(image_token)
            else:
                raise ValueError(f"unsupported message content type {item['type']!r} (text and image only)")
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ("system", "user", "assistant", "model"):
            raise ValueError(f"message {i}: unknown role {m['role']!r} (system, user, assistant/model)")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
    return list(messages)


def _gemma_chat(msgs: list[dict], bos: str, add_generation_prompt: bool) -> str:
    prefix = ""
    if msgs[0]["role"] == "system":       # as Gemma 3's template: not stripped; the first text part of a list
        c = msgs[0]["content"]
        if isinstance(c, str):
            prefix = c + "\n\n"
        else:
            texts = [it.get("text", "") for it in c if isinstance(it, dict)] if isinstance(c, (list, tuple)) else []
            if not texts:
                raise ValueError("the system message has no text")
            prefix = str(texts[0]) + "\n\n"
        msgs = msgs[1:]
    out = [bos]
    for i, m in enumerate(msgs):
        role = "model" if m["role"] in ("assistant", "model") else m["role"]
        if (role == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/... "
                             f"(message {i} after the system message is {m['role']!r})")
        out.append(f"<start_of_turn>{role}\n" + (prefix if i == 0 else "")
                   + _content_text(m["content"], "<start_of_image>") + "<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _gemma4_chat(msgs: list[dict], bos: str, add_generation_prompt: bool) -> str:
    out = [bos]
    if msgs[0]["role"] == "system":
        out.append("<|turn>system\n" + _content_text(msgs[0]["content"], "<|image|>") + "<turn|>\n")
        msgs = msgs[1:]
    for m in msgs:
        role = "model" if m["role"] in ("assistant", "model") else m["role"]
        out.append(f"<|turn>{role}\n" + _content_text(m["content"], "<|image|>") + "<turn|>\n")
    if add_generation_prompt:
        out.append("<|turn>model\n")
    return "".join(out)

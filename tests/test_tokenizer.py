"""workbench.tokenizer: the GGUF tokenizer of Gemma 3 270M against transformers' tokenizer for the same file,
round trips, Gemma's chat template, special ids and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.tokenizer import Tokenizer, generate_merges

PROMPTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "   three leading, two trailing  ",
    "multiple    spaces   inside     here",
    " " * 40,
    "line one\nline two\n\nline four\n",
    "tabs\tand\t\tmore\ttabs",
    "windows\r\nline endings\r\n",
    "\n\n\n   \t \n",
    "Café, naïve, résumé, Ångström, Straße, coöperate",
    "e\u0301 (decomposed) vs é (composed)",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️ 🤖",
    "العربية من اليمين إلى اليسار",
    "עברית: שלום עולם",
    "Mixed ltr עברית and العربية text 123",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "    indented = {'a': [1, 2, 3]}\n\tif x:\n\t\tpass",
    "3.14159 2,718 1e-10 -42 0x1F 1000000 ½ ⅔ ²",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "text with <start_of_turn> inside and <end_of_turn> too",
    "<bos><eos><pad><unk><mask>",
    "almost special: <start_of_turn <end_of_turn> <b o s>",
    "<unused0>[multimodal]<start_of_image>",
    "null \x00 and control \x07 \x1b[31m chars",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "URL https://example.com/path?q=1&r=2#frag and email a.b@c.de",
    "ALL CAPS and camelCaseWords and snake_case_words",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="session")
def tok(g270m) -> Tokenizer:
    return Tokenizer.from_gguf(g270m)


@pytest.fixture(scope="session")
def hf_tok(g270m):
    """transformers' tokenizer for the same GGUF (AutoTokenizer.from_pretrained(dir, gguf_file=name)), as saved in the
    shared float32 HF export of this GGUF (built once, ~2 min, shared with test_gguf and the HF reference); without
    torch, straight from the GGUF (~35 s)."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                                              "(pip install gemma-workbench[reference])")
    try:
        pytest.importorskip("torch")
        from workbench.references.hf import DEFAULT_GGUF_CACHE, export_hf_dir_from_gguf
        d = export_hf_dir_from_gguf(g270m, DEFAULT_GGUF_CACHE / f"{g270m.stem}-float32", "float32")
        return transformers.AutoTokenizer.from_pretrained(str(d))
    except pytest.skip.Exception:
        return transformers.AutoTokenizer.from_pretrained(str(g270m.parent), gguf_file=g270m.name)


def test_special_ids(tok):
    assert tok.vocab_size == len(tok) == 262144
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 1, 0, 3)
    assert tok.stop_ids == [1, 106]
    assert tok.id_to_piece(106) == "<end_of_turn>" and tok.id_to_piece(105) == "<start_of_turn>"
    assert tok.piece_to_id("<bos>") == 2
    assert tok.is_special(106) and not tok.is_special(107)


@pytest.mark.reference
def test_backend_is_transformers_tokenizer(tok, hf_tok):
    """Not just the same ids: the same tokenizers pipeline (model, merges, added tokens, normalizer, ...)."""
    ours = json.loads(tok.backend.to_str())
    theirs = json.loads(hf_tok.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert ours[key] == theirs[key], key
    for key in ("type", "unk_token", "fuse_unk", "byte_fallback", "ignore_merges", "vocab"):
        assert ours["model"][key] == theirs["model"][key], key
    assert ours["model"]["merges"] == theirs["model"]["merges"]


@pytest.mark.reference
@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_encode_matches_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_bos=False) == hf_tok.encode(text, add_special_tokens=False)
    ids = tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids[1:]) == text
    assert tok.decode(ids) == "<bos>" + text
    assert tok.decode(ids, skip_special_tokens=True) == tok.decode([i for i in ids if not tok.is_special(i)])


def test_known_ids(tok):
    assert tok.encode("Hello world") == [2, 9259, 1902]
    assert tok.encode("<start_of_turn>user\nhi<end_of_turn>") == [2, 105, 2364, 107, 2202, 106]
    assert tok.encode("  two  spaces ", add_bos=False) == [138, 13498, 138, 35220, 236743]
    assert tok.encode_batch(["Hello world", "hi"]) == [[2, 9259, 1902], tok.encode("hi")]


def test_decode_out_of_range(tok):
    with pytest.raises(ValueError, match=r"token id 262144 is out of range.*vocab_size 262144"):
        tok.decode([2, 262144])
    with pytest.raises(ValueError, match=r"token id -1 is out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_piece(10**9)
    assert tok.decode(np.array([9259, 1902])) == "Hello world"


GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse. "}, {"role": "user", "content": "  Why is the sky blue?\n"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "x2?"}],
    [{"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
     {"role": "user", "content": [{"type": "text", "text": " Describe "}, {"type": "image"},
                                  {"type": "text", "text": "this."}]},
     {"role": "model", "content": "A cat."}],
]


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}]
    assert tok.apply_chat_template(msgs) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n"
        "<start_of_turn>model\n")
    assert tok.apply_chat_template(msgs[1:2], add_generation_prompt=False) == \
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n"
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]
    assert ids.count(tok.bos_id) == 1
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([])


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_template_matches_gemma3_jinja(tok, i):
    jinja2 = pytest.importorskip("jinja2")

    def raise_exception(msg):
        raise ValueError(msg)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    tpl = env.from_string(GEMMA3_TEMPLATE)
    for gen in (True, False):
        want = tpl.render(messages=CONVERSATIONS[i], bos_token="<bos>", add_generation_prompt=gen)
        assert tok.apply_chat_template(CONVERSATIONS[i], add_generation_prompt=gen) == want


def test_gemma4_style_chat_on_gemma4_vocab():
    """A vocabulary with Gemma 4's turn tokens gets Gemma 4's format (native system turn)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "x"])}
    hf = HFTokenizer(WordLevel(vocab, unk_token="<unk>"))
    hf.add_special_tokens([AddedToken(t, special=True) for t in vocab if t.startswith("<")])
    t = Tokenizer(hf)
    assert t.stop_ids == [1, 5]
    assert t.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U "}]) == \
        "<bos><|turn>system\nS<turn|>\n<|turn>user\nU<turn|>\n<|turn>model\n"


def _small_gemma_tokenizer():
    """A Gemma-style tokenizer over a small SentencePiece-like vocabulary, built the GGUF way."""
    from workbench.tokenizer import _build_from_gguf_metadata, _vocab_and_merges
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁w", "or", "ld", "orld", "▁world"]
    tokens += pieces
    types = [3, 3, 3, 2, 3, 3, 3, 4, 4] + [6] * 256 + [1] * len(pieces)
    meta = {"architecture": "gemma3", "model": "llama", "tokens": tokens, "token_types": types, "scores": None,
            "merges": None, "bos_id": 2, "eos_id": 1, "pad_id": 0, "unk_id": 3, "add_bos": True}
    _, vocab, merges, _ = _vocab_and_merges(meta)
    return _build_from_gguf_metadata(meta, vocab, merges)


def test_from_file_and_from_source(g270m, tmp_path):
    backend = _small_gemma_tokenizer()
    t1 = Tokenizer(backend)
    assert t1.encode("hello world") == [2] + [backend.token_to_id(x) for x in ("hello", "▁world")]
    assert t1.decode(t1.encode("hello\n  world\t!")) == "<bos>hello\n  world\t!"      # byte fallback for \t, !
    d = tmp_path / "hfdir"
    d.mkdir()
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": {"content": "<eos>"},
                                                         "pad_token": "<pad>", "chat_template": "{{ x }}"}))
    t2 = Tokenizer.from_file(d / "tokenizer.json")
    assert (t2.bos_id, t2.eos_id, t2.pad_id, t2.unk_id) == (2, 1, 0, 3) and t2.chat_template == "{{ x }}"
    assert t2.stop_ids == [1, 6]
    for text in ("hello world", " hello  world ", "<start_of_turn>hello<end_of_turn>\n", "wörld 😀"):
        assert t2.encode(text) == t1.encode(text)
        assert t2.decode(t2.encode(text, add_bos=False)) == text
    assert Tokenizer.from_source(d).encode("hello") == t1.encode("hello")
    assert Tokenizer.from_source(d / "tokenizer.json").encode("hello") == t1.encode("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Tokenizer.from_source(empty) is None
    t4 = Tokenizer.from_source(g270m)
    assert t4.encode("Hello world") == [2, 9259, 1902]
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_source(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(empty)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a tokenizer source"):
        Tokenizer.from_source(tmp_path / "x.txt")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not a valid tokenizers JSON"):
        Tokenizer.from_source(tmp_path / "bad.json")


def test_generate_merges_matches_reference_definition():
    """The fast merge ranking equals the straightforward definition (transformers' generate_merges)."""
    from workbench.tokenizer import _ranked_merges

    def reference(vocab, vocab_scores=None):
        reverse = vocab_scores is not None
        vocab_scores = dict(vocab_scores) if reverse else vocab
        merges = []
        for merge, piece_score in vocab_scores.items():
            local = []
            for index in range(1, len(merge)):
                piece_l, piece_r = merge[:index], merge[index:]
                if piece_l in vocab and piece_r in vocab:
                    local.append((piece_l, piece_r, piece_score))
            local = sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
            merges.extend(local)
        merges = sorted(merges, key=lambda val: (val[2], len(val[0]), len(val[1])), reverse=reverse)
        return [(val[0], val[1]) for val in merges]

    rng = np.random.default_rng(0)
    alphabet = list("ab▁c")
    pieces = list(dict.fromkeys(alphabet + ["".join(rng.choice(alphabet, rng.integers(2, 6))) for _ in range(300)]))
    pieces += pieces[5:9]              # duplicates: the last index wins, as in a dict comprehension
    vocab = {t: i for i, t in enumerate(pieces)}
    positions = {t: -i for i, t in enumerate(pieces)}
    assert generate_merges(vocab, positions) == reference(vocab, positions)
    assert _ranked_merges(pieces, vocab) == reference(vocab, positions)
    scores = {t: float(rng.integers(0, 5)) for t in vocab}      # ties
    assert generate_merges(vocab, scores) == reference(vocab, scores)
    assert generate_merges(vocab) == reference(vocab)

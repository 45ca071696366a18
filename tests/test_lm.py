"""The LanguageModel front (workbench/lm.py) and the one loader (workbench.loader.build_model).

- ``wb.load`` returns a LanguageModel: decoder + tokenizer + media tensors; its multimodal forward builds the
  towers from the tensors kept at load and opens no checkpoint file again;
- ``wb.compare`` / ``wb.bench`` / ``wb.diverge`` make every model through ``build_model`` (no decoder is
  built anywhere else);
- the decoder's public pass (``embed`` -> ``forward_embeds`` -> ``unembed``) is the forward pass, and the
  decoder itself has no tokenizer, generate or media.
"""
from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, fixture_dir, multimodal_fixture_module, one_torch_thread

import workbench as wb
from workbench import loader
from workbench.lm import DECODER_NAMES, LanguageModel
from workbench.model.gemma import Gemma, InputError

MM = FIXTURES / "multimodal" / "gemma4_mm"


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    with one_torch_thread():
        yield


class _Opened:
    """Records every file opened under ``root`` (builtins.open and the safetensors / checkpoint readers)."""

    def __init__(self, monkeypatch, root: Path):
        self.paths: list[str] = []
        self.root = str(root.resolve())
        real_open = builtins.open

        def spy_open(file, *a, **k):
            if isinstance(file, (str, Path)) and str(Path(file).resolve()).startswith(self.root):
                self.paths.append(str(file))
            return real_open(file, *a, **k)

        def no_read(*a, **k):
            self.paths.append(f"load_hf_checkpoint{a}")
            raise AssertionError("the checkpoint was read again after wb.load")

        monkeypatch.setattr(builtins, "open", spy_open)
        import workbench.weights.safetensors as st
        monkeypatch.setattr(st, "load_hf_checkpoint", no_read)
        monkeypatch.setattr(loader, "read_source", no_read)


def test_load_returns_a_language_model_whose_media_forward_reads_no_file_again(monkeypatch):
    pytest.importorskip("PIL", reason="Pillow (image decoding) is not installed")
    fx = multimodal_fixture_module()
    m = wb.load(MM, backend="torch:cpu", progress=False)
    assert isinstance(m, LanguageModel) and isinstance(m.decoder, Gemma)
    assert m.media is not None and m.media.tensors and all(
        k.startswith(("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")) for k in m.media.tensors)
    assert m.config is m.decoder.config and m.source == str(MM) and m.source_path == Path(MM)
    assert m._encoders is None                      # the towers are built on first use, not at load

    spy = _Opened(monkeypatch, MM)
    ids = [2, 5, m.encoders().tokens.image, 6]       # one image placeholder in token ids
    out = m.forward(ids, images=fx.make_test_images()[:1], audio=None, taps=["vision.*", "logits"],
                    max_soft_tokens=70)
    assert spy.paths == [], f"files opened after load: {spy.paths}"
    assert out.num_image_tokens and out.logits.shape[1] == out.input_ids.shape[1]
    assert np.isfinite(out.logits).all() and any(k.startswith("vision.") for k in out.taps)
    g = m.generate(ids, images=fx.make_test_images()[:1], max_new_tokens=2, ignore_eos=True, max_soft_tokens=70)
    assert spy.paths == [] and len(g.token_ids) == 2
    assert g.token_ids[0] == int(np.argmax(out.logits[0, -1]))
    assert m.last_stats is g.stats and g.stats["image_tokens"] == out.num_image_tokens


def test_a_checkpoint_without_towers_says_so():
    m = wb.load(fixture_dir("gemma3_text"), progress=False)
    assert m.media is None
    with pytest.raises(InputError, match="Gemma 4 multimodal checkpoint"):
        m.forward([2, 5, 6], images=[np.zeros((32, 32, 3), np.uint8)])


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])    # with and without a final logit softcap
def test_the_decoders_public_pass_is_the_forward_pass(name):
    m = wb.load(fixture_dir(name), progress=False)
    d = m.decoder
    ids = np.array([[2, 5, 6, 7, 8]])
    L = m.config.num_hidden_layers
    ref = m.forward(ids, taps=[f"blocks.{L - 1}.hook_resid_post", "ln_final.hook_normalized"])
    x = d.embed(ids)
    logits = d.ops.numpy(d.forward_embeds(x, d.ops.asids(ids)))
    np.testing.assert_array_equal(logits, ref.logits)
    # unembed = final norm + head (+ softcap): on the last block's output it gives the logits
    un = d.ops.numpy(m.unembed(ref.taps[f"blocks.{L - 1}.hook_resid_post"]))
    assert np.abs(un - ref.logits).max() <= 1e-5 * np.abs(ref.logits).max()
    # text in, through the front's tokenizer; the decoder itself takes ids only
    if m.tokenizer is not None:
        np.testing.assert_array_equal(m.forward("hello world").logits,
                                      m.forward(m.tokenizer.encode("hello world")).logits)
    with pytest.raises(InputError, match="LanguageModel"):
        d.forward("hello")
    with pytest.raises(InputError, match="LanguageModel"):
        d.forward(ids, images=["x.png"])
    for gone in ("generate", "tokenizer", "_media", "source_path"):
        assert not hasattr(d, gone), gone


def test_the_front_forwards_exactly_its_listed_names():
    m = wb.load(fixture_dir("gemma2"), progress=False)
    for n in DECODER_NAMES:
        assert getattr(m, n) is getattr(m.decoder, n) or getattr(m, n) == getattr(m.decoder, n), n
    with pytest.raises(AttributeError, match="m.decoder"):
        m._block     # internals stay on the decoder
    fault = lambda i, name, x: x * 2 if (i, name) == (0, "hook_mlp_out") else x  # noqa: E731
    base = m.forward([2, 5, 6]).logits
    m.perturb = fault
    assert m.decoder.perturb is fault and not np.array_equal(m.forward([2, 5, 6]).logits, base)
    m.perturb = None
    pieces = list(m.generate([2, 5, 6], max_new_tokens=3, stream=True))
    assert len(pieces) == 3 and m.last_stats["generated_tokens"] == 3 and m.last_stats["route"]


def test_compare_bench_and_diverge_build_every_model_through_the_one_loader(monkeypatch):
    built, decoders = [], []
    real_build, real_init = loader.build_model, Gemma.__init__

    def counting_build(ckpt, ops, source=None):
        built.append(f"{ops.spec.name}:{ops.dtype}")
        return real_build(ckpt, ops, source)

    def counting_init(self, *a, **k):
        decoders.append(type(self).__name__)
        real_init(self, *a, **k)

    monkeypatch.setattr(loader, "build_model", counting_build)
    monkeypatch.setattr(Gemma, "__init__", counting_init)
    src = fixture_dir("gemma3_text")
    r = wb.compare(src, backends=["torch:cpu"], dtypes=["float32"], anchor=False, store=False, progress=False,
                   prompt=[2, 5, 6, 7, 8], references=[])
    assert r.passed and "torch:cpu:float32" in built and "torch:cpu:float64" in built, built
    n = len(built)
    wb.bench(src, backends=["torch:cpu"], dtypes=["float32"], prompt_len=8, gen_len=4, repeats=1, store=False,
             progress=False)
    assert built[n:] == ["torch:cpu:float32"], built
    n = len(built)
    wb.diverge(src, backends=["torch:cpu"], dtypes=["float32"], prompt=[2, 5, 6, 7], steps=3, store=False,
               progress=False)
    assert "torch:cpu:float64" in built[n:] and "torch:cpu:float32" in built[n:], built[n:]
    assert len(decoders) == len(built), (decoders, built)   # no decoder built outside the one loader

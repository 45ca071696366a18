"""Gemma 4 multimodal: vision and audio towers, projectors, preprocessing, and the runner.

    from workbench.multimodal import multimodal_forward, multimodal_generate
    out = multimodal_forward(m, "Describe <|image|> and <|audio|>", images=["cat.png"], audio=["a.wav"],
                             taps=["vision.*", "audio.*", "logits"])

Modules: ``vision.py`` (Gemma4VisionModel), ``audio.py`` (Gemma4AudioModel), ``projector.py``
(Gemma4MultimodalEmbedder), ``preprocess.py`` (images, WAV, log-mel; equal to HF's processors), ``runner.py``
(placeholder expansion, embedding merge, bidirectional image attention), ``points.py`` (tap names),
``mmops.py`` (ops the towers need beyond ``workbench.backends``).
"""
from .common import MediaError  # noqa: F401
from .preprocess import (PreparedAudio, PreparedImage, load_audio, load_image, log_mel, preprocess_audio,  # noqa: F401
                         preprocess_image, read_wav)
from .runner import (MediaEncoders, MediaTensors, MultimodalOutput, attach_media, multimodal_forward,  # noqa: F401
                     multimodal_generate, tap_names)

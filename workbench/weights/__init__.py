"""Weight loaders: HF safetensors, GGUF; one canonical naming (names.py)."""

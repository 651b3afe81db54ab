"""The model, in rooms: `families/` (the architectures, one `Family` record each), `io/` (HF and GGUF
directories, safetensors streaming, chat formats, consistency checks), `inference/` (loading for use,
generation, KV caches) and `convert/` (`kiln import`, `kiln export`); beside them the layers every family
shares (`linear.py`, `lora.py`) and the one loss (`loss.py`, with `masking.py`'s masked-LM batches)."""

"""The model: the decoder, LoRA, generation and HF directory I/O."""

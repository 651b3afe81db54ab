"""Tokenizer: byte-level BPE (HF `tokenizers`), chat templates, and encoding into token shards."""

from lmkiln.pipeline import stage_runner

run = stage_runner("tokenizer")

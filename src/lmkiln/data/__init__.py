"""Data preparation: gather, clean, filter, deduplicate and shard text."""

from lmkiln.pipeline import stage_runner

run = stage_runner("data")

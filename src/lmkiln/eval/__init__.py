"""Evaluation: perplexity and bits per byte, the docstring task, side-by-side comparison, the run report."""

from lmkiln.pipeline import stage_runner

run = stage_runner("eval")

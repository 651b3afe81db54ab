"""`kiln`'s arguments: a parser per verb, every option with its help (`kiln VERB --help`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

STAGE_HELP = {
    "data": "gather, clean, filter and deduplicate text into Parquet shards (run_dir/data)",
    "tokenizer": "train a byte-level BPE tokenizer and encode the shards into token shards (run_dir/tokenizer)",
    "pretrain": "train the model by next-token prediction; resumes from the last checkpoint (run_dir/pretrain)",
    "finetune": "fine-tuning: supervised (full, LoRA or DoRA; loss on replies only), DPO, GRPO on rewards, or a "
    "classification head (run_dir/finetune)",
    "align": "a second fine-tuning on the fine-tuned model: DPO on preference pairs or GRPO on rewards "
    "(the recipe's align section; run_dir/align)",
    "eval": "score models side by side: perplexity (an encoder: masked-LM loss), in-context tasks, generative, "
    "classification and tagging tasks on your data, bias probes (run_dir/eval)",
}

EPILOG = """\
Recipes are YAML files with one section per stage (see recipes/quickstart.yaml and docs/recipes.md).
Any key can be overridden after the recipe: `pretrain.max_steps=50 run_dir=/tmp/x`.
Sizes accept suffixes: 20M, 1.5B, 8K.
"""


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipe",
        nargs="*",
        metavar="RECIPE [KEY=VALUE ...]",
        help="a recipe YAML (or a shipped one by name, e.g. quickstart), then overrides",
    )
    p.add_argument("--force", action="store_true", help="redo the stage even if its manifest is up to date")
    _add_quiet(p)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps `kiln -q VERB` working: the verb's parser only sets it when given after the verb.
    p.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or tables on stderr"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="lmkiln: raw text to a trained, fine-tuned, evaluated and served language model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables on stderr")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    _pipeline_verbs(sub)
    _planning_verbs(sub)
    _monitor_verbs(sub)
    _generate_verb(sub)
    _model_file_verbs(sub)
    _serve_verb(sub)
    _chat_verb(sub)
    return parser


def _pipeline_verbs(sub) -> None:
    """Run, and a verb per stage."""
    p = sub.add_parser(
        "run",
        help="run every stage the recipe names, in order, then write report.md",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_recipe_args(p)
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(
            name, help=text, description=text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        _add_recipe_args(p)
        if name == "finetune":
            _finetune_options(p)
        if name == "eval":
            _eval_options(p)


def _finetune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preview",
        type=int,
        metavar="N",
        default=None,
        help="print N training examples as rendered, trained tokens highlighted, and stop",
    )
    p.add_argument(
        "--task",
        choices=("generate", "classify", "dpo", "tag", "grpo"),
        default=None,
        help="classify: a label head on {text, label} rows; dpo: preference pairs "
        "{prompt, chosen, rejected}; tag: a BIO tag per word on an encoder, from {tokens, tags} rows or "
        "a .conll file; grpo: rewards (finetune.rewards) on completions sampled for instruction or chat "
        "prompts (same as finetune.task=...)",
    )


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help="model directories or stage names to compare (default: eval.models of the recipe); "
        "LABEL=DIR names one in the table (a label other than a recipe section or run_dir)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="with --models: also write eval.json, eval.md and eval.png here "
        "(a new directory, or one lmkiln wrote; --force to add them beside other files)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        default=None,
        help="perplexity (held-out text, eval.text; an encoder: its masked-LM loss), docstrings (the "
        "quickstart's task), gen:FILE[@val|@test] (instruction/chat rows: exact match, token F1, "
        "ROUGE-L, reply loss; {text, label} rows: accuracy, macro-F1; {tokens, tags} rows on an "
        "encoder's tagger: entity precision, recall, F1), builtin:bias, bias:DIR (axis files of your own) "
        "or a CrowS-Pairs .jsonl (bias probes), ICL task files (.jsonl: multiple choice, schema, language "
        "modelling) or suite files (.yaml); same as eval.tasks=[...]",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="score the first N documents of every task (sets eval.icl_max_examples for ICL "
        "tasks and eval.max_examples for gen: and docstrings)",
    )


def _planning_verbs(sub) -> None:
    """Tune and estimate: settings searched or costed before training."""
    p = sub.add_parser(
        "tune",
        help="search fine-tuning settings (lr, epochs, LoRA rank, tune.space) with "
        "Optuna, pruning bad trials early; writes run_dir/tune/best.yaml, trials.csv, trials.png",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="*", metavar="RECIPE [KEY=VALUE ...]", help="a recipe YAML, then overrides")
    p.add_argument("--trials", type=int, default=None, help="trials to run in all (default: tune.trials)")
    _add_quiet(p)

    p = sub.add_parser(
        "estimate",
        help="parameters, memory per device and time per step of a recipe's pretraining, before any training",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="*", metavar="RECIPE [KEY=VALUE ...]", help="a recipe YAML, then overrides")
    p.add_argument("--world", type=int, default=1, help="number of ranks (torchrun processes) to plan for")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or mps (default: pretrain.device)")
    _add_quiet(p)


def _monitor_verbs(sub) -> None:
    """Monitor (a live endpoint) and monitor report."""
    p = sub.add_parser(
        "monitor",
        help="re-evaluate a live OpenAI-compatible endpoint on gen: tasks, and check its logged prompts for drift; "
        "exit 3 when a score fell below its baseline beyond the paired bootstrap interval, or a signal drifted",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", help="the endpoint's /v1 base, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("recipe", nargs="*", metavar="RECIPE [KEY=VALUE ...]", help="a recipe YAML, then overrides")
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        default=None,
        help="what to score: gen:FILE[@val|@test] rows (replies by token F1, classification rows by accuracy) "
        "and ICL task files (.jsonl, from the endpoint's prompt log-probabilities)",
    )
    _drift_options(p)
    p.add_argument("--model", default=None, help="the model id to ask for (default: the endpoint's)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="the endpoint's key, sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)",
    )
    p.add_argument(
        "--history", type=Path, default=Path("monitor/history.jsonl"), help="scores appended here, a run a line"
    )
    p.add_argument("--baseline", type=Path, default=None, help="an eval.json from kiln eval (default: the first run)")
    p.add_argument("--webhook", default=None, help="POST each alert here as JSON")
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve the latest scores and alerts to Prometheus on this port"
    )
    p.add_argument("--every", type=float, default=None, metavar="MINUTES", help="run again every N minutes")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (default 120)")
    _add_quiet(p)

    p = sub.add_parser(
        "monitor report",
        help="write an HTML page of kiln monitor's histories: scores in their baseline band, drift, alerts, "
        "the prompts most out of distribution",
    )
    p.add_argument("--history", type=Path, default=Path("monitor/history.jsonl"), help="kiln monitor --tasks' history")
    p.add_argument(
        "--drift-history", type=Path, default=Path("monitor/drift.jsonl"), help="kiln monitor --drift's history"
    )
    p.add_argument(
        "--out", type=Path, default=Path("monitor/report.html"), help="the page (default monitor/report.html)"
    )
    _add_quiet(p)


def _drift_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drift",
        action="store_true",
        help="compare the logged prompts of a window (--requests) with a reference (--reference): length, "
        "language, the model's own loss, vocabulary; exit 3 when a signal's PSI passes --drift-threshold",
    )
    p.add_argument("--requests", type=Path, default=None, metavar="DIR", help="drift: kiln serve's --log-requests DIR")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="SRC",
        help="drift: the fine-tuning data (any fine-tuning format) or a request-log directory "
        "(default: the same log before --window)",
    )
    p.add_argument(
        "--window", type=float, default=None, metavar="HOURS", help="drift: the last HOURS of the log (default: all)"
    )
    p.add_argument(
        "--drift-threshold", type=float, default=0.25, help="drift: the PSI past which a signal alerts (default 0.25)"
    )
    p.add_argument(
        "--drift-sample", type=int, default=500, help="drift: prompts measured per side at most (default 500)"
    )
    p.add_argument(
        "--drift-history",
        type=Path,
        default=Path("monitor/drift.jsonl"),
        help="drift: each check appended here, a line a window",
    )


def _generate_verb(sub) -> None:
    """Generate: a model directory continuing a prompt."""
    p = sub.add_parser("generate", help="continue a prompt with a model directory (KV cache, sampling)")
    p.add_argument("model", type=Path, help="a model directory (e.g. runs/quickstart/finetune/final)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens; 0 = all (default 50)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument(
        "--num-beams", type=int, default=1, help="beam search width on an encoder-decoder (T5); 1 = no beam search"
    )
    p.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam search: finished scores over length ** this (default 1)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step first (about 2 minutes on 2 CPU cores the first time, seconds once "
        "PyTorch has it on disk), then decode the same tokens 1.8-2.4x faster. Default: compiled when "
        "--max-tokens is 1024 or more, where it pays even for the compile from disk; --no-compile never",
    )
    _add_quiet(p)


def _chat_verb(sub) -> None:
    """Chat: a model directory in the terminal, through its chat template."""
    p = sub.add_parser("chat", help="talk to a model in the terminal through its chat template")
    p.add_argument("model", type=Path, help="a model directory")
    p.add_argument("--system", default=None, help="a system message to start each conversation with")
    p.add_argument("--max-tokens", type=int, default=512, help="new tokens per reply at most (default 512)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def _model_file_verbs(sub) -> None:
    """Import and export: model directories in and out."""
    p = sub.add_parser(
        "import",
        help="import an open model (Llama, Qwen2/3, Mistral, SmolLM2, TinyLlama) from an HF "
        "directory or a GGUF file into an lmkiln model directory, checked",
    )
    p.add_argument(
        "source",
        help="an HF model directory, a .gguf file (or a folder holding one), package:NAME (a model "
        "an installed Python package ships), or a hub id (OWNER/NAME) where a network exists",
    )
    p.add_argument("out", type=Path, help="the model directory to write")
    p.add_argument(
        "--dtype",
        default=None,
        help="fp32, bf16 or fp16 (default: keep the checkpoint's; a quantized GGUF stays quantized: Q4_0, "
        "Q4_1 and Q4_K as lmkiln's int4, other quantized types as int8; --dtype fp32 dequantizes it)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a directory holding other files, replacing only "
        "the files lmkiln writes (never the source itself)",
    )
    _add_quiet(p)

    p = sub.add_parser(
        "quantize",
        help="keep a model's matrices quantized (int8 per row, or int4 in groups of 32): a quarter or an "
        "eighth of the fp32 bytes, decoded by PyTorch's weight-only kernels",
    )
    p.add_argument("model", type=Path, help="a dense decoder model directory (imported, or trained by lmkiln)")
    p.add_argument("out", type=Path, help="the quantized model directory to write")
    p.add_argument(
        "--quant",
        required=True,
        choices=("int8", "int4"),
        help="int8: one int8 per weight, a scale per output row; int4: symmetric 4-bit codes in groups of 32, "
        "a scale each (the embedding and the head stay int8); written in compressed-tensors' layout, which "
        "transformers reads back",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a directory holding other files, replacing only the files lmkiln writes",
    )
    _add_quiet(p)

    p = sub.add_parser(
        "export",
        help="export a model: merge a LoRA adapter, change dtype, or write GGUF (llama.cpp, Ollama) with a Modelfile",
    )
    p.add_argument("model", type=Path, help="a model directory, or a LoRA adapter directory (adapter_config.json)")
    p.add_argument("out", type=Path, help="the directory to write")
    p.add_argument("--merge", action="store_true", help="merge the adapter into its base model")
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="the adapter's base model directory (default: base_model_name_or_path of adapter_config.json)",
    )
    p.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default="hf",
        help="hf: a transformers directory (default); gguf: model.gguf + Modelfile",
    )
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: keep the model's)")
    p.add_argument(
        "--quant",
        default=None,
        metavar="TYPE",
        help="with --format gguf: quantize the matrices to q8_0, "
        "q4_0, q4_1, q5_0 or q5_1 (norms and vectors stay float, as llama.cpp's converter keeps them)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a directory holding other files, replacing only "
        "the files lmkiln writes (never an input itself)",
    )
    _add_quiet(p)


def _serve_verb(sub) -> None:
    """Serve: the OpenAI-compatible API."""
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API with continuous batching, and a chat page at /"
    )
    p.add_argument("model", type=Path, nargs="?", help="a model directory (or --models-file)")
    p.add_argument(
        "--models-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML naming the version to serve (model: DIR, adapters: {NAME: DIR}, version: LABEL); "
        "on SIGHUP it is re-read and what it names then is loaded, checked and swapped in without downtime",
    )
    p.add_argument(
        "--version-name",
        default=None,
        metavar="LABEL",
        help="the first version's label, named in replies as MODEL@LABEL (default v1)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="model id reported by /v1/models (default: directory name)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter (PEFT layout) served as model NAME+... i.e. '<model>+NAME'; repeatable",
    )
    p.add_argument(
        "--max-batch", type=int, default=16, help="sequences decoded together, each with a KV-cache slot (default 16)"
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="tokens per slot, prompt and reply together (default: the model's max_seq_len)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require the key on every route but /health ('Authorization: Bearer KEY'; the chat page asks for it "
        "and keeps a session cookie); the admin API (new versions, rollback) is off without it; "
        "LMKILN_API_KEY sets it without putting it on the command line (default: none)",
    )
    p.add_argument(
        "--cors", action="append", default=[], metavar="ORIGIN", help="allow this browser origin; repeatable; * for any"
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=1 << 20,
        help="largest request body, counted as it is read, chunked bodies too: 413 past it (default 1 MiB)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=128,
        help="requests to /v1 in flight at once, streamed ones until they end; 429 with Retry-After past it "
        "(default 128)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=64,
        help="keys and values of shared prompt prefixes (a system prompt) kept for reuse, in MiB; least "
        "recently used go first; 0 turns it off (default 64)",
    )
    _reply_options(p)


def _reply_options(p: argparse.ArgumentParser) -> None:
    """What happens to replies: the request log and the blocklist."""
    p.add_argument(
        "--log-requests",
        type=Path,
        default=None,
        metavar="DIR",
        help="log each generation request and reply to rotating requests-*.jsonl files in DIR (default: off)",
    )
    p.add_argument(
        "--log-redact",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="redact personal data (the data stage's rules) before a record reaches disk (default: on)",
    )
    p.add_argument(
        "--blocklist",
        type=Path,
        default=None,
        metavar="FILE",
        help="words and phrases (one a line) kept out of replies: whole words, any case; a reply that would "
        "contain one is cut before it with finish_reason content_filter",
    )
    p.add_argument("--log-max-mb", type=int, default=64, help="request log: a new file past this size (default 64)")
    p.add_argument("--log-max-files", type=int, default=20, help="request log: files kept, oldest removed (default 20)")

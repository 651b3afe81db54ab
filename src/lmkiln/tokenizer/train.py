"""Train a byte-level BPE tokenizer and write it as HF files (tokenizer.json, tokenizer_config.json).

A decoder's vocabulary carries lmkiln's chat and FIM tokens; an encoder's (`tokenizer.kind: encoder`)
carries BERT's `[CLS] [SEP] [MASK] [PAD]` and its post-processor, so `tokenizer("a", "b")` in transformers
gives `[CLS] a [SEP] b [SEP]` with token type ids 0 then 1. T5's (`tokenizer.kind: t5`) has `<pad>`,
`</s>` and `<unk>` as ids 0-2, the 100 sentinels of span corruption at the top (`<extra_id_0>` highest),
and `</s>` after each text."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmkiln.io import write_json, write_text
from lmkiln.model.chat_format import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        text = text[: max_chars - total]
        total += len(text)
        yield text


CLS, SEP, MASK, ENC_PAD = "[CLS]", "[SEP]", "[MASK]", "[PAD]"
ENCODER_TOKENS = [CLS, SEP, MASK, ENC_PAD]
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"  # T5's ids 0, 1 and 2
T5_SENTINELS = 100


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, max_chars: int = 50_000_000, kind: str = "decoder"
) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = {"encoder": ENCODER_TOKENS, "t5": [T5_PAD, T5_EOS, T5_UNK]}.get(kind, SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (T5_SENTINELS if kind == "t5" else 0),
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_capped(texts, max_chars), trainer=trainer)
    if kind == "encoder":
        cls, sep = tok.token_to_id(CLS), tok.token_to_id(SEP)
        pairs = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls), (SEP, sep)]
        )
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), pairs])
    if kind == "t5":  # the sentinels last, <extra_id_0> the highest id, as T5's vocabulary has them
        tok.add_special_tokens([sentinel(i) for i in reversed(range(T5_SENTINELS))])
        closing = processors.TemplateProcessing(
            single=f"$A {T5_EOS}",
            pair=f"$A {T5_EOS} $B:1 {T5_EOS}:1",
            special_tokens=[(T5_EOS, tok.token_to_id(T5_EOS))],
        )
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), closing])
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int = 1024) -> None:
    write_text(out_dir / "tokenizer.json", tok.to_str())
    if tok.token_to_id(sentinel(0)) is not None:  # T5's: pad, eos, unk and the sentinels
        names = {"pad_token": T5_PAD, "eos_token": T5_EOS, "unk_token": T5_UNK}
        extra = [sentinel(i) for i in range(T5_SENTINELS)]
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "additional_special_tokens": extra}
        write_json(
            out_dir / "tokenizer_config.json",
            {**config, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False},
        )
        write_json(out_dir / "special_tokens_map.json", {**names, "additional_special_tokens": extra})
        return
    if tok.token_to_id(MASK) is not None:  # an encoder's vocabulary: BERT's tokens, no chat template
        names = {"cls_token": CLS, "sep_token": SEP, "mask_token": MASK, "pad_token": ENC_PAD}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "unk_token": None}
        write_json(
            out_dir / "tokenizer_config.json",
            {**config, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False},
        )
        write_json(out_dir / "special_tokens_map.json", names)
        return
    write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def special_ids(tok: Tokenizer) -> dict[str, int | None]:
    from lmkiln.model.chat_format import END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

    if tok.token_to_id(sentinel(0)) is not None:  # T5's: documents end with </s>, nothing before them
        return {
            "bos": None,
            "eos": tok.token_to_id(T5_EOS),
            "pad": tok.token_to_id(T5_PAD),
            "sentinels": [tok.token_to_id(sentinel(i)) for i in range(T5_SENTINELS)],
            "end": None,
            "fim_prefix": None,
            "fim_middle": None,
            "fim_suffix": None,
        }
    if tok.token_to_id(MASK) is not None:  # an encoder's: documents are [CLS] ... [SEP]
        cls, sep = tok.token_to_id(CLS), tok.token_to_id(SEP)
        return {
            "bos": cls,
            "eos": sep,
            "pad": tok.token_to_id(ENC_PAD),
            "cls": cls,
            "sep": sep,
            "mask": tok.token_to_id(MASK),
            "end": None,
            "fim_prefix": None,
            "fim_middle": None,
            "fim_suffix": None,
        }
    return {
        "bos": tok.token_to_id(BOS),
        "eos": tok.token_to_id(EOS),
        "pad": tok.token_to_id(PAD),
        "end": tok.token_to_id(END),
        "fim_prefix": tok.token_to_id(FIM_PREFIX),
        "fim_middle": tok.token_to_id(FIM_MIDDLE),
        "fim_suffix": tok.token_to_id(FIM_SUFFIX),
    }


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each token stands for (0 for the tokenizer's special tokens, whatever they are): byte-level
    BPE maps one char to one byte."""
    specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    lengths = [0] * tok.get_vocab_size()
    for token, idx in tok.get_vocab().items():
        lengths[idx] = 0 if idx in specials else len(token)
    return lengths


def word_starts(tok: Tokenizer) -> np.ndarray:
    """Per token id: does it begin a word? In byte-level BPE a word's first token carries the space before it
    (Ġ) or a line break (Ċ); special tokens stand alone. For whole-word masking."""
    starts = np.zeros(tok.get_vocab_size(), dtype=bool)
    for token, i in tok.get_vocab().items():
        starts[i] = token.startswith(("Ġ", "Ċ")) or (token.startswith("[") and token.endswith("]"))
    return starts

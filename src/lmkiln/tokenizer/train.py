"""Train a byte-level BPE tokenizer and write it as HF files (tokenizer.json, tokenizer_config.json).

A decoder's vocabulary carries lmkiln's chat and FIM tokens; another `tokenizer.kind` carries the special
tokens its family defines (model/families: a `Vocabulary`), e.g. an encoder's BERT layout, so
`tokenizer("a", "b")` in transformers gives `[CLS] a [SEP] b [SEP]` with token type ids 0 then 1, or an
encoder-decoder's sentinels of span corruption at the top of the vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmkiln.io import write_json, write_text
from lmkiln.model.families import VOCABULARIES
from lmkiln.model.families.family import Vocabulary
from lmkiln.model.io.chat_format import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS


def _capped(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        text = text[: max_chars - total]
        total += len(text)
        yield text


def vocabulary(kind: str) -> Vocabulary | None:
    """A `tokenizer.kind`'s family vocabulary; None for a decoder's (lmkiln's chat and FIM tokens)."""
    return VOCABULARIES.get(kind)


def vocabulary_of(tok: Tokenizer) -> Vocabulary | None:
    """The family vocabulary a trained tokenizer carries, by its marker token; None for a decoder's."""
    return next((v for v in VOCABULARIES.values() if tok.token_to_id(v.marker) is not None), None)


def tokenizer_kind(tok: Tokenizer) -> str:
    """The `tokenizer.kind` a trained tokenizer was made as."""
    vocab = vocabulary_of(tok)
    return vocab.kind if vocab is not None else "decoder"


def vocabulary_label(kind: str) -> str:
    """A tokenizer kind's vocabulary in a message: what its special tokens are."""
    vocab = vocabulary(kind)
    if vocab is None:
        return "a decoder vocabulary (chat and FIM tokens)"
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind} vocabulary ({' '.join(vocab.specials[:3])}{' and sentinels' if vocab.sentinels else ''})"


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, max_chars: int = 50_000_000, kind: str = "decoder"
) -> Tokenizer:
    vocab = vocabulary(kind)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (len(vocab.sentinels) if vocab else 0),
        min_frequency=min_frequency,
        special_tokens=list(vocab.specials) if vocab else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_capped(texts, max_chars), trainer=trainer)
    if vocab is None:
        return tok
    if vocab.sentinels:  # last, the first sentinel the highest id, as T5's vocabulary has them
        tok.add_special_tokens(list(reversed(vocab.sentinels)))
    if vocab.single:
        template = processors.TemplateProcessing(
            single=vocab.single,
            pair=vocab.pair,
            special_tokens=[(t, tok.token_to_id(t)) for t in vocab.template_tokens],
        )
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int = 1024) -> None:
    write_text(out_dir / "tokenizer.json", tok.to_str())
    vocab = vocabulary_of(tok)
    if vocab is not None:  # a family's own tokens, no chat template
        names = dict(vocab.names)
        extra = {"additional_special_tokens": list(vocab.sentinels)} if vocab.sentinels else {}
        unk = {} if "unk_token" in names else {"unk_token": None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, **unk, **extra}
        write_json(
            out_dir / "tokenizer_config.json",
            {**config, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False},
        )
        write_json(out_dir / "special_tokens_map.json", {**names, **extra})
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
    from lmkiln.model.io.chat_format import END, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

    vocab = vocabulary_of(tok)
    if vocab is not None:  # a family's own tokens: no chat end-of-turn, no FIM
        ids = {k: None if t is None else tok.token_to_id(t) for k, t in vocab.ids.items()}
        if vocab.sentinels:
            ids["sentinels"] = [tok.token_to_id(t) for t in vocab.sentinels]
        return {**ids, "end": None, "fim_prefix": None, "fim_middle": None, "fim_suffix": None}
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

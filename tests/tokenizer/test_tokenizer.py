import numpy as np
import pytest

from lmkiln.data.examples import encode_example
from lmkiln.model.io.chat_format import render
from lmkiln.model.loss import IGNORE
from lmkiln.tokenizer.encode import encode_to_shard, open_shard
from lmkiln.tokenizer.train import load_tokenizer, save_tokenizer, special_ids, token_byte_lengths, train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n", "The kiln fires clay at high heat. Ünïcödé ✓\n"] * 50


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe(TEXTS, 400), out)
    return out


def test_byte_level_round_trip_and_specials(tok_dir):
    tok = load_tokenizer(tok_dir)
    for text in TEXTS[:2] + ["never seen: 漢字 and emoji 🔥"]:
        assert tok.decode(tok.encode(text).ids) == text
    ids = special_ids(tok)
    assert len(set(ids.values())) == 7 and None not in ids.values()
    lengths = token_byte_lengths(tok)
    enc = tok.encode(TEXTS[1])
    assert sum(lengths[i] for i in enc.ids) == len(TEXTS[1].encode("utf-8"))


def test_token_shard_round_trip(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    header = encode_to_shard(tok, TEXTS[:4], tmp_path / "train", ids["bos"], ids["eos"])
    tokens, meta = open_shard(tmp_path / "train")
    assert meta["dtype"] == "uint16" and meta["num_documents"] == 4 == header["num_documents"]
    starts = np.fromfile(tmp_path / "train.idx", dtype="<u8")
    first = tokens[starts[0] : starts[1]].tolist()
    assert first[0] == ids["bos"] and first[-1] == ids["eos"]
    assert tok.decode(first[1:-1]) == TEXTS[0]


def test_chat_template_matches_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    for gen in (False, True):
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == render(messages, gen)[0]


def test_labels_cover_exactly_the_reply_and_end_token(tok_dir):
    tok = load_tokenizer(tok_dir)
    ex = {"instruction": "Add numbers", "input": "1 2", "output": "   3 and more"}
    ids, labels = encode_example(tok, ex)
    trained = [label for label in labels if label != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == "   3 and more<|end|>"
    # labels are shifted: the label at i is the token at i + 1
    for i, label in enumerate(labels):
        if label != IGNORE:
            assert ids[i + 1] == label

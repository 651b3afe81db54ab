"""`kiln serve` on an encoder: /v1/embeddings (OpenAI's shape, read by the openai client) on any
ModernBERT directory, /v1/classify on a classifier, and a clear 400 for the generating routes."""

from __future__ import annotations

import httpx
import pytest
import torch

from lmkiln.model.families.encoder import Encoder, EncoderArgs, EncoderClassifier, mean_embeddings
from lmkiln.model.io.hub import save_model
from lmkiln.serve.app import create_app
from lmkiln.tokenizer.train import save_tokenizer, special_ids, train_bpe
from lmkiln.train.classify import save_classifier
from tests.serve.conftest import serving

openai = pytest.importorskip("openai")
TEXTS = ["where is my parcel", "I want my money back", "reset my password please"] * 20


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    tok = train_bpe(TEXTS, 300, kind="encoder")
    save_tokenizer(tok, root / "tok", model_max_length=64)
    ids = special_ids(tok)
    args = EncoderArgs(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=2,
        max_seq_len=64,
        local_attention=8,
        pad_token_id=ids["pad"],
        cls_token_id=ids["cls"],
        sep_token_id=ids["sep"],
        mask_token_id=ids["mask"],
    )
    body = Encoder(args)
    body.init_weights(torch.Generator().manual_seed(0))
    save_model(body, root / "mlm", root / "tok")
    classifier = EncoderClassifier(body, 3)
    save_classifier(classifier, root / "cls", root / "tok", ["login", "refund", "ship"])
    return root, tok, body.eval(), classifier.eval()


def test_embeddings_in_openais_shape_equal_the_mean_pooled_states(encoder_dirs):
    root, tok, body, _ = encoder_dirs
    with serving(create_app(root / "mlm", device="cpu", name="enc")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        out = client.embeddings.create(model="enc", input=["where is my parcel", "money back"])
        assert [d.index for d in out.data] == [0, 1] and out.usage.prompt_tokens > 0
        expected = mean_embeddings(body, [tok.encode(t).ids for t in ("where is my parcel", "money back")])
        got = torch.tensor([d.embedding for d in out.data])
        assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got.norm(dim=-1), torch.ones(2))
        # one text alone embeds as it does in a batch: padding never reaches the real tokens
        alone = client.embeddings.create(model="enc", input="money back").data[0].embedding
        assert torch.allclose(torch.tensor(alone), got[1], atol=1e-5)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "is an encoder: it does not generate" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/classify", json={"input": "hi"})
        assert r.status_code == 400 and "no classification head" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["kind"] == "encoder"


def test_classify_returns_each_labels_probability(encoder_dirs):
    root, tok, _, classifier = encoder_dirs
    with serving(create_app(root / "cls", device="cpu", name="intents")) as url:
        r = httpx.post(url + "/v1/classify", json={"input": ["where is my parcel", "reset my password please"]})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        rows = [tok.encode(t).ids for t in ("where is my parcel", "reset my password please")]
        for item, row in zip(data, rows):
            with torch.no_grad():
                probs = classifier(torch.tensor([row]), torch.tensor([len(row)])).softmax(-1)[0]
            assert set(item["scores"]) == {"login", "refund", "ship"} and abs(sum(item["scores"].values()) - 1) < 1e-5
            assert item["label"] == ["login", "refund", "ship"][int(probs.argmax())]
            assert abs(item["scores"]["ship"] - float(probs[2])) < 1e-5
        r = httpx.post(url + "/v1/classify", json={"input": "x " * 200})
        assert r.status_code == 400 and "the context is 64" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").json()["kind"] == "classifier"


def test_generate_and_chat_refuse_an_encoder(encoder_dirs, capsys):
    from lmkiln.cli import main

    root = encoder_dirs[0]
    assert main(["generate", str(root / "mlm"), "--prompt", "hi"]) == 2
    assert "an encoder (ModernBERT) does not generate" in capsys.readouterr().err

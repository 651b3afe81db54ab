"""`kiln serve --blocklist`: blocked words and phrases never reach a reply, streamed or whole; the reply is
cut before them with finish_reason "content_filter", and the cuts are counted in /metrics."""

import json

import httpx
import pytest

from lmkiln.cli import main
from lmkiln.serve.app import create_app
from lmkiln.serve.blocklist import Blocklist
from tests.serve.conftest import serving

QUESTION = [{"role": "user", "content": "What sound does a cat make? (1)"}]


def test_matching_is_whole_words_any_case_and_any_whitespace():
    block = Blocklist(["darn", "bad  word"])
    assert block.cut("Oh DARN it", final=True) == 3
    assert block.cut("darned socks", final=True) is None and block.cut("undarn", final=True) is None
    assert block.cut("a Bad\n word here", final=True) == 2
    assert block.cut("oh darn", final=False) is None  # the word may still go on ("darned")
    assert block.cut("oh darn", final=True) == 3  # the reply ended: it is the word
    assert block.held("so bad wo") == len("bad wo") and block.held("so ba") == 2 and block.held("so da") == 2
    assert block.held("soda") == 0 and block.held("nothing here") == 0


def test_a_blocklist_file_is_read_and_checked(tiny_model, tmp_path, capsys):
    path = tmp_path / "block.txt"
    path.write_text("# words we never send\n\nDarn\n  heck it  \n")
    assert Blocklist.read(path).phrases == ["heck it", "darn"]
    path.write_text("# only a comment\n")
    assert main(["-q", "serve", str(tiny_model), "--blocklist", str(path)]) == 2  # before the port is bound
    assert "no words or phrases" in capsys.readouterr().err


def _chat(url, stream=False):
    body = {"messages": QUESTION, "max_tokens": 24, "temperature": 0, "stream": stream}
    if not stream:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return [e["choices"][0] for e in events if e["choices"]]


@pytest.mark.slow
def test_replies_are_cut_before_a_blocked_phrase_streamed_and_whole(smollm2):
    """On the real SmolLM2 (the tiny test model answers in no words): a two-word phrase from its own
    greedy reply is blocked, and both replies stop before it."""
    app = create_app(smollm2, device="cpu", name="smol")
    with serving(app) as url:
        free = _chat(url)["message"]["content"]
        words = free.split()
        assert len(words) >= 4, free
        phrase = " ".join(words[2:4])  # two words: streamed, they arrive in separate chunks
        app.state.server.blocklist = Blocklist([phrase])
        whole = _chat(url)
        chunks = _chat(url, stream=True)
        metrics = httpx.get(url + "/metrics").text
    before = free[: free.index(phrase)]
    assert whole["message"]["content"] == before and whole["finish_reason"] == "content_filter"
    pieces = [c["delta"].get("content", "") for c in chunks]
    # the phrase's first word was generated (and held back) a token before its second one completed it
    assert "".join(pieces) == before and chunks[-1]["finish_reason"] == "content_filter"
    assert "lmkiln_content_filtered_total 2.0" in metrics

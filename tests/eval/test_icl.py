"""ICL tasks: log-likelihoods against a hand computation, few-shot prompts as documented, metrics on
hand-made predictions, and malformed task files."""

import json
import math

import pytest
import torch

from lmkiln.cli import main
from lmkiln.errors import UserError
from lmkiln.eval.icl import IclTask, encode_pair, load_docs, loglikelihoods, requests_of, score_docs
from lmkiln.model.io.hub import load_model
from lmkiln.tokenizer.train import load_tokenizer

MC = [
    {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0},
    {"query": "Q: sky?", "choices": ["blue", "green", "red"], "gold": 0},
    {"query": "Q: grass?", "choices": ["blue", "green"], "gold": 1},
]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_continuation_loglikelihood_equals_a_hand_computation(trained_run):
    _, run_dir, _ = trained_run
    final = run_dir / "pretrain" / "final"
    model, tok = load_model(final), load_tokenizer(final)
    pairs = [
        encode_pair(tok, "def add(a, b):\n   ", " return a + b", None),
        encode_pair(tok, "import", " os", None),
        encode_pair(tok, "x = 1", " + 2 + 3 + 4", 0),
    ]
    got = loglikelihoods(model, pairs, batch_size=2)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont]))[0].double()
        by_hand, all_greedy = 0.0, True
        for k, token in enumerate(cont):
            row = logits[len(ctx) + k - 1]
            by_hand += row[token].item() - math.log(sum(math.exp(v) for v in row.tolist()))
            all_greedy &= int(row.argmax()) == token
        assert ll == pytest.approx(by_hand, abs=1e-4) and greedy == all_greedy


@pytest.mark.parametrize("window", [None, 6])
def test_choices_sharing_a_context_score_as_one_forward_each(trained_run, window):
    """The prefix-tree rows give each choice the numbers its own forward gives, with a sliding window
    too, and a pair longer than the model's context keeps its last tokens as before."""
    _, run_dir, _ = trained_run
    final = run_dir / "pretrain" / "final"
    model, tok = load_model(final), load_tokenizer(final)
    model.args.sliding_window = window
    query = "def read(path):\n    with open(path) as fh:\n        return"
    choices = (" fh.read()", " fh.readlines()", " fh.read().split()", " 1", " json.load(fh) if fh else None")
    pairs = [encode_pair(tok, query, c, None) for c in choices]  # three begin alike: a prefix tree
    pairs.append(encode_pair(tok, "x" * 400, " = 1", None))  # longer than max_seq_len=128: truncated alone
    pairs.append(encode_pair(tok, "import", " os", None))
    got = loglikelihoods(model, pairs, batch_size=2)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        seq = (ctx + cont)[-(model.args.max_seq_len + 1) :]
        with torch.no_grad():
            logits = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].double(), -1)
        rows = logits[len(seq) - 1 - len(cont) :]
        assert ll == pytest.approx(sum(rows[k, t].item() for k, t in enumerate(cont)), abs=1e-4)
        assert greedy == all(int(rows[k].argmax()) == t for k, t in enumerate(cont))


def test_trailing_context_whitespace_moves_into_the_continuation(trained_run):
    _, run_dir, _ = trained_run
    tok = load_tokenizer(run_dir / "pretrain" / "final")
    ctx, cont = encode_pair(tok, "Question: dresser\n", " finish", None)
    assert ctx == tok.encode("Question: dresser", add_special_tokens=False).ids
    whole = tok.encode("Question: dresser\n finish", add_special_tokens=False).ids
    assert ctx + cont == whole


def test_few_shot_prompts_are_built_as_documented(tmp_path):
    docs, kind = load_docs(_write(tmp_path / "mc.jsonl", MC))
    task = IclTask("mc", str(tmp_path / "mc.jsonl"), shots=2, separator="\n###\n")
    reqs = requests_of(docs, kind, 0, task, seed=1234)
    # shots: the other two documents in random.Random(1234 + 0) order, answered with their gold choice
    import random

    order = random.Random(1234).sample([1, 2], 2)
    shots = "\n###\n".join(docs[j]["query"] + " " + docs[j]["choices"][docs[j]["gold"]] for j in order)
    assert reqs == [(shots + "\n###\nQ: 2+2?", " 4"), (shots + "\n###\nQ: 2+2?", " 5")]
    assert requests_of(docs, kind, 1, IclTask("mc", "x"), 1234)[2] == ("Q: sky?", " red")


def test_metrics_on_hand_made_predictions():
    docs = MC
    texts = [d["choices"] for d in docs]
    results = [
        [(-1.0, False), (-2.0, False)],  # right by sum and by length
        [
            (-9.0, False),
            (-5.0, False),
            (-6.0, False),
        ],  # sum picks green (wrong); per char: blue -2.25, green -1.0 → wrong
        [(-4.0, False), (-4.5, False)],
    ]  # sum picks blue (wrong); per char: blue -1.0, green -0.9 → right
    m = score_docs(docs, "multiple_choice", results, texts)
    assert m["acc"] == pytest.approx(1 / 3, abs=1e-4) and m["acc_norm"] == pytest.approx(2 / 3, abs=1e-4)
    base = (1 / 2 + 1 / 3 + 1 / 2) / 3
    assert m["random_baseline"] == pytest.approx(base, abs=1e-4)
    assert m["centered"] == pytest.approx((2 / 3 - base) / (1 - base), abs=1e-4) and m["correct"] == [1, 0, 0]
    lm = score_docs(
        [{"context": "a", "continuation": "b"}] * 2, "language_modeling", [[(-1.0, True)], [(-1.0, False)]], [["b"]] * 2
    )
    assert lm["acc"] == 0.5 and lm["random_baseline"] == 0


def test_a_malformed_line_names_file_and_line(tmp_path, trained_run, capsys):
    bad = _write(tmp_path / "bad.jsonl", [MC[0], "{not json", MC[1]])
    with pytest.raises(UserError, match=r"bad.jsonl:2: "):
        load_docs(bad)
    _write(bad, [MC[0], {"query": "q", "choices": ["a", "b"], "gold": 2}])
    with pytest.raises(UserError, match=r"bad.jsonl:2: 'gold' must be an index into the 2 options, got 2"):
        load_docs(bad)
    _, run_dir, _ = trained_run
    code = main(["eval", "--models", str(run_dir / "pretrain" / "final"), "--tasks", str(bad)])
    assert code == 2 and "bad.jsonl:2: 'gold' must be an index" in capsys.readouterr().err


def test_paired_bootstrap_marks_only_clear_differences():
    from lmkiln.eval.results import paired_bootstrap, significant

    same = [1, 0] * 50
    assert paired_bootstrap(same, same) == (0.0, 0.0)
    better = [1] * 90 + [0] * 10
    low, high = paired_bootstrap(same, better)
    assert 0.25 < low < 0.4 < high < 0.55  # the true difference is 0.4
    results = {
        "base": {"t": {"acc": 0.5, "correct": same}},
        "tuned": {"t": {"acc": 0.9, "correct": better}},
        "noise": {"t": {"acc": 0.5, "correct": same[1:] + same[:1]}},
    }
    assert significant(results) == {("tuned", "t")}


def test_eval_compares_models_on_icl_tasks_with_table_markdown_and_chart(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    mc = _write(tmp_path / "mc.jsonl", MC * 4)
    lm = _write(tmp_path / "lm.jsonl", [{"context": "def add(a, b):\n    return", "continuation": "a + b"}] * 3)
    models = [str(run_dir / "pretrain" / "final"), str(run_dir / "finetune" / "final")]
    code = main(
        ["eval", "--models", *models, "--tasks", str(mc), str(lm), "eval.shots=1", "--out", str(tmp_path / "out")]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mc acc" in out and "lm acc" in out and "ICL centered" in out
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| model | mc acc ↑ | mc acc_norm ↑ | lm acc ↑ | ICL centered ↑ |" in md
    assert (tmp_path / "out" / "eval.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["pretrain/final"]["mc"]["n"] == 12 and saved["pretrain/final"]["mc"]["shots"] == 1


def test_bias_probes_count_the_pairs_whose_stereotype_is_likelier(trained_run, tmp_path):
    from lmkiln.eval.icl import IclTask, evaluate_task
    from lmkiln.model.io.chat_format import ChatFormat
    from lmkiln.tokenizer.train import special_ids

    _, run_dir, _ = trained_run
    final = run_dir / "pretrain" / "final"
    model, tok = load_model(final), load_tokenizer(final)
    res = evaluate_task(model, tok, ChatFormat(final), IclTask("bias-small", "builtin:bias-small"))
    docs, kind = load_docs("builtin:bias-small")
    assert kind == "bias" and res["n"] == len(docs) == 30
    bos = special_ids(tok)["bos"]

    def ll(text):
        ids = [bos] + tok.encode(text, add_special_tokens=False).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
        return sum(logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0)

    prefers = [ll(d["sent_more"]) > ll(d["sent_less"]) for d in docs]
    assert res["pct_stereotype"] == pytest.approx(sum(prefers) / 30, abs=1e-4)
    gender = [p for d, p in zip(docs, prefers) if d["bias_type"] == "gender"]
    assert res["by_type"]["gender"] == pytest.approx(sum(gender) / len(gender), abs=1e-4)
    assert set(res["by_type"]) == {"age", "disability", "gender", "nationality", "religion", "socioeconomic"}

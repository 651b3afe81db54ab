"""T5 checkpoints as transformers makes them (v1.1/Flan-T5, the original T5, mT5): imported with equal
logits, written back so transformers reads them, refused where lmkiln does not implement a value."""

import io
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkiln.cli import main
from lmkiln.model.families.t5 import relative_buckets
from lmkiln.model.inference.generate import print_continuation
from lmkiln.model.io.hub import load_model

transformers = pytest.importorskip("transformers")

# 8 buckets out to distance 20: sequences of 30 reach the logarithmic buckets and the clamp
SMALL = dict(
    vocab_size=200,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)


def _hf_dir(path, config, cls=None, own_head: bool = False):
    """A random transformers T5 saved at `path`, norms off 1 so a misplaced one shows; with `own_head`,
    an untied lm_head in the file and tie_word_embeddings false, as T5 v1.1 and Flan-T5 ship."""
    cls = cls or transformers.T5ForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if own_head:
        state = load_file(path / "model.safetensors")
        state["lm_head.weight"] = torch.randn(config.vocab_size, config.d_model) * 0.05
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        written = json.loads((path / "config.json").read_text())
        written.pop("scale_decoder_outputs", None)
        (path / "config.json").write_text(json.dumps({**written, "tie_word_embeddings": False}))
        model = cls.from_pretrained(path).eval()
    return model


def _logits(model, x, y, mask):
    with torch.no_grad():
        return model(input_ids=x, decoder_input_ids=y, attention_mask=mask.long()).logits


@pytest.mark.parametrize(
    "kind,proj,own_head",
    [("t5", "gated-gelu", True), ("t5", "gated-gelu", False), ("t5", "relu", False), ("mt5", "gated-gelu", True)],
    ids=["v1.1", "v1.1-tied", "original", "mt5"],
)
def test_import_of_a_t5_directory_gives_equal_logits(tmp_path, kind, proj, own_head):
    config_cls = transformers.MT5Config if kind == "mt5" else transformers.T5Config
    cls = transformers.MT5ForConditionalGeneration if kind == "mt5" else transformers.T5ForConditionalGeneration
    hf = _hf_dir(tmp_path / "hf", config_cls(**SMALL, feed_forward_proj=proj), cls, own_head)
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(2, 200, (2, 30), generator=g), torch.randint(2, 200, (2, 12), generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False  # the second input padded: its padding hidden from encoder and cross-attention
    expected = _logits(hf, x, y, mask)
    assert expected.std() > 0.01
    with torch.no_grad():
        assert torch.allclose(ours(x, y, mask), expected, atol=1e-4, rtol=0)
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again) is cls and torch.allclose(_logits(again, x, y, mask), expected, atol=1e-5)


@pytest.mark.parametrize("key,value", [("feed_forward_proj", "gated-swish"), ("is_encoder_decoder", False)])
def test_import_refuses_t5_values_it_does_not_implement(tmp_path, capsys, key, value):
    _hf_dir(tmp_path / "hf", transformers.T5Config(**SMALL, feed_forward_proj="gated-gelu"))
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert f"{key}=" in capsys.readouterr().err and not (tmp_path / "ours").exists()


def test_relative_buckets_are_exact_near_and_logarithmic_far():
    offsets = torch.arange(-40, 41)
    both = relative_buckets(offsets, True, 32, 128)
    assert both[40].item() == 0 and both[41].item() == 17 and both[39].item() == 1  # 0, +1, -1
    assert len(set(both[40:48].tolist())) == 8  # offsets 0..7 each their own bucket
    causal = relative_buckets(offsets, False, 32, 128)
    assert (causal[41:] == 0).all() and causal[:40].max().item() <= 31  # the future shares bucket 0
    far = relative_buckets(torch.tensor([-1000, -128, 1000]), True, 32, 128)
    assert far[0].item() == 15 and far[1].item() == 15 and far[2].item() == 31  # past max_distance: the last


T5_RUN = ["tokenizer.kind=t5", "model.arch=t5", "pretrain.seq_len=48"]


@pytest.fixture
def t5_run(tiny_recipe, tmp_path):
    from lmkiln import data, tokenizer

    def make(name="run", *extra):
        recipe = tiny_recipe(*T5_RUN, *extra, run_dir=tmp_path / name)
        data.run(recipe)
        tokenizer.run(recipe)
        return recipe

    return make


@pytest.mark.slow
def test_span_corruption_pretraining_writes_a_directory_transformers_loads(t5_run):
    from lmkiln.train import run_pretrain
    from lmkiln.train.metrics import read_metrics

    recipe = t5_run()
    manifest = run_pretrain(recipe)
    losses = [r["loss"] for r in read_metrics(recipe.run_dir / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert manifest["metrics"]["steps"] == 12 and losses[-1] < losses[0]
    final = recipe.run_dir / "pretrain" / "final"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    ours = load_model(final).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(3, 400, (2, 40), generator=g), torch.randint(3, 400, (2, 10), generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    assert torch.allclose(ours(x, y, mask), _logits(hf, x, y, mask), atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    assert tok.convert_ids_to_tokens(tok("a b")["input_ids"])[-1] == "</s>" and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids("<extra_id_0>") == ours.args.vocab_size - 1


@pytest.mark.slow
def test_span_corruption_pretraining_resumes_bit_for_bit(t5_run, tmp_path):
    from tests.model.test_encoder import assert_pretraining_resumes_bit_for_bit

    assert_pretraining_resumes_bit_for_bit(t5_run(), tmp_path)


@pytest.mark.slow
def test_estimate_of_a_t5_recipe_counts_both_stacks(t5_run, capsys):
    from lmkiln.model.families.t5 import build_t5_args
    from lmkiln.train.estimate import estimate
    from tests.conftest import TINY

    recipe = t5_run()
    est = estimate(recipe)
    vocab = json.loads((recipe.run_dir / "tokenizer" / "train.json").read_text())["vocab_size"]
    args = build_t5_args(recipe.model, vocab, {"pad": 0, "eos": 1})
    # 48 inputs come from windows of 52 tokens, whose targets are 12 long
    assert est["parameters"] == args.num_params() and est["flops_per_token"] == args.flops_per_token(48, 12)
    assert 0 < est["memory_bytes"]["activations"] < est["memory_bytes"]["total"]
    assert main(["estimate", *TINY, f"run_dir={recipe.run_dir}", *T5_RUN]) == 0
    assert "memory: total" in capsys.readouterr().out


@pytest.mark.slow
def test_greedy_and_beam_search_equal_transformers_generate(tmp_path):
    """Greedy and beam search (widths, length penalties, early stopping) give transformers' outputs; EOS is
    set to a token the random model often produces, so hypotheses end early and the finished-beam rules
    are exercised."""
    import collections

    from lmkiln.model.inference.t5_generate import generate

    config = transformers.T5Config(
        **{**SMALL, "vocab_size": 60}, feed_forward_proj="gated-gelu", decoder_start_token_id=0
    )
    hf = _hf_dir(tmp_path / "hf", config, own_head=True)
    inputs = [torch.randint(2, 60, (1, 12), generator=torch.Generator().manual_seed(s)) for s in range(8)]
    produced = collections.Counter(
        t for x in inputs for t in hf.generate(x, max_new_tokens=10, do_sample=False, use_cache=False)[0, 1:].tolist()
    )
    eos = [t for t, _ in produced.most_common() if t > 1][0]
    for name in ("config.json", "generation_config.json"):
        path = tmp_path / "hf" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": eos}))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    ended = 0
    for x in inputs:
        for beams, penalty, early in (
            (1, 1.0, False),
            (4, 1.0, False),
            (3, 0.6, False),
            (4, 2.0, True),
            (5, -0.5, False),
        ):
            settings = dict(num_beams=beams, length_penalty=penalty, early_stopping=early)
            theirs = hf.generate(x, max_new_tokens=10, do_sample=False, use_cache=False, **settings)[0, 1:].tolist()
            theirs = theirs[: theirs.index(eos) + 1] if eos in theirs else theirs  # padding after EOS
            mine = generate(ours, x[0].tolist(), 10, **settings)
            assert mine == theirs, settings
            ended += eos in mine
    assert ended >= 10, ended


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_text_to_text_fine_tuning_learns_and_saves_a_t5_transformers_loads(t5_run, method):
    from lmkiln.train import run_finetune, run_pretrain

    recipe = t5_run()
    run_pretrain(recipe)
    tuned = recipe.model_copy(deep=True)
    tuned.finetune.base = "pretrain"
    tuned.finetune.method = method
    tuned.finetune.lr = 3e-3
    tuned.finetune.epochs = 3
    metrics = run_finetune(tuned)["metrics"]
    assert metrics["best_val_loss"] < metrics["base_val_loss"], metrics
    final = recipe.run_dir / "finetune" / "final"
    ours = load_model(final).eval()
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(final, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(3, 400, (1, 20), generator=g), torch.randint(3, 400, (1, 6), generator=g)
    mask = torch.ones(1, 20, dtype=torch.bool)
    assert torch.allclose(ours(x, y, mask), _logits(hf, x, y, mask), atol=1e-4, rtol=0)
    if method == "lora":  # q, k, v, o and the feed-forward's matrices carried adapters
        assert (recipe.run_dir / "finetune" / "adapter" / "adapter_config.json").is_file()
    if method == "full":  # the verbs that run a model: generate (greedy and beam search) and eval
        from lmkiln.model.inference.load import load_format
        from lmkiln.model.inference.t5_generate import generate, input_ids

        tok, _ = load_format(final)
        prompt = "Write the docstring for this Python function."
        ids = input_ids(tok, prompt, ours.args.eos_token_id)
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, num_beams=2, do_sample=False, use_cache=False)
        expected = tok.decode(expected[0, 1:].tolist(), skip_special_tokens=True)
        assert tok.decode(generate(ours, ids, 8, num_beams=2), skip_special_tokens=True) == expected
        out = io.StringIO()
        print_continuation(final, prompt, max_tokens=8, temperature=0, num_beams=2, out=out)
        assert out.getvalue() == expected + "\n"
        ev = ["-q", "eval", f"run_dir={recipe.run_dir}", "eval.metrics=[bleu, chrf]", "--models", str(final)]
        assert main([*ev, "--tasks", f"gen:{recipe.finetune.data}@val", "--out", str(recipe.run_dir / "ev")]) == 0
        scores = next(iter(json.loads((recipe.run_dir / "ev" / "eval.json").read_text()).values()))
        task = next(v for k, v in scores.items() if k != "path")
        assert {"reply_loss", "bleu", "chrf", "samples"} <= set(task) and task["reply_loss"] > 0
        _check_serving(final, ours, tok, prompt)


def _check_serving(final, model, tok, prompt: str) -> None:
    """/v1/completions reads the prompt as the input; chat reads the conversation as `role: content`
    lines; both answer what greedy decoding gives, and the openai client reads them."""
    import httpx
    import openai

    from lmkiln.model.inference.t5_generate import generate, input_ids
    from lmkiln.serve.app import create_app
    from lmkiln.serve.blocklist import Blocklist
    from tests.serve.conftest import serving

    def greedy(text: str) -> str:
        return tok.decode(generate(model, input_ids(tok, text, model.args.eos_token_id), 8), skip_special_tokens=True)

    app = create_app(final, device="cpu", name="t5")
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        done = client.completions.create(model="t5", prompt=prompt, max_tokens=8, temperature=0)
        assert done.choices[0].text == greedy(prompt) and done.usage.completion_tokens > 0
        reply = client.chat.completions.create(
            model="t5", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content == greedy(f"user: {prompt}")
        chunks = list(client.completions.create(model="t5", prompt=prompt, max_tokens=8, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == greedy(prompt)
        # --blocklist: a word of the reply cuts it there, whole and streamed, and each cut is counted
        text = greedy(prompt)
        word = re.findall(r"\w+", text)[-1]
        app.state.server.blocklist = Blocklist([word])
        cut = client.completions.create(model="t5", prompt=prompt, max_tokens=8, temperature=0)
        streamed = list(client.completions.create(model="t5", prompt=prompt, max_tokens=8, temperature=0, stream=True))
        before = text[: re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text).start()]
        assert cut.choices[0].text == before and cut.choices[0].finish_reason == "content_filter"
        assert "".join(c.choices[0].text for c in streamed) == before
        assert streamed[-1].choices[0].finish_reason == "content_filter"
        assert "lmkiln_content_filtered_total 2.0" in httpx.get(url + "/metrics").text


def test_a_sentencepiece_only_vocabulary_is_converted_or_refused_with_the_command(tmp_path, capsys):
    """A T5 directory with spiece.model and no tokenizer.json: transformers converts it where sentencepiece
    is installed; where not, the import stops before writing and names the command that converts it."""
    import importlib.util

    _hf_dir(tmp_path / "hf", transformers.T5Config(**SMALL, feed_forward_proj="gated-gelu"))
    (tmp_path / "hf" / "spiece.model").write_bytes(b"not read unless sentencepiece is installed")
    code = main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")])
    if importlib.util.find_spec("sentencepiece") is None:
        err = capsys.readouterr().err
        assert code == 2 and "spiece.model" in err and "save_pretrained" in err and not (tmp_path / "ours").exists()
    else:  # a real spiece.model would convert; this one is not a SentencePiece model
        assert code != 0


@pytest.mark.slow
def test_span_corruption_ddp_two_ranks_equal_one_rank_with_double_accumulation(t5_run, tmp_path):
    import shutil

    from lmkiln.train import run_pretrain
    from tests.train.test_distributed import torchrun

    steps = [
        "pretrain.max_steps=4",
        "pretrain.checkpoint_every=100",
        "pretrain.eval_every=2",
        "pretrain.batch_tokens=384",
    ]
    single = t5_run("single", *steps)
    run_pretrain(single)
    ddp_dir = tmp_path / "ddp"
    shutil.copytree(single.run_dir, ddp_dir)
    shutil.rmtree(ddp_dir / "pretrain")
    res = torchrun(ddp_dir, *T5_RUN, *steps, "pretrain.strategy=ddp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 accum × 2 ranks" in res.stderr
    a, b = (load_model(d / "pretrain" / "final").state_dict() for d in (ddp_dir, single.run_dir))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())

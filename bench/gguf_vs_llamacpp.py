"""lmkiln's GGUF export run by llama.cpp itself (through llama-cpp-python), in one run.

For each family (Llama, Llama 3.1 rope scaling, Qwen2, Qwen3, Mistral): a small random model with
sharp logits, a byte-level BPE tokenizer trained on tinyshakespeare, exported with `kiln export
--format gguf --dtype fp32`; llama.cpp loads the file and scores a prompt. Prints the largest logit
difference against lmkiln's model and whether 24 greedy tokens agree.

    pip install llama-cpp-python      # builds llama.cpp (about 25 minutes on 2 cores)
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
    "llama3.1 rope": dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),
    "mistral": dict(arch="mistral"),
}


def make_model(family: dict, tokenizer_dir: Path, out: Path):
    from lmkiln.model.hub import save_model
    from lmkiln.model.transformer import ModelArgs, Transformer
    from lmkiln.tokenizer.train import load_tokenizer, special_ids

    ids = special_ids(load_tokenizer(tokenizer_dir))
    args = ModelArgs(vocab_size=load_tokenizer(tokenizer_dir).get_vocab_size(), hidden_size=128, num_layers=3,
                     num_heads=4, num_kv_heads=2, intermediate_size=256, max_seq_len=256, tie_embeddings=False,
                     bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], **family)
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

    from lmkiln.model.export import export_model
    from lmkiln.model.generate import generate
    from lmkiln.tokenizer.train import save_tokenizer, train_bpe

    root = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        text = SHAKESPEARE.read_text()
        save_tokenizer(train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], 1024), root / "tok")
        print(f"{'family':<15}{'max |logit diff|':>18}{'logit std':>11}{'greedy 24 equal':>17}")
        for name, family in FAMILIES.items():
            hf, gguf = root / f"{name}-hf", root / f"{name}-gguf"
            model = make_model(family, root / "tok", hf)
            export_model(hf, gguf, fmt="gguf", dtype="fp32")
            llm = llama_cpp.Llama(model_path=str(gguf / "model.gguf"), n_ctx=256, logits_all=True, verbose=False,
                                  type_k=0, type_v=0)  # an f32 KV cache (GGML_TYPE_F32), as lmkiln keeps
            prompt = [t % model.args.vocab_size for t in range(17, 17 + 40 * 7, 7)]
            llm.eval(prompt)
            with torch.no_grad():
                ours = model(torch.tensor([prompt]))[0].numpy()
            diff = np.abs(llm.scores[:len(prompt)] - ours).max()
            llm.reset()
            theirs = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
                theirs.append(token)
                if len(theirs) == 24:
                    break
            same = theirs == generate(model, prompt, 24, temperature=0.0)
            print(f"{name:<15}{diff:>18.2e}{ours.std():>11.2f}{'yes' if same else 'NO':>17}")
            del llm
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

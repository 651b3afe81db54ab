"""Peak memory of `kiln import` on a 1 GB checkpoint, against transformers' load-and-save, in one run.

Makes a random bf16 Llama checkpoint of about 1.1 GB in two safetensors shards, then measures three
imports, each in a fresh process: the peak resident memory above that process's own baseline (taken
after its imports, before any work).
  lmkiln copy:       `kiln import` as it is (headers checked, weight files copied)
  lmkiln convert:    `kiln import --dtype fp16` (every tensor read, converted and rewritten)
  transformers:      AutoModelForCausalLM.from_pretrained(dtype=bfloat16) + save_pretrained

    python bench/import_memory.py [--layers 9] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}

MAKE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out, layers = Path(sys.argv[1]), int(sys.argv[2])
cfg = json.loads((out / "config.json").read_text())
h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
def layer(n):
    p = f"model.layers.{n}."
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
              "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    return {p + k: torch.randn(s, dtype=torch.bfloat16) * 0.02 for k, s in shapes.items()}
halves = [list(range(layers // 2)), list(range(layers // 2, layers))]
weight_map, total = {}, 0
for k, part in enumerate(halves):
    state = {}
    for n in part:
        state.update(layer(n))
    if k == 0:
        state["model.embed_tokens.weight"] = torch.randn(v, h, dtype=torch.bfloat16) * 0.02
    else:
        state["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        state["lm_head.weight"] = torch.randn(v, h, dtype=torch.bfloat16) * 0.02
    name = f"model-0000{k + 1}-of-00002.safetensors"
    save_file(state, out / name, metadata={"format": "pt"})
    weight_map.update({key: name for key in state})
    total += sum(t.numel() * 2 for t in state.values())
    del state
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
print(total)
"""

MEASURE = """
import resource, sys
def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024
import torch
from lmkiln.model.convert.importer import import_model
kind, src, out = sys.argv[1:4]
if kind == "transformers":
    import transformers
base = rss_mb()
if kind == "copy":
    import_model(src, out)
elif kind == "convert":
    import_model(src, out, dtype="fp16")
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{peak - base:.0f} {base:.0f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=9, help="decoder layers (9: about 1.07 GB in bf16)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the files in this folder")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        src = root / "hf"
        src.mkdir(parents=True, exist_ok=True)
        (src / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": args.layers}))
        size = int(
            subprocess.run(
                [sys.executable, "-c", MAKE, str(src), str(args.layers)], check=True, capture_output=True, text=True
            ).stdout.split()[-1]
        )
        print(f"checkpoint: {size / 1e9:.2f} GB bf16 in 2 safetensors shards ({args.layers} layers)\n")
        print(f"{'import':<16}{'peak above baseline':>22}{'baseline':>10}")
        rows = {}
        for kind in ("copy", "convert", "transformers"):
            out = root / f"out-{kind}"
            result = subprocess.run(
                [sys.executable, "-c", MEASURE, kind, str(src), str(out)], check=True, capture_output=True, text=True
            )
            extra, base = map(float, result.stdout.split()[-2:])
            rows[kind] = extra
            label = {"copy": "lmkiln copy", "convert": "lmkiln convert", "transformers": "transformers"}[kind]
            print(f"{label:<16}{extra:>18,.0f} MB{base:>7,.0f} MB")
            shutil.rmtree(out, ignore_errors=True)
        print(
            f"\nlimit: 1.5 GB above baseline; transformers / lmkiln convert: "
            f"{rows['transformers'] / max(rows['convert'], 1):.1f}x"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

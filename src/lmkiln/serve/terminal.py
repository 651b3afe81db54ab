"""`kiln chat`: a conversation with a model in the terminal, through its chat template, each reply
streamed as it is generated, with its tokens/s. `/reset` starts over; `/exit` or end of input ends."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO


def chat_loop(
    model_dir: Path,
    device: str = "auto",
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 512,
    system: str | None = None,
    seed: int | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    from lmkiln.device import pick_device
    from lmkiln.model.inference.generate import TextStream, check_sampling, stream
    from lmkiln.model.inference.load import check_model_dir, load_for_inference

    check_sampling(temperature, top_p, max_tokens)
    check_model_dir(model_dir)
    lm = load_for_inference(model_dir, pick_device(device))
    model, tok, chat = lm.model, lm.tok, lm.chat
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = stdin.isatty()
    turns = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return turns
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(start)
            stdout.write("(new conversation)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = tok.encode(chat.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
        stdout.write("model> ")
        reply, began = TextStream(tok), time.perf_counter()
        for token in stream(
            model, prompt, max_tokens, temperature=temperature, top_p=top_p, stop_ids=sorted(chat.stop_ids), seed=seed
        ):
            stdout.write(reply.push(token))
            stdout.flush()
        seconds, n = time.perf_counter() - began, len(reply.ids)
        stdout.write(f"\n[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]\n")
        messages.append({"role": "assistant", "content": reply.text})
        turns += 1

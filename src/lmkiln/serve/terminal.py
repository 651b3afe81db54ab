"""`kiln chat`: a conversation with a model in the terminal, through its chat template, each reply
streamed as it is generated, with its tokens/s. `/reset` starts over; `/exit` or end of input ends."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO


def chat_loop(model_dir: Path, device: str = "auto", temperature: float = 0.7, top_p: float = 0.95,
              max_tokens: int = 512, system: str | None = None, seed: int | None = None,
              stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    from lmkiln.device import pick_device
    from lmkiln.model.generate import stream
    from lmkiln.model.hub import generation_eos, load_model
    from lmkiln.tokenizer.train import load_tokenizer
    from lmkiln.train.formats import ChatFormat

    model = load_model(model_dir, pick_device(device))
    tok, chat = load_tokenizer(model_dir), ChatFormat(model_dir)
    stops = set(generation_eos(model_dir)) | ({chat.eos} if chat.eos is not None else set())
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
        ids, shown, began = [], "", time.perf_counter()
        for token in stream(model, prompt, max_tokens, temperature=temperature, top_p=top_p,
                            stop_ids=sorted(stops), seed=seed):
            ids.append(token)
            decoded = tok.decode(ids)
            if not decoded.endswith("\ufffd"):
                stdout.write(decoded[len(shown):])
                stdout.flush()
                shown = decoded
        seconds = time.perf_counter() - began
        stdout.write(f"\n[{len(ids)} tokens, {len(ids) / max(seconds, 1e-9):.1f} tokens/s]\n")
        messages.append({"role": "assistant", "content": tok.decode(ids)})
        turns += 1

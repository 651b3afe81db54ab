"""What `kiln serve` offers for an encoder-decoder (T5): `/v1/completions` (the prompt is the input,
the completion the output) and `/v1/chat/completions` (the conversation as `role: content` lines is the
input, as text-to-text fine-tuning renders chat rows). The output is decoded whole, then returned (or
streamed as one chunk): T5 writes its output after reading all of the input."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import torch
from fastapi.responses import StreamingResponse

from lmkiln.serve.protocol import ApiError


def is_seq2seq(model_dir: Path) -> bool:
    from lmkiln.io import read_json
    from lmkiln.model.families import is_seq2seq_config

    return is_seq2seq_config(read_json(Path(model_dir) / "config.json"))


class Seq2SeqService:
    def __init__(self, model_dir: Path, device) -> None:
        from lmkiln.model.inference.load import load_format
        from lmkiln.model.io.hub import load_model

        self.tok, _ = load_format(model_dir)
        self.model = load_model(model_dir, device).eval()
        self.context = self.model.args.max_seq_len
        self.lock = threading.Lock()  # one generation at a time on the shared model

    def complete(self, text: str, req, max_tokens: int, param: str) -> dict:
        from lmkiln.model.inference.t5_generate import generate, input_ids

        eos = self.model.args.eos_token_id
        ids = input_ids(self.tok, text, eos)
        if len(ids) > self.context:
            raise ApiError(400, f"{param}: {len(ids)} tokens; the model reads at most {self.context}", param)
        generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        with self.lock:
            out = generate(
                self.model, ids, max_tokens, temperature=req.temperature, top_p=req.top_p, generator=generator
            )
        return {
            "text": self.tok.decode(out, skip_special_tokens=True),
            "prompt_tokens": len(ids),
            "completion_tokens": len(out),
            "finish_reason": "stop" if out and out[-1] == eos else "length",
        }


def respond(
    service: Seq2SeqService, req, texts: list[str], chat: bool, name: str, param: str, blocklist=None, metrics=None
):
    """OpenAI's completion (or chat completion) for each text, n each; one chunk and [DONE] when streamed.
    With a blocklist, an output is cut before its first blocked phrase (finish_reason content_filter), and
    each cut is counted in `metrics`, as a decoder's are."""
    max_tokens = (getattr(req, "max_completion_tokens", None) or req.max_tokens) or (128 if chat else 16)
    outputs = [service.complete(t, req, max_tokens, param) for t in texts for _ in range(req.n)]
    for o in outputs:
        cut = blocklist.cut(o["text"], final=True) if blocklist else None
        if cut is not None:
            o.update(text=o["text"][:cut], finish_reason="content_filter")
            if metrics is not None:
                metrics.filtered()
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": name,
    }
    usage = {
        "prompt_tokens": sum(o["prompt_tokens"] for o in outputs[:: req.n]),
        "completion_tokens": sum(o["completion_tokens"] for o in outputs),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

    def choice(i: int, o: dict, delta: bool = False) -> dict:
        if not chat:
            return {"index": i, "text": o["text"], "logprobs": None, "finish_reason": o["finish_reason"]}
        message = {"role": "assistant", "content": o["text"]}
        return {
            "index": i,
            "delta" if delta else "message": message,
            "logprobs": None,
            "finish_reason": o["finish_reason"],
        }

    kind = "chat.completion" if chat else "text_completion"
    if not req.stream:
        return {**head, "object": kind, "choices": [choice(i, o) for i, o in enumerate(outputs)], "usage": usage}

    def events():
        chunk = {**head, "object": f"{kind}.chunk" if chat else kind}
        for i, o in enumerate(outputs):
            yield f"data: {json.dumps({**chunk, 'choices': [choice(i, o, delta=True)]})}\n\n"
        if req.stream_options is not None and req.stream_options.include_usage:
            yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

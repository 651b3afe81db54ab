"""The chat format: special tokens, the Jinja template stored in tokenizer_config.json, and the same
rendering in Python with character spans of what the loss trains on.

The Python rendering must equal what `transformers`' `apply_chat_template` makes of the Jinja template
(tested), so what we train on is what a server that reads tokenizer_config.json will send.
"""

from __future__ import annotations

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, END] + [f"<|{r}|>" for r in ROLES] + [FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render(messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans of assistant replies,
    each reply's span including its end-of-turn token, which the model must learn to emit."""
    parts = [BOS]
    spans = []
    pos = len(BOS)
    for m in messages:
        if m["role"] not in ROLES:
            raise ValueError(f"unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        head = f"<|{m['role']}|>\n"
        body = m["content"] + END
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts += [head, body, "\n"]
        pos += len(head) + len(body) + 1
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts), spans


def instruction_messages(instruction: str, input_text: str = "", output: str | None = None) -> list[dict]:
    """Alpaca-style fields as a conversation: the user turn holds instruction and input."""
    user = instruction if not input_text else f"{instruction}\n\n{input_text}"
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages

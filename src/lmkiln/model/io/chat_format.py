"""A model's own format: its chat template and its special ids (bos, eos, pad, the tokens that stop a
reply), read from the model directory, never assumed. lmkiln's own template and tokens apply only to a
model lmkiln's tokenizer stage made, which carries them in its files like any other model.

lmkiln's own format: its special tokens, the Jinja template its tokenizer stage stores in
tokenizer_config.json, and the same rendering in Python with character spans of what the loss trains on.
The Python rendering must equal what `transformers`' `apply_chat_template` makes of the Jinja template
(tested), so what we train on is what a server that reads tokenizer_config.json will send."""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path

from lmkiln.errors import UserError
from lmkiln.io import read_json

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


# a conversation that exercises every role: what the checks render and the end-of-turn probe reads
PROBE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi there"},
]


def tokenizer_config(model_dir: Path) -> dict:
    return read_json(Path(model_dir) / "tokenizer_config.json")


def chat_template(model_dir: Path) -> str | None:
    """The template from tokenizer_config.json, or from chat_template.jinja (newer HF layout)."""
    template = tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return template


@lru_cache(maxsize=8)
def _compiled(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
    return env.from_string(template)


def render_chat(
    model_dir: Path, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> str:
    """Render messages as transformers' apply_chat_template does (sandboxed Jinja, same options, and
    `tools` as the template's variable of that name)."""
    template = chat_template(model_dir)
    if template is None:
        raise UserError(f"{model_dir}: no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)")
    cfg = tokenizer_config(model_dir)
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items() if k.endswith("_token")}
    extra = {"tools": tools} if tools else {}
    return _compiled(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special, **extra
    )


def _special_tokens(model_dir: Path) -> dict[str, int]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return {}
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {t["content"]: t["id"] for t in added if t.get("special", True)}


def end_of_turn(model_dir: Path) -> tuple[str, int] | None:
    """The special token the chat template puts right after an assistant reply (<|eot_id|>, <|im_end|>,
    </s>, ...), or None if it puts none there."""
    text = render_chat(model_dir, PROBE)
    after = text[text.rfind(PROBE[-1]["content"]) + len(PROBE[-1]["content"]) :].lstrip(" ")
    for token, token_id in sorted(_special_tokens(model_dir).items(), key=lambda kv: -len(kv[0])):
        if after.startswith(token):
            return token, token_id
    return None


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [v for v in (value or []) if isinstance(v, int)]


class ChatFormat:
    """How a model's conversations become text and which ids frame them: its own chat template
    (tokenizer_config.json or chat_template.jinja; lmkiln's when it has none) and its bos, eos, pad and
    stop ids from config.json, generation_config.json and tokenizer_config.json."""

    def __init__(self, model_dir: Path | None = None) -> None:
        root = Path(model_dir) if model_dir is not None else None
        self.model_dir = root if root is not None and chat_template(root) else None
        cfg = read_json(root / "config.json") if root else {}
        gen = read_json(root / "generation_config.json") if root else {}
        # an encoder's text is framed [CLS] ... [SEP]: BERT's configs name those, not bos and eos
        framing = {"bos": "cls", "eos": "sep", "pad": "pad"}
        found = {
            name: _ids(cfg.get(f"{name}_token_id"))
            or _ids(gen.get(f"{name}_token_id"))
            or _ids(cfg.get(f"{framing[name]}_token_id"))
            for name in framing
        }
        if root is not None and not all(found.values()):  # else the tokenizer's named tokens
            named = self._named_ids(root)
            found = {
                name: ids or _ids(named.get(name)) or _ids(named.get(framing[name])) for name, ids in found.items()
            }
        eos = found["eos"]
        self.bos: int | None = found["bos"][0] if found["bos"] else None
        self.eos: int | None = eos[0] if eos else None
        # padding is never attended to nor trained (masks come from lengths), so any id serves when
        # the model names none
        self.pad: int = found["pad"][0] if found["pad"] else (self.eos if self.eos is not None else 0)
        self.end_of_turn: int | None = self._end_of_turn()
        # what ends a generated reply: every eos id and the template's end of turn
        self.stop_ids = frozenset(
            _ids(gen.get("eos_token_id")) + eos + ([self.end_of_turn] if self.end_of_turn is not None else [])
        )

    @property
    def start(self) -> int | None:
        """The id a document or probe starts from: BOS, else EOS (the previous document's end)."""
        return self.bos if self.bos is not None else self.eos

    @staticmethod
    def _named_ids(root: Path) -> dict[str, int]:
        """tokenizer_config.json's bos/eos/pad (and an encoder's cls/sep) token strings, as ids of
        tokenizer.json."""
        names = {
            k.removesuffix("_token"): (v.get("content") if isinstance(v, dict) else v)
            for k, v in read_json(root / "tokenizer_config.json").items()
            if k in ("bos_token", "eos_token", "pad_token", "cls_token", "sep_token")
        }
        tok = read_json(root / "tokenizer.json")
        vocab = dict((tok.get("model") or {}).get("vocab") or {})
        vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
        return {k: vocab[v] for k, v in names.items() if isinstance(v, str) and isinstance(vocab.get(v), int)}

    def _end_of_turn(self) -> int | None:
        if self.model_dir is None:
            return None
        try:
            found = end_of_turn(self.model_dir)
        except Exception:  # a template that does not render: the consistency checks report it
            return None
        return found[1] if found else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """The conversation as the model reads it; `tools` go to a template that renders them (see
        renders_tools) and are an error for one that cannot."""
        if tools and not self.renders_tools:
            raise ValueError("this chat template does not render tools")
        if self.model_dir is None:
            return render(messages, add_generation_prompt)[0]
        return render_chat(self.model_dir, messages, add_generation_prompt, tools)

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the template uses a `tools` list: a one-message conversation renders differently
        with one than without."""
        if self.model_dir is None:
            return False
        probe = [{"role": "user", "content": "x"}]
        tool = [{"type": "function", "function": {"name": "probe", "description": "d", "parameters": {}}}]
        try:
            return render_chat(self.model_dir, probe, True, tool) != render_chat(self.model_dir, probe, True)
        except Exception:  # a template that fails on tools does not render them
            return False

    def reply_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant reply with its end-of-turn
        token: the text the template adds for that message after the generation prompt, found by
        rendering the conversation up to it (whatever the template, the prompt is what a server sends)."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not upto.startswith(before) or not text.startswith(upto):
                where = self.model_dir or "lmkiln's template"
                raise UserError(
                    f"the chat template of {where} does not render a conversation as a prefix of its "
                    f"continuation, so the reply tokens cannot be found; set finetune.loss_on=all"
                )
            spans.append((len(before), len(upto.rstrip())))
        return text, spans

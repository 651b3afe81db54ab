"""A model's own format: its chat template and its special ids (bos, eos, pad, the tokens that stop a
reply), read from the model directory, never assumed. lmkiln's own template and tokens apply only to a
model lmkiln's tokenizer stage made, which carries them in its files like any other model."""

from __future__ import annotations

from pathlib import Path

from lmkiln.errors import UserError
from lmkiln.io import read_json
from lmkiln.tokenizer.chat import render


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else [v for v in (value or []) if isinstance(v, int)]


class ChatFormat:
    """How a model's conversations become text and which ids frame them: its own chat template
    (tokenizer_config.json or chat_template.jinja; lmkiln's when it has none) and its bos, eos, pad and
    stop ids from config.json, generation_config.json and tokenizer_config.json."""

    def __init__(self, model_dir: Path | None = None) -> None:
        from lmkiln.model.checks import chat_template

        root = Path(model_dir) if model_dir is not None else None
        self.model_dir = root if root is not None and chat_template(root) else None
        cfg = read_json(root / "config.json") if root else {}
        gen = read_json(root / "generation_config.json") if root else {}
        found = {name: _ids(cfg.get(f"{name}_token_id")) or _ids(gen.get(f"{name}_token_id"))
                 for name in ("bos", "eos", "pad")}
        if root is not None and not all(found.values()):  # else the tokenizer's named tokens
            named = self._named_ids(root)
            found = {name: ids or _ids(named.get(name)) for name, ids in found.items()}
        eos = found["eos"]
        self.bos: int | None = found["bos"][0] if found["bos"] else None
        self.eos: int | None = eos[0] if eos else None
        # padding is never attended to nor trained (masks come from lengths), so any id serves when
        # the model names none
        self.pad: int = found["pad"][0] if found["pad"] else (self.eos if self.eos is not None else 0)
        self.end_of_turn: int | None = self._end_of_turn()
        # what ends a generated reply: every eos id and the template's end of turn
        self.stop_ids = frozenset(_ids(gen.get("eos_token_id")) + eos
                                  + ([self.end_of_turn] if self.end_of_turn is not None else []))

    @property
    def start(self) -> int | None:
        """The id a document or probe starts from: BOS, else EOS (the previous document's end)."""
        return self.bos if self.bos is not None else self.eos

    @staticmethod
    def _named_ids(root: Path) -> dict[str, int]:
        """tokenizer_config.json's bos_token/eos_token/pad_token strings, as ids of tokenizer.json."""
        names = {k.removesuffix("_token"): (v.get("content") if isinstance(v, dict) else v)
                 for k, v in read_json(root / "tokenizer_config.json").items() if k in ("bos_token", "eos_token", "pad_token")}
        tok = read_json(root / "tokenizer.json")
        vocab = dict((tok.get("model") or {}).get("vocab") or {})
        vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
        return {k: vocab[v] for k, v in names.items() if isinstance(v, str) and isinstance(vocab.get(v), int)}

    def _end_of_turn(self) -> int | None:
        from lmkiln.model.checks import end_of_turn

        if self.model_dir is None:
            return None
        try:
            found = end_of_turn(self.model_dir)
        except Exception:  # a template that does not render: the consistency checks report it
            return None
        return found[1] if found else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.model_dir is None:
            return render(messages, add_generation_prompt)[0]
        from lmkiln.model.checks import render_chat

        return render_chat(self.model_dir, messages, add_generation_prompt)

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
            upto = self.render(messages[:i + 1])
            if not upto.startswith(before) or not text.startswith(upto):
                where = self.model_dir or "lmkiln's template"
                raise UserError(f"the chat template of {where} does not render a conversation as a prefix of its "
                                f"continuation, so the reply tokens cannot be found; set finetune.loss_on=all")
            spans.append((len(before), len(upto.rstrip())))
        return text, spans

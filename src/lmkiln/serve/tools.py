"""Tool calling in the Hermes format that Qwen2.5/3, SmolLM2-1.7B/SmolLM3 and Hermes templates use: a
call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the reply, a result goes back
as a `tool` message. A template that renders `tools` itself is given them as
transformers' apply_chat_template would; one that ignores them (SmolLM2-135M's) gets the list in its
system message and the calls and results as text, in the same format. A forced call (`required` or a
named function) is one call, held to the format and to the function's parameters schema by a grammar."""

from __future__ import annotations

import json
import uuid

from lmkiln.serve.constraints import JSON_OPTIONS, bounded
from lmkiln.serve.protocol import ApiError, ChatRequest, NamedToolChoice

OPEN, CLOSE = "<tool_call>", "</tool_call>"

SYSTEM = (
    "You can call functions to answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call one, reply with its name and arguments as one JSON object inside tags, like this:\n"
    '<tool_call>\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n</tool_call>'
)


def tool_dicts(req: ChatRequest) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in req.tools or []]


def messages_for_template(req: ChatRequest, native: bool) -> list[dict]:
    """The conversation as the template takes it: natively (assistant `tool_calls` with their arguments
    as objects, `tool` messages) or, for a template without tools, all of it as text in the format."""
    tools = tool_dicts(req) if req.tool_choice != "none" else []
    names = {c.id: c.function.name for m in req.messages for c in m.tool_calls or []}
    out = []
    for m in req.messages:
        calls = [_call_dict(c) for c in m.tool_calls or []]
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system turn
        if native:
            entry = {"role": role, "content": m.text()}
            if calls:
                entry["tool_calls"] = [{"type": "function", "id": c["id"], "function": c["function"]} for c in calls]
            if m.role == "tool":
                entry["tool_call_id"] = m.tool_call_id
            out.append(entry)
        elif m.role == "tool":  # untagged: a small model shown two tags mixes them up (measured on SmolLM2)
            out.append({"role": "user", "content": f"Result of {names.get(m.tool_call_id, 'the call')}: {m.text()}"})
        else:
            text = m.text() + "".join(f"\n{OPEN}\n{json.dumps(c['function'])}\n{CLOSE}" for c in calls)
            out.append({"role": role, "content": text.strip("\n")})
    if tools and not native:
        listed = SYSTEM.format(tools="\n".join(json.dumps(t["function"]) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + listed}
        else:
            out.insert(0, {"role": "system", "content": listed})
    return out


def _call_dict(call) -> dict:
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        raise ApiError(400, f"messages: tool call {call.id}: arguments are not JSON", "messages") from None
    return {"id": call.id, "function": {"name": call.function.name, "arguments": arguments}}


def forced_grammar(req: ChatRequest) -> str | None:
    """The Lark grammar a forced call needs (llguidance's %json embeds each function's schema), or None
    when the model may answer in text."""
    choice = req.tool_choice
    if not req.tools or choice in (None, "none", "auto"):
        return None
    functions = [t.function for t in req.tools]
    if isinstance(choice, NamedToolChoice):
        functions = [f for f in functions if f.name == choice.function.name]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = bounded(options[0] if len(options) == 1 else {"anyOf": options})
    schema["x-guidance"] = JSON_OPTIONS  # %json in Lark takes its options from the schema
    return f'start: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"'  # one call: a forced call ends


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """The reply's text outside tool calls, and each well-formed call in OpenAI's shape (arguments as
    a JSON string). A block that does not parse stays in the text."""
    content, calls, rest = "", [], text
    while OPEN in rest:
        before, _, after = rest.partition(OPEN)
        body, closed, rest = after.partition(CLOSE)
        call = _call(body)
        if call is None or not closed:
            content += before + OPEN + body + closed
            continue
        content += before
        calls.append(call)
    return (content + rest).strip(), calls


def _call(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(arguments)},
    }


class CallStream:
    """A streamed reply split as it comes into content deltas and tool calls, each call whole once its
    closing tag arrives; text that could begin a call is held back until it cannot, and whitespace
    around calls is dropped (as parse_calls strips it from a whole reply)."""

    def __init__(self) -> None:
        self.pending, self.space, self.started = "", "", False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        out, calls = "", []
        while True:
            i = self.pending.find(OPEN)
            if i < 0:
                held = max((k for k in range(1, len(OPEN)) if self.pending.endswith(OPEN[:k])), default=0)
                cut = len(self.pending) - held
                out += self._content(self.pending[:cut])
                self.pending = self.pending[cut:]
                return out, calls
            out += self._content(self.pending[:i])
            j = self.pending.find(CLOSE, i)
            if j < 0:
                self.pending = self.pending[i:]
                return out, calls
            block, self.pending = self.pending[i : j + len(CLOSE)], self.pending[j + len(CLOSE) :]
            rest, found = parse_calls(block)
            calls += found
            self.space = ""  # whitespace before a call is not content
            out += self._content(rest)

    def flush(self) -> str:
        """What is left at the end (an unclosed call is text), trailing whitespace dropped."""
        text, self.pending = self.pending, ""
        return self._content(text.rstrip()) if text.strip() else ""

    def _content(self, text: str) -> str:
        if not text.strip():
            self.space += text if self.started else ""
            return ""
        if not self.started:
            text, self.started = text.lstrip(), True
        out, self.space = self.space + text, ""
        trailing = len(out) - len(out.rstrip())
        if trailing:
            out, self.space = out[: len(out) - trailing], out[len(out) - trailing :]
        return out

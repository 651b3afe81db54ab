"""OpenAI's request and response shapes: the requests as pydantic models (a bad parameter is a 400 that
names it), errors as {"error": {message, type, param, code}}, and the logprobs of both endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class ApiError(Exception):
    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": None}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is enforced whichever it says


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Common(BaseModel):
    # A field we do not implement is refused (400 naming it), never silently ignored.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    user: str | None = None  # the caller's end user, an identifier that changes nothing in the reply
    # Structured outputs: OpenAI's response_format, and vLLM's guided_* extensions (one per request).
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a Lark grammar, as llguidance reads it
    # Accepted at their neutral values only: a client that sends the default loses nothing.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("not supported by kiln serve: only 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value):
        if value:
            raise ValueError("not supported by kiln serve: only an empty map")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]


class CompletionRequest(Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo and logprobs: score the prompt, generate nothing

    def check_scoring(self) -> None:
        """max_tokens 0 scores the prompt: echo and logprobs, answered whole."""
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise ApiError(400, "max_tokens 0 scores the prompt: it needs echo and logprobs", "max_tokens")
        if self.echo and self.logprobs is not None and self.stream:
            raise ApiError(400, "echo with logprobs (the prompt's log-probabilities) is answered whole", "stream")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("an empty list")
        return prompt


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    content: str | list[dict] | None = Field(None, validate_default=True)  # None: a turn that only called tools

    @field_validator("content")
    @classmethod
    def _content(cls, content, info: ValidationInfo):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("required (only an assistant turn with tool_calls may leave it out)")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "messages: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # the arguments are held to `parameters` whichever it says


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: Function


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ApiError(400, "tools: two functions share a name", "tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ApiError(400, f"tool_choice: no tool named {choice.function.name!r} in tools", "tool_choice")
        if choice == "required" or isinstance(choice, NamedToolChoice):
            if not names:
                raise ApiError(400, "tool_choice: needs tools", "tool_choice")
            if self.response_format is not None and self.response_format.type != "text":
                raise ApiError(400, "response_format: not with a forced tool call", "response_format")


def completion_logprobs(tokens: list, decode, offset: int) -> dict:
    """The legacy completions shape: parallel lists of tokens, their logprobs, the top alternatives."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        piece = decode([t.id])
        out["tokens"].append(piece)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({decode([i]): lp for i, lp in t.top} if t.top is not None else None)
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def chat_logprobs(tokens: list, decode) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        piece = decode([token_id])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in (t.top or [])]} for t in tokens
        ]
    }


class TextsRequest(BaseModel):
    """/v1/embeddings (OpenAI's shape) and /v1/classify: one text or a list of them."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32, as OpenAI sends it

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty list")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input

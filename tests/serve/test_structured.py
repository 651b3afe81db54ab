"""Structured outputs and tool calls through the official openai client against `kiln serve` on the real
model (SmolLM2-135M-Instruct, kept quantized): json_schema replies that always validate, pydantic
`parse`, guided choice and regex, forced and automatic tool calls whole and streamed; the rest of the
request (n, seed, stop across chunks, chat logprobs, include_usage); and unknown fields refused."""

import json
import math
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from lmkiln.serve.app import create_app
from lmkiln.serve.tools import CallStream, parse_calls
from tests.serve.conftest import serving

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},  # bounded, so every sampled reply ends in its budget
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer"},
        "coastal": {"type": "boolean"},
    },
    "required": ["city", "country", "population", "coastal"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def client(smollm2_quantized):
    app = create_app(smollm2_quantized, device="cpu", name="smol", max_batch=16)
    with serving(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _ask(client, content: str, **kw):
    return client.chat.completions.create(model="smol", messages=[{"role": "user", "content": content}], **kw)


@pytest.mark.slow
def test_json_schema_replies_always_parse_and_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}

    def one(seed: int):
        return _ask(client, "Describe a city as JSON.", response_format=fmt, temperature=0.9, seed=seed, max_tokens=160)

    with ThreadPoolExecutor(16) as pool:  # continuous batching: each request its own constraint
        replies = list(pool.map(one, range(50)))
    for r in replies:
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), CITY)
    assert len({r.choices[0].message.content for r in replies}) > 10  # sampled, not one forced answer
    # same request and seed, same reply, streamed or whole (each alone: a batch around a request may round
    # its bf16 keys and values, and so a sampled token, differently)
    whole = one(3).choices[0].message.content
    streamed = _ask(client, "Describe a city as JSON.", response_format=fmt, temperature=0.9, seed=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole


def test_pydantic_parse_json_object_choice_and_regex(client):
    class City(BaseModel):
        city: str
        country: str

    parsed = client.beta.chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "Name a city in Italy."}],
        response_format=City,
        temperature=0,
        max_tokens=60,
    )
    assert isinstance(parsed.choices[0].message.parsed, City)
    obj = _ask(
        client, "Give a JSON object with a name and an age.", response_format={"type": "json_object"}, temperature=0
    )
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].message.content), dict)
    yes_no = _ask(client, "Is the sky blue?", extra_body={"guided_choice": ["yes", "no"]}, temperature=0)
    assert yes_no.choices[0].message.content in ("yes", "no")
    date = _ask(client, "When?", extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}, max_tokens=20)
    assert len(date.choices[0].message.content) == 10 and date.choices[0].message.content[4] == "-"


def test_forced_tool_calls_give_valid_arguments_whole_and_streamed(client):
    params = WEATHER["function"]["parameters"]
    for seed in range(4):
        r = _ask(
            client,
            "What is the weather in Paris?",
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0.8,
            seed=seed,
            max_tokens=80,
        )
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), params)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    chunks = list(_ask(client, "What time is it in Tokyo?", tools=[WEATHER, TIME], tool_choice="required", stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    (call,) = [t for d in deltas for t in d.tool_calls or []]
    assert call.index == 0 and call.function.name in ("get_weather", "get_time")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not d.content for d in deltas)  # the call's text is not content too


def test_auto_calls_a_tool_when_the_conversation_needs_one(client):
    """135M answers a lone question in text; shown one call and its result, it calls the tool again."""
    shown = json.dumps({"city": "Paris", "unit": "celsius"})
    convo = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": shown}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 18})},
        {"role": "assistant", "content": "It is 18 degrees Celsius in Paris."},
        {"role": "user", "content": "What is the weather in London?"},
    ]
    kw = dict(model="smol", messages=convo, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kw)
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "London"
    streamed = [
        t
        for c in client.chat.completions.create(**kw, stream=True)
        if c.choices
        for t in c.choices[0].delta.tool_calls or []
    ]
    assert [t.function.arguments for t in streamed] == [call.function.arguments]
    none = client.chat.completions.create(**{**kw, "tool_choice": "none"})
    assert none.choices[0].message.tool_calls is None


def test_n_seed_stop_logprobs_and_usage_on_the_real_model(client):
    a = _ask(client, "Tell me a story.", n=3, seed=7, temperature=1.0, max_tokens=12)
    b = _ask(client, "Tell me a story.", n=3, seed=7, temperature=1.0, max_tokens=12)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1
    whole = _ask(client, "Count from one to ten in words.", temperature=0, max_tokens=40)
    cut_at = whole.choices[0].message.content.split()[3]
    stopped = _ask(client, "Count from one to ten in words.", temperature=0, max_tokens=40, stop=[cut_at])
    streamed = _ask(
        client,
        "Count from one to ten in words.",
        temperature=0,
        max_tokens=40,
        stop=[cut_at],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stopped.choices[0].message.content and cut_at not in text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stopped.usage.completion_tokens
    lp = _ask(client, "Say hi.", temperature=0, max_tokens=5, logprobs=True, top_logprobs=3).choices[0].logprobs
    for entry in lp.content:
        # greedy: the top one (or one tied with it: the Q4_1 model gives exact ties, ordered either way)
        top = [t for t in entry.top_logprobs if t.logprob == entry.top_logprobs[0].logprob]
        assert len(entry.top_logprobs) == 3 and entry.token in [t.token for t in top]
        assert entry.logprob == top[0].logprob
        assert abs(sum(math.exp(t.logprob) for t in entry.top_logprobs)) <= 1 + 1e-4


@pytest.mark.parametrize(
    "field",
    [
        {"frequency_penalty": 0.5},
        {"presence_penalty": 1.0},
        {"logit_bias": {"42": 5}},
        {"functions": [{"name": "f"}]},
        {"audio": {"voice": "alloy"}},
        {"reasoning_effort": "high"},
    ],
    ids=lambda f: next(iter(f)),
)
def test_unsupported_fields_are_400_naming_them(client, field):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "hi", max_tokens=2, extra_body=field)
    assert err.value.body["param"] == next(iter(field)) and "not supported" in err.value.message


def test_bad_constraints_are_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "hi", extra_body={"guided_regex": "(unclosed"})
    assert err.value.body["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "hi", extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert "one constraint" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "hi", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
    }
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "hi", response_format=fmt)
    assert err.value.body["param"].startswith("response_format")
    _ask(client, "hi", max_tokens=2, frequency_penalty=0, presence_penalty=0, user="u-1")  # neutral values pass


def test_tool_calls_are_parsed_from_text_and_from_a_stream():
    text = (
        'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>broken</tool_call>'
    )
    content, calls = parse_calls(text)
    assert [c["function"]["name"] for c in calls] == ["f"] and json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    assert content == "Let me check.\n\n<tool_call>broken</tool_call>"
    stream, out, found = CallStream(), "", []
    for piece in ["Let me", " check.\n<tool", '_call>\n{"name": "f", ', '"arguments": {"x": 1}}\n</tool_', "call>\n"]:
        delta, calls = stream.feed(piece)
        out, found = out + delta, found + calls
    out += stream.flush()
    assert out == "Let me check." and [c["function"]["name"] for c in found] == ["f"]

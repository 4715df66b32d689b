"""A tool-call round trip on Qwen2.5-Coder-1.5B-Instruct behind the real server, driven by `openai`: with
tool_choice "auto" the model decides to call the tool in its own syntax (Qwen's <tool_call> tags, rendered by its
chat template, or in a bare JSON object, which this small model prefers), the server parses it into OpenAI's
tool_calls (streamed as deltas too), and after the tool's result the model answers in text that uses it."""

import json

import openai
import pytest
from server_harness import running_server

from leanlm import LLM
from leanlm.config import EngineConfig, parse_size
from leanlm.formats.assets import fetch_known_model
from leanlm.server.app import build_app
from leanlm.server.serving import ServerSettings

pytestmark = pytest.mark.slow

MODEL = "qwen"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def client():
    llm = LLM(
        fetch_known_model("qwen2.5-coder-1.5b", quiet=True),
        engine_config=EngineConfig(max_num_seqs=2, kv_cache_memory=parse_size("256MiB")),
    )
    with running_server(build_app(llm, ServerSettings(model_name=MODEL, max_tokens_limit=128))) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


def test_the_model_calls_the_tool_and_answers_from_its_result(client):
    first = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=64, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    streamed = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER_TOOL], max_tokens=64, temperature=0, stream=True
    )
    deltas = [d for chunk in streamed for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices]
    assert [d.function.name for d in deltas if d.function.name] == ["get_weather"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}

    result = {"city": "Paris", "temperature_c": 17, "conditions": "light rain"}
    messages = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    # tool_choice "none": answer now (left to itself, this small model calls the tool again)
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=64, temperature=0
    )
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason == "stop"
    assert "17" in answer.message.content and "rain" in answer.message.content.lower(), answer.message.content

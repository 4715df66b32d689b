"""Structured output and tool calling end to end: the default model behind the real server, driven by `openai`.

Every json_schema answer must validate with pydantic (streamed or not), regex and grammar answers must match,
tool calls must parse into OpenAI's tool_calls with arguments that match the tool's schema, and a bad schema or
grammar is a 400 that names the field.
"""

import json
import re
import threading
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field
from server_harness import running_server

from leanlm import LLM
from leanlm.config import EngineConfig, parse_size
from leanlm.server.app import build_app
from leanlm.server.serving import ServerSettings

pytestmark = pytest.mark.slow

KEY = "e2e-key"
MODEL = "smol"


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)


class Weather(BaseModel):
    city: str = Field(max_length=40)
    temperature_c: float
    conditions: Literal["sunny", "cloudy", "rain", "snow"]


class Item(BaseModel):
    name: str = Field(max_length=30)
    count: int


class Inventory(BaseModel):
    owner: str = Field(max_length=30)
    items: list[Item] = Field(min_length=1, max_length=3)


SCHEMAS = [Person, Weather, Inventory]
PROMPTS = ["Describe it as JSON.", "Make up an example and answer in JSON only."]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(default_gguf_path):
    config = EngineConfig(max_num_seqs=16, kv_cache_memory=parse_size("256MiB"))
    llm = LLM(default_gguf_path, engine_config=config)
    settings = ServerSettings(model_name=MODEL, api_key=KEY, max_tokens_limit=512)
    with running_server(build_app(llm, settings)) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def schema_format(model: type[BaseModel]) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": model.model_json_schema(), "strict": True},
    }


def ask(client, model: type[BaseModel], prompt: str, stream: bool, temperature: float) -> str:
    messages = [{"role": "user", "content": f"{model.__name__}: {prompt}"}]
    common = {"model": MODEL, "messages": messages, "max_tokens": 300, "temperature": temperature, "seed": 1}
    if not stream:
        answer = client.chat.completions.create(**common, response_format=schema_format(model))
        assert answer.choices[0].finish_reason == "stop"
        return answer.choices[0].message.content
    chunks = list(client.chat.completions.create(**common, response_format=schema_format(model), stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    return "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_answers_always_validate(client, stream):
    results, errors = {}, []

    def run(model, prompt, temperature):
        try:
            results[(model.__name__, prompt, temperature)] = (model, ask(client, model, prompt, stream, temperature))
        except Exception as exc:  # noqa: BLE001 (reported below, with the case)
            errors.append((model.__name__, prompt, exc))

    cases = [(m, p, t) for m in SCHEMAS for p in PROMPTS for t in (0.0, 0.9)]
    threads = [threading.Thread(target=run, args=case) for case in cases]  # one batch: constrained rows together
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == len(cases)
    for model, text in results.values():
        model.model_validate_json(text)  # raises if it does not match


def test_json_object_is_a_json_object(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "List two fruits."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_regex_and_grammar_completions_match(client):
    pattern = r"\d{3}-\d{4}"
    answer = client.completions.create(
        model=MODEL, prompt="Call me at", max_tokens=20, temperature=0.7, seed=2, extra_body={"guided_regex": pattern}
    )
    assert re.fullmatch(pattern, answer.choices[0].text), answer.choices[0].text
    grammar = 'start: "yes" | "no" | "maybe"'
    answer = client.completions.create(
        model=MODEL, prompt="Is the sky blue?", max_tokens=5, temperature=0, extra_body={"guided_grammar": grammar}
    )
    assert answer.choices[0].text in {"yes", "no", "maybe"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "spaceship"}}}},
            "response_format.json_schema.schema",
        ),
        ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": "start: undefined_rule"}}, "guided_grammar"),
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "response_format"),
    ],
)
def test_bad_schemas_and_grammars_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], **extra)
    assert bad.value.body["param"] == param, bad.value.body


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=60, temperature=0
    )
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")


def test_named_tool_choice_streams_a_tool_call(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather in Oslo please"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=100,
            temperature=0,
            stream=True,
        )
    )
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert [call.function.name for call in calls] == ["get_weather"]
    assert set(json.loads(calls[0].function.arguments)) == {"city"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_tool_calls_in_parallel_all_parse(client):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Rome, Oslo and Lima?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=200,
        temperature=0,
    )
    calls = answer.choices[0].message.tool_calls
    assert 1 <= len(calls) <= 4 and answer.choices[0].finish_reason == "tool_calls"
    assert all(set(json.loads(call.function.arguments)) == {"city"} for call in calls)

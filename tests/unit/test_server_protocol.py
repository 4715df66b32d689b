"""Request validation (strict types, bounds, unsupported fields) and its OpenAI-style errors; metrics text."""

import pytest
from pydantic import ValidationError

from leanlm.server.errors import from_validation_error, param_name
from leanlm.server.metrics import Histogram, ServerMetrics
from leanlm.server.protocol import ChatCompletionRequest, CompletionRequest, ModelList
from leanlm.server.tools import conversation

CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def error_of(model, data) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return from_validation_error(info.value).body()["error"]


def completion(**fields):
    return {"model": "m", "prompt": "hi", **fields}


def chat(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_valid_requests_keep_their_values():
    request = CompletionRequest.model_validate(completion(max_tokens=5, temperature=0, stop="\n", n=2, seed=3))
    assert (request.max_tokens, request.temperature, request.stop, request.n, request.seed) == (5, 0.0, ["\n"], 2, 3)
    assert CompletionRequest.model_validate(completion(prompt=[1, 2, 3])).prompt == [1, 2, 3]
    assert CompletionRequest.model_validate(completion(prompt=["a", "b"])).prompt == ["a", "b"]
    assert CompletionRequest.model_validate(completion(prompt=[[1], [2, 3]])).prompt == [[1], [2, 3]]
    parts = chat(
        messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    messages, tools = conversation(ChatCompletionRequest.model_validate(parts), template_renders_tools=False)
    assert (messages, tools) == ([{"role": "system", "content": "ab"}], None)
    assert ChatCompletionRequest.model_validate(chat(max_completion_tokens=7)).token_limit == 7


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"temperature": "1"}, "temperature", "valid number"),
        ({"max_tokens": True}, "max_tokens", "valid integer"),
        ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"max_tokens": 0}, "echo", "max_tokens 0 needs echo: true"),
        ({"max_tokens": 2.5}, "max_tokens", "valid integer"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"n": 100}, "n", "less than or equal to 16"),
        ({"stop": ["a", ""]}, "stop", "non-empty"),
        ({"stop": ["a"] * 5}, "stop", "up to 4"),
        ({"prompt": []}, "prompt", "prompt must be"),
        ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
        ({"prompt": "\ud800"}, "prompt", "unpaired surrogate"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias", "not supported"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"best_of": 3}, "best_of", "not supported"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"repetition_penalty": 5e-324}, "repetition_penalty", "greater than or equal to 0.01"),  # schemathesis
    ],
)
def test_bad_completion_fields_are_named(fields, param, words):
    error = error_of(CompletionRequest, completion(**fields))
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_unknown_and_missing_fields():
    unknown = error_of(CompletionRequest, completion(max_token=5))
    assert (unknown["param"], unknown["code"]) == ("max_token", "unknown_parameter")
    missing = error_of(CompletionRequest, {"prompt": "x"})
    assert (missing["param"], missing["code"]) == ("model", "missing_required_parameter")


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "text only"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "text only"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ({"max_tokens": 2, "max_completion_tokens": 3}, "max_completion_tokens", "not both"),
        ({"tools": [{"type": "function"}]}, "tools[0].function", "Missing"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "pattern"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
            "not among the tools",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "'json_schema'"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            "Missing",
        ),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content", "Missing content"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls", "assistant"),
    ],
)
def test_bad_chat_fields_are_named(fields, param, words):
    error = error_of(ChatCompletionRequest, chat(**fields))
    assert error["param"] == param and words in error["message"]


def test_param_names_follow_openai_style():
    assert param_name(("messages", 0, "content")) == "messages[0].content"
    assert param_name(()) is None


def test_histogram_text_is_cumulative_with_inf_bucket():
    histogram = Histogram(buckets=(0.1, 1.0))
    for value in (0.05, 0.5, 0.7, 3.0):
        histogram.observe(value)
    assert histogram.lines("x") == [
        'x_bucket{le="0.1"} 1',
        'x_bucket{le="1.0"} 3',
        'x_bucket{le="+Inf"} 4',
        "x_sum 4.25",
        "x_count 4",
    ]


def test_metrics_render_every_family_once():
    metrics = ServerMetrics()
    metrics.observe_first_token(0.2)
    metrics.observe_tokens(0.1, 2)
    metrics.observe_finished("stop", 1.0)
    text = metrics.render(None, in_flight=3)
    assert "leanlm_requests_in_flight 3" in text
    assert 'leanlm_inter_token_latency_seconds_bucket{le="0.06"} 2' in text
    assert 'leanlm_requests_finished_total{reason="stop"} 1' in text
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))


def test_model_list_shape():
    assert ModelList(data=[]).model_dump() == {"object": "list", "data": []}

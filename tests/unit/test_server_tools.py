"""Tool calling without a model: rendering the history for templates with and without tool support, parsing
Hermes-style calls, and the grammar that forces a call."""

import json

import pytest

from leanlm.sampling.grammar import compile_grammar
from leanlm.server.protocol import ChatCompletionRequest
from leanlm.server.tools import call_grammar, conversation, parse_tool_calls

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, "tools": [TOOL], **fields})


def test_history_for_a_template_without_tool_support_is_written_in_hermes_syntax():
    messages, tools = conversation(request(), template_renders_tools=False)
    assert tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(TOOL["function"]["parameters"]) in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": "<tool_response>\n21 C\n</tool_response>"}


def test_history_for_a_template_with_tool_support_is_passed_as_transformers_does():
    messages, tools = conversation(request(), template_renders_tools=True)
    assert tools == [TOOL]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert messages[3] == {"role": "tool", "content": "21 C", "tool_call_id": "c1"}


def test_tool_choice_none_hides_the_tools():
    messages, tools = conversation(request(tool_choice="none"), template_renders_tools=False)
    assert tools is None and "# Tools" not in messages[0]["content"]


def test_parse_tool_calls():
    text = 'Let me check.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>{"name": "g"'
    content, calls = parse_tool_calls(text)
    assert content == 'Let me check.\n<tool_call>{"name": "g"'  # the unfinished call stays text
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("f", {"a": 1})]
    assert len({c.id for c in calls}) == 1 and calls[0].id.startswith("call_")
    assert parse_tool_calls("plain answer") == ("plain answer", [])


@pytest.mark.parametrize(
    "text",
    [
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',  # Qwen2.5-Coder-1.5B's answer
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    ],
)
def test_an_answer_that_is_only_a_call_to_an_offered_tool_is_a_call(text):
    content, calls = parse_tool_calls(text, {"get_weather"})
    assert content is None and [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parse_tool_calls(text) == (text, [])  # no tools offered: it is text
    assert parse_tool_calls(text, {"other"}) == (text, [])  # a tool that was not offered: text


def test_json_beside_prose_or_without_arguments_stays_text():
    for text in [
        'Here: {"name": "get_weather", "arguments": {"city": "Paris"}}',
        '{"name": "get_weather", "city": "Paris"}',
        '{"name": "get_weather", "arguments": {"city": "Paris"}} and more',
    ]:
        assert parse_tool_calls(text, {"get_weather"}) == (text, [])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_call_grammar_compiles(choice):
    body = request(tool_choice=choice)
    grammar = call_grammar(body.tools, body.tool_choice, body.parallel_tool_calls)
    assert compile_grammar(grammar=grammar)
    assert '"const": "get_weather"' in grammar

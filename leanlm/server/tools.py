"""Tool calling in OpenAI's format over the Hermes-style syntax that SmolLM2, Qwen2.5 and many others use:
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

A template that renders `tools` itself (Qwen2.5) gets them and the history's calls and results as transformers
passes them; for one that does not (SmolLM2), the tools are described in the system message and calls and results
are written into the text in the same syntax. With tool_choice "required" or a named function, the output is
constrained (a Lark grammar around the arguments' JSON schema), so the call always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from typing import Any

from leanlm.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool, ToolCall, ToolCallFunction

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 4  # calls one constrained answer may hold (a small model may otherwise repeat calls forever)
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
_BARE = re.compile(r"(?:```(?:json)?\s*)?([\[{].*[\]}])(?:\s*```)?", re.DOTALL)  # a JSON answer, maybe fenced


def conversation(body: ChatCompletionRequest, template_renders_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the chat template."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []] if body.tools_active else None
    messages = [_message(m, template_renders_tools) for m in body.messages]
    if tools and not template_renders_tools:
        prompt = _tools_prompt(tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
        tools = None
    return messages, tools


def _message(message: ChatMessage, template_renders_tools: bool) -> dict[str, Any]:
    # Chat templates know system/user/assistant; OpenAI's newer "developer" role plays the system part.
    role = "system" if message.role == "developer" else message.role
    text = message.text()
    calls = message.tool_calls or []
    if template_renders_tools:
        result: dict[str, Any] = {"role": role, "content": text}
        if calls:
            result["tool_calls"] = [
                {"type": "function", "id": c.id, "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in calls
            ]
        if message.tool_call_id is not None:
            result["tool_call_id"] = message.tool_call_id
        return result
    if calls:  # written as the model would have written them
        written = [f"{OPEN}\n{json.dumps({'name': c.function.name, 'arguments': _args(c)})}\n{CLOSE}" for c in calls]
        text = "\n".join(([text] if text else []) + written)
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    return {"role": role, "content": text}


def _args(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


def _tools_prompt(tools: list[dict]) -> str:
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        f"{CLOSE}"
    )


def call_grammar(tools: list[Tool], choice: str | NamedToolChoice, parallel: bool) -> str:
    """A Lark grammar (llguidance's, with %json) for output that is one call, or several when parallel, of the
    named tool or any tool, whose arguments match the tool's parameters schema."""
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    repeat = (
        f' ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel and not isinstance(choice, NamedToolChoice) else ""
    )
    return f'start: call{repeat}\ncall: "{OPEN}\\n" args "\\n{CLOSE}"\nargs: %json {json.dumps(schema)}\n'


def parse_tool_calls(text: str, tool_names: Collection[str] = ()) -> tuple[str | None, list[ToolCall]]:
    """(the text outside the calls or None, the calls) from a model's output; a call that does not parse as
    {"name": ..., "arguments": {...}} stays in the text. Without <tool_call> tags, an answer that is nothing but
    such an object (or a list of them), bare or in a ``` fence, naming one of `tool_names`, is a call too: small
    models (Qwen2.5-Coder-1.5B) often answer a tool prompt that way."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    position = 0
    for match in _CALL.finditer(text):
        call = _call(match.group(1))
        if call is None:
            continue
        kept.append(text[position : match.start()])
        position = match.end()
        calls.append(call)
    kept.append(text[position:])
    content = "".join(kept).strip()
    if not calls and tool_names and (bare := _bare_calls(text, tool_names)):
        return None, bare
    return (content or None), calls


def _call(text: str | dict) -> ToolCall | None:
    try:
        data = json.loads(text) if isinstance(text, str) else text
        name, arguments = data["name"], data.get("arguments", data.get("parameters", {}))
        if not isinstance(name, str):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    encoded = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=ToolCallFunction(name=name, arguments=encoded))


def _bare_calls(text: str, tool_names: Collection[str]) -> list[ToolCall]:
    match = _BARE.fullmatch(text.strip())
    try:
        data = json.loads(match.group(1)) if match else None
    except json.JSONDecodeError:
        return []
    items = data if isinstance(data, list) else [data]
    calls = [_call(item) for item in items if isinstance(item, dict) and isinstance(item.get("arguments"), dict)]
    if not calls or None in calls or len(calls) != len(items):
        return []
    return calls if all(call.function.name in tool_names for call in calls) else []

"""Request and response bodies of the OpenAI API subset leanlm serves, validated strictly.

Strict types (no "5" for 5, no true for 1), no NaN/infinity, and unknown fields are rejected as OpenAI does,
so a typo such as `max_token` is an error rather than a silently ignored setting. Fields OpenAI defines but
leanlm does not implement are accepted only at their neutral value, with an error that names them otherwise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_N = 16  # choices per request
MAX_PROMPTS = 16  # prompts per /v1/completions request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token
MAX_SEED = 2**63 - 1 - MAX_N  # seed + choice index must stay a valid 64-bit seed
MAX_GRAMMAR_CHARS = 100_000  # regex and grammar texts
MAX_TOOLS = 128

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _no_surrogates(text: str) -> str:
    # JSON escapes such as "\ud800" decode to lone surrogates, which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text must be valid Unicode; it has an unpaired surrogate at character {exc.start}") from None
    return text


Text = Annotated[str, AfterValidator(_no_surrogates)]


def _prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    def is_ids(item: Any) -> bool:
        return isinstance(item, list) and bool(item) and all(type(t) is int for t in item)

    if isinstance(value, str):
        return _no_surrogates(value)
    if is_ids(value):
        return value
    if isinstance(value, list) and value and len(value) <= MAX_PROMPTS:
        if all(isinstance(p, str) for p in value):
            return [_no_surrogates(p) for p in value]
        if all(is_ids(p) for p in value):
            return value
    raise ValueError(
        f"prompt must be a string, a list of up to {MAX_PROMPTS} strings, a non-empty list of token ids, "
        "or a list of such lists"
    )


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of up to {MAX_STOP} non-empty strings")
    return [_no_surrogates(s) for s in stops]


def _content(value: Any) -> str | list[TextPart]:
    if isinstance(value, str):
        return _no_surrogates(value)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return [TextPart.model_validate(p) for p in value]
    raise ValueError("content must be a string or a list of {'type': 'text', 'text': ...} parts (text only)")


def _content_or_none(value: Any) -> str | list[TextPart] | None:
    return None if value is None else _content(value)


def _neutral(value: Any, info: ValidationInfo) -> Any:
    """Accept an OpenAI field leanlm does not implement only at its neutral value (0, empty, false)."""
    if value in (None, 0, {}, [], False, "", "none", {"type": "text"}):
        return value
    hint = " (repetition_penalty is the supported alternative)" if info.field_name.endswith("_penalty") else ""
    raise ValueError(f"{info.field_name} is not supported by leanlm; leave it out{hint}")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields that completions and chat completions share."""

    model_config = STRICT

    model: str
    max_tokens: int | None = Field(None, ge=1)  # the upper bound is the server's --max-tokens-limit
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[Any, PlainValidator(_stop)] = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # leanlm (and vLLM) extensions
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100)  # beyond, logits overflow to inf
    ignore_eos: bool = False
    # structured output (vLLM's names): the output matches a JSON schema, a regular expression or a Lark grammar
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    guided_grammar: Text | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)

    _unsupported = field_validator("presence_penalty", "frequency_penalty", "logit_bias")(_neutral)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Annotated[Any, PlainValidator(_prompt)]
    # 0 only with echo: the answer is the prompt with its log-probabilities (scoring, as vLLM and OpenAI's old API)
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # the answer starts with the prompt; with logprobs, the prompt tokens' log-probabilities too
    echo: bool = Field(False, validate_default=True)
    best_of: int | None = None
    suffix: str | None = None

    _unsupported_completion = field_validator("suffix")(_neutral)

    @field_validator("echo")
    @classmethod
    def _zero_tokens_need_echo(cls, value: bool, info: ValidationInfo) -> bool:
        if info.data.get("max_tokens") == 0 and not value:
            raise ValueError("max_tokens 0 needs echo: true (the answer is only the prompt, with its logprobs)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported by leanlm; leave it out")
        return value


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(**STRICT, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _schema_for_its_type(cls, value: JsonSchemaFormat | None, info: ValidationInfo) -> JsonSchemaFormat | None:
        if value is not None and info.data.get("type") != "json_schema":
            raise ValueError("json_schema goes with type 'json_schema' only")
        return value

    @model_validator(mode="after")
    def _json_schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema: {'name': ..., 'schema': {...}}")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must match; None for plain text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            schema = self.json_schema.json_schema or {}
            return _closed_objects(schema) if self.json_schema.strict else schema
        return None


def _closed_objects(schema: Any) -> Any:
    """OpenAI's strict mode: objects have no properties beyond those listed (additionalProperties: false unless
    the schema says otherwise). A copy; the request's depth is bounded by the server's JSON depth limit."""
    if isinstance(schema, list):
        return [_closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed_objects(value) for key, value in schema.items()}
    if (closed.get("type") == "object" or "properties" in closed) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(BaseModel):
    model_config = STRICT
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers
    content: Annotated[Any, PlainValidator(_content_or_none)] = Field(None, validate_default=True)  # after role

    @field_validator("tool_calls")
    @classmethod
    def _calls_by_the_assistant(cls, value: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return value

    @field_validator("content")
    @classmethod
    def _content_unless_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("Missing content (only an assistant message with tool_calls may leave it out)")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, value, info: ValidationInfo):
        if value not in (None, "none") and not info.data.get("tools"):
            raise ValueError("tool_choice needs tools")
        if isinstance(value, NamedToolChoice):
            names = [tool.function.name for tool in info.data.get("tools") or []]
            if value.function.name not in names:
                raise ValueError(f"tool_choice names '{value.function.name}', which is not among the tools {names}")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_token_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("max_tokens") is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tools_active(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


# ---- responses ------------------------------------------------------------------------------------------------


class CompletionTokensDetails(BaseModel):
    # OpenAI's names (Predicted Outputs); here: speculative tokens the model accepted or rejected
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None  # with --speculative


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    # with echo, the prompt's first token has no log-probability (nothing comes before it): null, as OpenAI
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_calls(self, handler):
        data = handler(self)
        if not data.get("tool_calls"):
            data.pop("tool_calls", None)
        return data


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "leanlm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- tokenizer endpoints (vLLM's /tokenize, /detokenize and /tokenizer_info; lm-evaluation-harness uses them) ----


class TokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    prompt: Text | None = Field(None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # prompt: the tokenizer's own BOS/EOS; messages: the chat template's
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str = "leanlm"
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int

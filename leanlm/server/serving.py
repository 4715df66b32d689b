"""OpenAI requests -> engine requests -> OpenAI responses (whole or streamed), for completions and chat."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from leanlm.errors import InvalidRequestError, PromptTooLongError
from leanlm.sampling.grammar import compile_grammar
from leanlm.sampling_params import SamplingParams
from leanlm.server import sse
from leanlm.server.async_engine import AsyncEngine, Submission
from leanlm.server.errors import APIError, BadRequest, NotFound
from leanlm.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionTokensDetails,
    DetokenizeRequest,
    DetokenizeResponse,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from leanlm.server.tools import call_grammar, conversation, parse_tool_calls

CLIENT_CLOSED = 499  # nginx's status for "the client went away"; nobody reads it


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    max_tokens_limit: int = 4096
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    shutdown_grace_s: float = 10.0
    completion_default_max_tokens: int = 16  # as OpenAI; chat defaults to the limit
    bind_host: str = "127.0.0.1"  # the address the server listens on; a Host header may name it
    allowed_hosts: tuple[str, ...] = ()  # more Host names to answer ("*": any); checked without an API key
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS ("*": any); none by default
    special_tokens_in_content: bool = False  # trusted clients only: control tokens typed in messages stay control

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")


@dataclass
class _Job:
    prompts: list[list[int]]  # one per choice (choice index = prompt index * n + j)
    params: list[SamplingParams]
    texts: list[str | None]
    distinct_prompt_tokens: int


class OpenAIServing:
    def __init__(self, llm, engine: AsyncEngine, settings: ServerSettings):
        self.llm = llm
        self.engine = engine
        self.settings = settings
        self.context_length = llm.config.context_length

    # ---- entry points -------------------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompts = _completion_prompts(body.prompt)
        ids = [self._encode(p, "prompt") for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        constraint = _constraint(body)
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):  # scores the prompt tokens too
            constraint = {**constraint, "prompt_logprobs": body.logprobs or 0}
        job = self._job(
            ids, texts, body, body.max_tokens, self.settings.completion_default_max_tokens, body.logprobs, constraint
        )
        submission = await self._submit(job, "prompt")
        reply = _Reply("cmpl", self.settings.model_name, self._token_text, body.logprobs is not None)
        reply.echo = self._prompt_text if body.echo else None
        if body.stream:
            return sse.EventStreamResponse(self._stream(submission, reply, reply.completion_chunk, body, job))
        outputs = await _unless_disconnected(request, _collect(submission))
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(reply.completion(outputs, _usage(job, outputs)).model_dump(mode="json"))

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        tokenizer = self.llm.tokenizer
        renders_tools = "tools" in (getattr(tokenizer, "chat_template", None) or "")
        messages, tools = conversation(body, renders_tools)
        try:
            ids = tokenizer.encode_chat(
                messages, tools=tools, special_tokens_in_content=self.settings.special_tokens_in_content
            )
        except InvalidRequestError as exc:
            raise BadRequest(str(exc), "messages") from None
        self._check_length(ids, "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = self._job([ids], [None], body, body.token_limit, self.settings.max_tokens_limit, top, _constraint(body))
        submission = await self._submit(job, "messages")
        tool_names = frozenset(tool.function.name for tool in body.tools or []) if body.tools_active else frozenset()
        reply = _Reply("chatcmpl", self.settings.model_name, self._token_text, body.logprobs, tool_names)
        if body.stream:
            return sse.EventStreamResponse(self._stream(submission, reply, reply.chat_chunk, body, job))
        outputs = await _unless_disconnected(request, _collect(submission))
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(reply.chat(outputs, _usage(job, outputs)).model_dump(mode="json"))

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise NotFound(
                f"The model {_short(name)} does not exist on this server, which serves '{self.settings.model_name}' "
                "(GET /v1/models lists it).",
                "model",
                "model_not_found",
            )

    # ---- requests -----------------------------------------------------------------------------------------------

    async def _submit(self, job: _Job, param: str) -> Submission:
        try:
            return await self.engine.submit(job.prompts, job.params, job.texts)
        except PromptTooLongError as exc:  # e.g. longer than the KV cache, which only the engine knows
            raise BadRequest(str(exc), param, "context_length_exceeded") from None
        except InvalidRequestError as exc:
            raise BadRequest(str(exc), param) from None

    def _encode(self, prompt: str | list[int], param: str) -> list[int]:
        try:
            ids = self.llm.encode(prompt)
        except InvalidRequestError as exc:
            raise BadRequest(str(exc), param) from None
        self._check_length(ids, param)
        return ids

    def _check_length(self, ids: list[int], param: str) -> None:
        if not ids:
            raise BadRequest(f"The {param} is empty. Send at least one token of text.", param)
        if len(ids) >= self.context_length:
            raise BadRequest(
                f"The {param} has {len(ids)} tokens but the model's context window is {self.context_length}, "
                "which must also hold at least one generated token. Shorten it.",
                param,
                "context_length_exceeded",
            )

    def _job(
        self,
        prompt_ids: list[list[int]],
        texts: list[str | None],
        body: SamplingFields,
        max_tokens: int | None,
        default_max_tokens: int,
        logprobs: int | None,
        constraint: dict[str, str],
    ) -> _Job:
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise BadRequest(
                f"{param} is {max_tokens} but this server allows at most {limit} (its --max-tokens-limit).", param
            )
        if len(prompt_ids) * body.n > self.engine.max_in_flight:
            raise BadRequest(
                f"{len(prompt_ids)} prompt(s) x n={body.n} choices exceed what this server holds at once "
                f"({self.engine.max_in_flight}). Lower n or send fewer prompts per request.",
                "n",
            )
        job = _Job([], [], [], sum(len(ids) for ids in prompt_ids))
        for ids, text in zip(prompt_ids, texts, strict=True):
            room = self.context_length - len(ids)  # the context window caps generation
            for choice in range(body.n):
                job.prompts.append(ids)
                job.texts.append(text)
                limit = min(default_max_tokens if max_tokens is None else max_tokens, room)
                job.params.append(self._params(body, limit, choice, logprobs, constraint))
        return job

    @staticmethod
    def _params(
        body: SamplingFields, max_tokens: int, choice: int, logprobs: int | None, constraint: dict[str, str]
    ) -> SamplingParams:
        extra = dict(constraint) if logprobs is None else {"logprobs": logprobs, **constraint}
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                min_p=body.min_p,
                repetition_penalty=body.repetition_penalty,
                seed=None if body.seed is None else body.seed + choice,  # n choices must differ
                stop=tuple(body.stop or ()),
                ignore_eos=body.ignore_eos,
                **extra,
            )
        except (InvalidRequestError, TypeError) as exc:
            raise BadRequest(str(exc)) from None

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one serving object per server; the vocabulary bounds it)
    def _token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)

    def _prompt_text(self, output) -> str:
        """The prompt as echoed: the client's text, or its token ids decoded."""
        if output.prompt is not None:
            return output.prompt
        return self.llm.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)

    # ---- tokenizer endpoints ------------------------------------------------------------------------------------

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        if body.model is not None:
            self.check_model(body.model)
        tokenizer = self.llm.tokenizer
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            chat = ChatCompletionRequest(model=self.settings.model_name, messages=body.messages)
            messages, _ = conversation(chat, "tools" in (getattr(tokenizer, "chat_template", None) or ""))
            try:
                ids = tokenizer.encode_chat(
                    messages,
                    add_generation_prompt=body.add_generation_prompt,
                    special_tokens_in_content=self.settings.special_tokens_in_content,
                )
            except InvalidRequestError as exc:
                raise BadRequest(str(exc), "messages") from None
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.context_length)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            self.check_model(body.model)
        vocab = self.llm.config.vocab_size
        if (bad := next((t for t in body.tokens if t >= vocab), None)) is not None:
            raise BadRequest(f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", "tokens")
        return DetokenizeResponse(prompt=self.llm.tokenizer.decode(body.tokens, skip_special_tokens=False))

    def tokenizer_info(self) -> TokenizerInfo:
        tokenizer = self.llm.tokenizer
        special = tokenizer.special_tokens
        return TokenizerInfo(
            bos_token=special.get("bos_token"),
            eos_token=special.get("eos_token"),
            pad_token=special.get("pad_token"),
            chat_template=getattr(tokenizer, "chat_template", None),
            model_max_length=self.context_length,
        )

    # ---- streaming ----------------------------------------------------------------------------------------------

    async def _stream(
        self, submission: Submission, reply: _Reply, chunk, body: SamplingFields, job: _Job
    ) -> AsyncIterator[bytes]:
        finals: dict[int, object] = {}
        try:
            started: set[int] = set()
            async for index, output in submission.outputs():
                first = index not in started
                started.add(index)
                payload = chunk(index, output, first)
                if payload is not None:
                    yield sse.event(payload)
                if output.finish_reason is not None:
                    finals[index] = output
            if body.include_usage:
                yield sse.event(reply.usage_chunk(_usage(job, list(finals.values()))))
            yield sse.DONE
        except APIError as exc:  # stopped by the server (shutdown, engine error): tell the client in-band
            yield sse.event(exc.body())
        finally:
            submission.close()  # aborts the engine requests of a client that went away


class _Reply:
    """Builds the response objects of one request."""

    def __init__(self, prefix: str, model: str, token_text, logprobs: bool, tools: frozenset[str] = frozenset()):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.token_text = token_text
        self.logprobs = logprobs
        self.tools = tools  # the offered tools' names: parse calls out of the text, streamed at the end of each choice
        self.echo = None  # completions with echo: output -> the prompt's text, put before the completion

    # completions

    def _completion_logprobs(self, entries: list, offset: int) -> CompletionLogprobs:
        """entries: TokenLogprobs, or (an echoed prompt's first token) a token id with no log-probability."""
        result = CompletionLogprobs()
        for entry in entries:
            scored = not isinstance(entry, int)
            token = self.token_text(entry.token_id if scored else entry)
            result.tokens.append(token)
            result.token_logprobs.append(_finite(entry.logprob) if scored else None)
            top = {self.token_text(t): _finite(lp) for t, lp in entry.top.items()} if scored else None
            result.top_logprobs.append(top)
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _echoed(self, output) -> tuple[str, list]:
        """With echo: the prompt's text and its logprob entries (with logprobs), put before the completion."""
        if self.echo is None:
            return "", []
        scores = output.prompt_logprobs or []
        entries = [output.prompt_token_ids[0], *scores[1:]] if self.logprobs and scores else []
        return self.echo(output), entries

    def completion(self, outputs: list, usage: Usage) -> CompletionResponse:
        choices = []
        for index, out in enumerate(outputs):
            prompt, prompt_entries = self._echoed(out)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=prompt + out.text,
                    logprobs=self._completion_logprobs(prompt_entries + (out.logprobs or []), 0)
                    if self.logprobs
                    else None,
                    finish_reason=out.finish_reason,
                )
            )
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def completion_chunk(self, index: int, output, first: bool) -> CompletionResponse | None:
        entries = (output.new_logprobs or []) if self.logprobs else []
        prompt, prompt_entries = self._echoed(output) if first else ("", [])
        if not prompt and not output.new_text and not entries and output.finish_reason is None:
            return None  # text held back (a possible stop string, an incomplete character)
        echoed = len(self.echo(output)) if self.echo is not None else 0  # every chunk's offsets count the prompt
        offset = echoed - len(prompt) + len(output.text) - len(output.new_text)
        choice = CompletionChoice(
            index=index,
            text=prompt + output.new_text,
            logprobs=self._completion_logprobs(prompt_entries + entries, offset) if self.logprobs else None,
            finish_reason=output.finish_reason,
        )
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    # chat

    def _chat_logprobs(self, entries: list) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            token = self.token_text(token_id)
            return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(token.encode("utf-8")))

        content = []
        for entry in entries:
            sampled = top(entry.token_id, entry.logprob)
            alternatives = [top(t, lp) for t, lp in entry.top.items()]
            content.append(TokenLogprob(**sampled.model_dump(), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    def _message(self, output) -> tuple[AssistantMessage, str | None]:
        if not self.tools:
            return AssistantMessage(content=output.text), output.finish_reason
        content, calls = parse_tool_calls(output.text, self.tools)
        finish = "tool_calls" if calls and output.finish_reason == "stop" else output.finish_reason
        return AssistantMessage(content=content, tool_calls=calls or None), finish

    def chat(self, outputs: list, usage: Usage) -> ChatCompletionResponse:
        choices = []
        for index, out in enumerate(outputs):
            message, finish = self._message(out)
            logprobs = self._chat_logprobs(out.logprobs or []) if self.logprobs else None
            choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish))
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def chat_chunk(self, index: int, output, first: bool) -> ChatCompletionChunk | None:
        entries = (output.new_logprobs or []) if self.logprobs else []
        if self.tools:  # the text is held back until the choice ends, when it is known whether it holds calls
            return self._tool_chunk(index, output, first, entries)
        if not first and not output.new_text and not entries and output.finish_reason is None:
            return None
        delta = ChatDelta(role="assistant" if first else None, content=output.new_text)
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            logprobs=self._chat_logprobs(entries) if self.logprobs else None,
            finish_reason=output.finish_reason,
        )
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def _tool_chunk(self, index: int, output, first: bool, entries: list) -> ChatCompletionChunk | None:
        finish = None
        if output.finish_reason is None:
            if not first:
                return None
            delta = ChatDelta(role="assistant", content="")
        else:
            message, finish = self._message(output)
            calls = [
                ToolCallDelta(index=i, id=call.id, function=call.function)
                for i, call in enumerate(message.tool_calls or [])
            ]
            delta = ChatDelta(role="assistant" if first else None, content=message.content, tool_calls=calls or None)
        logprobs = self._chat_logprobs(entries) if self.logprobs else None
        choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: Usage):
        kind = ChatCompletionChunk if self.id.startswith("chatcmpl") else CompletionResponse
        return kind(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


# ---- helpers ----------------------------------------------------------------------------------------------------


def _finite(logprob: float) -> float:
    """JSON has no infinity or NaN: an impossible token gets OpenAI's -9999.0."""
    return logprob if math.isfinite(logprob) else -9999.0


def _short(text: str, limit: int = 100) -> str:
    """A client's string quoted in an error message, cut so that a huge one is not echoed back whole."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _constraint(body: SamplingFields) -> dict[str, str]:
    """The request's structured-output constraint as SamplingParams fields, checked (a 400 naming the field)."""
    given: dict[str, tuple[str, str]] = {}  # request field -> (SamplingParams field, value)
    if body.guided_json is not None:
        given["guided_json"] = ("json_schema", body.guided_json)
    if body.guided_regex is not None:
        given["guided_regex"] = ("regex", body.guided_regex)
    if body.guided_grammar is not None:
        given["guided_grammar"] = ("grammar", body.guided_grammar)
    if isinstance(body, ChatCompletionRequest):
        if body.response_format is not None and body.response_format.output_schema() is not None:
            field = "response_format.json_schema.schema" if body.response_format.json_schema else "response_format"
            given[field] = ("json_schema", body.response_format.output_schema())
        if body.tools_active and body.tool_choice not in (None, "auto"):
            grammar = call_grammar(body.tools, body.tool_choice, body.parallel_tool_calls)
            given["tools"] = ("grammar", grammar)
    if not given:
        return {}
    if len(given) > 1:
        raise BadRequest(f"Give one output constraint at most; got {', '.join(given)}.", list(given)[1])
    field, (kind, value) = next(iter(given.items()))
    if kind == "json_schema" and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"Invalid value for '{field}': not valid JSON ({exc.msg}).", field) from None
    try:
        compile_grammar(**{kind: value})
    except InvalidRequestError as exc:
        raise BadRequest(f"Invalid value for '{field}': {exc}", field, "invalid_grammar") from None
    return {kind: json.dumps(value) if kind == "json_schema" else value}


def _completion_prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


async def _collect(submission: Submission) -> list:
    finals: dict[int, object] = {}
    try:
        async for index, output in submission.outputs():
            if output.finish_reason is not None:
                finals[index] = output
    finally:
        submission.close()
    return [finals[i] for i in range(submission.count)]


def _usage(job: _Job, outputs: list) -> Usage:
    completion = sum(len(out.token_ids) for out in outputs)
    drafted = sum(getattr(out.metrics, "num_draft_tokens", 0) for out in outputs)
    accepted = sum(getattr(out.metrics, "num_accepted_tokens", 0) for out in outputs)
    details = CompletionTokensDetails(
        accepted_prediction_tokens=accepted, rejected_prediction_tokens=drafted - accepted
    )
    return Usage(
        prompt_tokens=job.distinct_prompt_tokens,
        completion_tokens=completion,
        total_tokens=job.distinct_prompt_tokens + completion,
        completion_tokens_details=details if drafted else None,
    )


async def _unless_disconnected(request: Request, work: Awaitable):
    """The result of `work`, or None once the client has disconnected: then `work` is cancelled (which aborts its
    engine requests) and awaited, so that its cleanup has run before the caller answers 499."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (watcher, task):
            if not pending.done():
                pending.cancel()
        # cancel() only asks: wait until both have really ended (a cancelled task has no result to read)
        await asyncio.wait({task, watcher})
    if task.cancelled():  # the client went away first
        return None
    return task.result()

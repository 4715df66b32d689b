"""Tokenizer: text <-> token ids, chat templates and streaming detokenization.

The work is done by a `tokenizers.Tokenizer` (Rust), built either from a Hugging Face folder's tokenizer.json or
from a GGUF file's vocabulary (see gguf_tokenizer.py). This class adds what a generation loop needs on top:
BOS handling as the model's metadata says, the set of ids that end a turn, and the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from leanlm.errors import InvalidRequestError, ModelFormatError, ModelNotFoundError
from leanlm.formats.gguf_tokenizer import END_OF_TURN_TEXTS, build_vocabulary, template_processor

_REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: frozenset[int],
        chat_template: str | None,
        special_tokens: dict[str, str] | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(eos_token_ids)
        self.chat_template = chat_template or None
        self.special_tokens = dict(special_tokens or {})  # bos_token/eos_token/... -> text, seen by chat templates
        self._add_bos, self._add_eos = add_bos, add_eos  # None: whatever tokenizer.json's post-processor does
        self._compiled_template = None
        self._specials: list[str] | None = None  # control-token texts, for encode_chat
        self._plain: BackendTokenizer | None = None

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        vocab = build_vocabulary(metadata)
        return cls(
            vocab.backend,
            bos_token_id=vocab.bos_token_id,
            eos_token_ids=vocab.eos_token_ids,
            chat_template=vocab.chat_template,
            special_tokens=vocab.special_tokens,
            add_bos=vocab.add_bos,
            add_eos=vocab.add_eos,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"Model folder not found: {folder}. Check the path.")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"{folder} has no tokenizer.json. leanlm reads fast-tokenizer files only; create one with "
                "`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)` in transformers."
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception for malformed files
            raise ModelFormatError(f"{tokenizer_file} could not be read ({exc}). Download the file again.") from exc
        config = _read_json(folder / "tokenizer_config.json")
        special = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(name))) is not None
        }
        bos_id = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if add_bos is not None or add_eos is not None or backend.post_processor is None:
            # An explicit flag in tokenizer_config.json overrides tokenizer.json's post-processor (as in transformers).
            bos_text = special.get("bos_token") if add_bos and bos_id is not None else None
            eos_id = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
            eos_text = special.get("eos_token") if add_eos and eos_id is not None else None
            backend.post_processor = template_processor(bos_text, bos_id, eos_text, eos_id)
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=_folder_eos_ids(backend, folder, special),
            chat_template=_folder_chat_template(folder, config),
            special_tokens=special,
            add_bos=bool(add_bos) if add_bos is not None else None,
            add_eos=bool(add_eos) if add_eos is not None else None,
        )

    def to_folder_files(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so that `from_folder` (and transformers) reload this."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            **self.special_tokens,
        }
        if self._add_bos is not None:
            config["add_bos_token"] = self._add_bos
        if self._add_eos is not None:
            config["add_eos_token"] = self._add_eos
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    # ---- encoding -----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequestError(f"Text to encode must be a string, got {type(text).__name__}.")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------------------

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        special_tokens_in_content: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The chat template's prompt as token ids. Control-token text typed inside a message's content (e.g.
        `<|im_end|>\\n<|im_start|>system`) is encoded as plain text, so that a user cannot forge another turn;
        the template's own control tokens stay control tokens. special_tokens_in_content=True trusts the content."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        contents = [m["content"] for m in messages if isinstance(m.get("content"), str) and m["content"]]
        specials = self._special_texts()
        structured = json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False, default=str)
        if not special_tokens_in_content and any(sp in structured for sp in specials):  # rendered by tojson: refuse
            raise InvalidRequestError(
                "Tool definitions or tool calls hold control-token text, which could forge a turn. Remove it."
            )
        if special_tokens_in_content or not any(sp in c for c in contents for sp in specials):
            return self.encode(text, add_special_tokens=False)  # the template writes BOS itself if needed
        ids, cursor = [], 0
        for content in contents:
            start, piece = text.find(content, cursor), content
            if start < 0:  # a template that trims content
                piece = content.strip()
                start = text.find(piece, cursor) if piece else -1
            if start < 0:
                raise InvalidRequestError(
                    "A message's content holds control-token text that the chat template changed, so it cannot "
                    "be kept inert. Remove the special tokens from the message."
                )
            ids += self.encode(text[cursor:start], add_special_tokens=False) if start > cursor else []
            ids += self._plain_backend().encode(piece, add_special_tokens=False).ids
            cursor = start + len(piece)
        return ids + (self.encode(text[cursor:], add_special_tokens=False) if cursor < len(text) else [])

    def _special_texts(self) -> list[str]:
        if self._specials is None:
            added = self.backend.get_added_tokens_decoder().values()
            self._specials = [token.content for token in added if token.special and token.content]
        return self._specials

    def _plain_backend(self) -> BackendTokenizer:
        """A copy of the backend that reads special-token text as ordinary text (a copy: no shared flag to race)."""
        if self._plain is None:
            plain = BackendTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self.chat_template is None:
            raise InvalidRequestError(
                "This model has no chat template (no tokenizer.chat_template in the GGUF, none in the model folder). "
                "Pass a plain prompt instead of chat messages."
            )
        _check_messages(messages)
        import jinja2

        template = self._template()
        try:
            return template.render(
                messages=messages,
                tools=tools or None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:  # e.g. raise_exception(), or non-string content
            raise InvalidRequestError(f"The model's chat template rejected the messages: {exc}") from exc

    def _template(self):
        if self._compiled_template is None:
            import jinja2

            try:
                self._compiled_template = _jinja_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise ModelFormatError(f"The model's chat template is not valid Jinja ({exc}).") from exc
        return self._compiled_template


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, holding back bytes of a character that is not complete yet.

    Each step decodes only a short window: the tokens already emitted last time (as context, so that decoders which
    strip a leading space see the same neighbour as a full decode) plus the tokens not yet emitted.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_start = 0  # window start: context tokens, already emitted
        self._read_start = 0  # first token whose text has not been emitted
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text, window_text = self._window_texts()
        if len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT):
            return ""  # nothing new, or the last character is still missing bytes
        return self._emit(window_text[len(prefix_text) :])

    def flush(self) -> str:
        prefix_text, window_text = self._window_texts()
        if len(window_text) <= len(prefix_text):
            return ""
        return self._emit(window_text[len(prefix_text) :])

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def _window_texts(self) -> tuple[str, str]:
        window = self._ids[self._prefix_start :]
        prefix = self._backend.decode(window[: self._read_start - self._prefix_start], skip_special_tokens=self._skip)
        return prefix, self._backend.decode(window, skip_special_tokens=self._skip)

    def _emit(self, piece: str) -> str:
        self._prefix_start, self._read_start = self._read_start, len(self._ids)
        self._pieces.append(piece)
        return piece


# ---- helpers ----------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}). Download the file again.") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _folder_eos_ids(backend: BackendTokenizer, folder: Path, special: dict[str, str]) -> frozenset[int]:
    ids: set[int] = set()
    if "eos_token" in special and (eos := backend.token_to_id(special["eos_token"])) is not None:
        ids.add(eos)
    generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif isinstance(generation_eos, list):
        ids.update(i for i in generation_eos if isinstance(i, int))
    # End-of-turn tokens by name, like llama.cpp: chat models often declare only one of several stop tokens.
    for token_id, added in backend.get_added_tokens_decoder().items():
        if added.special and added.content in END_OF_TURN_TEXTS:
            ids.add(token_id)
    return frozenset(ids)


def _folder_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    # transformers >= 4.47 saves the template in its own file; older folders keep it in tokenizer_config.json.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("Chat messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise InvalidRequestError(
                f"Chat message {index} must be a dict with a string 'role' and a 'content', got {message!r}."
            )


def _generation_tag_class():
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationTag


def _jinja_environment():
    """A sandboxed Jinja environment with the same settings and helpers transformers gives chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    generation_tag = _generation_tag_class()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[generation_tag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env

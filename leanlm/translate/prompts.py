"""What each kind of model is told to translate: an instruct model gets a chat message, T5 its task prefix,
a multilingual Marian model its `>>xx<<` target token; languages by ISO 639-1 code or English name."""

from __future__ import annotations

from leanlm.errors import InvalidRequestError

LANGUAGES = {
    "ar": "Arabic",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "hu": "Hungarian",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sv": "Swedish",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "vi": "Vietnamese",
    "zh": "Chinese",
}


def language_code(language: str) -> str:
    """'fr', 'FR' or 'French' -> 'fr'."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    for code, name in LANGUAGES.items():
        if name.lower() == key:
            return code
    raise InvalidRequestError(
        f"Unknown language {language!r}. Use an ISO 639-1 code or its English name: {', '.join(sorted(LANGUAGES))}."
    )


def language_name(language: str) -> str:
    return LANGUAGES[language_code(language)]


def instruct_messages(text: str, target: str, source: str | None = None) -> list[dict[str, str]]:
    """One user turn asking for the translation alone (small instruct models otherwise add commentary)."""
    origin = f" from {language_name(source)}" if source else ""
    instruction = (
        f"Translate the following text{origin} into {language_name(target)}. "
        "Reply with the translation only, without notes or quotes."
    )
    return [{"role": "user", "content": f"{instruction}\n\n{text}"}]


def t5_prefix(target: str, source: str | None = None) -> str:
    """T5's task prefix, as its multi-task training wrote it ('translate English to French: ')."""
    return f"translate {language_name(source or 'en')} to {language_name(target)}: "


def marian_target_token(target: str) -> str:
    """Multilingual opus-mt models (e.g. en-ROMANCE) choose the output language with a leading `>>fr<<` token."""
    return f">>{language_code(target)}<<"

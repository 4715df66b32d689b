"""A transcription as text, SRT, WebVTT, JSON or verbose JSON (OpenAI's audio API shapes)."""

from __future__ import annotations

import json

from leanlm.errors import InvalidRequestError
from leanlm.speech.transcribe import Transcription

FORMATS = ("text", "txt", "srt", "vtt", "json", "verbose_json")


def timestamp(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def to_srt(result: Transcription) -> str:
    blocks = [
        f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(result.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(result: Transcription) -> str:
    blocks = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in result.segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def verbose(result: Transcription) -> dict:
    return {
        "task": result.task,
        "language": result.language,
        "duration": round(result.duration, 3),
        "text": result.text,
        "segments": [
            {
                "id": s.id,
                "seek": s.seek,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": s.tokens,
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in result.segments
        ],
    }


def render(result: Transcription, fmt: str) -> str:
    if fmt in ("text", "txt"):
        return result.text + "\n"
    if fmt == "srt":
        return to_srt(result)
    if fmt == "vtt":
        return to_vtt(result)
    if fmt == "json":
        return json.dumps({"text": result.text}, ensure_ascii=False)
    if fmt == "verbose_json":
        return json.dumps(verbose(result), ensure_ascii=False)
    raise InvalidRequestError(f"response format must be one of {', '.join(FORMATS)}, not {fmt!r}")

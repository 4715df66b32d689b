"""Text corpora for evaluation and calibration, fetched from PyPI (the exllamav2 wheel) and cached like the model.

Evaluation uses `wiki` and calibration (quantization, pruning) uses `c4`: keeping them apart means a compressed model
is never scored on the text it was calibrated on.
"""

from __future__ import annotations

import re
from pathlib import Path

from leanlm.errors import DownloadError, InvalidRequestError
from leanlm.formats import assets

CORPORA: dict[str, assets.WheelAsset] = {
    "wiki": assets.CORPUS_WIKI,
    "c4": assets.CORPUS_C4,
    "code": assets.CORPUS_CODE,
    "multilingual": assets.CORPUS_MULTILINGUAL,
    "technical": assets.CORPUS_TECHNICAL,
    "tiny": assets.CORPUS_TINY,
}
EVALUATION_CORPUS = "wiki"
CALIBRATION_CORPUS = "c4"

# wiki.utf8 is a WikiExtractor dump: each article sits between <doc id=... title=...> and </doc> lines.
_WIKI_MARKUP = re.compile(r"^(<doc [^\n]*>|</doc>)\n", re.MULTILINE)


def corpus_path(name: str, quiet: bool = False) -> Path:
    if name not in CORPORA:
        raise InvalidRequestError(f"Unknown corpus '{name}'. Use one of: {', '.join(CORPORA)}, or pass --text-file.")
    try:
        return assets.fetch(CORPORA[name], quiet=quiet)
    except DownloadError as exc:
        raise DownloadError(f"{exc} To evaluate without the download, pass your own text with --text-file.") from exc


def corpus_text(name: str, quiet: bool = False) -> str:
    text = corpus_path(name, quiet).read_text(encoding="utf-8")
    return _WIKI_MARKUP.sub("", text) if name == "wiki" else text


def evaluation_text(quiet: bool = False) -> str:
    """About 2 MB of Wikipedia articles, markup removed."""
    return corpus_text(EVALUATION_CORPUS, quiet)


def calibration_text(quiet: bool = False) -> str:
    """About 330 kB of C4 web text; disjoint from `evaluation_text`."""
    return corpus_text(CALIBRATION_CORPUS, quiet)


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"Text file not found: {path}. Pass an existing UTF-8 text file to --text-file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{path} is not UTF-8 text ({exc}). Convert it to UTF-8 first.") from exc
    if not text.strip():
        raise InvalidRequestError(f"{path} is empty. Pass a file with text to score.")
    return text

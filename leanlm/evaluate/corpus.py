"""The corpora, for evaluation's users: they live in formats/corpus.py, below compress/ (which calibrates on c4)."""

from leanlm.formats.corpus import (
    CALIBRATION_CORPUS,
    CORPORA,
    EVALUATION_CORPUS,
    calibration_text,
    corpus_path,
    corpus_text,
    evaluation_text,
    read_text_file,
)

__all__ = [
    "CALIBRATION_CORPUS",
    "CORPORA",
    "EVALUATION_CORPUS",
    "calibration_text",
    "corpus_path",
    "corpus_text",
    "evaluation_text",
    "read_text_file",
]

"""leanlm's Marian tokenizer against transformers' MarianTokenizer on the same SentencePiece model and vocab.json
(a tiny model trained here: opus-mt's own files are not in any Python package)."""

from __future__ import annotations

import io
import json

import pytest

sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

LINES = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat saw it",
    "where is the station, please?",
    "good morning to you, my friend",
    "the weather is nice today",
] * 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marian_tok")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES), model_writer=model, vocab_size=40, model_type="unigram", minloglevel=2
    )
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1, ">>fr<<": 2, ">>de<<": 3}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder, vocab


TEXTS = ["the cat sat on the park", "Where is the station?", ">>fr<< good morning", ">>xx<< the dog", "zebra ü"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(folder, text):
    from leanlm.formats.marian_tokenizer import MarianTokenizer

    path, vocab = folder
    ours = MarianTokenizer(path, eos_token_id=0, pad_token_id=vocab["<pad>"])
    theirs = transformers.MarianTokenizer(str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json"))
    ids = ours.encode(text)
    assert ids == theirs(text).input_ids
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True, use_source_tokenizer=False)

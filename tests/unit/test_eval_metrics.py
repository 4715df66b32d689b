"""Evaluation metrics without a real model: window plans, NLL/perplexity/bits-per-byte arithmetic, KL, the result."""

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from leanlm.errors import InvalidRequestError
from leanlm.evaluate import EvalResult, evaluate
from leanlm.evaluate.compare import check_same_tokenizer, compare, token_kl
from leanlm.evaluate.perplexity import (
    bits_per_byte,
    check_window_options,
    perplexity,
    plan_windows,
    sliding_log_probs,
    tokenize_for_eval,
)
from leanlm.formats.tokenizer import Tokenizer

# ---- fake models: (1, T) ids, (1, T) positions -> (1, T, V) logits ---------------------------------------------


def constant_model(probs: list[float]):
    """Predicts the same distribution at every position."""
    logits = torch.tensor(probs).log()

    def model(ids, positions):
        return logits.expand(ids.shape[0], ids.shape[1], -1).clone()

    return model


def bigram_model(table: torch.Tensor):
    """Next-token distribution depends on the current token only: rows of `table` are probabilities."""
    logits = table.log()

    def model(ids, positions):
        return logits[ids]

    return model


def recording_model(vocab: int, calls: list):
    def model(ids, positions):
        calls.append((ids[0].tolist(), positions[0].tolist()))
        return torch.zeros(1, ids.shape[1], vocab)

    return model


def byte_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    """One token per UTF-8 byte (byte-level BPE without merges), no BOS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = vocab or {c: i for i, c in enumerate(sorted(alphabet))}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=frozenset(), chat_template=None)


# ---- windows --------------------------------------------------------------------------------------------------


def hf_scored_positions(num_tokens: int, context: int, stride: int) -> list[int]:
    """Positions scored by Hugging Face's strided loop (labels -100 outside the target span, then shifted by one)."""
    scored, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        trg_len = end - prev_end
        labels = [-100] * (end - begin - trg_len) + list(range(end - trg_len, end))
        scored += [p for p in labels[1:] if p != -100]
        prev_end = end
        if end == num_tokens:
            break
    return scored


@pytest.mark.parametrize("num_tokens", [2, 3, 7, 64, 100, 101, 257])
@pytest.mark.parametrize("context,stride", [(2, 1), (8, 4), (8, 7), (16, 5), (64, 32), (1024, 512)])
def test_every_token_but_the_first_is_scored_exactly_once(num_tokens, context, stride):
    windows = plan_windows(num_tokens, context, stride)
    scored = [t for w in windows for t in range(w.scored_from, w.end)]
    assert scored == list(range(1, num_tokens))  # in order, no gaps, no repeats
    assert scored == hf_scored_positions(num_tokens, context, stride)
    for i, w in enumerate(windows):
        assert w.end - w.begin <= context
        assert w.begin < w.scored_from <= w.end  # every scored token has at least one token of context
        assert w.begin == i * stride
    assert windows[-1].end == num_tokens


def test_window_plan_edge_cases():
    assert plan_windows(5, context=8, stride=4) == plan_windows(5, context=100, stride=50)  # one window
    (only,) = plan_windows(5, context=8, stride=4)
    assert (only.begin, only.end, only.scored_from) == (0, 5, 1)
    # A text ending exactly at a window end needs no extra window.
    assert [(w.begin, w.end, w.scored_from) for w in plan_windows(12, 8, 4)] == [(0, 8, 1), (4, 12, 8)]
    # One token past it: a last window that scores that single token with context - 1 tokens of context.
    assert [(w.begin, w.end, w.scored_from) for w in plan_windows(13, 8, 4)][-1] == (8, 13, 12)
    assert [w.num_scored for w in plan_windows(10, 4, 1)] == [3, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "context,stride,message",
    [(4, 4, "larger than --stride"), (4, 8, "larger than --stride"), (4, 0, "--stride must be >= 1")],
)
def test_bad_window_options_are_rejected(context, stride, message):
    with pytest.raises(InvalidRequestError, match=message):
        plan_windows(100, context, stride)


def test_context_longer_than_the_model_is_rejected():
    with pytest.raises(InvalidRequestError, match="exceeds the model's context length"):
        check_window_options(4096, 512, model_context=2048)
    check_window_options(2048, 512, model_context=2048)


def test_too_few_tokens_are_rejected():
    with pytest.raises(InvalidRequestError, match="at least 2 tokens"):
        plan_windows(1, 8, 4)


def test_windows_feed_the_right_slices_with_positions_from_zero():
    calls = []
    ids = list(range(10, 23))  # 13 tokens
    out = list(sliding_log_probs([recording_model(32, calls)], ids, context=8, stride=4))
    assert [c[0] for c in calls] == [ids[0:8], ids[4:12], ids[8:13]]
    assert [c[1] for c in calls] == [list(range(8)), list(range(8)), list(range(5))]
    assert [t.tolist() for _, t, _ in out] == [ids[1:8], ids[8:12], ids[12:13]]
    assert [lp[0].shape for _, _, lp in out] == [(7, 32), (4, 32), (1, 32)]


# ---- NLL, perplexity, bits per byte -----------------------------------------------------------------------------


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size():
    stats = perplexity(constant_model([0.125] * 8), [1, 2, 3, 4, 5, 6, 7, 0, 1, 2], context=4, stride=2)
    assert stats.num_tokens == 9
    assert stats.nll_mean == pytest.approx(math.log(8), rel=1e-6)
    assert stats.perplexity == pytest.approx(8.0, rel=1e-6)
    assert stats.bits_per_byte(9) == pytest.approx(3.0, rel=1e-6)  # 3 bits per token, one byte per token


def test_nll_is_the_mean_of_the_scored_tokens_log_probabilities():
    # p(next = 0) = 0.5, p(1) = 0.25, p(2) = 0.25 regardless of context.
    stats = perplexity(constant_model([0.5, 0.25, 0.25]), [2, 0, 0, 1, 2], context=3, stride=1)
    expected = -(math.log(0.5) * 2 + math.log(0.25) * 2) / 4
    assert stats.nll_mean == pytest.approx(expected, rel=1e-6)
    assert stats.perplexity == pytest.approx(math.exp(expected), rel=1e-6)


@pytest.mark.parametrize("context,stride", [(2, 1), (5, 3), (64, 1), (1000, 999)])
def test_context_free_model_gives_the_same_perplexity_for_any_windows(context, stride):
    torch.manual_seed(0)
    table = torch.rand(6, 6).softmax(-1)
    ids = torch.randint(0, 6, (50,)).tolist()
    expected = -sum(math.log(table[a, b].item()) for a, b in itertools.pairwise(ids)) / 49
    stats = perplexity(bigram_model(table), ids, context, stride)
    assert stats.nll_mean == pytest.approx(expected, rel=1e-6)


def test_bits_per_byte_arithmetic():
    assert bits_per_byte(math.log(2) * 100, 50) == pytest.approx(2.0)
    assert bits_per_byte(math.log(256) * 10, 10) == pytest.approx(8.0)  # uniform over bytes: 8 bits per byte
    assert math.isnan(bits_per_byte(1.0, 0))


def test_tokenize_counts_the_bytes_of_the_scored_tokens():
    tok = byte_tokenizer()
    text = "héllo wörld, 北京"
    full = tokenize_for_eval(tok, text)
    assert len(full.ids) == len(text.encode())
    assert full.num_bytes == len(text.encode()) - 1  # the first token (byte) is not scored
    cut = tokenize_for_eval(tok, text, max_tokens=7)  # "héllo " is 7 bytes; the cut falls between characters
    assert cut.ids == full.ids[:7]
    assert cut.num_bytes == 6


def test_tokenize_a_long_text_by_prefix_gives_the_leading_tokens_of_the_whole():
    tok = byte_tokenizer()
    text = "the quick brown fox jumps over the lazy dog. " * 500
    assert tokenize_for_eval(tok, text, max_tokens=300).ids == tokenize_for_eval(tok, text).ids[:300]


@pytest.mark.parametrize("max_tokens", [-1, 1])
def test_bad_max_tokens_is_rejected(max_tokens):
    with pytest.raises(InvalidRequestError, match="--max-tokens"):
        tokenize_for_eval(byte_tokenizer(), "some text", max_tokens)


def test_one_token_of_text_is_rejected():
    with pytest.raises(InvalidRequestError, match="at least 2"):
        tokenize_for_eval(byte_tokenizer(), "a")


# ---- KL and top-1 against a baseline ----------------------------------------------------------------------------


def test_kl_of_two_known_distributions():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert token_kl(p, q).item() == pytest.approx(expected, rel=1e-5)
    assert token_kl(p, p).item() == 0.0


def test_kl_ignores_zero_probability_tokens_of_the_baseline():
    p = torch.tensor([[0.0, 1.0]]).log()  # log 0 = -inf
    q = torch.tensor([[0.5, 0.5]]).log()
    assert token_kl(p, q).item() == pytest.approx(math.log(2), rel=1e-6)


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    torch.manual_seed(0)
    model = bigram_model(torch.rand(5, 5).softmax(-1))
    ids = torch.randint(0, 5, (40,)).tolist()
    result = compare(model, model, ids, context=8, stride=3)
    assert result.kl_mean == 0.0 and result.kl_max == 0.0
    assert result.top1_agreement == 1.0
    assert result.ppl_ratio == 1.0
    assert result.candidate == result.baseline == perplexity(model, ids, context=8, stride=3)


def test_compare_against_hand_computed_values():
    baseline = constant_model([0.5, 0.3, 0.2])
    candidate = bigram_model(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.5, 0.3, 0.2]]))
    ids = [0, 1, 2, 1, 0, 1, 0]  # predictions come from ids[:-1] = 0 1 2 1 0 1: candidate differs after each 1
    result = compare(candidate, baseline, ids, context=4, stride=2)
    kl_after_1 = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(1) + 0.2 * math.log(0.2 / 0.5)
    assert result.kl_mean == pytest.approx(3 * kl_after_1 / 6, rel=1e-5)
    assert result.kl_max == pytest.approx(kl_after_1, rel=1e-5)
    assert result.top1_agreement == pytest.approx(3 / 6)
    # targets ids[1:] = 1 2 1 0 1 0
    base_nll = -(math.log(0.3) + math.log(0.2) + math.log(0.3) + math.log(0.5) + math.log(0.3) + math.log(0.5)) / 6
    cand_nll = -(math.log(0.3) + math.log(0.5) + math.log(0.3) + math.log(0.2) + math.log(0.3) + math.log(0.2)) / 6
    assert result.baseline.nll_mean == pytest.approx(base_nll, rel=1e-6)
    assert result.candidate.nll_mean == pytest.approx(cand_nll, rel=1e-6)
    assert result.ppl_ratio == pytest.approx(math.exp(cand_nll - base_nll), rel=1e-6)


def test_different_vocabularies_are_rejected():
    tok = byte_tokenizer()
    vocab = tok.backend.get_vocab()
    swapped = dict(vocab)
    a, b = sorted(vocab)[:2]
    swapped[a], swapped[b] = vocab[b], vocab[a]
    check_same_tokenizer(tok, byte_tokenizer())
    with pytest.raises(InvalidRequestError, match="different vocabularies"):
        check_same_tokenizer(tok, byte_tokenizer(swapped))
    smaller = {t: i for i, t in enumerate(sorted(vocab)[:100])}
    with pytest.raises(InvalidRequestError, match="256 tokens vs 100"):
        check_same_tokenizer(tok, byte_tokenizer(smaller))


def test_different_logit_sizes_are_rejected():
    with pytest.raises(InvalidRequestError, match="output logits"):
        compare(constant_model([0.5, 0.5]), constant_model([0.25] * 4), [0, 1, 1], context=2, stride=1)


# ---- the result -------------------------------------------------------------------------------------------------

RESULT_KEYS = {
    "model",
    "dtype",
    "corpus",
    "corpus_path",
    "num_tokens",
    "num_bytes",
    "context",
    "stride",
    "nll_mean",
    "perplexity",
    "bits_per_byte",
    "elapsed_s",
    "baseline",
    "baseline_dtype",
    "baseline_perplexity",
    "ppl_ratio",
    "kl_mean",
    "kl_max",
    "top1_agreement",
}
BASELINE_KEYS = {
    "baseline",
    "baseline_dtype",
    "baseline_perplexity",
    "ppl_ratio",
    "kl_mean",
    "kl_max",
    "top1_agreement",
}


def fake_llm(name: str, model, dtype=torch.float32, context_length: int = 64):
    return SimpleNamespace(
        model=model,
        tokenizer=byte_tokenizer(),
        config=SimpleNamespace(context_length=context_length),
        dtype=dtype,
        model_path=Path(f"/models/{name}"),
    )


def test_evaluate_result_and_its_json_schema():
    text = "Bits per byte make tokenizers comparable. " * 4
    llm = fake_llm("uniform.gguf", constant_model([1 / 256] * 256))
    result = evaluate(llm, text, corpus="text-file", corpus_path="/tmp/t.txt", context=16, stride=8, max_tokens=100)
    assert isinstance(result, EvalResult)
    record = json.loads(json.dumps(result.to_dict()))
    assert set(record) == RESULT_KEYS
    assert all(record[k] is None for k in BASELINE_KEYS)
    assert record["model"] == "uniform.gguf" and record["dtype"] == "float32"
    assert (record["num_tokens"], record["num_bytes"], record["context"], record["stride"]) == (99, 99, 16, 8)
    assert record["perplexity"] == pytest.approx(256, rel=1e-5)
    assert record["bits_per_byte"] == pytest.approx(8.0, rel=1e-5)
    with pytest.raises(AttributeError):
        result.perplexity = 1.0  # frozen


def test_evaluate_with_a_baseline_fills_the_comparison_fields():
    text = "abcabcabcabcabcabcabc"
    candidate = fake_llm("cand.gguf", constant_model([1 / 256] * 256), dtype=torch.bfloat16)
    baseline = fake_llm("base.gguf", constant_model([1 / 256] * 256))
    record = evaluate(candidate, text, corpus="wiki", context=8, stride=4, baseline=baseline).to_dict()
    assert set(record) == RESULT_KEYS
    assert (record["baseline"], record["baseline_dtype"], record["dtype"]) == ("base.gguf", "float32", "bfloat16")
    assert record["kl_mean"] == 0.0 and record["kl_max"] == 0.0 and record["top1_agreement"] == 1.0
    assert record["ppl_ratio"] == 1.0 and record["baseline_perplexity"] == pytest.approx(256, rel=1e-5)


def test_evaluate_rejects_a_context_the_model_cannot_hold():
    llm = fake_llm("m", constant_model([0.5, 0.5]), context_length=32)
    with pytest.raises(InvalidRequestError, match="exceeds the model's context length"):
        evaluate(llm, "some text", corpus="x", context=64, stride=32)

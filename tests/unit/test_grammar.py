"""Constrained decoding without a model: grammar checks, llguidance masks over a small in-memory vocabulary, and
masked rows in the batched sampler (other rows untouched)."""

import pytest
import torch
from test_tokenizer import byte_level_metadata

from leanlm.errors import InvalidRequestError
from leanlm.formats.tokenizer import Tokenizer
from leanlm.sampling.batch import sample_batch
from leanlm.sampling.grammar import GrammarCompiler, compile_grammar
from leanlm.sampling.state import SamplingState
from leanlm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf_metadata(byte_level_metadata())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"json_schema": {"type": "spaceship"}}, "Invalid json_schema"),
        ({"json_schema": "[1, 2]"}, "must be a JSON object"),
        ({"regex": "a(b"}, "Invalid regex"),
        ({"grammar": "start: nowhere"}, "Invalid grammar"),
        ({}, "exactly one"),
        ({"regex": "a", "grammar": 'start: "a"'}, "exactly one"),
    ],
)
def test_bad_constraints_are_invalid_requests(kwargs, words):
    with pytest.raises(InvalidRequestError, match=words):
        compile_grammar(**kwargs)


def test_sampling_params_take_one_constraint():
    params = SamplingParams(json_schema={"type": "object"})
    assert params.constrained and params.json_schema == '{"type": "object"}'
    assert hash(params)  # stays hashable
    with pytest.raises(InvalidRequestError, match="at most one"):
        SamplingParams(regex="a", grammar='start: "a"')
    with pytest.raises(InvalidRequestError, match="non-empty string"):
        SamplingParams(regex="")


def test_masks_allow_exactly_the_tokens_that_keep_the_output_matching(tokenizer):
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    constraint = compiler.constraint(SamplingParams(regex="hello world"))
    allowed = compiler.masks([constraint])[0]
    texts = {tokenizer.decode([t]) for t in allowed.nonzero().flatten().tolist()}
    assert texts and all("hello world".startswith(text) for text in texts)
    for token in tokenizer.encode("hello world", add_special_tokens=False):
        assert compiler.masks([constraint])[0, token]
        constraint.consume(token)
    done = compiler.masks([constraint])[0]
    assert set(done.nonzero().flatten().tolist()) <= set(tokenizer.eos_token_ids)  # only the end may follow


def test_sampler_masks_constrained_rows_only(tokenizer):
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    vocab = tokenizer.vocab_size
    logits = torch.zeros(2, vocab)
    favourite = tokenizer.encode("or", add_special_tokens=False)[0]
    logits[:, favourite] = 10.0  # both rows prefer a token the grammar forbids
    greedy = SamplingParams(temperature=0, regex="hello")
    constrained = SamplingState(greedy, [], constraint=compiler.constraint(greedy))
    free = SamplingState(SamplingParams(temperature=0), [])
    rows, masks = [0], compiler.masks([constrained.constraint])
    tokens = [row[0] for row in sample_batch(logits, [constrained, free], (rows, masks))]
    assert tokens[1] == favourite
    assert tokens[0] != favourite and "hello".startswith(tokenizer.decode([tokens[0]]))


def test_logprobs_of_a_constrained_row_list_only_allowed_alternatives(tokenizer):
    """Regression (found by benchmarks/fuzz_server.py): excluded tokens' -inf log-probabilities made a 500."""
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    params = SamplingParams(temperature=0, regex="(hello|world)", logprobs=5)
    state = SamplingState(params, [], constraint=compiler.constraint(params))
    logits = torch.randn(1, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    allowed = compiler.masks([state.constraint])
    [(token, logprob, top)] = sample_batch(logits, [state], ([0], allowed))
    assert allowed[0, token] and logprob > float("-inf")
    assert top and all(allowed[0, t] and v > float("-inf") for t, v in top)

"""Marian and T5 (v1.0 ReLU and v1.1 gated-GELU) on tiny random weights against transformers: the folder saved by
transformers loads, logits match over a whole pass and token by token through the decoder cache (padded sources
in the batch), and greedy and 4-beam generation give transformers' `generate` tokens exactly. No Marian or T5
weights ship in a Python package, so these tiny random models are what holds the families to transformers."""

from __future__ import annotations

import pytest
import torch

from leanlm.translate.seq2seq import Seq2SeqModel, load_seq2seq

transformers = pytest.importorskip("transformers")

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1)
MARIAN = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    scale_embedding=True,
    activation_function="swish",
    decoder_start_token_id=0,  # Marian starts decoding from the pad token
    forced_eos_token_id=1,
)
T5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
)
CONFIGS = {
    "marian": lambda: transformers.MarianMTModel(transformers.MarianConfig(**COMMON, **MARIAN)),
    "t5": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(**COMMON, **T5, feed_forward_proj="relu")
    ),
    "t5-v1.1": lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(**COMMON, **T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    ),
}
LOGITS_ATOL = 1e-4  # float32; measured: 2e-7 (Marian) to 9e-6 (T5 v1.1, whose logits reach ~30)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory) -> tuple[torch.nn.Module, Seq2SeqModel]:
    torch.manual_seed(0)
    hf = CONFIGS[request.param]().eval()
    with torch.no_grad():  # transformers' init (std 0.02) makes outputs that ignore the source: widen it
        for name, param in hf.named_parameters():
            if param.dim() == 2 and "embed_positions" not in name:  # (Marian's sinusoids are not stored)
                param.normal_(0, 0.3)
        if request.param == "marian":
            hf.final_logits_bias.normal_()  # zero in a fresh model: make the test see it
            hf.generation_config.bad_words_ids = [[0]]  # as opus-mt's generation_config.json: never the pad token
        else:
            hf.shared.weight[1].mul_(2.5)  # a likelier end token (the head is tied): hypotheses that end early
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_seq2seq(folder)


def sources() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a shorter source, padded
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@torch.inference_mode()
def test_logits_match_transformers_whole_pass_and_token_steps(pair):
    hf, ours = pair
    ids, mask = sources()
    targets = torch.randint(2, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=targets).logits
    model = ours.model
    cache = model.new_cache(model.cross_kv(model.encode(ids, mask)), 3, cross_mask=mask)
    steps = [model.decode(targets[:, :4], cache)] + [model.decode(targets[:, i : i + 1], cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=LOGITS_ATOL, rtol=1e-4)


# transformers' defaults (length_penalty 1, early_stopping False) spelled out, then the other stopping rules
SEARCHES = [(1, 1.0, False), (4, 1.0, False), (3, 0.6, True), (4, 2.0, "never")]


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", SEARCHES)
@torch.inference_mode()
def test_generate_tokens_equal_transformers(pair, num_beams, length_penalty, early_stopping):
    """Marian's hypotheses end by the forced end token at the limit, T5 v1.1's also by themselves before it."""
    hf, ours = pair
    ids, mask = sources()
    search = dict(max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    expected = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **search)
    got = ours.generate(ids, mask, **search)
    for row, tokens in enumerate(got):
        reference = expected[row, 1:].tolist()  # without the decoder start token
        if 1 in reference:
            reference = reference[: reference.index(1) + 1]  # up to the end token; the rest is padding
        assert tokens == reference, f"row {row}"


@torch.inference_mode()
def test_a_request_alone_equals_its_row_in_a_batch(pair):
    _, ours = pair
    ids, mask = sources()
    batched = ours.generate(ids, mask, max_new_tokens=8, num_beams=4)
    alone = ours.generate([ids[1, :6].tolist()], max_new_tokens=8, num_beams=4)
    assert alone[0] == batched[1]


def test_bad_inputs_get_clear_errors(pair):
    from leanlm.errors import InvalidRequestError, ModelFormatError

    _, ours = pair
    with pytest.raises(InvalidRequestError, match="lie in"):
        ours.generate([[VOCAB + 5]])
    with pytest.raises(InvalidRequestError, match="at least one token"):
        ours.generate([[]])
    with pytest.raises(ValueError, match="num_beams"):
        ours.generate([[3, 4]], num_beams=0)
    with pytest.raises(InvalidRequestError, match="decoder positions"):
        ours.generate([[3, 4]], max_new_tokens=ours.model.max_positions)
    with pytest.raises(ModelFormatError, match="no tokenizer"):
        ours.translate(["hello"])  # random weights saved without tokenizer files

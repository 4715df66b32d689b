"""Encoder-decoder requests in the engine, on a tiny random Whisper: greedy tokens equal speech/decoding.py's own
loop; a batch gives each request its solo tokens; the encoder cache is empty once requests finish or abort; the
scheduler never encodes more inputs per step than its budget; prefix-cache hashes never match across audio."""

from __future__ import annotations

import pytest
import torch

from leanlm.cache.block_manager import BlockManager
from leanlm.config import EngineConfig
from leanlm.engine.request import EncoderInput, Request
from leanlm.engine.scheduler import Scheduler
from leanlm.errors import InvalidRequestError
from leanlm.formats.whisper_tokenizer import WhisperTokenizer
from leanlm.models.whisper import WhisperConfig, WhisperModel
from leanlm.sampling_params import SamplingParams
from leanlm.speech.decoding import DecodeOptions, LogitRules, decode_windows
from leanlm.speech.engine_decoding import (
    abort_window,
    decode_windows_engine,
    submit_window,
    whisper_engine,
    window_hash,
)

CONFIG = WhisperConfig(
    vocab_size=120,
    num_mel_bins=16,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    decoder_layers=2,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_source_positions=50,
    max_target_positions=40,
)
OPTIONS = DecodeOptions(beam_size=1, max_length=CONFIG.max_target_positions, suppress_tokens=(3,))


class _Encoded:
    def __init__(self, ids):
        self.ids = ids


class _Backend:
    """Just what LogitRules and the engine's detokenizer call: a space is token 5; text is the ids."""

    def encode(self, text, add_special_tokens=False):
        return _Encoded([5])

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if i < 100)


# Ids 0..99 are text, 100 is end-of-text, 101.. the special tokens, 108.. the timestamps.
TOKENIZER = WhisperTokenizer(_Backend(), 100, 101, 103, 104, 105, 106, 107, {"en": 102, "fr": 109})
SOT = TOKENIZER.sot_sequence("en", "transcribe")
PROMPTS = [SOT, [105, 7, 8, 9, 10, 11] + SOT, [105, 40] + SOT]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = WhisperModel(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def windows():
    torch.manual_seed(1)
    return [torch.randn(16, 100) for _ in PROMPTS]


def engine(model, **limits):
    config = EngineConfig(max_num_seqs=8, block_size=4, num_kv_blocks=64, **limits)
    return whisper_engine(model, TOKENIZER, config)


def reference(model, windows, prompts):
    results = decode_windows(model, TOKENIZER, model.encode(torch.stack(windows)), prompts, OPTIONS)
    return [r.tokens for r in results]


def test_engine_greedy_equals_decode_windows_and_batched_equals_solo(model, windows):
    reference_results = decode_windows(model, TOKENIZER, model.encode(torch.stack(windows)), PROMPTS, OPTIONS)
    expected = [r.tokens for r in reference_results]
    assert all(len(tokens) >= 3 for tokens in expected), expected  # the rules and the decoder both had work
    batched = decode_windows_engine(engine(model), TOKENIZER, windows, PROMPTS, OPTIONS)
    assert [r.tokens for r in batched] == expected
    for window, prompt, tokens in zip(windows, PROMPTS, expected, strict=True):
        solo = decode_windows_engine(engine(model), TOKENIZER, [window], [prompt], OPTIONS, no_speech=False)
        assert solo[0].tokens == tokens
    for ours, theirs in zip(batched, reference_results, strict=True):
        assert ours.sum_logprob == pytest.approx(theirs.sum_logprob, abs=1e-4)
        assert ours.no_speech_prob == pytest.approx(theirs.no_speech_prob, abs=1e-5)


@torch.inference_mode()
def test_each_batched_row_gets_the_logits_of_its_own_audio(model, windows):
    """Logits the engine samples from, batched, equal WhisperModel.decode over the request's own audio and tokens
    (the random decoder leans little on the audio, so tokens alone would hide a row reading another's)."""
    eng = engine(model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(PROMPTS))}
    rules = LogitRules(TOKENIZER, CONFIG.vocab_size, OPTIONS)
    for i, (window, prompt) in enumerate(zip(windows, PROMPTS, strict=True)):
        eng.add_request(
            str(i),
            prompt,
            SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=(TOKENIZER.eot,)),
            encoder_input=EncoderInput(window, str(i)),
            logits_processors=[
                lambda out, row, i=i: seen[i].append(row.clone()) or row,
                lambda out, row: rules.apply(row[None], [out])[0],
            ],
        )
    outputs = {}
    while eng.has_unfinished_requests():
        outputs.update({o.request_id: o for o in eng.step() if o.finished})
    for i, (window, prompt) in enumerate(zip(windows, PROMPTS, strict=True)):
        tokens = prompt + list(outputs[str(i)].token_ids)
        cache = model.new_cache(model.cross_kv(model.encode(window[None])), 1)
        expected = model.decode(torch.tensor([tokens[:-1]]), cache)[0, len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(seen[i]), expected, atol=1e-4, rtol=1e-4)


def test_requests_arriving_mid_run_get_their_solo_tokens(model, windows):
    """A request added while others decode (continuous batching) still gets its solo tokens."""
    expected = reference(model, windows, PROMPTS)
    eng = engine(model)
    ids = [submit_window(eng, TOKENIZER, windows[0], PROMPTS[0], OPTIONS, no_speech=False).request_id]
    done = {}
    for step in range(200):
        if step in (2, 4):
            index = len(ids)
            ids.append(submit_window(eng, TOKENIZER, windows[index], PROMPTS[index], OPTIONS, False).request_id)
        done.update({o.request_id: o for o in eng.step() if o.finished})
        if len(done) == 3:
            break
    tokens = [[t for t in done[rid].token_ids if t != TOKENIZER.eot] for rid in ids]
    assert tokens == expected


def test_encoder_cache_is_freed_on_finish_and_on_abort(model, windows):
    eng = engine(model)
    handles = [submit_window(eng, TOKENIZER, w, p, OPTIONS) for w, p in zip(windows, PROMPTS, strict=True)]
    eng.step()
    keys = [window_hash(w) for w in windows]
    assert set(eng.runner.encoder_cache) == set(keys)  # encoded once, at admission, shared with the probe
    abort_window(eng, handles[1])
    assert set(eng.runner.encoder_cache) == {keys[0], keys[2]}
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.runner.encoder_cache == {} and eng.scheduler.encoder_users == {}
    assert eng.stats().kv_blocks_used == 0


def test_requests_over_the_same_audio_share_one_encoder_output(model, windows):
    """Two prompts over one window (a probe and a transcription, a fallback): one encoder run, one cache entry, kept
    until the last of them ends; tokens as when each runs alone."""
    eng = engine(model)
    encoded = []
    encode_inputs = eng.model.encode_inputs
    eng.model.encode_inputs = lambda inputs: encoded.append(len(inputs)) or encode_inputs(inputs)
    first = submit_window(eng, TOKENIZER, windows[0], PROMPTS[0], OPTIONS, no_speech=False).request_id
    eng.step()
    second = submit_window(eng, TOKENIZER, windows[0], PROMPTS[1], OPTIONS, no_speech=False).request_id
    eng.step()  # admitted: it reads the first one's encoder output
    eng.abort_request(first)
    assert list(eng.runner.encoder_cache) == [window_hash(windows[0])]  # still read by the second request
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert encoded == [1] and eng.runner.encoder_cache == {}
    expected = reference(model, [windows[0]], [PROMPTS[1]])[0]
    assert [t for t in done[second].token_ids if t != TOKENIZER.eot] == expected


def test_scheduler_never_encodes_more_inputs_per_step_than_its_budget(model, windows):
    eng = engine(model, max_encoder_inputs_per_step=1)
    counts = []
    schedule = eng.scheduler.schedule

    def spy():
        out = schedule()
        counts.append(len(out.encoder_inputs))
        return out

    eng.scheduler.schedule = spy
    expected = reference(model, windows, PROMPTS)
    results = decode_windows_engine(eng, TOKENIZER, windows, PROMPTS, OPTIONS)
    assert [r.tokens for r in results] == expected
    assert counts[:3] == [1, 1, 1] and sum(counts) == 3  # one new window per step, each encoded once


def test_encoder_budget_holds_back_new_inputs_but_not_shared_ones_or_text():
    """Budget 2: two new inputs are encoded this step; a third new one waits (and, FCFS, whoever is behind it); a
    request over an input already encoded costs nothing from the budget."""
    scheduler = Scheduler(EngineConfig(block_size=4, max_encoder_inputs_per_step=2), BlockManager(64, 4, False))

    def add(request_id, audio):
        request = Request(request_id, [1, 2, 3], SamplingParams(max_tokens=4), 4)
        request.encoder_input = EncoderInput(None, audio)
        scheduler.add(request)
        return request

    a, b, a2, c, d = add("a", "x"), add("b", "y"), add("a2", "x"), add("c", "z"), add("d", "w")
    out = scheduler.schedule()
    assert out.encoder_inputs == [a, b]
    assert [e.request for e in out.scheduled] == [a, b, a2]  # a2 reads a's output; c is over the budget
    assert scheduler.encoder_users == {"x": {"a", "a2"}, "y": {"b"}}
    scheduler.update(out)
    out = scheduler.schedule()
    assert out.encoder_inputs == [c, d] and [e.request for e in out.scheduled][-2:] == [c, d]


def test_prefix_cache_blocks_are_shared_only_over_the_same_audio():
    """Equal decoder prompts over different encoder inputs must not share KV blocks (the salt); over the same input
    they do."""
    config = EngineConfig(block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(config, BlockManager(64, 4, True))
    prompt = list(range(1, 11))  # two full blocks, then the last token

    def run(request_id, audio):
        request = Request(request_id, prompt, SamplingParams(max_tokens=4), 4)
        request.encoder_input = EncoderInput(None, audio)
        scheduler.add(request)
        out = scheduler.schedule()
        scheduler.update(out)
        scheduler.finish(request, "stop")
        return request.num_cached_tokens, out.encoder_inputs == [request]

    assert run("a", "audio-1") == (0, True)
    assert run("b", "audio-2") == (0, True)  # same tokens, other audio: nothing reused
    assert run("c", "audio-1") == (8, True)  # same audio: its two full blocks are reused; it is still encoded


def test_clear_errors_for_mismatched_requests(model, windows):
    eng = engine(model)
    with pytest.raises(InvalidRequestError, match="encoder input"):
        eng.add_request("x", SOT, SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="greedily"):
        submit_window(eng, TOKENIZER, windows[0], SOT, DecodeOptions(beam_size=5))
    with pytest.raises(InvalidRequestError, match="Speculative"):
        engine(model, speculative="ngram")


def test_int8_whisper_runs_through_the_engine_with_its_solo_tokens(model, windows):
    """int8 layers (per-token activation scales) keep a row's result independent of its batch: the engine's batched
    greedy tokens equal the standalone loop's on the same int8 model, whose logits stay near float32's."""
    import copy

    from leanlm.layers.int8_linear import Int8DynamicLinear
    from leanlm.models.whisper_int8 import quantize_int8

    int8 = quantize_int8(copy.deepcopy(model))
    swapped = [m for m in int8.modules() if isinstance(m, Int8DynamicLinear)]
    assert len(swapped) == 3 * CONFIG.encoder_layers + 6 * CONFIG.decoder_layers  # all layer Linears but fc2
    assert all(isinstance(layer.fc2, torch.nn.Linear) for layer in [*int8.encoder_layers, *int8.decoder_layers])
    with torch.inference_mode():
        frames = torch.stack(windows)
        tokens = torch.tensor([PROMPTS[0]] * len(windows))
        ours = int8.decode(tokens, int8.new_cache(int8.cross_kv(int8.encode(frames)), len(windows)))
        theirs = model.decode(tokens, model.new_cache(model.cross_kv(model.encode(frames)), len(windows)))
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.99
    expected = reference(int8, windows, PROMPTS)
    assert [r.tokens for r in decode_windows_engine(engine(int8), TOKENIZER, windows, PROMPTS, OPTIONS)] == expected

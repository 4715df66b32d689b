"""The Python API on the real default model: streaming, stop strings, seeds, finish reasons, limits."""

import pytest

from leanlm import LLM, SamplingParams
from leanlm.errors import InvalidRequestError, PromptTooLongError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    return LLM(default_gguf_path)


def test_stream_equals_generate(llm):
    params = SamplingParams(max_tokens=40, temperature=0)
    chunks = list(llm.stream("Write a haiku about the sea.", params, chat=True))
    streamed = "".join(c.text for c in chunks)
    full = llm.chat([{"role": "user", "content": "Write a haiku about the sea."}], params)[0]
    assert streamed == full.text
    assert chunks[-1].finish_reason == full.finish_reason
    assert sum(len(c.token_ids) for c in chunks) == len(full.token_ids)
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_multibyte_text_streams_whole_characters(llm):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    chunks = [c.text for c in llm.stream("Translate to Chinese: I love my family. 我", params)]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == llm.generate("Translate to Chinese: I love my family. 我", params)[0].text


def test_stop_string_is_cut_in_stream_and_output(llm):
    params = SamplingParams(max_tokens=40, temperature=0, stop=(" 9",))
    out = llm.generate("1, 2, 3, 4, 5,", params)[0]
    streamed = "".join(c.text for c in llm.stream("1, 2, 3, 4, 5,", params))
    assert out.finish_reason == "stop"
    assert out.text == streamed == " 6, 7, 8,"


def test_seed_reproduces_sampling_and_different_seeds_differ(llm):
    prompts = ["Once upon a time", "The best way to learn is"]
    a = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=123))
    b = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=123))
    c = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=7))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_finish_reasons_and_metrics(llm):
    length = llm.generate("The weather today is", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert (length.finish_reason, len(length.token_ids)) == ("length", 5)
    assert length.metrics.num_prompt_tokens == len(llm.tokenizer.encode("The weather today is"))
    assert length.metrics.time_to_first_token_s > 0 and length.metrics.decode_tokens_per_s > 0
    eos = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=200, temperature=0))[0]
    assert eos.finish_reason == "stop" and eos.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in eos.text


def test_generation_is_capped_by_the_context_window(llm, monkeypatch):
    # A 64-token window stands in for the real 8192 one, so the test does not prefill 8k tokens.
    monkeypatch.setattr(llm.engine, "model_config", llm.config.replace(context_length=64))
    ids = llm.tokenizer.encode("word " * 100)[:61]
    out = llm.generate([ids], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert (len(out.token_ids), out.finish_reason) == (3, "length")
    with pytest.raises(PromptTooLongError, match="context window is 64"):
        llm.generate([ids + [1, 2, 3]], SamplingParams(max_tokens=5))


def test_bad_prompts_and_params(llm):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**9]])
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_generating_on_another_thread_than_the_loading_one_warns_once(llm):
    import threading
    import warnings

    params = SamplingParams(max_tokens=2, temperature=0)
    caught = []

    def generate_twice():
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            llm.generate("Hello", params)
            llm.generate("Hello", params)
        caught.extend(str(r.message) for r in records)

    worker = threading.Thread(target=generate_twice, name="worker")
    worker.start()
    worker.join()
    assert len(caught) == 1 and "OpenMP" in caught[0] and "worker" in caught[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loading thread itself never warns
        llm.generate("Hello", params)


def test_threads_hold_for_each_llms_own_steps_only(default_gguf_path, monkeypatch):
    """LLM(threads=) does not change the process's setting, nor a second LLM's: each engine step runs at its own
    LLM's count, and the caller's count is back after every call."""
    import torch

    torch.set_num_threads(2)
    one, two = LLM(default_gguf_path, threads=1), LLM(default_gguf_path, threads=2)
    assert torch.get_num_threads() == 2
    seen = {}
    for name, llm in (("one", one), ("two", two)):
        run = llm.engine.runner.run

        def counting(schedule, run=run, name=name):
            seen.setdefault(name, set()).add(torch.get_num_threads())
            return run(schedule)

        monkeypatch.setattr(llm.engine.runner, "run", counting)
    params = SamplingParams(max_tokens=4, temperature=0)
    tokens = one.generate("The capital of France is", params)[0].token_ids
    assert torch.get_num_threads() == 2
    assert two.generate("The capital of France is", params)[0].token_ids == tokens
    assert one.generate("Hello", params)[0].token_ids
    assert seen == {"one": {1}, "two": {2}} and torch.get_num_threads() == 2

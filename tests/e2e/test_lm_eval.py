"""lm-evaluation-harness (`lm-eval`) scores a multiple-choice task through the real server: its
`local-completions` model sends token-id prompts with echo and logprobs, and tokenizes with the server's own
/tokenize. Its accuracy and every per-choice loglikelihood must equal what leanlm computes directly (a plain
forward pass of the model, no engine, no server)."""

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from leanlm import LLM
from leanlm.config import EngineConfig, parse_size
from leanlm.server.app import build_app
from leanlm.server.serving import ServerSettings
from tests.server_harness import running_server

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "lm_eval"
MODEL = "smollm2"
TOLERANCE = 2e-3  # nats per choice: the server batches and chunks; the reference is one plain forward pass


@pytest.fixture(scope="module")
def llm(default_gguf_path):
    return LLM(default_gguf_path, engine_config=EngineConfig(max_num_seqs=8, kv_cache_memory=parse_size("128MiB")))


def direct_loglikelihood(llm, context: str, continuation: str) -> tuple[float, bool]:
    """As lm-eval defines it: trailing spaces of the context move to the continuation, the pair is encoded whole
    and split at the context's length; the sum of the continuation tokens' log-probabilities, and whether each
    of them is the model's greedy choice."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = llm.tokenizer.encode(context + continuation, add_special_tokens=False)
    start = len(llm.tokenizer.encode(context, add_special_tokens=False))
    with torch.inference_mode():
        logits = llm.model(torch.tensor([whole]), torch.arange(len(whole))[None], last_only=False)[0].float()
    logprobs = logits[start - 1 : len(whole) - 1].log_softmax(-1)
    targets = torch.tensor(whole[start:])
    chosen = logprobs[torch.arange(len(targets)), targets]
    return chosen.sum().item(), bool((logprobs.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def url(llm):
    with running_server(build_app(llm, ServerSettings(model_name=MODEL, max_tokens_limit=64))) as (base, _):
        yield base


def test_lm_eval_local_completions_equals_direct_scoring(llm, url, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(TASK_DIR)  # the task's data_files are relative to it
    results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{url}/v1/completions",
                "model": MODEL,
                "tokenizer_backend": "remote",
                "num_concurrent": 2,
                "max_retries": 1,
            },
            tasks=["leanlm_facts"],
            task_manager=TaskManager(include_path=str(TASK_DIR)),
            log_samples=True,
            batch_size=1,
        )
    samples = results["samples"]["leanlm_facts"]
    assert len(samples) == sum(1 for _ in open(TASK_DIR / "leanlm_facts.jsonl"))
    correct = 0
    for sample in samples:
        direct = [direct_loglikelihood(llm, *argument) for argument in sample["arguments"]]
        served = [response[0] for response in sample["resps"]]
        for (got, got_greedy), (want, want_greedy) in zip(served, direct, strict=True):
            assert got == pytest.approx(want, abs=TOLERANCE)
            assert got_greedy == want_greedy
        correct += max(range(len(direct)), key=lambda i: direct[i][0]) == sample["target"]
    accuracy = results["results"]["leanlm_facts"]["acc,none"]
    assert accuracy == pytest.approx(correct / len(samples))
    print(f"lm-eval accuracy {accuracy:.3f} on {len(samples)} questions; {os.cpu_count()} CPUs")


def test_echo_scores_the_prompt_streamed_or_not_and_bad_requests_name_the_field(llm, url):
    prompt = "The capital of France is Paris, and the capital of Italy is"
    ids = llm.tokenizer.encode(prompt)
    body = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body).json()["choices"][0]
    assert whole["text"] == prompt and whole["finish_reason"] == "length"
    scores = whole["logprobs"]
    assert len(scores["tokens"]) == len(ids) and scores["token_logprobs"][0] is None
    assert "".join(scores["tokens"]) == prompt and scores["text_offset"][1] == len(scores["tokens"][0])
    want = direct_loglikelihood(llm, llm.tokenizer.decode(ids[:1]), llm.tokenizer.decode(ids[1:]))[0]
    assert sum(scores["token_logprobs"][1:]) == pytest.approx(want, abs=TOLERANCE)

    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "max_tokens": 3, "stream": True}) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    first = events[0]["choices"][0]["logprobs"]["token_logprobs"]
    assert first[0] is None and first[1 : len(ids)] == pytest.approx(scores["token_logprobs"][1:], abs=TOLERANCE)
    plain = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}
    answer = httpx.post(f"{url}/v1/completions", json=plain).json()["choices"][0]["text"]
    assert "".join(e["choices"][0]["text"] for e in events) == prompt + answer

    tokens = httpx.post(f"{url}/tokenize", json={"prompt": prompt, "add_special_tokens": False}).json()
    assert tokens["tokens"] == llm.tokenizer.encode(prompt, add_special_tokens=False) and tokens["count"] > 0
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == llm.tokenizer.decode(
        ids, skip_special_tokens=False
    )
    assert httpx.get(f"{url}/tokenizer_info").json()["eos_token"]
    for path, bad, field in [
        ("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 0}, "echo"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ]:
        reply = httpx.post(f"{url}{path}", json=bad)
        assert reply.status_code == 400, reply.text
        assert field in reply.text

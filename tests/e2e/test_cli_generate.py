"""`leanlm generate` on the real default model, and every kind of bad input the core issue names."""

import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

from leanlm.cli.main import main

pytestmark = pytest.mark.slow


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_greedy_streams_text(capsys, default_gguf_path):
    code, out, err = run_cli(
        capsys,
        "generate",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--model",
        str(default_gguf_path),
    )
    assert code == 0
    assert "Paris" in out
    assert "tok/s" in err


def test_generate_prompt_file_json(capsys, tmp_path, default_gguf_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, my name is\n\n1, 2, 3, 4,\n")
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(default_gguf_path),
        "--prompt-file",
        str(prompts),
        "--json",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "-q",
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["Hello, my name is", "1, 2, 3, 4,"]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in records)
    assert records[1]["text"].startswith(" 5")


def test_generate_chat_uses_template(capsys, default_gguf_path):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--chat",
        "What is the capital of France?",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "-q",
        "--model",
        str(default_gguf_path),
    )
    assert code == 0 and "Paris" in out


def test_chat_keeps_history(monkeypatch, capsys, default_gguf_path):
    import io

    from leanlm.engine.llm import LLM

    seen = []
    real_stream_chat = LLM.stream_chat

    def spy(self, messages, params=None):
        seen.append([dict(m) for m in messages])
        return real_stream_chat(self, messages, params)

    monkeypatch.setattr(LLM, "stream_chat", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\n/reset\nHi\nWhat is my name?\n"))
    code, out, _ = run_cli(
        capsys,
        "chat",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--system",
        "Be brief.",
        "--model",
        str(default_gguf_path),
    )
    assert code == 0
    assert [len(m) for m in seen] == [2, 2, 4]  # /reset dropped the first exchange, kept the system message
    assert seen[2][0] == {"role": "system", "content": "Be brief."}
    assert seen[2][2]["role"] == "assistant" and seen[2][2]["content"]
    assert f"\n{seen[2][2]['content']}\n" in out  # the streamed second answer, as printed, went into the history
    assert seen[2][3] == {"role": "user", "content": "What is my name?"}


def test_stop_string_never_leaks(capsys, default_gguf_path):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "1, 2, 3, 4, 5,",
        "--stop",
        " 8",
        "--max-tokens",
        "30",
        "--temperature",
        "0",
        "-q",
        "--model",
        str(default_gguf_path),
    )
    assert code == 0
    assert " 7," in out and " 8" not in out


# ---- bad input: a leanlm error that names the problem, no traceback, non-zero exit -------------------------


def write_gguf(path, arch):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert code == 1 and "not found" in err and "Traceback" not in err


def test_truncated_gguf(capsys, tmp_path, default_gguf_path):
    truncated = tmp_path / "truncated.gguf"
    with open(default_gguf_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(40_000_000))
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(truncated))
    assert code == 1 and "truncated" in err and "Download the file again" in err


def test_header_only_gguf(capsys, tmp_path, default_gguf_path):
    truncated = tmp_path / "header.gguf"
    with open(default_gguf_path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(100_000))  # cut inside the vocabulary
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(truncated))
    assert code == 1 and "truncated" in err


def test_not_a_gguf(capsys, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(bogus))
    assert code == 1 and "not a GGUF file" in err


def test_unknown_gguf_architecture(capsys, tmp_path):
    path = tmp_path / "gptj.gguf"
    write_gguf(path, "gptj")
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(path))
    assert code == 1 and "'gptj' is not supported" in err and "llama" in err


def test_unknown_config_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "vocab_size": 10}))
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tmp_path))
    assert code == 1 and "'gpt_neox' is not supported" in err


def test_folder_without_weights(capsys, tmp_path, default_gguf_path):
    shutil.copy(default_gguf_path.parent / default_gguf_path.name, tmp_path / "a.gguf")
    shutil.copy(default_gguf_path.parent / default_gguf_path.name, tmp_path / "b.gguf")
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tmp_path))
    assert code == 1 and "2 .gguf files" in err


def test_prompt_longer_than_context(capsys, tmp_path, default_gguf_path):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("word " * 9000)
    code, _, err = run_cli(capsys, "generate", "--prompt-file", str(long_prompt), "--model", str(default_gguf_path))
    assert code == 1 and "context window is 8192" in err and "Shorten the prompt" in err


@pytest.mark.parametrize(
    "flag,value,name",
    [("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--max-tokens", "0", "max_tokens")],
)
def test_invalid_sampling_parameters(capsys, flag, value, name):
    code, _, err = run_cli(capsys, "generate", "hi", flag, value)
    assert code == 1 and name in err


def test_real_process_exits_nonzero_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "leanlm.cli.main", "generate", "hi", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("leanlm: error:") and "Traceback" not in result.stderr


def test_help_explains_commands():
    result = subprocess.run(
        [sys.executable, "-m", "leanlm.cli.main", "generate", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for option in ("--model", "--dtype", "--device", "--threads", "--temperature", "--chat", "--prompt-file"):
        assert option in result.stdout

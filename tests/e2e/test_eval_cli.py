"""`leanlm eval` end to end on the default model: table, JSON file, baseline comparison, and clear errors."""

import json

import pytest

from leanlm.cli.main import main

pytestmark = pytest.mark.slow

TEXT = (
    "The Transformer architecture replaced recurrence with attention. Each layer lets every token look at every "
    "earlier token through scaled dot-product attention, and then passes the result through a small feed-forward "
    "network. At inference time text is produced one token at a time, and each new token must read every weight "
    "of the model once, so small models on ordinary CPUs are limited by memory bandwidth rather than arithmetic. "
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 2, encoding="utf-8")
    return path


def test_eval_on_the_default_corpus_prints_a_table_and_writes_json(default_gguf_path, tmp_path, capsys):
    out = tmp_path / "result.json"
    args = ["eval", "--model", str(default_gguf_path), "--max-tokens", "160", "--context", "96", "--stride", "48"]
    assert main([*args, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "perplexity" in captured.out and "bits / byte" in captured.out
    assert "tok" in captured.err  # the progress bar
    record = json.loads(out.read_text())
    assert record["corpus"] == "wiki" and record["corpus_path"].endswith("wiki.utf8")
    assert record["dtype"] == "bfloat16" and record["model"] == default_gguf_path.name
    assert (record["num_tokens"], record["context"], record["stride"]) == (159, 96, 48)
    assert 2 < record["perplexity"] < 100
    assert 0.3 < record["bits_per_byte"] < 2.0
    assert record["baseline"] is None and record["kl_mean"] is None


def test_eval_against_a_baseline(default_gguf_path, text_file, capsys):
    model = str(default_gguf_path)
    args = ["eval", "--model", model, "--baseline", model, "--baseline-dtype", "float32", "--text-file", str(text_file)]
    assert main([*args, "--max-tokens", "128", "--context", "64", "--stride", "32", "--quiet", "--json", "-"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert captured.err == ""  # --quiet: no progress bar
    assert record["corpus"] == "text-file" and record["corpus_path"] == str(text_file.resolve())
    assert (record["dtype"], record["baseline_dtype"]) == ("bfloat16", "float32")
    assert record["num_tokens"] == 127
    # bfloat16 against float32 of the same weights: close, but not identical.
    assert 0 < record["kl_mean"] < 0.05 and record["kl_max"] >= record["kl_mean"]
    assert 0.85 < record["top1_agreement"] <= 1.0
    assert 0.9 < record["ppl_ratio"] < 1.1
    assert record["ppl_ratio"] == pytest.approx(record["perplexity"] / record["baseline_perplexity"])


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--text-file", "/nonexistent/book.txt"], "Text file not found"),
        (["--context", "256", "--stride", "256"], "must be larger than --stride"),
        (["--context", "128", "--stride", "512"], "must be larger than --stride"),
        (["--stride", "0"], "--stride must be >= 1"),
        (["--max-tokens", "1"], "--max-tokens must be 0"),
        (["--corpus", "c4", "--text-file", "x.txt"], "either --text-file or --corpus"),
        (["--json", "/nonexistent/dir/out.json"], "does not exist"),
    ],
)
def test_bad_options_fail_with_a_clear_message_before_loading(extra, message, capsys):
    # --model points nowhere: these errors must come first, without loading or downloading anything.
    assert main(["eval", "--model", "/nonexistent/model.gguf", *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("leanlm: error: ") and message in err
    assert "Traceback" not in err


def test_empty_text_file_and_too_long_context_are_rejected(default_gguf_path, tmp_path, text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert main(["eval", "--model", str(default_gguf_path), "--text-file", str(empty)]) == 1
    assert "is empty" in capsys.readouterr().err
    args = ["eval", "--model", str(default_gguf_path), "--text-file", str(text_file), "--context", "100000"]
    assert main([*args, "--stride", "512"]) == 1
    err = capsys.readouterr().err
    assert "exceeds the model's context length (8192)" in err and "Traceback" not in err


def test_unknown_corpus_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--corpus", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err

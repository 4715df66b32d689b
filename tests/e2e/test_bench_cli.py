"""A short real `leanlm bench` run on the default model: table, JSON schema, plot."""

import json

import pytest

from leanlm.cli.main import main

pytestmark = pytest.mark.slow


def test_bench_writes_table_json_and_plot(tmp_path, capsys, default_gguf_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(
        [
            "bench",
            "--model",
            str(default_gguf_path),
            "--threads",
            "2",
            "-r",
            "2",
            "--prompt-tokens",
            "32",
            "--gen-tokens",
            "8",
            "--batch",
            "1,2",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "decode tok/s" in captured.out and "roofline" in captured.out
    report = json.loads(out_json.read_text())
    assert set(report) >= {"machine", "spec", "model", "bandwidth_gbs", "rows", "samples"}
    assert report["machine"]["threads"] == 2 and report["machine"]["torch"]
    assert report["bandwidth_gbs"] > 1
    assert [(r["engine"], r["batch"]) for r in report["rows"]] == [("leanlm", 1), ("leanlm", 2)]
    for row in report["rows"]:
        for metric in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mib"):
            assert row[metric]["n"] == 2 and row[metric]["min"] <= row[metric]["median"] <= row[metric]["max"]
        assert 0 < row["roofline_pct"] < 100
    assert len(report["samples"][0]["samples"]) == 2  # every raw sample is kept
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_peer(capsys):
    assert main(["bench", "--vs", "vllm"]) == 1
    assert "Unknown peer 'vllm'" in capsys.readouterr().err

"""The optimizer's report: the front PNG and a self-contained HTML page with every candidate, the choice, the
machine and the commands."""

import pytest
from test_optimize_search import TRUTH, FakeMeasurer, run

from leanlm.optimize.report import html_report, save_front_png


def test_report_lists_every_candidate_marks_the_choice_and_inlines_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result = run(FakeMeasurer(), tmp_path)
    png = save_front_png(
        result,
        tmp_path / "front.png",
        references=[{"label": "llama.cpp Q4_K_M", "kl_mean": 0.046, "decode_tok_s": 90.0}],
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html_report(result, png, {"cpu": "test CPU"}, ["leanlm optimize --max-kl 0.05 -o x"], "title")
    assert page.count("<tr><td>") == len(TRUTH)
    assert "<b>chosen</b>" in page and "data:image/png;base64," in page
    assert "test CPU" in page and "leanlm optimize --max-kl 0.05 -o x" in page
    assert "over budget" in page and "on the front" in page

"""`leanlm optimize`, `leanlm plan` and `leanlm eval --card` refuse bad input with a clear message, before any
model loads or anything is written."""

import pytest

from leanlm.cli.main import main


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["optimize"], "Give a quality budget"),
        (["optimize", "--max-kl", "0"], "--max-kl must be > 0"),
        (["optimize", "--min-top1", "1.5"], "--min-top1 must be in (0, 1]"),
        (["optimize", "--max-ppl-increase", "lots"], "percentage such as 2%"),
        (["optimize", "--max-kl", "0.05", "--formats", "q9"], "Unknown format(s) q9"),
        (["optimize", "--max-kl", "0.05", "--threads", "two"], "--threads takes integers"),
        (["optimize", "--max-kl", "0.05", "--eval-tokens", "8"], "--eval-tokens must be at least 64"),
        (["plan", "--batch", "0"], "must be >= 1"),
        (["optimize", "--max-kl", "0.05", "--kernels", "auto,fast"], "Unknown kernel mode 'fast'"),
    ],
)
def test_bad_input_gets_a_clear_error(arguments, message, tmp_path, capsys):
    extra = ["-o", str(tmp_path / "out")] if arguments[0] == "optimize" else []
    assert main([*arguments, *extra]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_card_on_a_folder_without_a_card(tmp_path, capsys):
    assert main(["eval", "--card", str(tmp_path)]) == 1
    assert "has no card.json" in capsys.readouterr().err

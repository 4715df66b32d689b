"""`leanlm prune` refuses bad input with a clear message before loading any model."""

import pytest

from leanlm.cli.main import main


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--method", "wanda", "--sparsity", "1.5"], "strictly between 0 and 1"),
        (["--method", "magnitude", "--sparsity", "0"], "strictly between 0 and 1"),
        (["--method", "sparsegpt", "--pattern", "3:2"], "0 < N < M"),
        (["--method", "structured", "--drop-heads", "1"], "remove them all"),
        (["--method", "layers", "--drop", "0"], "--drop N"),
        (["--method", "wanda", "--sparsity", "0.5", "--scope", "global"], "global threshold"),
    ],
)
def test_bad_input_gets_a_clear_error(arguments, message, tmp_path, capsys):
    assert main(["prune", *arguments, "-o", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--method", "optimal-brain", "-o", str(tmp_path / "out")])
    assert "invalid choice: 'optimal-brain'" in capsys.readouterr().err

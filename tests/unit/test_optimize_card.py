"""The quality card: card.json and README.md round trip, and `leanlm eval --card` passes an artifact that meets
its card and fails (exit status 1) one whose weights were damaged after it was written."""

import json

import pytest
import torch

from leanlm.cli.main import main
from leanlm.errors import InvalidRequestError
from leanlm.optimize.card import model_card_markdown, read_card, write_card_files
from leanlm.optimize.formats import FORMATS


def card_for(name: str, source: str, budget: dict, kl: float = 0.01) -> dict:
    quality = {"kl_mean": kl, "ppl_ratio": 1.004, "top1_agreement": 0.95, "eval_tokens": 127}
    return {
        "name": name,
        "source": source,
        "format": FORMATS["int8"].to_dict(),
        "candidate": {"format": "int8", "kv_cache": "auto", "threads": 2},
        "objective": "decode",
        "budget": budget,
        "budget_text": "KL <= 0.05",
        "quality": quality,
        "held_out_quality": {**quality, "meets_budget": True},
        "speed": {
            "decode_tok_s": 80.0,
            "prefill_tok_s": 300.0,
            "peak_rss_mib": 400.0,
            "prompt_tokens": 64,
            "gen_tokens": 32,
            "threads": 2,
            "samples": 2,
        },
        "disk_bytes": 150 * 2**20,
        "eval": {"corpus": "wiki", "context": 512, "stride": 256, "search_tokens": 127, "held_out_tokens": 128},
        "load": {"path": ".", "options": {"dtype": "bfloat16", "dequantize": False, "kv_cache": "auto", "threads": 2}},
        "command": f'leanlm generate --model {name} "Hello"',
        "machine": {"cpu": "test CPU", "cores": 2, "memory_gib": 8.0, "torch": torch.__version__, "python": "3.11"},
        "search": {"command": "leanlm optimize --max-kl 0.05 -o x", "front": ["int8.kv-auto.t2"]},
    }


def test_card_round_trip_and_model_card_format(tmp_path):
    card = card_for("out", "/models/m.gguf", {"max_kl": 0.05, "max_ppl_increase": None, "min_top1": None})
    write_card_files(tmp_path, card)
    folder, read = read_card(tmp_path)
    assert read == card and folder == tmp_path
    readme = (tmp_path / "README.md").read_text()
    assert readme == model_card_markdown(card)
    front_matter = readme.split("---")[1]
    assert "library_name: leanlm" in front_matter and "base_model: m.gguf" in front_matter
    assert "| search half | 127 | 0.0100 | 95.0% | 1.0040 |" in readme
    assert "| 80.0 | 300.0 | 400 MiB | 150.0 MiB |" in readme
    with pytest.raises(InvalidRequestError, match="has no card.json"):
        read_card(tmp_path / "elsewhere")


@pytest.mark.slow
def test_eval_card_passes_a_good_artifact_and_fails_a_damaged_one(default_gguf_path, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from leanlm.compress.config import QuantConfig
    from leanlm.compress.pipelines import quantize_to_folder

    folder = tmp_path / "artifact"
    quantize_to_folder(default_gguf_path, QuantConfig("int8"), folder, eval_tokens=0, progress=False, threads=2)
    budget = {"max_kl": 0.05, "max_ppl_increase": None, "min_top1": None}
    write_card_files(folder, card_for("artifact", str(default_gguf_path), budget))
    assert main(["eval", "--card", str(folder), "-n", "128", "-q"]) == 0
    assert "meets its card" in capsys.readouterr().out

    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith("mlp.down_proj.scale")][:6]:  # a damaged copy, say
        tensors[name] = tensors[name] * 1.5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "leanlm"})
    assert main(["eval", "--card", str(folder), "-n", "128", "-q", "--json", str(tmp_path / "check.json")]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT meet its card: KL" in out
    assert json.loads((tmp_path / "check.json").read_text())["meets"] is False

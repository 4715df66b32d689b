"""Mixed precision per layer: the knapsack allocation, the sensitivity probe, and a mixed artifact end to end on a
tiny random Llama (tests/tiny_model.py)."""

import itertools
import json

import pytest
import torch

from leanlm import LLM
from leanlm.compress.allocate import allocate_bits, stored_bytes
from leanlm.compress.artifact import save_quantized
from leanlm.compress.config import QuantConfig
from leanlm.compress.mixed import group_sizes, sensitivity_table
from leanlm.compress.quantize import quantize
from leanlm.compress.sensitivity import layer_sensitivity, probe_groups
from leanlm.errors import InvalidRequestError
from leanlm.layers.quantized_linear import QuantizedLinear
from tests.tiny_model import write_tiny_model

# ---- allocation ---------------------------------------------------------------------------------------------------


def fake_problem(n: int = 6, seed: int = 0):
    """n groups of different sizes; 8 bits cost about 1.8x 4 bits and cut the KL 10-20x."""
    g = torch.Generator().manual_seed(seed)
    kl, size = {}, {}
    for i in range(n):
        base = float(torch.rand(1, generator=g)) + 0.01
        params = 1000 * (1 + int(torch.randint(0, 4, (1,), generator=g)))
        kl[f"layers.{i}"] = {4: base, 8: base / (10 + 10 * float(torch.rand(1, generator=g)))}
        size[f"layers.{i}"] = {4: params, 8: int(params * 1.8)}
    return kl, size


def total(kl, size, allocation):
    return sum(kl[g][b] for g, b in allocation.items()), sum(size[g][b] for g, b in allocation.items())


def brute_force(kl, size, budget):
    groups = sorted(kl)
    best = None
    for choice in itertools.product(*(sorted(kl[g]) for g in groups)):
        allocation = dict(zip(groups, choice, strict=True))
        loss, used = total(kl, size, allocation)
        if used <= budget and (best is None or loss < best[0] - 1e-12):
            best = (loss, allocation)
    return best[0]


def test_allocation_respects_the_budget_is_optimal_and_monotone():
    kl, size = fake_problem()
    floor = sum(s[4] for s in size.values())
    ceiling = sum(s[8] for s in size.values())
    previous = None
    for budget in range(floor, ceiling + 1, (ceiling - floor) // 40):
        allocation = allocate_bits(kl, size, budget, unit=1)
        loss, used = total(kl, size, allocation)
        assert used <= budget
        assert loss == pytest.approx(brute_force(kl, size, budget), rel=1e-9)  # exact at unit = 1 byte
        if previous is not None:
            assert loss <= previous + 1e-12  # more bytes never cost quality
        previous = loss
    assert allocate_bits(kl, size, floor) == dict.fromkeys(kl, 4)
    assert allocate_bits(kl, size, ceiling) == dict.fromkeys(kl, 8)


def test_allocation_upgrades_the_most_sensitive_layer_first_and_rejects_a_budget_below_the_floor():
    kl = {"layers.0": {4: 0.01, 8: 0.001}, "layers.1": {4: 0.5, 8: 0.01}, "lm_head": {4: 0.05, 8: 0.002}}
    size = dict.fromkeys(kl, {4: 100, 8: 180})
    assert allocate_bits(kl, size, 380) == {"layers.0": 4, "layers.1": 8, "lm_head": 4}
    assert allocate_bits(kl, size, 460) == {"layers.0": 4, "layers.1": 8, "lm_head": 8}
    with pytest.raises(InvalidRequestError, match="below the smallest allocation"):
        allocate_bits(kl, size, 299)
    with pytest.raises(InvalidRequestError, match="same groups"):
        allocate_bits(kl, {"layers.0": {4: 1}}, 10)


def test_stored_bytes_counts_packed_codes_and_float16_parameters():
    assert stored_bytes(64, 256, 4, 32, symmetric=False) == 64 * 128 + 64 * 8 * 4
    assert stored_bytes(64, 256, 8, 32, symmetric=True) == 64 * 256 + 64 * 8 * 2
    assert stored_bytes(64, 256, 3, -1, symmetric=False) == 64 * 128 + 64 * 4  # 3-bit codes are packed as 4


def test_layer_bits_take_the_longest_matching_prefix():
    config = QuantConfig("int4", group_size=32, layer_bits=(("layers.1", 8), ("layers.1.mlp.down_proj", 5)))
    assert config.bits_for("layers.1.self_attn.qkv_proj") == 8
    assert config.bits_for("layers.1.mlp.down_proj") == 5
    assert config.bits_for("layers.10.mlp.down_proj") == 4  # "layers.1" is not a prefix of layer 10
    assert config.symmetric_for("layers.1.mlp.gate_up_proj") and not config.symmetric_for("lm_head")
    with pytest.raises(InvalidRequestError, match="int8 has nothing to upgrade"):
        QuantConfig("int8", mixed=0.1)
    with pytest.raises(InvalidRequestError, match="mixed_bits"):
        QuantConfig("int4", mixed=0.1, mixed_bits=4)


# ---- the probe and the artifact on a tiny model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def logits(llm, ids):
    with torch.inference_mode():
        return llm.model(ids, torch.arange(ids.shape[1])[None])[0].float()


IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))


def test_sensitivity_probe_measures_each_group_and_restores_the_weights(tiny_folder):
    llm = LLM(tiny_folder, dtype="float32", dequantize=True)
    before = logits(llm, IDS[:1])
    config = QuantConfig("int4", group_size=32)
    report = layer_sensitivity(llm.model, config, IDS, (2, 4, 8))
    assert set(report) == {"layers.0", "layers.1", "lm_head"}
    for group, kl in report.items():
        assert kl[2] > kl[4] > kl[8] >= 0, group  # more bits, closer to the original
        assert kl[4] > 1e-5, group
    assert torch.equal(logits(llm, IDS[:1]), before)
    per_tensor = QuantConfig("int4", group_size=32, mixed=0.1, mixed_granularity="tensor")
    assert len(probe_groups(llm.model, per_tensor)) == 2 * 4 + 1


def test_a_mixed_artifact_reloads_with_the_same_logits_and_per_layer_kernels(tiny_folder, tmp_path):
    llm = LLM(tiny_folder, dtype="float32", dequantize=True)
    config = QuantConfig("int4", group_size=32, layer_bits=(("layers.1", 8), ("lm_head", 8)))
    quantize(llm, config)
    layers = {n: m for n, m in llm.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert {n: m.bits for n, m in layers.items() if m.bits == 8}.keys() == {
        "layers.1.self_attn.qkv_proj",
        "layers.1.self_attn.o_proj",
        "layers.1.mlp.gate_up_proj",
        "layers.1.mlp.down_proj",
        "lm_head",
    }
    folder = save_quantized(llm, tmp_path / "mixed", {"method": "int4", "bits": 4, "group_size": 32})
    manifest = json.loads((folder / "quantization.json").read_text())
    assert manifest["layers"]["layers.1.mlp.down_proj"]["bits"] == 8
    assert manifest["layers"]["layers.0.mlp.down_proj"]["bits"] == 4
    assert manifest["embedding"] == {"bits": 8, "group_size": 32, "symmetric": True}  # int8 rows, Q8_0's layout
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "embed_tokens.weight" not in f.keys()
        assert f.get_tensor("embed_tokens.codes").dtype == torch.int8
        assert f.get_tensor("layers.0.mlp.down_proj.scale").dtype == torch.float16  # float16 scales and offsets
        assert f.get_tensor("layers.0.mlp.down_proj.offset").dtype == torch.float16
    loaded = LLM(folder, dtype="float32")
    assert torch.equal(logits(loaded, IDS[:1]), logits(llm, IDS[:1]))
    kernels = {n: m.kernel for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)}
    if kernels["layers.0.mlp.down_proj"].startswith("leanlm"):  # leanlm's kernels built on this machine
        assert kernels["layers.1.mlp.down_proj"] == "leanlm-q8" and kernels["layers.0.mlp.down_proj"] == "leanlm-q4"


def test_quantize_to_folder_allocates_bits_within_the_size_margin(tiny_folder, tmp_path):
    from leanlm.compress.pipelines import quantize_to_folder

    config = QuantConfig("int4", group_size=32, mixed=0.3, sensitivity_samples=2, sensitivity_length=32)
    manifest = quantize_to_folder(tiny_folder, config, tmp_path / "out", eval_tokens=0, progress=False)
    mixed = manifest["mixed"]
    assert mixed["allocated_bytes"] <= mixed["budget_bytes"] == int(mixed["uniform_bytes"] * 1.3)
    assert mixed["predicted_kl_sum"]["mixed"] < mixed["predicted_kl_sum"]["uniform"]
    upgraded = {row["group"] for row in mixed["groups"] if row["bits"] == 8}
    assert upgraded and len(upgraded) < len(mixed["groups"])  # some layers, not all, within +30%
    for name, layer in manifest["layers"].items():
        group = name if name == "lm_head" else ".".join(name.split(".")[:2])
        assert layer["bits"] == (8 if group in upgraded else 4), name
    llm = LLM(tiny_folder, dtype="float32", dequantize=True)
    assert (
        sum(group_sizes(llm.model, config, (4,))[g][4] for g in probe_groups(llm.model, config))
        == mixed["uniform_bytes"]
    )
    assert "KL@4bit" in sensitivity_table(mixed) and "layers.1" in sensitivity_table(mixed)
    LLM(tmp_path / "out").generate("w1 w2 w3")  # the folder loads and runs


def test_sensitivity_command_prints_and_writes_the_kl_report(tiny_folder, tmp_path, capsys):
    from leanlm.cli.main import main

    out = tmp_path / "report.json"
    assert (
        main(
            [
                "sensitivity",
                "--model",
                str(tiny_folder),
                "--bits",
                "4,8",
                "--samples",
                "1",
                "--length",
                "32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [row["group"] for row in report["groups"]] == ["layers.0", "layers.1", "lm_head"]
    assert all(row["kl"]["4"] > row["kl"]["8"] for row in report["groups"])
    assert "KL@8bit" in capsys.readouterr().out

    from leanlm.compress.pipelines import quantize_to_folder

    # quantize --mixed reuses the report instead of probing again; a report for other groups is refused
    config = QuantConfig("int4", group_size=32, mixed=0.3)
    manifest = quantize_to_folder(tiny_folder, config, tmp_path / "q", eval_tokens=0, progress=False, sensitivity=out)
    assert [row["kl"] for row in manifest["mixed"]["groups"]] == [row["kl"] for row in report["groups"]]
    with pytest.raises(InvalidRequestError, match="the group size"):
        quantize_to_folder(
            tiny_folder, QuantConfig("int4", group_size=64, mixed=0.3), tmp_path / "r", eval_tokens=0, sensitivity=out
        )


def test_mixed_formats_join_optimize_search_space():
    from leanlm.optimize.formats import FORMATS

    spec = FORMATS["gptq4-g32-mix10"]
    assert spec.quant_config().mixed == 0.1 and spec.quant_config().mixed_bits == 8
    assert spec.at_least_as_fine_as(FORMATS["gptq4-g32"])  # a failed mixed format rules out the uniform one
    assert not FORMATS["gptq4-g32"].at_least_as_fine_as(spec)


def test_the_int8_embedding_shrinks_the_artifact_and_costs_little(tiny_folder, tmp_path):
    sizes, outputs = {}, {}
    for bits in (0, 8):
        llm = LLM(tiny_folder, dtype="float32", dequantize=True)
        quantize(llm, QuantConfig("int4", group_size=32, embedding_bits=bits))
        folder = save_quantized(llm, tmp_path / f"e{bits}", {"method": "int4"})
        sizes[bits] = (folder / "model.safetensors").stat().st_size
        loaded = LLM(folder, dtype="float32")
        outputs[bits] = logits(loaded, IDS[:1]).log_softmax(-1)
        assert torch.equal(logits(loaded, IDS[:1]), logits(llm, IDS[:1]))
    table = 256 * 64
    assert sizes[0] - sizes[8] > table * (2 - 1.1)  # bfloat16 (2 bytes) -> int8 + a float16 scale per 32
    kl = (outputs[0].exp() * (outputs[0] - outputs[8])).sum(-1).mean()
    assert kl < 0.01, kl  # measured 0.003 on this random model, whose std-1 embedding feeds every layer


def test_a_tied_head_runs_on_the_int8_embedding_codes_stored_once(tiny_folder, tmp_path):
    from safetensors import safe_open

    llm = LLM(tiny_folder, dtype="float32", dequantize=True)
    llm.model.lm_head.weight = llm.model.embed_tokens.weight  # a tied model, as SmolLM2 and Gemma are
    report = quantize(llm, QuantConfig("int4", group_size=32))
    head = llm.model.lm_head
    assert isinstance(head, QuantizedLinear) and head.bits == 8 and head.offset is None  # the embedding's int8 rows
    assert torch.equal(head.dequantize(), llm.model.embed_tokens.weight)
    assert report["quantized_layers"] == 2 * 4 + 1
    folder = save_quantized(llm, tmp_path / "tied", {"method": "int4"})
    manifest = json.loads((folder / "quantization.json").read_text())
    assert manifest["embedding"]["tied_to"] == "lm_head" and manifest["layers"]["lm_head"]["bits"] == 8
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert not any(k.startswith("embed_tokens") for k in f.keys())  # stored once, as the head
    loaded = LLM(folder, dtype="float32")
    assert torch.equal(logits(loaded, IDS[:1]), logits(llm, IDS[:1]))
    if loaded.model.layers[0].mlp.down_proj.kernel.startswith("leanlm"):
        assert loaded.model.lm_head.kernel == "leanlm-q8"  # the head runs on the quantized kernels


def test_quantize_command_prints_the_allocation(tiny_folder, tmp_path, capsys):
    from leanlm.cli.main import main

    out = tmp_path / "cli-mixed"
    args = ["quantize", "--model", str(tiny_folder), "--method", "int4", "--group-size", "32", "--mixed", "30%"]
    assert main([*args, "--sensitivity-samples", "1", "--eval-tokens", "0", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KL@8bit" in printed and "groups at 8 bits" in printed
    assert json.loads((out / "quantization.json").read_text())["config"]["mixed"] == 0.3

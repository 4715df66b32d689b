"""GPTQ and AWQ on random matrices with correlated inputs: both must beat round-to-nearest on the output error."""

from types import SimpleNamespace

import pytest
import torch

from leanlm.compress.awq import search_scales, tie_heads
from leanlm.compress.calibrated import calibration_tensor, quantize_weights_calibrated
from leanlm.compress.config import QuantConfig
from leanlm.compress.gptq import accumulate_hessian, gptq_quantize
from leanlm.compress.quantize import install, target_linears
from leanlm.compress.rtn import quantize_rtn
from leanlm.config import ModelConfig
from leanlm.errors import CalibrationError, InvalidRequestError
from leanlm.layers.quantized_linear import QuantizedTensor
from leanlm.models.llama import LlamaForCausalLM

ROWS, COLS, TOKENS = 96, 256, 2048


def correlated_inputs(seed: int = 0, tokens: int = TOKENS, cols: int = COLS) -> torch.Tensor:
    """Inputs with a few loud channels and strong correlations, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    loudness = torch.ones(cols)
    loudness[torch.randperm(cols, generator=g)[:8]] = 10.0
    return (torch.randn(tokens, cols, generator=g) @ mixing) * loudness


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs()
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian, count = None, 0
    for chunk in x.split(500):  # uneven chunks: the running average must equal the one-shot formula
        hessian, count = accumulate_hessian(hessian, count, chunk)
    return x, weight, hessian


def output_error(x: torch.Tensor, weight: torch.Tensor, q: QuantizedTensor) -> float:
    return (x @ weight.T - x @ q.dequantize().T).norm().item()


def check_valid(q: QuantizedTensor, rows: int, cols: int, bits: int, group: int) -> None:
    assert q.codes.shape == (rows, cols) and q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= 2**bits - 1
    groups = -(-cols // group)  # the last group may be shorter
    assert q.scale.shape == (rows, groups) and q.offset.shape == (rows, groups)
    assert q.bits == bits and q.group_size == group
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all() and torch.isfinite(q.offset).all()


def test_hessian_is_twice_the_input_covariance(problem):
    x, _, hessian = problem
    torch.testing.assert_close(hessian, 2 * x.double().T @ x.double() / x.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits, group", [(4, 64), (3, 128), (4, -1)])
def test_gptq_beats_round_to_nearest(problem, bits, group):
    x, weight, hessian = problem
    gptq = gptq_quantize(weight, hessian, bits, group)
    rtn = quantize_rtn(weight, bits, group, symmetric=False)
    group = COLS if group == -1 else group
    check_valid(gptq, ROWS, COLS, bits, group)
    gptq_error, rtn_error = output_error(x, weight, gptq), output_error(x, weight, rtn)
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


def test_gptq_act_order_is_valid_and_beats_round_to_nearest(problem):
    x, weight, hessian = problem
    ordered = gptq_quantize(weight, hessian, 4, 64, act_order=True)
    check_valid(ordered, ROWS, COLS, 4, 64)
    ordered_error = output_error(x, weight, ordered)
    rtn_error = output_error(x, weight, quantize_rtn(weight, 4, 64, False))
    assert ordered_error < 0.9 * rtn_error, (ordered_error, rtn_error)
    assert not torch.equal(ordered.codes, gptq_quantize(weight, hessian, 4, 64).codes)  # the order did change


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_weights_lie_on_their_own_grid(problem, act_order):
    """Rounding the dequantized weights with the stored scale and offset gives back the stored codes."""
    _, weight, hessian = problem
    q = gptq_quantize(weight, hessian, 4, 64, act_order=act_order)
    rows, cols = q.codes.shape
    w = q.dequantize().view(rows, cols // 64, 64)
    recovered = torch.round((w - q.offset.unsqueeze(-1)) / q.scale.unsqueeze(-1)).view(rows, cols)
    assert torch.equal(recovered.to(torch.uint8), q.codes)


def test_gptq_symmetric_codes(problem):
    x, weight, hessian = problem
    q = gptq_quantize(weight, hessian, 4, 64, symmetric=True)
    assert q.offset is None and q.codes.dtype == torch.int8 and int(q.codes.abs().max()) <= 7
    assert output_error(x, weight, q) < output_error(x, weight, quantize_rtn(weight, 4, 64, True))


def test_gptq_dead_columns_are_zero(problem):
    x, weight, _ = problem
    x = x.clone()
    x[:, :5] = 0.0
    hessian, _ = accumulate_hessian(None, 0, x)
    q = gptq_quantize(weight, hessian, 4, 64)
    check_valid(q, ROWS, COLS, 4, 64)
    assert q.dequantize()[:, :5].abs().max() <= q.scale[:, 0].max()  # zeroed, up to one grid step
    assert output_error(x, weight, q) < output_error(x, weight, quantize_rtn(weight, 4, 64, False))


def test_gptq_with_a_shorter_last_group(problem):
    """256 columns in groups of 96: two of 96 and one of 64, as rtn.py lays them out."""
    x, weight, hessian = problem
    for act_order in (False, True):
        q = gptq_quantize(weight, hessian, 4, 96, act_order=act_order)
        check_valid(q, ROWS, COLS, 4, 96)
        per_column_scale, per_column_offset = q.per_column(q.scale), q.per_column(q.offset)
        recovered = torch.round((q.dequantize() - per_column_offset) / per_column_scale)
        assert torch.equal(recovered.to(torch.uint8), q.codes)
        assert output_error(x, weight, q) < output_error(x, weight, quantize_rtn(weight, 4, 96, False))


def test_gptq_rejects_a_group_size_that_is_not_a_multiple_of_8(problem):
    _, weight, hessian = problem
    with pytest.raises(InvalidRequestError, match="multiple of 8"):
        gptq_quantize(weight, hessian, 4, 12)


def test_awq_never_does_worse_than_round_to_nearest(problem):
    x, weight, _ = problem
    result = search_scales(x, weight, 4, 64)
    rtn = quantize_rtn(weight, 4, 64, False)
    assert result.rtn_error == pytest.approx(output_error(x, weight, rtn) ** 2 / (TOKENS * ROWS), rel=1e-4)
    assert result.error <= result.rtn_error
    assert result.alpha > 0 and result.error < 0.9 * result.rtn_error  # loud channels: scaling helps
    assert result.scales.shape == (COLS,) and (result.scales > 0).all()
    scaled = quantize_rtn(weight * result.scales, 4, 64, False)
    check_valid(scaled, ROWS, COLS, 4, 64)
    approx = scaled.dequantize() / result.scales
    assert (x @ (weight - approx).T).pow(2).mean().item() == pytest.approx(result.error, rel=1e-4)


def test_awq_keeps_scale_one_when_inputs_are_flat():
    x = torch.ones(64, COLS)  # every channel equally loud: scaling changes nothing, alpha 0 wins ties
    weight = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(2))
    result = search_scales(x, weight, 4, 64)
    assert result.alpha == 0.0 and torch.equal(result.scales, torch.ones(COLS))


def test_awq_tied_scales_are_shared_per_kv_head():
    heads, kv_heads, dim = 6, 2, 8
    x = correlated_inputs(seed=3, tokens=512, cols=heads * dim).abs()
    weight = torch.randn(32, heads * dim, generator=torch.Generator().manual_seed(4))
    tie, to_v = tie_heads(heads, kv_heads)
    scales = search_scales(x, weight, 4, 16, tie=tie).scales.view(heads, dim)
    for h in range(heads):  # q head h reads kv head h // 3
        torch.testing.assert_close(scales[h], scales[(h // 3) * 3])
    assert to_v(scales.flatten()).shape == (kv_heads * dim,)


# ---- the layer-by-layer driver on a tiny random Llama -------------------------------------------------------------


def tiny_llm(attention_bias: bool = True) -> SimpleNamespace:
    config = ModelConfig(
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        context_length=256,
        attention_bias=attention_bias,
    )
    model = LlamaForCausalLM(config).eval()
    seeded_init(model, seed=0)
    return SimpleNamespace(model=model, tokenizer=None)


def seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Set every parameter from a seeded generator: nothing may come from the constructor's uninitialized memory
    (an embedding built on torch.empty) or from the global RNG's state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # RMSNorm weights of a trained model are far from all-ones
                param.uniform_(0.5, 2.0, generator=g)
            elif name.endswith("bias"):
                param.normal_(0, 0.5, generator=g)
            elif "embed" in name:
                param.normal_(0, 1.0, generator=g)
            else:  # nn.Linear's own range, U(-1/sqrt(in), 1/sqrt(in))
                bound = param.shape[1] ** -0.5
                param.uniform_(-bound, bound, generator=g)


def test_tiny_model_is_fully_and_reproducibly_initialized():
    garbage = torch.full((128 * 64,), float("nan"))  # NaNs on the heap, where an embedding on torch.empty may land
    del garbage
    first, second = tiny_llm().model.state_dict(), tiny_llm().model.state_dict()
    for name, tensor in first.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, second[name]), name


CALIBRATION = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.mark.parametrize("method, act_order", [("gptq", False), ("gptq", True), ("awq", False)])
def test_driver_quantizes_every_target_linear(method, act_order):
    llm = tiny_llm()
    ids = torch.tensor(CALIBRATION)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.inference_mode():
        expected = llm.model(ids, positions)
    config = QuantConfig(method, group_size=32, act_order=act_order)
    names = set(target_linears(llm.model, config))
    quantized = quantize_weights_calibrated(llm, config, CALIBRATION)
    assert set(quantized) == names
    for name, q in quantized.items():
        linear = llm.model.get_submodule(name)
        check_valid(q, linear.out_features, linear.in_features, 4, 32)
    with torch.inference_mode():
        if method == "awq":  # scales folded into norms and weights: the float function is unchanged
            torch.testing.assert_close(llm.model(ids, positions), expected, rtol=1e-4, atol=1e-4)
        install(llm.model, quantized)
        logits = llm.model(ids, positions)
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.5


def test_gptq_names_the_layer_when_its_hessian_is_not_finite():
    llm = tiny_llm()
    with torch.no_grad():
        llm.model.embed_tokens.weight[CALIBRATION[0][0]] = float("nan")  # one poisoned token reaches every layer
    with pytest.raises(CalibrationError, match=r"layers\.0\.self_attn\.qkv_proj.*non-finite.*NaN or infinity"):
        quantize_weights_calibrated(llm, QuantConfig("gptq", group_size=32), CALIBRATION)


def test_gptq_refuses_a_non_finite_hessian(problem):
    _, weight, hessian = problem
    hessian = hessian.clone()
    hessian[3, 5] = float("inf")
    with pytest.raises(CalibrationError, match="Hessian of mlp.down_proj has 1 non-finite"):
        gptq_quantize(weight, hessian, 4, 64, name="mlp.down_proj")


def test_driver_rejects_a_bad_group_size_before_calibrating():
    config = QuantConfig("gptq")
    object.__setattr__(config, "group_size", 12)  # past QuantConfig's own validation, as a hand-built config could be
    with pytest.raises(InvalidRequestError, match="self_attn.qkv_proj.*multiple of 8"):
        quantize_weights_calibrated(tiny_llm(), config)  # no tokenizer needed to fail


def test_calibration_windows_are_deterministic(monkeypatch):
    import leanlm.formats.corpus as corpus

    monkeypatch.setattr(corpus, "calibration_text", lambda quiet=False: "".join(chr(65 + i % 50) for i in range(5000)))
    llm = SimpleNamespace(tokenizer=SimpleNamespace(encode=lambda text: [ord(c) for c in text]))
    config = QuantConfig("gptq", calibration_samples=6, calibration_length=40, seed=1)
    first = calibration_tensor(llm, config, None)
    assert first.shape == (6, 40)
    assert torch.equal(first, calibration_tensor(llm, config, None))
    assert not torch.equal(first, calibration_tensor(llm, QuantConfig("gptq", calibration_length=40, seed=2), None)[:6])
    with pytest.raises(InvalidRequestError, match="calibration_length"):
        calibration_tensor(llm, QuantConfig("gptq", calibration_length=6000), None)

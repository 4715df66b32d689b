"""Pruning without a model: validated config, exact mask counts, the sparse storage format, SparseGPT and repair
on small random problems, head/channel choice under grouped-query attention."""

import pytest
import torch

from leanlm.compress.prune.config import PruneConfig, parse_pattern
from leanlm.compress.prune.masks import global_masks, layer_mask, nm_mask, row_mask
from leanlm.compress.prune.repair import refit
from leanlm.compress.prune.sparsegpt import sparsegpt_prune
from leanlm.compress.prune.structured import Shape, choose_heads, target_shape
from leanlm.config import ModelConfig
from leanlm.errors import InvalidRequestError, ModelFormatError
from leanlm.formats.sparse_folder import pack_sparse, unpack_sparse

SMOL = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 8192)


# ---- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval_is_refused(sparsity):
    with pytest.raises(InvalidRequestError, match="strictly between 0 and 1"):
        PruneConfig("wanda", sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["3:2", "2:2", "0:4", "2-4", "a:b", "2:4:8"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(InvalidRequestError, match="N:M|Pattern"):
        PruneConfig("sparsegpt", pattern=pattern)


def test_pattern_sets_the_sparsity_and_conflicts_are_named():
    assert PruneConfig("magnitude", pattern="2:4").sparsity == 0.5
    assert PruneConfig("magnitude", pattern="4:8").nm == (4, 8)
    assert parse_pattern("1:4") == (1, 4)
    with pytest.raises(InvalidRequestError, match="means sparsity 0.5"):
        PruneConfig("magnitude", pattern="2:4", sparsity=0.3)


def test_unknown_method_and_options_of_another_method_are_refused():
    with pytest.raises(InvalidRequestError, match="Unknown pruning method 'optimal-brain'"):
        PruneConfig("optimal-brain", sparsity=0.5)
    with pytest.raises(InvalidRequestError, match="--method structured"):
        PruneConfig("wanda", sparsity=0.5, drop_heads=0.25)
    with pytest.raises(InvalidRequestError, match="magnitude, wanda and sparsegpt"):
        PruneConfig("structured", drop_heads=0.25, sparsity=0.5)
    with pytest.raises(InvalidRequestError, match="global threshold"):
        PruneConfig("wanda", sparsity=0.5, scope="global")


def test_scope_defaults_follow_the_method():
    assert PruneConfig("wanda", sparsity=0.5).scope == "row"
    assert PruneConfig("sparsegpt", sparsity=0.5).scope == "layer"
    assert PruneConfig("magnitude", sparsity=0.5, scope="global").scope == "global"


def test_dropping_everything_is_refused():
    with pytest.raises(InvalidRequestError, match="remove them all"):
        PruneConfig("structured", drop_heads=1.0)
    with pytest.raises(InvalidRequestError, match="above 0"):
        PruneConfig("structured")
    with pytest.raises(InvalidRequestError, match="--drop N"):
        PruneConfig("layers", drop_layers=0)
    with pytest.raises(InvalidRequestError, match="every head"):
        target_shape(SMOL, PruneConfig("structured", drop_heads=0.9))  # 3 of 3 query heads per group
    with pytest.raises(InvalidRequestError, match="every head"):
        target_shape(SMOL, PruneConfig("structured", drop_heads=0.9, head_unit="kv"))


def test_target_shape_keeps_groups_uniform_and_channels_round():
    assert target_shape(SMOL, PruneConfig("structured", drop_heads=0.25)) == Shape(2, 3, 1536)
    assert target_shape(SMOL, PruneConfig("structured", drop_heads=0.25, head_unit="kv")) == Shape(3, 2, 1536)
    assert target_shape(SMOL, PruneConfig("structured", drop_mlp=0.25)) == Shape(3, 3, 1152)
    assert target_shape(SMOL, PruneConfig("structured", drop_mlp=0.3)).intermediate_size % 32 == 0
    assert target_shape(SMOL, PruneConfig("layers", drop_layers=4)) == Shape(3, 3, 1536)


# ---- masks --------------------------------------------------------------------------------------------------------


def test_masks_keep_exact_counts_even_with_ties():
    scores = torch.randint(0, 4, (64, 96)).float()  # few distinct values, like dequantized GGUF weights
    assert (row_mask(scores, 0.5).sum(1) == 48).all()
    assert layer_mask(scores, 0.25).sum() == 64 * 96 * 3 // 4
    mask = nm_mask(scores, 2, 4)
    assert (mask.view(64, 24, 4).sum(-1) == 2).all()
    assert (nm_mask(scores, 4, 8).view(64, 12, 8).sum(-1) == 4).all()


def test_nm_mask_keeps_the_largest_of_each_group():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0, 0.5, 9.0, 8.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, True, False, False, False, True, True]]


def test_nm_width_must_divide():
    with pytest.raises(InvalidRequestError, match="groups of 8"):
        nm_mask(torch.rand(4, 12), 4, 8)


def test_global_masks_prune_the_exact_fraction_overall():
    scores = {"a": torch.randint(0, 3, (10, 20)).float(), "b": torch.randint(0, 3, (30, 7)).float() * 2}
    masks = global_masks(scores, 0.4)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == 410 - round(410 * 0.4)
    # everything kept scores at least as high as everything pruned
    low_kept = min(scores[n][masks[n]].min() for n in scores)
    high_pruned = max(scores[n][~masks[n]].max() for n in scores)
    assert low_kept >= high_pruned


# ---- storage ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_format_round_trips_and_is_compact(dtype):
    weight = torch.randn(24, 37).to(dtype)
    weight[torch.rand(24, 37) < 0.5] = 0
    bitmap, values = pack_sparse(weight)
    assert bitmap.shape == (24, 5) and bitmap.dtype == torch.uint8
    assert values.numel() == int((weight != 0).sum())
    assert torch.equal(unpack_sparse(bitmap, values, (24, 37)), weight)


def test_sparse_format_detects_corruption():
    bitmap, values = pack_sparse(torch.tensor([[1.0, 0.0, 2.0]]))
    with pytest.raises(ModelFormatError, match="corrupt"):
        unpack_sparse(bitmap, values[:1], (1, 3))


# ---- SparseGPT and repair -----------------------------------------------------------------------------------------


def _correlated_inputs(n: int, k: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, k) @ (torch.randn(k, k) / k**0.5 + torch.eye(k))


@pytest.mark.parametrize("options", [{"sparsity": 0.5}, {"sparsity": 0.5, "nm": (2, 4)}, {"sparsity": 0.25}])
def test_sparsegpt_beats_magnitude_on_output_error(options):
    x = _correlated_inputs(512, 64)
    weight = torch.randn(32, 64)
    hessian = 2 * x.T.double() @ x.double() / x.shape[0]
    pruned = sparsegpt_prune(weight, hessian, block_size=16, **options)
    if "nm" in options:
        assert ((pruned != 0).view(32, 16, 4).sum(-1) <= 2).all()
        magnitude = weight * nm_mask(weight.abs(), 2, 4)
    else:
        assert int((pruned == 0).sum()) == round(weight.numel() * options["sparsity"])
        magnitude = weight * layer_mask(weight.abs(), options["sparsity"])
    error = (x @ (weight - pruned).T).pow(2).mean()
    assert error < 0.8 * (x @ (weight - magnitude).T).pow(2).mean()


def test_refit_recovers_a_linear_target_and_keeps_weights_without_signal():
    x = _correlated_inputs(256, 16)
    target_weight = torch.randn(8, 16)
    start = torch.randn(8, 16)
    fitted = refit(start, x, x @ target_weight.T, damp=0.0)
    torch.testing.assert_close(fitted, target_weight, atol=1e-3, rtol=1e-3)
    x[:, 3] = 0  # a silent input: the ridge keeps its current weights
    fitted = refit(start, x, x @ target_weight.T, damp=1e-3)
    torch.testing.assert_close(fitted[:, 3], start[:, 3])


def test_choose_heads_respects_groups():
    energy = torch.tensor([1.0, 5.0, 3.0, 0.1, 0.2, 0.3, 9.0, 8.0, 7.0])  # 3 KV groups of 3 query heads
    assert choose_heads(energy, 3, Shape(2, 3, 1)) == ([1, 2, 4, 5, 6, 7], [0, 1, 2])
    assert choose_heads(energy, 3, Shape(3, 2, 1)) == ([0, 1, 2, 6, 7, 8], [0, 2])


def test_sparsegpt_names_a_non_finite_hessian():
    from leanlm.errors import CalibrationError

    hessian = torch.eye(64)
    hessian[3, 5] = float("nan")
    with pytest.raises(
        CalibrationError, match="SparseGPT: the Hessian of a \\(16 x 64\\) linear layer has 1 non-finite"
    ):
        sparsegpt_prune(torch.randn(16, 64), hessian, 0.5)

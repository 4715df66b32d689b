"""Build the engine's Speculator from EngineConfig.speculative: ngram, self[:N] or draft:MODEL."""

from __future__ import annotations

import copy

import torch
from torch import nn

from leanlm.cache.block_manager import BlockManager
from leanlm.cache.kv_cache import default_cache_dtype
from leanlm.cache.paged_kv import PagedKVCache
from leanlm.config import EngineConfig, check_speculative
from leanlm.engine.speculative.model_drafter import ModelDrafter, first_layers
from leanlm.engine.speculative.ngram import NgramDrafter
from leanlm.engine.speculative.speculator import Speculator
from leanlm.errors import InvalidRequestError
from leanlm.formats.tokenizer import Tokenizer

DEFAULT_DRAFT_TOKENS = 5  # a model drafter's cap without num_speculative_tokens (prompt lookup sizes its own)

# Text whose tokens a draft model's tokenizer must give exactly as the target's does.
TOKENIZER_PROBE = "Hello, world! def add(a, b):\n    return a + b  # 123 éà 你好"


def build_speculator(
    config: EngineConfig,
    model: nn.Module,
    tokenizer: Tokenizer,
    cache: PagedKVCache,
    blocks: BlockManager,
    draft_model: nn.Module | None = None,
) -> Speculator:
    """draft_model: an already built model for `draft:...` (the name after the colon is then only a label)."""
    method = config.speculative
    check_speculative(method)
    kind, _, arg = method.partition(":")
    if kind == "ngram":
        drafter = NgramDrafter()
    elif kind == "self" and (arg == "int4" or (not arg and not _quantized(model))):
        drafter = _separate_drafter("self:int4", quantized_copy(model), model, blocks)
    elif kind == "self":
        layers = int(arg) if arg else max(1, len(model.layers) // 2)
        if not 0 < layers < len(model.layers):
            raise InvalidRequestError(
                f"--speculative self:{layers}: the model has {len(model.layers)} layers; a self-draft uses fewer "
                f"(1..{len(model.layers) - 1})."
            )
        shallow = first_layers(model, layers)
        drafter = ModelDrafter(f"self:{layers}", shallow, first_layers_cache(cache, layers), blocks, shares_cache=True)
    else:
        if draft_model is None:
            draft_model, draft_tokenizer = load_draft_model(arg, model)
            check_same_tokenizer(tokenizer, draft_tokenizer, arg)
        drafter = _separate_drafter(f"draft:{arg}", draft_model, model, blocks)
    max_tokens = config.num_speculative_tokens or getattr(drafter, "default_max_tokens", DEFAULT_DRAFT_TOKENS)
    return Speculator(drafter, max_tokens, config.speculative_adaptive)


def _quantized(model: nn.Module) -> bool:
    from leanlm.layers.quantized_linear import QuantizedLinear

    return any(isinstance(m, QuantizedLinear) for m in model.layers.modules())


def quantized_copy(model: nn.Module, bits: int = 4, group_size: int = 32) -> nn.Module:
    """The model with every projection and the head quantized by round-to-nearest (compress/rtn.py), for drafting:
    new modules around the target's, whose own tensors are left untouched."""
    from leanlm.compress.config import QuantConfig
    from leanlm.compress.quantize import install, quantize_weights_rtn, target_linears
    from leanlm.models.registry import prepare_runtime

    if model.plan is None:
        raise InvalidRequestError("self:int4 needs a model loaded by LLM(...) (it reuses the model's runtime plan).")
    # embedding_bits=0: the draft's head is quantized like its projections, not tied to an int8 embedding
    config = QuantConfig("int4", bits=bits, group_size=group_size, embedding_bits=0)
    targets = target_linears(model, config)
    quantized = quantize_weights_rtn(model, config)
    # Copy everything except the dense projections (about to be replaced: no need to copy gigabytes of them).
    draft = copy.deepcopy(model, memo={id(linear): linear for linear in targets.values()})
    install(draft, quantized)
    prepare_runtime(draft, model.plan.for_weights(quantized=True))
    return draft


def first_layers_cache(cache: PagedKVCache, num_layers: int) -> PagedKVCache:
    """The same cache seen through its first num_layers layers (views: writes land in the target's cache)."""
    view = copy.copy(cache)
    for name in ("keys", "values", "key_scales", "value_scales"):
        if hasattr(cache, name):
            setattr(view, name, getattr(cache, name)[:num_layers])
    return view


def _separate_drafter(name: str, draft: nn.Module, target: nn.Module, target_blocks: BlockManager) -> ModelDrafter:
    if draft.config.vocab_size > target.config.vocab_size:
        raise InvalidRequestError(
            f"The draft model's vocabulary ({draft.config.vocab_size}) is larger than the target's "
            f"({target.config.vocab_size}); pick a draft model of the same family that shares the tokenizer."
        )
    param = next(draft.parameters())
    mc = draft.config
    # As many tokens as the target's cache: every running request can draft.
    cache = PagedKVCache(
        mc.num_layers,
        target_blocks.num_blocks,
        target_blocks.block_size,
        mc.num_kv_heads,
        mc.head_dim,
        default_cache_dtype(param.dtype, param.device),
        param.device,
    )
    blocks = BlockManager(target_blocks.num_blocks, target_blocks.block_size, enable_prefix_caching=False)
    return ModelDrafter(name, draft, cache, blocks, shares_cache=False)


def load_draft_model(name: str, target: nn.Module) -> tuple[nn.Module, Tokenizer]:
    """Load a draft model as the target was loaded (its RuntimePlan: device, dtype, kernels)."""
    from leanlm.layers.quantized_tensor import QuantizedTensor
    from leanlm.models.checkpoint import holds_quantized_weights, load_checkpoint
    from leanlm.models.registry import build_model

    plan = target.plan
    if plan is None:
        raise InvalidRequestError("draft:MODEL needs a target model loaded by LLM(...); pass draft_model= instead.")
    quantized = plan.native_quant and holds_quantized_weights(name)
    dtype = torch.float32 if quantized and plan.leanlm_kernels else plan.dtype
    checkpoint = load_checkpoint(name, dtype, native_quant=plan.native_quant)
    draft_plan = plan.for_weights(any(isinstance(t, QuantizedTensor) for t in checkpoint.weights.values()))
    return build_model(checkpoint.config, checkpoint.weights, draft_plan), checkpoint.tokenizer


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, name: str) -> None:
    if target.encode(TOKENIZER_PROBE) != draft.encode(TOKENIZER_PROBE):
        raise InvalidRequestError(
            f"The draft model {name!r} tokenizes text differently from the target model; a draft model must share "
            "the target's tokenizer (pick a smaller model of the same family)."
        )

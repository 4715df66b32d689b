"""The top module every decoder family shares: embedding, layers, final norm and head, one forward contract.

A family subclasses CausalLM, builds `embed_tokens`, `layers`, `norm` and `lm_head` in its constructor, and
implements `forward_context` (its rotary tables); the description (`spec`) says the rest (embedding scale, logit
soft-capping), and the C++ stack runs the layers when it implements them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from leanlm.config import ModelConfig
from leanlm.layers.attention import ATTENTION_BACKENDS
from leanlm.layers.quantized_tensor import QuantizedTensor
from leanlm.models.base import ForwardContext, assign_weights, strip_prefix
from leanlm.models.family import ModelSpec
from leanlm.models.stack import refresh_decoder_stack, run_decoder_stack


class CausalLM(nn.Module):
    fused_module_types: tuple[type, ...] = ()  # modules whose `fused` flag follows set_fused_ops

    def __init__(self, config: ModelConfig, spec: ModelSpec):
        super().__init__()
        self.config, self.spec = config, spec
        self.attention_name, self.fused_ops = "sdpa", False
        self.attention = ATTENTION_BACKENDS["sdpa"]
        self.decoder_stack = None  # leanlm's one-call decoder layers; see set_fused_ops
        self.decoder_stack_refusal: str | None = "fused ops are off"  # why decoder_stack is None
        self.plan = None  # the RuntimePlan it runs under (registry.prepare_runtime)

    def set_attention_backend(self, name: str) -> None:
        self.attention_name = name
        # With the fused kernels loaded, the fast path ("sdpa") takes leanlm's per-query attention kernel.
        self.attention = ATTENTION_BACKENDS["fused" if name == "sdpa" and self.fused_ops else name]

    def set_fused_ops(self, enabled: bool) -> None:
        """leanlm's one-dispatch kernels for the norms, RoPE, gating and attention (float32 CPU), and the C++ stack
        where it implements the layers. Needs leanlm.kernels.build.load_kernels() to have succeeded."""
        self.fused_ops = enabled
        for module in self.modules():
            if isinstance(module, self.fused_module_types):
                module.fused = enabled
        self.set_attention_backend(self.attention_name)
        refresh_decoder_stack(self)

    def __getstate__(self) -> dict:
        # The stack is a C++ object over this model's tensors: a copy (deepcopy, pickle) builds its own.
        return {**super().__getstate__(), "decoder_stack": None, "decoder_stack_refusal": None}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.spec.embedding_scale is not None:  # scaled in the weights' dtype, as HF does
            x = x * torch.tensor(self.spec.embedding_scale, dtype=x.dtype)
        return x

    def forward_context(self, positions: torch.Tensor, dtype: torch.dtype, attend: Callable | None = None):
        """What the layers of one forward pass share (compress/ builds one to run layers one at a time)."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Callable | None = None,
        last_only: bool = False,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: (B, T). Returns float32 logits (B, T, V), or (B, 1, V) with last_only,
        or (B, R, V) for the R columns in logits_indices. `attend` keeps keys and values (ForwardContext); without
        it the call attends causally over its own tokens."""
        x = self.embed(input_ids)
        ctx: ForwardContext = self.forward_context(positions, x.dtype, attend)
        stacked = run_decoder_stack(self, x, ctx, positions)
        if stacked is not None:
            x = stacked
        else:
            for layer in self.layers:
                x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        elif logits_indices is not None:
            x = x[:, logits_indices]
        logits = self.lm_head(self.norm(x)).float()
        if cap := self.spec.logit_softcap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: dict[str, torch.Tensor | QuantizedTensor], dtype: torch.dtype) -> None:
        """Take HF-named tensors (model.layers.N.self_attn.q_proj.weight, ...), fuse, and assign them.
        A QuantizedTensor weight turns its nn.Linear into a QuantizedLinear."""
        assign_weights(self, strip_prefix(weights), dtype)

"""16-bit weights on leanlm's kernels: nn.Linear and nn.Embedding whose weight stays bfloat16 or float16 (the
checkpoint's own matrix, held once) while activations are float32 (kernels/csrc/half_linear.cpp).

They are nn.Linear / nn.Embedding subclasses over the same Parameter, so whatever reads a model's linears
(compress/, a tied head's `lm_head.weight is embed_tokens.weight`) sees what it saw before; `use_half_kernels`
switches a model's modules in place and back (models/registry.prepare_runtime).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)


class HalfLinear(nn.Linear):
    """y = x W^T + b with W bfloat16/float16 and x float32, accumulated in float32 by leanlm's kernel
    ("leanlm-bf16" / "leanlm-f16"); `reference_forward` is the definition it is tested against.

    round_activations (kernel mode "auto", bfloat16 weights): x is rounded to bfloat16 first, as llama.cpp does for
    BF16 files, so that AVX-512 BF16's vdpbf16ps multiplies two pairs per lane (twice the prefill throughput);
    mode "exact" keeps float32 activations."""

    kernel = "leanlm"
    round_activations = False

    @property
    def half_kernel(self) -> bool:
        return self.weight.dtype in HALF_DTYPES and self.weight.device.type == "cpu"

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.half_kernel:  # e.g. converted to float32 after the plan changed
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        bias = None if self.bias is None else self.bias.float()
        return torch.ops.leanlm.half_linear(x, self.weight.detach(), bias, self.round_activations)

    def runtime_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class HalfEmbedding(nn.Embedding):
    """A lookup table of 16-bit rows that returns float32 rows (the stack's activations)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


def use_half_kernels(model: nn.Module, enabled: bool, round_activations: bool = False) -> int:
    """Run every nn.Linear with a 16-bit CPU weight on leanlm's kernel, and the token embedding's 16-bit rows as
    float32 (enabled), or turn such modules back into plain nn.Linear / nn.Embedding. Returns how many linears
    run the kernel. Only the class changes: parameters (and their sharing) stay as they are."""
    count = 0
    for module in model.modules():
        if type(module) in (nn.Linear, HalfLinear):
            half = enabled and module.weight.dtype in HALF_DTYPES and module.weight.device.type == "cpu"
            module.__class__ = HalfLinear if half else nn.Linear
            if half and not module.weight.is_contiguous():  # a shard's slice: the kernel reads whole rows
                module.weight.data = module.weight.data.contiguous()
            if half:
                module.round_activations = round_activations and module.weight.dtype == torch.bfloat16
            count += half
        elif type(module) in (nn.Embedding, HalfEmbedding):
            half = enabled and module.weight.dtype in HALF_DTYPES
            module.__class__ = HalfEmbedding if half else nn.Embedding
    return count


def half_weight_ids(model: nn.Module) -> set[int]:
    """The Parameters that half modules keep in 16 bits (the plan's dtype change skips them)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, (HalfLinear, HalfEmbedding))}

"""float32 linear layer on oneDNN's GEMM (torch.ops.mkldnn._linear_pointwise), with an optional fused activation.

torch's F.linear runs float32 products in MKL's sgemm, which on AMD CPUs takes its AVX2 path: on the 2-vCPU
AMD EPYC (Zen 4) oneDNN's AVX-512 kernels did the encoder's products 2-3x faster (about 470 against 215 GFLOP/s
at 384 tokens, and twice as fast at 12). The activation (GELU, erf or tanh; ReLU) runs as a oneDNN post-op on the
product while it is still in cache, and so does a residual added to the output (the encoder's x + attn_out(h)).
Where torch has no oneDNN, the layer computes the same with F.linear.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

# An encoder's hidden_act -> oneDNN's post-op (attr, algorithm); the same names as models/encoder.ACTIVATIONS.
POST_OPS = {
    None: ("none", ""),
    "gelu": ("gelu", "none"),
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}


@cache
def onednn_linear_available() -> bool:
    """torch was built with oneDNN and its fused linear op answers (checked once on a small product)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        x, w = torch.ones(2, 4), torch.ones(3, 4)
        return bool(torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), x @ w.t()))
    except RuntimeError:
        return False


class OneDNNLinear(nn.Module):
    """y = act(x W^T + b) for float32 x of any leading shape; `weight` and `bias` keep nn.Linear's names."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None):
        super().__init__()
        if activation not in POST_OPS:
            raise ValueError(f"OneDNNLinear has no fused activation {activation!r} (known: {list(POST_OPS)[1:]}).")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
        self.activation = activation
        self.attr, self.algorithm = POST_OPS[activation]
        self.fused = onednn_linear_available()

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str | None = None) -> OneDNNLinear:
        return cls(linear.weight, linear.bias, activation)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.activation in ("gelu_new", "gelu_pytorch_tanh"):
            return F.gelu(out, approximate="tanh")
        if self.activation == "gelu":
            return F.gelu(out)
        return F.relu(out) if self.activation == "relu" else out

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(x W^T + b), plus `residual` when given (added by oneDNN as a post-op: one pass less)."""
        if not self.fused or x.dtype != torch.float32:  # the weights are float32: so is the product
            out = self.reference_forward(x.float()).to(x.dtype)
            return out if residual is None else residual + out
        if residual is not None and self.activation is None and residual.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual.contiguous(), self.weight, self.bias, "add")
        out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.attr, [], self.algorithm)
        return out if residual is None else residual + out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation={self.activation}, onednn={self.fused}"


def use_onednn(root: nn.Module) -> nn.Module:
    """Swap every float32 nn.Linear under `root` for an OneDNNLinear (same names, same math), in place."""
    if not onednn_linear_available():
        return root
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(module, name, OneDNNLinear.from_linear(child))
    return root

"""int8 x int8 linear layer with dynamic per-token activation scales (W8A8), for prefill-shaped work (encoders).

Weights: symmetric int8 codes, one scale per output row. Activations: each row (token) is scaled by its own
max |x| / 127 at run time and rounded to int8, so a token's result never depends on the rest of its batch.
The product runs in torch's int8 GEMM (`torch._int_mm`, oneDNN with VNNI/AMX where the CPU has them) with
exact int32 accumulation; `reference_forward` computes the same quantities in float32.

An optional smoothing vector s (SmoothQuant) moves per-channel outliers of the input into the weights:
x W^T = (x / s)(W s)^T. Per-token scales alone lose the small channels of a token that has a few huge ones
(BERT's LayerNorm outputs have such channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, K) and per-row scales (M, 1) with x ~ codes * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12).div_(127.0)
    return (x.float() * scale.reciprocal()).round_().clamp_(-127, 127).to(torch.int8), scale


# Chosen on all-MiniLM-L6-v2 (60 wiki pairs, mean cosine to float32): 0.9986 at 0.5, 0.9990 at 0.65, 0.9988 at 0.8.
SMOOTHING_ALPHA = 0.65


def smoothing_factors(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), for (K,) input maxima and (N, K) weights."""
    weight_absmax = weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
    return (input_absmax.float().clamp(min=1e-5).pow(alpha) / weight_absmax.pow(1 - alpha)).clamp(min=1e-5)


class Int8DynamicLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, smoothing: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if smoothing is not None:
            weight = weight.detach().float() * smoothing
            self.register_buffer("inverse_smoothing", smoothing.reciprocal().float())
        else:
            self.inverse_smoothing = None
        codes, scale = quantize_rows(weight.detach())
        self.register_buffer("codes_t", codes.t())  # (K, N): the layout _int_mm reads as its second operand
        self.register_buffer("weight_scale", scale.view(-1))  # (N,)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        from leanlm.kernels.int8_rows import load_int8_rows

        # "fused": leanlm's one-pass quantize and epilogue around _int_mm; "int_mm": the same steps as torch ops.
        self.kernel = "fused" if load_int8_rows() else "int_mm"

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        inverse_smoothing: torch.Tensor | None = None,
    ) -> Int8DynamicLinear:
        """The layer from its stored form ((N, K) int8 codes, (N,) scales, 1/s), as an artifact holds it."""
        # A zero weight (and unit smoothing) only sizes the buffers, which the stored ones then replace.
        unit = None if inverse_smoothing is None else torch.ones(codes.shape[1])
        layer = cls(torch.zeros(codes.shape), bias, unit)
        layer.codes_t = codes.to(torch.int8).t()
        layer.weight_scale = weight_scale.float().reshape(-1)
        if inverse_smoothing is not None:
            layer.inverse_smoothing = inverse_smoothing.float()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_absmax: torch.Tensor | None = None) -> Int8DynamicLinear:
        """input_absmax: each input channel's largest |x| on calibration text, to smooth with (None: no smoothing)."""
        smoothing = None if input_absmax is None else smoothing_factors(input_absmax, linear.weight)
        return cls(linear.weight.float(), linear.bias, smoothing)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer multiplies by (smoothing included: W s)."""
        return self.codes_t.t().float() * self.weight_scale[:, None]

    def _smoothed(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return flat if self.inverse_smoothing is None else flat.float() * self.inverse_smoothing

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantized activations and weights, multiplied in float32."""
        codes, scale = quantize_rows(self._smoothed(x))
        out = F.linear(codes.float() * scale, self.dequantize(), self.bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b, plus `residual` when given (the fused kernel adds it in its epilogue: one pass less)."""
        if self.kernel == "reference":
            out = self.reference_forward(x)
            return out if residual is None else residual + out
        if self.kernel == "fused" and (residual is None or residual.dtype == torch.float32):
            codes, scale = torch.ops.leanlm_int8.quantize_rows(
                x.reshape(-1, self.in_features).float().contiguous(), self.inverse_smoothing
            )
            flat_residual = None if residual is None else residual.reshape(-1, self.out_features)
            out = torch.ops.leanlm_int8.scale_int32(
                torch._int_mm(codes, self.codes_t), scale, self.weight_scale, self.bias, flat_residual
            )
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        codes, scale = quantize_rows(self._smoothed(x))
        out = torch._int_mm(codes, self.codes_t).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if residual is None else residual + out

    def extra_repr(self) -> str:
        smoothed = self.inverse_smoothing is not None
        return f"in={self.in_features}, out={self.out_features}, smoothed={smoothed}, kernel={self.kernel}"

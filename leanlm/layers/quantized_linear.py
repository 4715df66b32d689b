"""Weight-only quantized linear layer: y = x W^T + b with W = codes * scale + offset, group-wise along inputs.

The stored form (codes, scale, offset) holds int8 per-channel, int4 group-wise (RTN, GPTQ, AWQ) and
GGUF's Q8_0/Q4_0/Q4_1 blocks without loss. How the forward pass reads it is the layer's choice:
`prepare_runtime()` packs a kernel layout next to it, and `reference_forward` is the plain
dequantize-then-matmul that every fast path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.kernels.layout import kernel_format, pack_segments, unpack_segments
from leanlm.layers.quantized_tensor import QuantizedTensor, expand_groups

__all__ = ["KERNEL_MODES", "QuantizedLinear", "QuantizedTensor", "expand_groups"]  # QuantizedTensor: its old home


# torch's packed int4 CPU kernel supports these group sizes.
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)

# The stored form's tensors, which a layer on leanlm's kernels drops once packed: the layout holds the same numbers
# (layout.unpack gives them back on access), so the weights sit in memory once.
STORED = ("codes", "scale", "offset", "scale_base", "offset_base")

# How CPU layers run: leanlm's own kernels with int8 activations (fastest), the same kernels with float
# activations (exact), or torch's kernels only (the fallback when ours cannot be built).
KERNEL_MODES = ("auto", "exact", "torch")


class QuantizedLinear(nn.Module):
    """A drop-in for nn.Linear holding a QuantizedTensor.

    Kernels, picked by `prepare_runtime` from the weight and the activation dtype/device:
      leanlm-q4 / leanlm-q8  leanlm's AVX2 kernels (leanlm/kernels/) for blocks of 32 inputs; with int8
                activations (mode "auto") or float activations (mode "exact")
      int4pack  torch's packed 4-bit CPU matmul (group-wise scale and offset; bf16 activations read fastest)
      int8pack  torch's int8 CPU matmul with one scale per output row (symmetric, per-channel)
      dense     a dequantized copy in the activation dtype (any layout, any device; memory as a dense layer)
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("scale_base", weight.scale_base)  # GGUF K-quants only (QuantizedTensor)
        self.register_buffer("offset_base", weight.offset_base)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel = "reference"

    def __getattr__(self, name: str):
        if name in STORED and "_packed" in self.__dict__ and "codes" not in self.__dict__.get("_buffers", {}):
            return getattr(unpack_segments(self._packed, self.bits, self.group_size), name)
        return super().__getattr__(name)

    @property
    def weight_q(self) -> QuantizedTensor:
        if "codes" not in self._buffers:  # packed away
            return unpack_segments(self._packed, self.bits, self.group_size)
        return QuantizedTensor(
            self.codes, self.scale, self.offset, self.bits, self.group_size, self.scale_base, self.offset_base
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_q.dequantize(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain definition: dequantize to float32, multiply, cast back."""
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.dequantize(torch.float32), bias).to(x.dtype)

    def prepare_runtime(self, dtype: torch.dtype, device: torch.device, mode: str = "auto") -> str:
        """Build the layout of the fastest kernel for activations of `dtype` on `device`; returns its name."""
        if mode not in KERNEL_MODES:
            raise ValueError(f"Unknown kernel mode '{mode}'. Choose among: {', '.join(KERNEL_MODES)}.")
        if "codes" not in self._buffers:  # packed away by an earlier call: the stored form back first
            weight = self.weight_q
            for name in STORED:
                self._buffers[name] = getattr(weight, name)  # (register_buffer would see __getattr__'s value)
        for name in ("_int4pack", "_int4scales", "_int8scale", "_dense", "_packed"):
            self.__dict__.pop(name, None)
        on_cpu = device.type == "cpu"
        kernel_group = self._int4pack_group()
        if on_cpu and mode != "torch" and self._use_leanlm_kernels():
            self._packed = pack_segments(self.weight_q)  # a fused q/k/v of mixed types: row segments, each narrow
            for name in STORED:
                del self._buffers[name]
            self._int8_activations = mode == "auto"
            self.kernel = "leanlm-q4" if all(p.q4 for p in self._packed.segments()) else "leanlm-q8"
        elif on_cpu and self.bits <= 4 and kernel_group:  # 2- and 3-bit codes fit the 4-bit kernel too
            # Groups the kernel cannot take (128 over 576 inputs) are re-expressed as smaller equal groups.
            scale = self.weight_q.per_column(self.scale, kernel_group)
            offset = self.weight_q.per_column(self.offset, kernel_group) if self.offset is not None else 0 * scale
            zeros = offset + 8 * scale  # torch's kernel computes (q - 8) * scale + zero
            self._int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.to(torch.int32), 1)
            self._int4scales = torch.stack([scale.t(), zeros.t()], dim=-1).contiguous().to(dtype)
            self._kernel_group = kernel_group
            self.kernel = "int4pack"
        elif on_cpu and self.bits == 8 and self.group_size == self.in_features and self.offset is None:
            self._int8scale = self.scale[:, 0].contiguous().to(dtype)
            self.kernel = "int8pack"
        else:
            self._dense = self.dequantize(dtype).to(device)
            self.kernel = "dense"
        return self.kernel

    def _use_leanlm_kernels(self) -> bool:
        from leanlm.kernels.build import load_kernels

        return kernel_format(self.weight_q) is not None and load_kernels()

    def _int4pack_group(self) -> int | None:
        """The largest group size the int4 kernel supports that divides both our groups and the row."""
        if self.in_features % 64 or self.out_features % 16:  # the kernel's own shape rules
            return None
        return next(
            (
                g
                for g in sorted(INT4PACK_GROUP_SIZES, reverse=True)
                if self.group_size % g == 0 and self.in_features % g == 0
            ),
            None,
        )

    def runtime_bytes(self) -> int:
        """Bytes the current kernel reads per call (the roofline's weight traffic)."""
        if self.kernel.startswith("leanlm"):
            return self._packed.nbytes()
        layout = {"int4pack": ("_int4pack", "_int4scales"), "int8pack": ("codes", "_int8scale"), "dense": ("_dense",)}
        names = layout.get(self.kernel, ("codes", "scale", "offset"))
        tensors = [getattr(self, name) for name in names if getattr(self, name, None) is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "reference":
            return self.reference_forward(x)
        if self.kernel.startswith("leanlm"):
            if self._packed.rest is None:
                return self._kernel_forward(self._packed, x, self.bias)
            outputs, start = [], 0
            for segment in self._packed.segments():  # row segments: their outputs side by side
                bias = None if self.bias is None else self.bias[start : start + segment.rows]
                outputs.append(self._kernel_forward(segment, x, bias))
                start += segment.rows
            return torch.cat(outputs, dim=-1)
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.kernel == "int4pack":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self._int4pack, self._kernel_group, self._int4scales)
        elif self.kernel == "int8pack":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self._int8scale)
        else:
            out = F.linear(flat, self._dense)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*shape[:-1], self.out_features)

    def _kernel_forward(self, p, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        op = torch.ops.leanlm.q4_linear if p.q4 else torch.ops.leanlm.q8_linear
        return op(x, p.codes, p.scales, p.offsets, bias, p.rows, self._int8_activations, p.scale_base, p.offset_base)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}, "
            f"offset={self.offset is not None}, kernel={self.kernel}"
        )

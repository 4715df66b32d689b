"""The runtime plan: how a model runs on this machine (device, dtypes, kernels, attention, KV cache), resolved once
from the user's options and the machine, then passed down to the model builder, the engine and compress/."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from leanlm.errors import InvalidRequestError
from leanlm.layers.attention import ATTENTION_BACKENDS
from leanlm.layers.quantized_linear import KERNEL_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bfloat16 is the default on CPU: torch's bf16 matmuls read half the bytes and run faster than float32 here
# (benchmarks/bench_core.py); float32 stays available and is what parity tests use.
DEFAULT_DTYPE = "bfloat16"
HALF_DTYPES = (torch.bfloat16, torch.float16)
KV_CACHE_TYPES = ("auto", "int8")  # float (the compute dtype), or int8 with per-vector scales


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for but torch sees no CUDA GPU. Use --device cpu.")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise InvalidRequestError(f"Unknown device '{device}'. Use cpu, cuda or auto.")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DEFAULT_DTYPE if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise InvalidRequestError(f"Unknown dtype '{dtype}'. Use one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


@dataclass(frozen=True)
class RuntimePlan:
    device: torch.device
    dtype: torch.dtype  # dense weights, as asked (--dtype)
    compute_dtype: torch.dtype  # activations: float32 around leanlm's quantized kernels, else `dtype`
    kernels: str = "auto"  # how quantized layers run on CPU: auto (int8 activations), exact, torch
    leanlm_kernels: bool = False  # leanlm's C++ kernels are built and run this plan's quantized layers
    attention: str = "sdpa"
    kv_cache: str = "auto"
    dequantize: bool = False  # GGUF blocks become dense weights instead of running at their own precision
    # dense bfloat16/float16 weights run leanlm's 16-bit kernels (layers/half_linear.py) with float32 activations
    half_weights: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kernels", self.kernels, KERNEL_MODES),
            ("attention", self.attention, tuple(ATTENTION_BACKENDS)),
            ("kv_cache", self.kv_cache, KV_CACHE_TYPES),
        ):
            if value not in allowed:
                raise InvalidRequestError(f"Unknown {name} '{value}'. Choose among: {', '.join(allowed)}.")

    @property
    def native_quant(self) -> bool:
        """GGUF Q8_0/Q4_0/Q4_1 matrices run at their own precision; float32 is the reference, always dense."""
        return not self.dequantize and self.dtype != torch.float32

    @property
    def fused_ops(self) -> bool:
        """leanlm's one-dispatch norm/RoPE/attention kernels and the C++ stack (float32 CPU activations)."""
        return self.leanlm_kernels and self.compute_dtype == torch.float32

    def for_weights(self, quantized: bool) -> RuntimePlan:
        """The plan once the checkpoint is known: quantized weights on leanlm's kernels compute in float32
        (float32 norms, RoPE and attention beat bfloat16 on CPU, and the kernels read float32 activations)."""
        compute = torch.float32 if quantized and self.leanlm_kernels else self.dtype
        # Dense 16-bit weights stay 16-bit (read once per token, converted in registers) and compute in float32
        # too, on the same C++ stack as quantized ones.
        half = not quantized and self.leanlm_kernels and self.device.type == "cpu" and self.dtype in HALF_DTYPES
        return dataclasses.replace(self, compute_dtype=torch.float32 if half else compute, half_weights=half)

    def describe(self) -> str:
        kernels = "leanlm's kernels" if self.leanlm_kernels else "torch's kernels"
        kernels += " (16-bit weights)" if self.half_weights else ""
        return (
            f"{self.device.type}, weights {_name(self.dtype)}, activations {_name(self.compute_dtype)}, "
            f"{kernels} ({self.kernels}), attention {self.attention}, KV cache {self.kv_cache}"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_plan(
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    kernels: str = "auto",
    attention: str = "sdpa",
    kv_cache: str = "auto",
    dequantize: bool = False,
) -> RuntimePlan:
    """The plan before the checkpoint is read (`for_weights` completes it): builds leanlm's kernels for this CPU
    on first use when they may run (a failed build warns once and falls back to torch)."""
    resolved_device, resolved_dtype = resolve_device(device), resolve_dtype(dtype)
    plan = RuntimePlan(resolved_device, resolved_dtype, resolved_dtype, kernels, False, attention, kv_cache, dequantize)
    if resolved_device.type == "cpu" and kernels != "torch":
        from leanlm.kernels.build import load_kernels

        plan = dataclasses.replace(plan, leanlm_kernels=load_kernels())
    return plan

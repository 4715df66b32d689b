"""Compile leanlm's C++ kernels on first use and register them as torch ops (`torch.ops.leanlm.*`).

The build is cached per machine under $LEANLM_HOME/kernels/<source hash>-<torch version>, so only the first
use pays (about a minute on 2 cores). Without a compiler, ninja or AVX2 the kernels are reported
unavailable with one warning and callers keep to the torch path; nothing crashes.

LEANLM_KERNEL_VARIANT=avx2 builds (and caches apart) what an AVX2-only CPU such as AMD Zen 3 compiles, on any
x86 host with AVX2: the test suite runs the kernel tests in it, so the AVX2 code paths are checked on machines
that have AVX-512 or VNNI too. One process loads one variant (both register the same torch ops).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from functools import cache
from pathlib import Path

import torch

from leanlm.errors import InvalidRequestError

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("quant_linear.cpp", "half_linear.cpp", "fused_ops.cpp", "decoder_stack.cpp")]
HEADERS = sorted(CSRC.glob("*.h"))
# -march=native: the build is per machine, so it may use what this CPU has beyond AVX2 (VNNI's dpbusd on newer
# x86 cores; the results are the same bits). fp-contract off: a written multiply-then-add stays two roundings
# (dequantize must equal torch exactly).
# -fopenmp: without it ATen's parallel_for compiles to a serial loop (it is a header template), and the
# extension shares torch's already-loaded libgomp at run time.
FLAGS = ["-O3", "-march=native", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-std=c++17", "-fopenmp"]
DISABLE_ENV = "LEANLM_DISABLE_KERNELS"  # set to 1 to force the torch fallback (tests, comparisons)
VARIANT_ENV = "LEANLM_KERNEL_VARIANT"
# Each variant's target flags, in place of -march=native. x86-64-v3 is AVX2, FMA, F16C and BMI: no AVX-512, no
# VNNI, no AMX, whatever the host has; tuned for the host all the same.
VARIANTS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mtune=native"]}


def variant() -> str:
    """The kernel build this process uses: $LEANLM_KERNEL_VARIANT, default native."""
    name = os.environ.get(VARIANT_ENV) or "native"
    if name not in VARIANTS:
        raise InvalidRequestError(f"Unknown {VARIANT_ENV}={name!r}. Use one of: {', '.join(VARIANTS)}.")
    return name


def compile_flags(name: str = "native") -> list[str]:
    return [flag for f in FLAGS for flag in (VARIANTS[name] if f == "-march=native" else [f])]


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: trust torch's own dispatch level
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def _cpu_fingerprint() -> bytes:
    """The CPU model and feature flags: a -march=native build is only valid on the CPU it was built for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return b""
    return "\n".join(line for line in lines if line.startswith(("model name", "flags"))).encode()


def build_directory(name: str = "native") -> Path:
    from leanlm.formats.assets import leanlm_home

    sources = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(sources + " ".join(compile_flags(name)).encode() + _cpu_fingerprint())
    tag = f"{digest.hexdigest()[:12]}-torch{torch.__version__.replace('+', '_')}"
    return leanlm_home() / "kernels" / (tag if name == "native" else f"{tag}-{name}")


@cache
def load_kernels() -> bool:
    """Build (or load the cached build of) the kernels; True when torch.ops.leanlm is ready."""
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    name = variant()
    if not _cpu_has_avx2():
        warnings.warn("leanlm kernels need AVX2/FMA/F16C, which this CPU lacks; using torch's kernels.", stacklevel=2)
        return False
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory(name)
        library = directory / "leanlm_kernels.so"
        if library.is_file() and _load_built(library):  # the folder name carries the source hash
            _register_fake_kernels()
            return True
        directory.mkdir(parents=True, exist_ok=True)
        load(
            name="leanlm_kernels",
            sources=[str(path) for path in SOURCES],
            extra_cflags=compile_flags(name),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a failed build: fall back, say why once
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"leanlm kernels could not be built ({first_line}); using torch's kernels. "
            "Install a C++ compiler and ninja (pip install ninja) for the fast path.",
            stacklevel=2,
        )
        return False
    _register_fake_kernels()
    return True


def _load_built(library: Path) -> bool:
    """Load a library built earlier without asking ninja (which stats every torch header: seconds per process)."""
    try:
        torch.ops.load_library(str(library))
    except OSError:  # a truncated file from an interrupted build: build again
        return False
    return True


def _register_fake_kernels() -> None:
    """Shape-only versions, so torch.compile can trace through the ops."""

    def linear_shape(x, codes, scales, offsets, bias, rows, *rest):
        return x.new_empty(*x.shape[:-1], rows)

    def dequantize_shape(codes, scales, offsets, rows, *bases):
        return scales.new_empty(rows, codes.shape[1] * 32, dtype=torch.float32)

    torch.library.register_fake("leanlm::q4_linear")(linear_shape)
    torch.library.register_fake("leanlm::q8_linear")(linear_shape)
    torch.library.register_fake("leanlm::dequantize")(dequantize_shape)
    torch.library.register_fake("leanlm::half_linear")(
        lambda x, weight, bias, round_activations=False: x.new_empty(*x.shape[:-1], weight.shape[0])
    )
    torch.library.register_fake("leanlm::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake("leanlm::rotary")(lambda x, cos, sin: x.new_empty(x.shape))
    torch.library.register_fake("leanlm::causal_attention")(lambda q, k, v, mask, scale: torch.empty_like(q))
    torch.library.register_fake("leanlm::silu_mul")(
        lambda gate_up: gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    )

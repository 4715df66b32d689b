"""Build (once per machine) and load csrc/int8_rows.cpp: the fused per-token quantization and int32 epilogue of
layers/int8_linear.py, as `torch.ops.leanlm_int8.*`, with csrc/encoder_attention.cpp (`torch.ops.leanlm_encoder`,
the encoders' float32 attention for short texts). Its own small library, cached apart from the main kernels;
without a compiler it is reported unavailable and the layer keeps its torch path (the same numbers, slower)."""

from __future__ import annotations

import hashlib
import os
import warnings
from functools import cache
from pathlib import Path

import torch

from leanlm.kernels.build import DISABLE_ENV, compile_flags, variant

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("int8_rows.cpp", "encoder_attention.cpp")]


def _build_directory() -> Path:
    from leanlm.formats.assets import leanlm_home

    try:
        cpu = "\n".join(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except OSError:
        cpu = ""
    flags = compile_flags(variant())
    sources = b"".join(source.read_bytes() for source in SOURCES)
    digest = hashlib.sha256(sources + " ".join(flags).encode() + cpu.encode()).hexdigest()[:12]
    return leanlm_home() / "kernels" / f"int8rows-{digest}-torch{torch.__version__.replace('+', '_')}"


@cache
def load_int8_rows() -> bool:
    """True when torch.ops.leanlm_int8 is ready."""
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    try:
        directory = _build_directory()
        library = directory / "leanlm_int8_rows.so"
        if library.is_file():
            try:
                torch.ops.load_library(str(library))
                return True
            except OSError:  # a truncated file from an interrupted build: build again
                pass
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        load(
            name="leanlm_int8_rows",
            sources=[str(source) for source in SOURCES],
            extra_cflags=compile_flags(variant()),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"leanlm's int8 row kernels could not be built ({first_line}); using torch ops.", stacklevel=2)
        return False

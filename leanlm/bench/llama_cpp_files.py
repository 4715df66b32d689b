"""GGUF files re-encoded by llama.cpp's own quantizer (llama-cpp-python, the `bench` extra), cached.

leanlm's exporter writes F16/BF16/Q8_0/Q4_0/Q4_1; the K-quant mixes people download (Q4_K_M, Q6_K...) come from
llama.cpp's quantizer, which picks a type per tensor (and falls back to Q5_0/Q5_1/Q8_0 where a row is not a
multiple of 256). Benchmarks and loading tests use these files as llama.cpp users have them.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from leanlm.errors import InvalidRequestError, LeanLMError

# llama.cpp's file types (enum llama_ftype) that take an F16 file as input.
FILE_TYPES = {
    "Q4_0": 2,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_M": 12,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "BF16": 32,
}


def quantize_with_llama_cpp(f16_file: str | Path, file_type: str, target: str | Path, threads: int = 2) -> Path:
    """llama.cpp's `llama-quantize` from an F16 (or F32) GGUF to `file_type`, written atomically to `target`
    and reused when it is already there."""
    if file_type not in FILE_TYPES:
        raise InvalidRequestError(f"Unknown llama.cpp file type '{file_type}'. Use one of: {', '.join(FILE_TYPES)}.")
    target = Path(target)
    if target.is_file():
        return target
    try:
        import llama_cpp
    except ImportError as exc:
        raise InvalidRequestError(
            "Re-encoding with llama.cpp needs llama-cpp-python: `pip install 'leanlm[bench]'`."
        ) from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[file_type]
    params.nthread = threads
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        status = llama_cpp.llama_model_quantize(str(f16_file).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0 or not partial.is_file():
            raise LeanLMError(f"llama.cpp could not quantize {f16_file} to {file_type} (status {status}).")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target

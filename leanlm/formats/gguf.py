"""Read GGUF files: metadata as plain Python values, tensors as dequantized torch tensors.

The header is parsed here because the `gguf` package's reader takes ~2 s on a 49k-token vocabulary
(it builds a numpy memmap per string); the `gguf` package still does all dequantization.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanlm.errors import ModelFormatError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars) as in the GGUF specification.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_TYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: slowest dimension first
    type_id: int
    offset: int  # absolute byte offset in the file
    n_bytes: int


class _HeaderParser:
    def __init__(self, buffer: memoryview, path: Path):
        self.buffer, self.pos, self.path = buffer, 0, path

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise ModelFormatError(f"{self.path} is truncated inside its header. Download the file again.")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.pos + length > len(self.buffer):
            raise ModelFormatError(f"{self.path} is truncated inside its header. Download the file again.")
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int) -> Any:
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type in _NUMPY_TYPES:
                dtype = np.dtype(_NUMPY_TYPES[item_type])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buffer):
                    raise ModelFormatError(f"{self.path} is truncated inside its header. Download the file again.")
                array = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
                self.pos = end
                return array.tolist()
            return [self.value(item_type) for _ in range(count)]
        if type_id not in _SCALAR_FORMATS:
            raise ModelFormatError(f"{self.path} has an unknown metadata value type {type_id}; the file is corrupt.")
        return self.scalar(_SCALAR_FORMATS[type_id])


class GGUFFile:
    """An open GGUF file. Metadata is read eagerly; tensor data stays memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {self.path}. Check the path or pass a model folder.")
        with open(self.path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise ModelFormatError(
                    f"{self.path} is not a GGUF file (it does not start with the 'GGUF' magic bytes). "
                    "Pass a .gguf file or a Hugging Face model folder."
                )
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._parse_header()

    def _parse_header(self) -> None:
        from gguf.constants import GGML_QUANT_SIZES

        parser = _HeaderParser(memoryview(self._map), self.path)
        parser.pos = 4
        version = parser.scalar("<I")
        if version not in (2, 3):
            raise ModelFormatError(f"{self.path} is GGUF version {version}; leanlm reads versions 2 and 3.")
        n_tensors, n_kv = parser.scalar("<Q"), parser.scalar("<Q")
        for _ in range(n_kv):
            key = parser.string()
            self.metadata[key] = parser.value(parser.scalar("<I"))
        raw_infos = []
        for _ in range(n_tensors):
            name = parser.string()
            dims = [parser.scalar("<Q") for _ in range(parser.scalar("<I"))]
            raw_infos.append((name, dims, parser.scalar("<I"), parser.scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (parser.pos + alignment - 1) // alignment * alignment
        file_size = len(self._map)
        for name, dims, type_id, offset in raw_infos:
            if type_id not in GGML_QUANT_SIZES:
                raise ModelFormatError(
                    f"Tensor '{name}' in {self.path} has unknown type id {type_id}; the file is corrupt."
                )
            block_size, type_size = GGML_QUANT_SIZES[type_id]
            n_bytes = int(np.prod(dims)) // block_size * type_size
            info = GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), type_id, data_start + offset, n_bytes)
            if info.offset + n_bytes > file_size:
                raise ModelFormatError(
                    f"{self.path} is truncated: tensor '{name}' ends at byte {info.offset + n_bytes} but the file has "
                    f"{file_size} bytes. Download the file again."
                )
            self.tensors[name] = info

    def tensor_type_name(self, name: str) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self._info(name).type_id).name

    def raw_tensor(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored: shape (rows, bytes per row), no copy."""
        info = self._info(name)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
        return data.reshape(rows, info.n_bytes // rows)

    def load_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize one tensor into a torch tensor with PyTorch's (out, in) shape."""
        from gguf import GGMLQuantizationType as T
        from gguf.quants import dequantize

        info = self._info(name)
        raw = self.raw_tensor(name)
        if info.type_id in (T.F32, T.F16, T.BF16):
            torch_dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[T(info.type_id)]
            # Copy out of the read-only map so the model owns writable memory.
            return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(info.shape).to(dtype)
        try:
            array = dequantize(raw, T(info.type_id))
        except NotImplementedError as exc:
            raise ModelFormatError(
                f"Tensor '{name}' in {self.path} uses {T(info.type_id).name}, which the gguf package cannot "
                "dequantize. Convert the model to F16, Q8_0 or Q4_K with llama.cpp's tools."
            ) from exc
        return torch.from_numpy(array).reshape(info.shape).to(dtype)

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise ModelFormatError(
                f"{self.path} has no tensor '{name}'. The file is incomplete or not a supported model."
            )
        return self.tensors[name]

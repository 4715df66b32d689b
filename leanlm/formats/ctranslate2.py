"""Reader for CTranslate2's `model.bin` (the format faster-whisper ships): no ctranslate2 needed.

Layout, little-endian: u32 binary version, string model name, u32 revision (version >= 2), u32 count of
variables, then per variable: string name, u8 rank, u32 dims, u8 dtype id (version >= 4), u32 byte count,
raw bytes; then u32 count of aliases and (alias, target) string pairs (version >= 3). A string is a u16 length
(counting its NUL terminator), the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leanlm.errors import ModelFormatError

# The order of CTranslate2's DataType enum (include/ctranslate2/types.h).
_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
_NUMPY_VIEW = (np.float32, np.int8, np.int16, np.int32, np.float16, np.uint16)  # bf16 read as raw uint16
_MAX_VERSION = 6


@dataclass
class CT2Model:
    name: str  # the spec's name, e.g. "WhisperSpec"
    revision: int
    variables: dict[str, torch.Tensor]  # aliases resolve to the same tensor

    def scalar(self, name: str, default=None):
        tensor = self.variables.get(name)
        return default if tensor is None else tensor.item()


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, count: int) -> memoryview:
        if self.pos + count > len(self.data):
            raise ModelFormatError(
                f"{self.path} ends after {len(self.data):,} bytes while a CTranslate2 model.bin needs more: the file "
                "is truncated (a part missing from a joined download?). Fetch it again."
            )
        view = memoryview(self.data)[self.pos : self.pos + count]
        self.pos += count
        return view

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        length = self.unpack("H")
        return bytes(self.take(length))[:-1].decode("utf-8")


def is_ctranslate2_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model.bin").is_file()


def read_model_bin(path: str | Path) -> CT2Model:
    """All variables of a CTranslate2 model.bin as torch tensors in their stored dtype (copied out of the map)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise ModelFormatError(f"{path} does not exist: pass a CTranslate2 model folder (model.bin + config.json).")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _Cursor(data, path)
        version = cursor.unpack("I")
        if not 1 <= version <= _MAX_VERSION:
            raise ModelFormatError(
                f"{path} starts with binary version {version}, not a CTranslate2 model.bin leanlm can read "
                f"(versions 1-{_MAX_VERSION}). Is it a CTranslate2 model?"
            )
        name = cursor.string() if version >= 2 else ""
        revision = cursor.unpack("I") if version >= 2 else 1
        variables: dict[str, torch.Tensor] = {}
        for _ in range(cursor.unpack("I")):
            var_name = cursor.string()
            shape = [cursor.unpack("I") for _ in range(cursor.unpack("B"))]
            type_id = cursor.unpack("B") if version >= 4 else 0
            if type_id >= len(_DTYPES):
                raise ModelFormatError(f"{path}: variable {var_name} has unknown CTranslate2 dtype id {type_id}.")
            num_bytes = cursor.unpack("I")
            raw = np.frombuffer(cursor.take(num_bytes), dtype=_NUMPY_VIEW[type_id]).copy()
            tensor = torch.from_numpy(raw)
            if _DTYPES[type_id] is torch.bfloat16:
                tensor = tensor.view(torch.bfloat16)
            variables[var_name] = tensor.reshape(shape)
        if version >= 3:
            for _ in range(cursor.unpack("I")):
                alias, target = cursor.string(), cursor.string()
                variables[alias] = variables[target]
    return CT2Model(name=name, revision=revision, variables=variables)

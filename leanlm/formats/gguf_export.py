"""Write a GGUF file at another precision (F32/F16/BF16/Q8_0/Q4_0/Q4_1), keeping every metadata key.

Used to give llama.cpp the same weights that leanlm runs, at a comparable precision. Matrices are
re-encoded (dequantize, then quantize with the `gguf` package); norms and other vectors stay float32,
as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from leanlm.errors import InvalidRequestError

EXPORT_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
}


def export_gguf(source: str | Path, target: str | Path, type_name: str) -> Path:
    """Re-encode every matrix of the GGUF `source` as `type_name`; written atomically to `target`."""
    import gguf

    if type_name not in EXPORT_TYPES:
        raise InvalidRequestError(f"Cannot export to '{type_name}'. Choose among: {', '.join(EXPORT_TYPES)}.")
    source, target = Path(source), Path(target)
    if source.suffix != ".gguf":
        raise InvalidRequestError(f"GGUF export reads a GGUF source; {source} is not one.")
    qtype = gguf.GGMLQuantizationType[type_name]
    reader = gguf.GGUFReader(source)  # the package's reader keeps each field's value type, which the writer needs
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch=str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type)
    writer.add_file_type(gguf.LlamaFileType[EXPORT_TYPES[type_name]])
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        values = values.reshape(shape)
        is_matrix = len(shape) > 1 and shape[-1] % block_size == 0
        if is_matrix and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)  # atomic: an interrupted export never leaves a loadable half-file
    return target

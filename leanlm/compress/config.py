"""What to quantize and how: one frozen, validated dataclass per run (recorded in quantization.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leanlm.errors import InvalidRequestError

METHODS = ("int8", "int4", "gptq", "awq")


@dataclass(frozen=True)
class QuantConfig:
    method: str
    bits: int = 0  # 0: the method's default (int8 -> 8, the others -> 4)
    group_size: int = 0  # 0: the method's default (int8 -> per channel, the others -> 128); -1: per channel
    include_lm_head: bool = True
    # Calibration (GPTQ, AWQ): sequences of c4.utf8, never the evaluation text.
    calibration_samples: int = 32
    calibration_length: int = 256
    act_order: bool = True  # GPTQ: columns by decreasing Hessian diagonal (measured: KL 0.30 -> 0.20 at int4 g128)
    damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added for stability
    seed: int = 0
    # Mixed precision (compress/mixed.py): the most sensitive layers at `mixed_bits`, the artifact at most `mixed`
    # (a fraction) larger than the uniform one. Sensitivity = KL of the final logits with one layer (or tensor) at
    # a time quantized, on `sensitivity_samples` x `sensitivity_length` c4 tokens (never the evaluation text).
    mixed: float = 0.0
    mixed_bits: int = 8
    mixed_granularity: str = "layer"  # "layer" (a decoder layer's linears together) or "tensor"
    sensitivity_samples: int = 4
    sensitivity_length: int = 128
    # The token embedding in the artifact: 0 = dense at the model's dtype; 8 = int8 rows in groups of 32 with float16
    # scales (llama.cpp's Q8_0 layout), dequantized on load. Only with the LM head quantized (else it stays tied).
    embedding_bits: int = 8
    # Per-layer bits, ((name or name prefix, bits), ...): set by the mixed allocation, or given directly.
    layer_bits: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(
                f"Unknown quantization method '{self.method}'. Choose among: {', '.join(METHODS)}."
            )
        if self.bits == 0:
            object.__setattr__(self, "bits", 8 if self.method == "int8" else 4)
        if self.group_size == 0:
            object.__setattr__(self, "group_size", -1 if self.method == "int8" else 128)
        if self.method == "int8" and self.bits != 8:
            raise InvalidRequestError("--method int8 quantizes to 8 bits; use int4/gptq/awq with --bits for fewer.")
        if not 2 <= self.bits <= 8:
            raise InvalidRequestError(f"bits must be between 2 and 8, got {self.bits}.")
        if self.group_size < -1 or self.group_size in (1,) or (self.group_size > 0 and self.group_size % 8):
            raise InvalidRequestError(f"group size must be -1 (per channel) or a multiple of 8, got {self.group_size}.")
        if self.calibration_samples < 1 or self.calibration_length < 16:
            raise InvalidRequestError("calibration needs at least 1 sample of at least 16 tokens.")
        if not 0 <= self.damp < 1:
            raise InvalidRequestError(f"damp must be in [0, 1), got {self.damp}.")
        if self.mixed < 0 or (self.mixed and self.method == "int8"):
            raise InvalidRequestError(
                f"mixed precision takes a size margin >= 0 (got {self.mixed}) and a 4-bit-or-fewer method "
                "(int4, gptq, awq): int8 has nothing to upgrade to."
            )
        if self.mixed and not self.bits < self.mixed_bits <= 8:
            raise InvalidRequestError(f"mixed_bits must be in ({self.bits}, 8], got {self.mixed_bits}.")
        if self.mixed_granularity not in ("layer", "tensor"):
            raise InvalidRequestError(f"mixed granularity is 'layer' or 'tensor', got '{self.mixed_granularity}'.")
        if self.sensitivity_samples < 1 or self.sensitivity_length < 16:
            raise InvalidRequestError("the sensitivity probe needs at least 1 sample of at least 16 tokens.")
        if self.embedding_bits and not 2 <= self.embedding_bits <= 8:
            raise InvalidRequestError(f"embedding_bits must be 0 (dense) or 2 to 8, got {self.embedding_bits}.")
        object.__setattr__(self, "layer_bits", tuple((str(n), int(b)) for n, b in self.layer_bits))
        for name, bits in self.layer_bits:
            if not 2 <= bits <= 8:
                raise InvalidRequestError(f"bits for {name} must be between 2 and 8, got {bits}.")

    @property
    def symmetric(self) -> bool:
        """int8 is symmetric per channel (torch's int8 kernel has no offset); 4-bit and below keep an offset."""
        return self.method == "int8"

    def bits_for(self, name: str) -> int:
        """A linear's bits: its own entry in layer_bits, else its longest matching prefix's, else `bits`."""
        best, found = -1, self.bits
        for prefix, bits in self.layer_bits:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), bits
        return found

    def symmetric_at(self, bits: int) -> bool:
        """Layers raised above 4 bits are symmetric: int8 codes run on leanlm's q8 kernel (unsigned 8-bit codes
        have no kernel and would run dense)."""
        return self.symmetric or (bits > 4 and bits != self.bits)

    def symmetric_for(self, name: str) -> bool:
        return self.symmetric_at(self.bits_for(name))

    def to_dict(self) -> dict:
        return asdict(self)

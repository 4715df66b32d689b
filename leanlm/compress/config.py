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

    @property
    def symmetric(self) -> bool:
        """int8 is symmetric per channel (torch's int8 kernel has no offset); 4-bit and below keep an offset."""
        return self.method == "int8"

    def to_dict(self) -> dict:
        return asdict(self)

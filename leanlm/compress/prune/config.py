"""What to prune and how: one frozen, validated dataclass per run (recorded in compression.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leanlm.errors import InvalidRequestError

UNSTRUCTURED = ("magnitude", "wanda", "sparsegpt")
STRUCTURED = ("structured", "layers")
METHODS = UNSTRUCTURED + STRUCTURED
SCOPES = ("auto", "row", "layer", "global")
HEAD_UNITS = ("query", "kv")
LAYER_SCORES = ("cosine", "kl")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep at most N nonzero weights in every M consecutive inputs of a row."""
    try:
        n, m = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise InvalidRequestError(f"Pattern '{pattern}' is not N:M with integers N and M, e.g. 2:4 or 4:8.") from None
    if not 0 < n < m or m > 64:
        raise InvalidRequestError(
            f"Pattern '{pattern}' is invalid: N:M keeps N of every M weights, so it needs 0 < N < M <= 64 "
            "(e.g. 2:4 or 4:8)."
        )
    return n, m


@dataclass(frozen=True)
class PruneConfig:
    method: str
    # Unstructured methods: a fraction of weights to zero, or an N:M pattern (which implies sparsity 1 - N/M).
    sparsity: float = 0.0
    pattern: str | None = None
    scope: str = "auto"  # row: each output row alike; layer: each matrix alike; global: one threshold (magnitude)
    # method "structured": fractions of attention heads and MLP channels to remove, the same count in every layer.
    drop_heads: float = 0.0
    head_unit: str = "query"  # query: equal numbers of query heads per KV group; kv: whole KV groups
    drop_mlp: float = 0.0
    # method "layers": how many decoder layers to remove, chosen by `layer_score`.
    drop_layers: int = 0
    layer_score: str = "cosine"
    repair: bool = True  # structured methods: least-squares refit of o_proj / down_proj towards the original
    # Repair's ridge, relative to the mean input energy: strong, since a weak one overfits the calibration text
    # (measured on SmolLM2, MLP 25%: KL 0.73 at 0.01, 0.52 at 0.3, 0.49 at 1.0, against 0.57 without repair).
    repair_ridge: float = 1.0
    # Calibration: sequences of c4.utf8, never the evaluation text (magnitude needs none).
    calibration_samples: int = 32
    calibration_length: int = 256
    damp: float = 0.01  # SparseGPT: fraction of the mean Hessian diagonal added for stability
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"Unknown pruning method '{self.method}'. Choose among: {', '.join(METHODS)}.")
        if self.method in UNSTRUCTURED:
            self._check_unstructured()
        else:
            self._check_structured()
        if self.calibration_samples < 1 or self.calibration_length < 16:
            raise InvalidRequestError("calibration needs at least 1 sample of at least 16 tokens.")
        if not 0 <= self.damp < 1:
            raise InvalidRequestError(f"damp must be in [0, 1), got {self.damp}.")
        if self.repair_ridge < 0:
            raise InvalidRequestError(f"repair_ridge must be >= 0, got {self.repair_ridge}.")

    def _check_unstructured(self) -> None:
        if self.drop_heads or self.drop_mlp or self.drop_layers:
            raise InvalidRequestError(
                f"--method {self.method} zeroes single weights; --drop-heads/--drop-mlp/--drop belong to "
                "--method structured or --method layers."
            )
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            implied = 1 - n / m
            if self.sparsity and abs(self.sparsity - implied) > 1e-9:
                raise InvalidRequestError(
                    f"Pattern {self.pattern} means sparsity {implied:g}, but --sparsity {self.sparsity:g} was given. "
                    "Pass one of the two."
                )
            object.__setattr__(self, "sparsity", implied)
        elif not 0 < self.sparsity < 1:
            raise InvalidRequestError(
                f"Sparsity must be strictly between 0 and 1 (a fraction of weights to zero), got {self.sparsity:g}. "
                "Use e.g. --sparsity 0.5, or an N:M pattern such as --pattern 2:4."
            )
        if self.scope not in SCOPES:
            raise InvalidRequestError(f"Unknown scope '{self.scope}'. Choose among: {', '.join(SCOPES)}.")
        if self.scope == "auto":  # Wanda compares within an output row (its paper's finding); the others per matrix
            object.__setattr__(self, "scope", "row" if self.method == "wanda" else "layer")
        if self.scope == "global" and (self.method != "magnitude" or self.pattern is not None):
            raise InvalidRequestError(
                "A global threshold needs scores that compare across layers and no N:M pattern: use it with "
                "--method magnitude and --sparsity only."
            )

    def _check_structured(self) -> None:
        if self.sparsity or self.pattern is not None:
            raise InvalidRequestError(
                f"--method {self.method} removes whole heads, channels or layers; --sparsity/--pattern belong to "
                "magnitude, wanda and sparsegpt."
            )
        if self.method == "structured":
            if self.drop_layers:
                raise InvalidRequestError("--drop removes layers: use --method layers for it.")
            for name, value in (("drop-heads", self.drop_heads), ("drop-mlp", self.drop_mlp)):
                if not 0 <= value < 1:
                    raise InvalidRequestError(
                        f"--{name} must be a fraction in [0, 1) (1 would remove them all), got {value:g}."
                    )
            if not self.drop_heads and not self.drop_mlp:
                raise InvalidRequestError("--method structured needs --drop-heads and/or --drop-mlp above 0.")
            if self.head_unit not in HEAD_UNITS:
                raise InvalidRequestError(
                    f"Unknown head unit '{self.head_unit}'. Choose among: {', '.join(HEAD_UNITS)}."
                )
        else:
            if self.drop_heads or self.drop_mlp:
                raise InvalidRequestError("--drop-heads/--drop-mlp belong to --method structured.")
            if self.drop_layers < 1:
                raise InvalidRequestError(f"--method layers needs --drop N with N >= 1 layers, got {self.drop_layers}.")
            if self.layer_score not in LAYER_SCORES:
                raise InvalidRequestError(
                    f"Unknown layer score '{self.layer_score}'. Choose among: {', '.join(LAYER_SCORES)}."
                )

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_pattern(self.pattern)

    @property
    def calibrated(self) -> bool:
        return self.method != "magnitude"

    def to_dict(self) -> dict:
        return asdict(self)

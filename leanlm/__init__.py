"""leanlm: make Transformer language models lean and fast, and prove it."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "StreamChunk", "LeanLMError", "Embedder", "CrossEncoder"]

if TYPE_CHECKING:
    from leanlm.embed import CrossEncoder, Embedder
    from leanlm.engine.llm import LLM
    from leanlm.engine.outputs import RequestOutput, StreamChunk
    from leanlm.errors import LeanLMError
    from leanlm.sampling_params import SamplingParams

_LAZY = {
    "LLM": "leanlm.engine.llm",
    "Embedder": "leanlm.embed",
    "CrossEncoder": "leanlm.embed",
    "RequestOutput": "leanlm.engine.outputs",
    "StreamChunk": "leanlm.engine.outputs",
    "LeanLMError": "leanlm.errors",
    "SamplingParams": "leanlm.sampling_params",
}


def __getattr__(name: str):
    # Lazy so that `import leanlm` (and `leanlm --help`) does not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leanlm' has no attribute {name!r}")

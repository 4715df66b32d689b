"""Error classes. Every message names the problem and how to fix it."""


class LeanLMError(Exception):
    """Base class for errors that leanlm reports to users (the CLI prints them without a traceback)."""


class ModelNotFoundError(LeanLMError):
    """A model path that does not exist or holds no loadable model."""


class ModelFormatError(LeanLMError):
    """A model file that is corrupt, truncated or not in a format leanlm reads."""


class UnsupportedArchitectureError(LeanLMError):
    """A model whose architecture has no implementation in leanlm."""


class DownloadError(LeanLMError):
    """A default asset (model or corpus) that could not be fetched."""


class PromptTooLongError(LeanLMError):
    """A prompt that does not fit in the model's context window."""


class InvalidRequestError(LeanLMError, ValueError):
    """Invalid user parameters (sampling parameters, options)."""


class CalibrationError(LeanLMError):
    """Calibration statistics that cannot be used (non-finite activations of a layer)."""

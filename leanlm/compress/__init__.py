"""Compression: transform weights (quantize, prune), then convert the model for runtime."""

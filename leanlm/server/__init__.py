"""OpenAI-compatible HTTP server: `leanlm serve` (FastAPI app, async engine wrapper, SSE, metrics)."""

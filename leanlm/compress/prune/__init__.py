"""Pruning: unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) and structured removal of heads, MLP
channels and whole layers, with optional least-squares repair. `prune(llm, PruneConfig(...))` is the entry point."""

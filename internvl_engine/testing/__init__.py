"""Tiny checkpoints in the official layouts, for tests, demos and benchmarks. Nothing in the engine, models or
server imports this package; the CLI's `demo` and `serve --tiny` do."""

from .checkpoint_builder import cache_dir, ensure_tiny_checkpoint, ensure_tiny_tokenizer

__all__ = ["cache_dir", "ensure_tiny_checkpoint", "ensure_tiny_tokenizer"]

"""Tiny checkpoints in the official layouts, for tests, demos and benchmarks. Nothing in the engine, models or
server imports this package; the CLI's `demo` and `serve --tiny` do."""

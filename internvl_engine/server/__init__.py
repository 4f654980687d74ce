"""The OpenAI-compatible HTTP server: `build_app(AsyncLLM, ServerConfig)`; `internvl-engine serve` runs it."""

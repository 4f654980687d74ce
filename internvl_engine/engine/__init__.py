"""Requests in, tokens out: input processing, the scheduler and block manager (torch-free), the feature cache,
output processing (detokenizer, stop strings), and the `LLM` / `AsyncLLM` front ends."""

"""Text in and out: the InternLM2 tokenizer (no transformers) and the chat templates."""

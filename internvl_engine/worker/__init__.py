"""One step on the device: the model runner, batch metadata, paged attention and the KV cache, CUDA graphs, and
the batched sampler."""

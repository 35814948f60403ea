"""Generation for every generative model family: `generate` (greedy, sampling, beam search with
a KV cache in one jitted loop) and `generate_stream`; see vlmjax.inference.generate."""
from vlmjax.inference.generate import GenerateOutput, generate, generate_stream

__all__ = ["GenerateOutput", "generate", "generate_stream"]

"""famjax inference: chunked prefill and constant-memory token-by-token generation.

    from famjax import infer
    gen = infer.generate(model, [prompt_a, prompt_b], max_new_tokens=64,
                         sampling=infer.Sampling(temperature=0.8, top_k=40, top_p=0.95), seed=0,
                         stop_tokens=[tok.eos_id], chunk_size=1024, steps_per_call=64)
    gen.tokens[0]                                   # int32 [n_0], the continuation of prompt_a
    logits, state = infer.prefill(model, prompts, chunk_size=1024)   # [b, V] after each prompt
    nll = infer.token_nll(model, tokens[None], chunk_size=1024)     # [1, T - 1] per-token loss
"""
from famjax.infer import load
from famjax.infer.decode import Generation, decode_step, decode_steps, generate
from famjax.infer.prefill import chunk_plan, distinct_buffers, prefill, read, stack_rows, token_nll
from famjax.infer.sampling import GREEDY, Sampling, filter_logits, sample

__all__ = ["GREEDY", "Generation", "Sampling", "chunk_plan", "decode_step", "decode_steps", "distinct_buffers",
           "filter_logits", "generate", "load", "prefill", "read", "sample", "stack_rows", "token_nll"]

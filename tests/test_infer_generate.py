"""Generation == argmax of one full forward at every step; constant state; seeds, stops, errors, streaming."""
import io

import jax
import numpy as np
import pytest
from model_utils import jit_apply, make_model, random_tokens

from famjax import infer

MODES = {
    "fam": dict(attention="fam", block_size=4, memory_blocks=1, fam_len=3),
    "bswa": dict(attention="bswa", block_size=4, memory_blocks=1),
    "full": dict(attention="full", max_len=32),
}
LENGTHS = (5, 11, 5)  # not multiples of the block size 4; a mixed batch with one repeated length


def _prompts(vocab, lengths=LENGTHS, seed=3):
    return [random_tokens(1, n, vocab, seed=seed + i)[0] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_equals_full_forward_argmax(mode):
    model, cfg, _ = make_model(seed=1, **MODES[mode])
    prompts = _prompts(cfg.vocab_size)
    gen = infer.generate(model, prompts, max_new_tokens=6, chunk_size=4)
    for prompt, new in zip(prompts, gen.tokens):
        assert len(new) == 6
        seq = np.concatenate([prompt, new[:-1]])[None]
        logits, _ = jit_apply(model, seq)
        # Position P-1+i of one full forward predicts new token i.
        np.testing.assert_array_equal(np.argmax(np.asarray(logits[0]), -1)[len(prompt) - 1:], new)
    assert gen.finish_reason == ["length"] * 3
    np.testing.assert_array_equal(np.asarray(gen.state.pos), np.array(LENGTHS) + 5)


def test_prefill_mixed_lengths_equals_separate_rows():
    model, cfg, _ = make_model(seed=2, **MODES["fam"])
    prompts = _prompts(cfg.vocab_size)
    logits, state = infer.prefill(model, prompts, chunk_size=4)
    for i, p in enumerate(prompts):
        one, one_state = infer.prefill(model, [p], chunk_size=4)
        np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(one[0]), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state.layers.fam[:, i]), np.asarray(one_state.layers.fam[:, 0]),
                                   atol=1e-5, rtol=1e-5)


def test_chunk_plan():
    assert infer.chunk_plan(23, 8) == [8, 8, 4, 2, 1]
    assert infer.chunk_plan(16, 8) == [8, 8]
    assert infer.chunk_plan(3, 8) == [2, 1]
    for n in range(1, 70):
        plan = infer.chunk_plan(n, 16)
        assert sum(plan) == n and all(s == 16 or s & (s - 1) == 0 for s in plan)
    with pytest.raises(ValueError, match="chunk_size"):
        infer.chunk_plan(5, 0)


def test_state_same_shapes_and_bytes_after_10_and_10000_tokens():
    model, cfg, _ = make_model(seed=3, **MODES["fam"])
    short = infer.generate(model, [random_tokens(1, 10, cfg.vocab_size)[0]], max_new_tokens=3, chunk_size=2000)
    long = infer.generate(model, [random_tokens(1, 10_000, cfg.vocab_size)[0]], max_new_tokens=3,
                          chunk_size=2000)
    assert int(long.state.pos[0]) == 10_002 and int(short.state.pos[0]) == 12

    def layout(s):
        return [(x.shape, x.dtype) for x in jax.tree.leaves(s)]
    assert layout(short.state) == layout(long.state)
    assert short.state.nbytes() == long.state.nbytes()
    # The long stream really moved the memory (a state that ignored its input would also keep its shapes).
    assert np.abs(np.asarray(long.state.layers.fam) - np.asarray(short.state.layers.fam)).max() > 1e-3


def test_seeded_sampling_reproducible_and_top_k_1_is_greedy():
    model, cfg, _ = make_model(seed=4, **MODES["fam"])
    prompts = _prompts(cfg.vocab_size)
    hot = infer.Sampling(temperature=3.0)
    a = infer.generate(model, prompts, max_new_tokens=12, sampling=hot, seed=7)
    b = infer.generate(model, prompts, max_new_tokens=12, sampling=hot, seed=7)
    c = infer.generate(model, prompts, max_new_tokens=12, sampling=hot, seed=8)
    for x, y in zip(a.tokens, b.tokens):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a.tokens, c.tokens))
    greedy = infer.generate(model, prompts, max_new_tokens=12)
    top1 = infer.generate(model, prompts, max_new_tokens=12, sampling=infer.Sampling(temperature=3.0, top_k=1),
                          seed=5)
    for x, y in zip(greedy.tokens, top1.tokens):
        np.testing.assert_array_equal(x, y)


def test_stop_tokens_and_streaming_callback():
    model, cfg, _ = make_model(seed=5, **MODES["fam"])
    prompts = _prompts(cfg.vocab_size)
    free = infer.generate(model, prompts, max_new_tokens=8)
    stop = int(free.tokens[0][2])
    seen = []
    gen = infer.generate(model, prompts, max_new_tokens=8, stop_tokens=[stop],
                         on_token=lambda t, e: seen.append((t.copy(), e.copy())))
    first = int(np.flatnonzero(free.tokens[0] == stop)[0])
    np.testing.assert_array_equal(gen.tokens[0], free.tokens[0][:first])
    assert gen.finish_reason[0] == "stop"
    # Streamed tokens are exactly the returned ones, row by row.
    for r in range(3):
        streamed = [int(t[r]) for t, e in seen if e[r]]
        np.testing.assert_array_equal(streamed, gen.tokens[r])
    assert infer.generate(model, prompts, max_new_tokens=0).tokens[0].size == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2, stop_tokens=[10_000]), "stop_tokens"),
    (dict(max_new_tokens=2, sampling=infer.Sampling(temperature=1.0, top_k=1000)), "top_k"),
    (dict(max_new_tokens=2, chunk_size=0), "chunk_size"),
    (dict(max_new_tokens=2, seed=1.5), "seed must be an integer"),
])
def test_invalid_generate_arguments(kwargs, match):
    model, cfg, _ = make_model(seed=6, **MODES["fam"])
    with pytest.raises((ValueError, TypeError), match=match):
        infer.generate(model, _prompts(cfg.vocab_size, lengths=(5,)), **kwargs)


@pytest.mark.parametrize("prompts, match", [
    ([np.zeros((0,), np.int32)], "prompt 0 is empty"),
    ([np.array([1, 2]), []], "prompt 1 is empty"),
    ([], "prompts is empty"),
    ([np.array([1, 99])], "outside"),
    ("hello", "prompts must be"),
])
def test_invalid_prompts(prompts, match):
    model, _, _ = make_model(seed=6, **MODES["fam"])
    with pytest.raises(ValueError, match=match):
        infer.generate(model, prompts, max_new_tokens=2)


def test_full_attention_cache_overflow_is_an_error():
    model, cfg, _ = make_model(seed=6, **MODES["full"])
    with pytest.raises(ValueError, match="max_len"):
        infer.generate(model, _prompts(cfg.vocab_size, lengths=(10,)), max_new_tokens=8, max_len=12)


def test_token_nll_matches_one_forward():
    model, cfg, _ = make_model(seed=7, **MODES["fam"])
    tokens = random_tokens(1, 17, cfg.vocab_size, seed=2)
    nll = infer.token_nll(model, tokens, chunk_size=8)
    logits, _ = jit_apply(model, tokens[:, :-1])
    logp = jax.nn.log_softmax(np.asarray(logits), -1)
    want = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(nll, want, atol=1e-4, rtol=1e-4)


class _LetterTokenizer:
    """Letters a..z as ids 3..28 (a vocabulary that fits the small test model); 0, 1, 2 = pad, bos, eos."""
    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 29

    def encode(self, text):
        return np.array([ord(c) - ord("a") + 3 for c in text], np.int32)

    def decode(self, ids):
        return "".join(chr(int(i) - 3 + ord("a")) for i in ids if 3 <= int(i) < 29)


def test_cli_run_streams_text():
    model, _, _ = make_model(seed=8, **MODES["fam"])
    tok = _LetterTokenizer()
    from famjax.generate import run
    out = io.StringIO()
    gen = run(model, tok, "helloworld", max_new_tokens=5, out=out, stop_at_eos=False)
    assert out.getvalue() == tok.decode(gen.tokens[0]) + "\n"
    with pytest.raises(ValueError, match="no tokens"):
        run(model, tok, "", add_bos=False, out=out)


# Greedy and sampled decoding through the FAM model; the full-attention cache once (sampled).
@pytest.mark.parametrize("mode, sampling", [("fam", infer.GREEDY),
                                            ("fam", infer.Sampling(temperature=3.0, top_k=20, top_p=0.9)),
                                            ("full", infer.Sampling(temperature=3.0, top_k=20, top_p=0.9))],
                         ids=["greedy-fam", "sampled-fam", "sampled-full"])
def test_fused_decode_equals_step_by_step(mode, sampling):
    """steps_per_call > 1 (one jitted while loop per call) gives the tokens, stops, streamed steps and state of
    the one-step-per-call loop bit for bit; a stop token ends one row mid-block while the others go on."""
    model, cfg, _ = make_model(seed=9, **MODES[mode])
    prompts = _prompts(cfg.vocab_size)
    kw = {"max_new_tokens": 11, "sampling": sampling, "seed": 11}
    free = infer.generate(model, prompts, steps_per_call=1, **kw)
    # A stop token that row 1 produces at step >= 2 and no other row produces: only row 1 stops.
    others = set(np.concatenate([free.tokens[0], free.tokens[2]]).tolist())
    stop = next(int(t) for t in free.tokens[1][2:] if int(t) not in others)

    def run(steps_per_call):
        seen = []
        gen = infer.generate(model, prompts, stop_tokens=[stop], steps_per_call=steps_per_call,
                             on_token=lambda t, e: seen.append((t.copy(), e.copy())), **kw)
        return gen, seen
    ref, ref_seen = run(1)
    assert ref.finish_reason == ["length", "stop", "length"] and len(ref.tokens[1]) < 10
    for steps_per_call in (3, 64):
        gen, seen = run(steps_per_call)
        for x, y in zip(ref.tokens, gen.tokens):
            np.testing.assert_array_equal(x, y)
        assert gen.finish_reason == ref.finish_reason and gen.decode_steps == ref.decode_steps == 10
        assert len(seen) == len(ref_seen) == 11
        for (t0, e0), (t1, e1) in zip(ref_seen, seen):
            np.testing.assert_array_equal(e0, e1)
            np.testing.assert_array_equal(t0, t1)
        assert jax.tree.structure(gen.state) == jax.tree.structure(ref.state)
        for a, b in zip(jax.tree.leaves(ref.state), jax.tree.leaves(gen.state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The unstopped run of the fused path matches too, and every row stopping ends the loop early.
    fused_free = infer.generate(model, prompts, steps_per_call=4, **kw)
    for x, y in zip(free.tokens, fused_free.tokens):
        np.testing.assert_array_equal(x, y)
    first = [int(t[0]) for t in free.tokens]
    early = infer.generate(model, prompts, stop_tokens=first, steps_per_call=64, **kw)
    assert early.finish_reason == ["stop"] * 3 and early.decode_steps == 0
    with pytest.raises(ValueError, match="steps_per_call"):
        infer.generate(model, prompts, steps_per_call=0, **kw)

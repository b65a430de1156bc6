"""Self-checks of tests/reference.py (the numpy TransformerFAM reference); no famjax needed."""
import types

import numpy as np
import pytest
from reference import random_params, reference_fam_states, reference_forward, reference_logits


def make_cfg(**kw):
    base = dict(vocab_size=23, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                mlp_dim=24, mlp_activation="swiglu", norm="rms", norm_eps=1e-6, rope_base=10000.0,
                tie_embeddings=False, embed_scale=False, attention="fam", block_size=4,
                memory_blocks=1, fam_len=3)
    base.update(kw)
    return types.SimpleNamespace(**base)


def tokens_for(cfg, batch, T, seed=0):
    return np.random.default_rng(seed + 1000).integers(0, cfg.vocab_size, size=(batch, T))


VARIANTS = [
    dict(),
    dict(norm="layer", mlp_activation="geglu", tie_embeddings=True, embed_scale=True, norm_eps=1e-5),
    dict(mlp_activation="gelu", num_kv_heads=4, rope_base=500.0),
    dict(num_kv_heads=1, num_layers=3),
]


# ---------------------------------------------------------------- an independent plain transformer
def simple_causal_transformer(p, c, tokens, offset=0.0):
    """Plain causal softmax transformer written separately (masked matrices, complex-number RoPE)."""
    def norm(x, q):
        if c.norm == "rms":
            return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * q["scale"]
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + c.norm_eps) * q["scale"] + q["bias"]

    def rope(x, pos):  # x [T, n, hd]; pair (x_i, x_{i+hd/2}) as a complex number
        half = x.shape[-1] // 2
        z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * np.outer(pos, c.rope_base ** (-np.arange(half) / half)))[:, None]
        return np.concatenate([z.real, z.imag], -1)

    act = {"swiglu": lambda u: u / (1 + np.exp(-u)),
           "geglu": lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))}
    T = len(tokens)
    pos = np.arange(T) + offset
    x = p["embed"][tokens] * (np.sqrt(c.d_model) if c.embed_scale else 1.0)
    mask = np.tril(np.ones((T, T), bool))
    for lp in p["layers"]:
        h = norm(x, lp["norm1"])
        q = rope(np.einsum("td,dhk->thk", h, lp["q"]), pos)
        rep = c.num_heads // c.num_kv_heads
        k = np.repeat(rope(np.einsum("td,dhk->thk", h, lp["k"]), pos), rep, axis=1)
        v = np.repeat(np.einsum("td,dhk->thk", h, lp["v"]), rep, axis=1)
        s = np.where(mask[None], np.einsum("qhk,shk->hqs", q, k) / np.sqrt(c.head_dim), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
        x = x + np.einsum("hqs,shk,hkd->qd", w, v, lp["o"])
        h, m = norm(x, lp["norm2"]), lp["mlp"]
        g = act["geglu"](h @ m["up"]) if c.mlp_activation == "gelu" else act[c.mlp_activation](h @ m["gate"]) * (h @ m["up"])
        x = x + g @ m["down"]
    x = norm(x, p["final_norm"])
    return x @ (p["embed"].T if c.tie_embeddings else p["lm_head"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_matches_simple_transformer(variant):
    cfg = make_cfg(attention="full", **variant)
    p = random_params(cfg, seed=1)
    toks = tokens_for(cfg, 2, 13)
    offs = np.array([0, 37])
    got = reference_logits(p, cfg, toks, position_offset=offs)
    for b in range(2):
        want = simple_causal_transformer(p, cfg, toks[b], offset=offs[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [12, 14])
@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_bswa_with_enough_memory_is_full(T, variant):
    full = make_cfg(attention="full", **variant)
    p = random_params(full, seed=2)
    toks = tokens_for(full, 2, T)
    want = reference_logits(p, full, toks)
    for B, m in [(4, 3), (4, 10), (1, T), (T, 0), (5, 3)]:
        cfg = make_cfg(attention="bswa", block_size=B, memory_blocks=m, **variant)
        np.testing.assert_allclose(reference_logits(p, cfg, toks), want, rtol=1e-10, atol=1e-10)


def test_bswa_with_too_little_memory_is_not_full():
    full = make_cfg(attention="full")
    p = random_params(full, seed=2)
    toks = tokens_for(full, 1, 12)
    cfg = make_cfg(attention="bswa", block_size=4, memory_blocks=1)
    assert not np.allclose(reference_logits(p, cfg, toks), reference_logits(p, full, toks))


@pytest.mark.parametrize("variant", VARIANTS[:2])
def test_fam_with_no_fam_rows_is_bswa(variant):
    cfg = make_cfg(attention="fam", fam_len=0, block_size=3, memory_blocks=1, **variant)
    p = random_params(cfg, seed=3)
    toks = tokens_for(cfg, 2, 11)
    bswa = make_cfg(attention="bswa", fam_len=0, block_size=3, memory_blocks=1, **variant)
    np.testing.assert_allclose(reference_logits(p, cfg, toks), reference_logits(p, bswa, toks),
                               rtol=1e-12, atol=1e-12)
    # bswa ignores fam_len
    bswa5 = make_cfg(attention="bswa", fam_len=5, block_size=3, memory_blocks=1, **variant)
    np.testing.assert_allclose(reference_logits(random_params(bswa5, seed=3), bswa5, toks),
                               reference_logits(p, bswa, toks), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,m,F", [(4, 1, 3), (2, 0, 5), (3, 2, 2), (4, 0, 4)])
def test_fam_causality(B, m, F):
    """Changing token j never changes logits at positions < j (fam mode, several blocks, B < F too)."""
    cfg = make_cfg(attention="fam", block_size=B, memory_blocks=m, fam_len=F)
    p = random_params(cfg, seed=4)
    T = 4 * B + 1
    toks = tokens_for(cfg, 1, T)
    base = reference_logits(p, cfg, toks)
    for j in range(T):
        alt = toks.copy()
        alt[0, j] = (alt[0, j] + 1) % cfg.vocab_size
        out = reference_logits(p, cfg, alt)
        np.testing.assert_allclose(out[:, :j], base[:, :j], rtol=0, atol=1e-12)
        assert not np.allclose(out[:, j], base[:, j])


def test_fam_carries_information_beyond_the_window():
    """memory_blocks=0: the last block still depends on the first block's tokens through the FAM,
    while plain BSWA with memory_blocks=0 does not."""
    fam = make_cfg(attention="fam", block_size=3, memory_blocks=0, fam_len=2)
    bswa = make_cfg(attention="bswa", block_size=3, memory_blocks=0, fam_len=2)
    p = random_params(fam, seed=5)
    toks = tokens_for(fam, 2, 12)
    alt = toks.copy()
    alt[:, 0] = (alt[:, 0] + 1) % fam.vocab_size
    d_fam = np.abs(reference_logits(p, fam, alt)[:, 9:] - reference_logits(p, fam, toks)[:, 9:]).max()
    d_bswa = np.abs(reference_logits(p, bswa, alt)[:, 9:] - reference_logits(p, bswa, toks)[:, 9:]).max()
    assert d_fam > 1e-6
    assert d_bswa == 0.0


@pytest.mark.parametrize("attention", ["full", "bswa", "fam"])
def test_position_offset_invariance(attention):
    """Shifting every position of a row (FAM positions included) leaves the logits unchanged: RoPE is
    relative. (Only true because all positions, including the FAM's, move together.)"""
    cfg = make_cfg(attention=attention, block_size=3, memory_blocks=1, fam_len=4)
    p = random_params(cfg, seed=6)
    toks = tokens_for(cfg, 2, 10)
    a, sa = reference_forward(p, cfg, toks)
    b, sb = reference_forward(p, cfg, toks, position_offset=np.array([1234, 7]))
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sa, sb, rtol=1e-8, atol=1e-8)


def test_fam_states_shapes_and_initial_fam():
    cfg = make_cfg(attention="fam", block_size=4, memory_blocks=1, fam_len=3, num_layers=3)
    p = random_params(cfg, seed=7)
    # no complete block: the final FAM is the initial FAM S_0^l, which does not depend on the tokens
    s_a = reference_fam_states(p, cfg, tokens_for(cfg, 2, 3, seed=1))
    s_b = reference_fam_states(p, cfg, tokens_for(cfg, 2, 1, seed=2))
    assert s_a.shape == (3, 2, 3, 16)
    np.testing.assert_allclose(s_a, s_b, rtol=0, atol=0)
    np.testing.assert_allclose(s_a[0, 0], p["fam_init"], rtol=0, atol=0)
    np.testing.assert_allclose(s_a[:, 0], s_a[:, 1], rtol=0, atol=0)
    assert not np.allclose(s_a[1], s_a[0])
    # a trailing partial block causes no FAM update; a complete one does
    toks = tokens_for(cfg, 2, 11)
    s8 = reference_fam_states(p, cfg, toks[:, :8])
    np.testing.assert_allclose(reference_fam_states(p, cfg, toks), s8, rtol=0, atol=0)
    assert not np.allclose(reference_fam_states(p, cfg, toks[:, :7]), s8)
    # full / bswa: no FAM rows
    assert reference_fam_states(p, make_cfg(attention="bswa", num_layers=3), toks).shape == (3, 2, 0, 16)


def test_prefix_consistency():
    """Logits of a prefix equal the first logits of the longer sequence (partial blocks included)."""
    cfg = make_cfg(attention="fam", block_size=4, memory_blocks=1, fam_len=3)
    p = random_params(cfg, seed=8)
    toks = tokens_for(cfg, 2, 14)
    full = reference_logits(p, cfg, toks)
    for T in (1, 3, 4, 5, 9, 13):
        np.testing.assert_allclose(reference_logits(p, cfg, toks[:, :T]), full[:, :T], rtol=0, atol=1e-12)


# ------------------------------------------ an independent masked formulation of one FAM layer stack
def masked_fam_forward(p, c, tokens):
    """FAM written differently: per layer, first run the FAM recurrence over blocks (section 8), then
    all token attention at once with one [T, keys] mask over [tokens, FAM rows of every block]."""
    B, m, F, T = c.block_size, c.memory_blocks, c.fam_len, len(tokens)
    rms = lambda x, q: x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * q["scale"]
    def rope(x, pos):
        half = x.shape[-1] // 2
        z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * np.outer(pos, c.rope_base ** (-np.arange(half) / half)))[:, None]
        return np.concatenate([z.real, z.imag], -1)
    def proj(lp, x, pos):
        h = rms(x, lp["norm1"]); rep = c.num_heads // c.num_kv_heads
        return (rope(np.einsum("td,dhk->thk", h, lp["q"]), pos),
                np.repeat(rope(np.einsum("td,dhk->thk", h, lp["k"]), pos), rep, 1),
                np.repeat(np.einsum("td,dhk->thk", h, lp["v"]), rep, 1))
    def attn(lp, q, k, v, mask):
        s = np.where(mask[None], np.einsum("qhk,shk->hqs", q, k) / np.sqrt(c.head_dim), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
        return np.einsum("hqs,shk,hkd->qd", w, v, lp["o"])
    ffn = lambda lp, a: a + (lambda h: (h @ lp["mlp"]["gate"]) / (1 + np.exp(-(h @ lp["mlp"]["gate"]))) * (h @ lp["mlp"]["up"]))(rms(a, lp["norm2"])) @ lp["mlp"]["down"]
    nb = -(-T // B)
    x, s0 = p["embed"][tokens], p["fam_init"]
    blk = np.arange(T) // B
    for lp in p["layers"]:
        # FAM read by block t is fams[t]; fams[0] = initial, positions of fams[t] = t*B - F + f
        fams, s = [s0], s0
        q, k, v = proj(lp, x, np.arange(T))
        for t in range(nb):
            qf, kf, vf = proj(lp, s, t * B - F + np.arange(F))
            if (t + 1) * B <= T:
                sl = slice(t * B, (t + 1) * B)
                a = attn(lp, qf, np.concatenate([kf, k[sl]]), np.concatenate([vf, v[sl]]), np.ones((F, F + B), bool))
                s = ffn(lp, a + (s if t > 0 else 0))
                fams.append(s)
        # keys: all T tokens, then F rows for each block's FAM
        kf_all, vf_all, owner = [k], [v], [np.full(T, -1)]
        for t in range(nb):
            _, kf, vf = proj(lp, fams[t], t * B - F + np.arange(F))
            kf_all.append(kf); vf_all.append(vf); owner.append(np.full(F, t))
        owner = np.concatenate(owner)
        kpos = np.concatenate([np.arange(T), np.full(nb * F, -1)])
        i = np.arange(T)[:, None]
        tok_ok = (owner[None] == -1) & (kpos[None] <= i) & (kpos[None] // B >= blk[:, None] - m)
        fam_ok = owner[None] == blk[:, None]
        a = x + attn(lp, q, np.concatenate(kf_all), np.concatenate(vf_all), tok_ok | fam_ok)
        x = ffn(lp, a)
        s0 = _next_initial(p, c, lp, fams[0], rms, proj, attn, ffn)
    return rms(x, p["final_norm"]) @ p["lm_head"]


def _next_initial(p, c, lp, s, rms, proj, attn, ffn):
    F = c.fam_len
    q, k, v = proj(lp, s, np.arange(F) - F)
    return ffn(lp, s + attn(lp, q, k, v, np.ones((F, F), bool)))


@pytest.mark.parametrize("B,m,F,T", [(4, 1, 3, 14), (2, 0, 5, 9), (3, 2, 2, 12), (5, 1, 1, 5)])
def test_fam_matches_masked_formulation(B, m, F, T):
    cfg = make_cfg(attention="fam", block_size=B, memory_blocks=m, fam_len=F, num_layers=3)
    p = random_params(cfg, seed=9)
    toks = tokens_for(cfg, 2, T)
    got = reference_logits(p, cfg, toks)
    for b in range(2):
        np.testing.assert_allclose(got[b], masked_fam_forward(p, cfg, toks[b]), rtol=1e-10, atol=1e-10)


def test_speed():
    import time
    cfg = make_cfg(attention="fam", d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                   block_size=8, memory_blocks=1, fam_len=4)
    p = random_params(cfg, seed=10)
    toks = tokens_for(cfg, 2, 40)
    t0 = time.perf_counter()
    reference_logits(p, cfg, toks)
    assert time.perf_counter() - t0 < 1.0

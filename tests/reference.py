"""Slow, obviously-correct numpy (float64) reference of TransformerFAM.

Written straight from the model's definition (docs/fam.md), independently of famjax, for parity tests.

Public API:
    reference_logits(params, cfg, tokens, position_offset=None) -> [batch, T, vocab]
    reference_fam_states(params, cfg, tokens, position_offset=None) -> [num_layers, batch, F, d]
    reference_forward(params, cfg, tokens, position_offset=None) -> (logits, fam_states)
    random_params(cfg, seed) -> params dict of numpy float64 arrays

Conventions (0-based blocks t = 0, 1, ...; block t holds tokens t*B .. (t+1)*B - 1):
    - token at index p has RoPE position p + offset[b];
    - S_t (FAM after complete block t) has positions (t+1)*B - F + f, f = 0..F-1 (+ offset[b]);
    - the initial FAM S_0^l ("S_{-1}" in 0-based block counting) has positions -F..-1 (+ offset[b]).
Options of pretrained families, read with getattr and defaults (off): qkv_bias (q/k/v biases before RoPE),
norm_offset (norms multiply by norm_offset + scale), post_norms (Gemma 2 sandwich norms on the attention and
FFN outputs, FAM rows included), attn_softcap (scores c tanh(s / c) before the softmax), final_softcap
(logits c tanh(logits / c)), query_scale (score scale; None = hd ** -0.5).
Everything is computed one batch row at a time, one layer at a time, one block at a time and
(for the block tokens) one query token at a time, with an explicit list of keys per query.
"""
import math

import numpy as np

# ----------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------

def _norm(x, p, cfg):
    """x: [N, d]. RMSNorm or LayerNorm over the last axis."""
    eps = float(cfg.norm_eps)
    scale = np.asarray(p["scale"], np.float64) + float(getattr(cfg, "norm_offset", 0.0))
    if cfg.norm == "rms":
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + eps) * scale
    if cfg.norm == "layer":
        mu = np.mean(x, axis=-1, keepdims=True)
        var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * scale + np.asarray(p["bias"], np.float64)
    raise ValueError(f"unknown norm {cfg.norm!r}")


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _mlp(x, p, cfg):
    """x: [N, d] -> [N, d]."""
    up = x @ p["up"]
    if cfg.mlp_activation == "swiglu":
        hidden = _silu(x @ p["gate"]) * up
    elif cfg.mlp_activation == "geglu":
        hidden = _gelu_tanh(x @ p["gate"]) * up
    elif cfg.mlp_activation == "gelu":
        hidden = _gelu_tanh(up)
    else:
        raise ValueError(f"unknown mlp_activation {cfg.mlp_activation!r}")
    return hidden @ p["down"]


def _rope(x, positions, rope_base):
    """Rotate-half RoPE. x: [N, heads, hd]; positions: [N] (float64)."""
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = rope_base ** (-2.0 * np.arange(half, dtype=np.float64) / hd)  # [half]
    angle = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]  # [N, half]
    cos = np.cos(angle)[:, None, :]  # [N, 1, half]
    sin = np.sin(angle)[:, None, :]
    x1 = x[..., :half]
    x2 = x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _qkv(xn, positions, lp, cfg):
    """xn: normed rows [N, d] at RoPE positions [N]. Returns q [N,H,hd], k [N,KV,hd], v [N,KV,hd]."""
    q = np.einsum("nd,dhk->nhk", xn, lp["q"])
    k = np.einsum("nd,dhk->nhk", xn, lp["k"])
    v = np.einsum("nd,dhk->nhk", xn, lp["v"])
    if getattr(cfg, "qkv_bias", False):  # biases before RoPE (Qwen2)
        q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
    q = _rope(q, positions, cfg.rope_base)
    k = _rope(k, positions, cfg.rope_base)
    return q, k, v


def _attend(q, k, v, lp, cfg):
    """Unmasked attention of queries q [Nq,H,hd] over keys k/v [Nk,KV,hd]; returns [Nq, d].

    The caller passes exactly the keys each query may see (no mask here)."""
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    group = H // KV
    scale = getattr(cfg, "query_scale", None)
    cap = float(getattr(cfg, "attn_softcap", 0.0))
    out = np.zeros((q.shape[0], H, hd), np.float64)
    for h in range(H):
        kh = k[:, h // group, :]  # [Nk, hd]
        vh = v[:, h // group, :]
        scores = q[:, h, :] @ kh.T  # [Nq, Nk]
        scores = scores / math.sqrt(hd) if scale is None else scores * float(scale)
        if cap:
            scores = cap * np.tanh(scores / cap)
        scores = scores - scores.max(axis=-1, keepdims=True)
        w = np.exp(scores)
        w = w / w.sum(axis=-1, keepdims=True)
        out[:, h, :] = w @ vh
    out = np.einsum("nhk,hkd->nd", out, lp["o"])
    return _norm(out, lp["norm_post_attn"], cfg) if getattr(cfg, "post_norms", False) else out


def _ffn(a, lp, cfg):
    """FFN(Norm2(a)) [N, d], normed again with post_norms (Gemma 2)."""
    out = _mlp(_norm(a, lp["norm2"], cfg), lp["mlp"], cfg)
    return _norm(out, lp["norm_post_ffn"], cfg) if getattr(cfg, "post_norms", False) else out


def _fam_positions(t, cfg, F, offset):
    """RoPE positions of S_t, the FAM after 0-based block t; t = -1 is the initial FAM.

    Ablation fam_positions="zero": every FAM row at position 0, whatever the block or the offset."""
    if getattr(cfg, "fam_positions", "block") == "zero":
        return np.zeros(F, np.float64)
    B = cfg.block_size
    return np.arange(F, dtype=np.float64) + ((t + 1) * B - F) + offset


def _mode(cfg):
    """Returns (attention, B, m, F) with the per-mode simplifications applied."""
    att = cfg.attention
    if att == "full":
        return att, None, None, 0
    if att == "bswa":
        return att, int(cfg.block_size), int(cfg.memory_blocks), 0
    if att == "fam":
        return att, int(cfg.block_size), int(cfg.memory_blocks), int(cfg.fam_len)
    raise ValueError(f"unknown attention {att!r}")


# ----------------------------------------------------------------------------------------------
# Initial FAM (spec section 4)
# ----------------------------------------------------------------------------------------------

def _initial_fams(params, cfg, offset):
    """[num_layers, F, d]: S_0^l for one batch row. S_0^0 = fam_init; S_0^{l+1} = layer l applied to
    S_0^l alone (full bidirectional attention among the F rows at positions -F..-1, normal residual)."""
    _, _, _, F = _mode(cfg)
    d = cfg.d_model
    out = np.zeros((cfg.num_layers, F, d), np.float64)
    if F == 0:
        return out
    s = np.asarray(params["fam_init"], np.float64).reshape(F, d)
    positions = _fam_positions(-1, cfg, F, offset)
    for l, lp in enumerate(params["layers"]):
        out[l] = s
        sn = _norm(s, lp["norm1"], cfg)
        q, k, v = _qkv(sn, positions, lp, cfg)
        a = _attend(q, k, v, lp, cfg) + s
        s = _ffn(a, lp, cfg) + a
    return out


# ----------------------------------------------------------------------------------------------
# One layer over a whole sequence (one batch row)
# ----------------------------------------------------------------------------------------------

def _layer_row(x, s0, lp, cfg, offset):
    """x: [T, d] input of this layer for one row; s0: [F, d] initial FAM of this layer.

    Returns (out [T, d], final FAM [F, d])."""
    att, B, m, F = _mode(cfg)
    T = x.shape[0]
    tok_pos = np.arange(T, dtype=np.float64) + offset
    xn = _norm(x, lp["norm1"], cfg)
    q, k, v = _qkv(xn, tok_pos, lp, cfg)  # projections of ALL tokens, each at its own position

    attn_out = np.zeros_like(x)

    if att == "full":
        for i in range(T):
            attn_out[i] = _attend(q[i:i + 1], k[:i + 1], v[:i + 1], lp, cfg)[0]
        return _finish(x, attn_out, lp, cfg), s0

    s = s0  # FAM read by the current block (S_{t-1})
    s_is_initial = True
    num_blocks = -(-T // B)
    for t in range(num_blocks):
        start, end = t * B, min(T, (t + 1) * B)
        mem_start = max(0, (t - m) * B)  # blocks t-m .. t-1 that exist

        # K/V (and Q) of the FAM S_{t-1}, at S_{t-1}'s positions
        if F > 0:
            sn = _norm(s, lp["norm1"], cfg)
            qf, kf, vf = _qkv(sn, _fam_positions(t - 1, cfg, F, offset), lp, cfg)
        else:  # no FAM rows: nothing to attend to, no update
            qf = None
            kf = np.zeros((0, cfg.num_kv_heads, cfg.head_dim))
            vf = np.zeros((0, cfg.num_kv_heads, cfg.head_dim))

        # block tokens: keys = [memory blocks, FAM S_{t-1}, own block up to and including i]
        for i in range(start, end):
            keys = np.concatenate([k[mem_start:start], kf, k[start:i + 1]], axis=0)
            vals = np.concatenate([v[mem_start:start], vf, v[start:i + 1]], axis=0)
            attn_out[i] = _attend(q[i:i + 1], keys, vals, lp, cfg)[0]

        # FAM update only after a COMPLETE block
        if F > 0 and end - start == B:
            keys = np.concatenate([kf, k[start:end]], axis=0)
            vals = np.concatenate([vf, v[start:end]], axis=0)
            af = _attend(qf, keys, vals, lp, cfg)
            if not s_is_initial or not getattr(cfg, "fam_zero_residual", True):  # ablation: always a residual
                af = af + s
            new = _ffn(af, lp, cfg) + af
            if getattr(cfg, "fam_keep_norm", False):  # variant: every row keeps its previous norm
                new = new * (np.linalg.norm(s, axis=-1, keepdims=True) / np.linalg.norm(new, axis=-1, keepdims=True))
            s = new
            s_is_initial = False

    return _finish(x, attn_out, lp, cfg), s


def _finish(x, attn_out, lp, cfg):
    a = attn_out + x
    return _ffn(a, lp, cfg) + a


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def reference_forward(params, cfg, tokens, position_offset=None):
    """Returns (logits [batch, T, V], fam_states [num_layers, batch, F, d]) for one pass from a fresh
    state. fam_states[l, b] is S after the last COMPLETE block of row b in layer l, or S_0^l if none
    completed. F is 0 for 'full' and 'bswa'."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 2, tokens.shape
    batch, T = tokens.shape
    assert len(params["layers"]) == cfg.num_layers, (len(params["layers"]), cfg.num_layers)
    _, _, _, F = _mode(cfg)
    d = cfg.d_model
    if position_offset is None:
        position_offset = np.zeros((batch,), np.int64)
    position_offset = np.asarray(position_offset).reshape(batch)

    embed = np.asarray(params["embed"], np.float64)
    logits = np.zeros((batch, T, cfg.vocab_size), np.float64)
    fams = np.zeros((cfg.num_layers, batch, F, d), np.float64)

    for b in range(batch):
        offset = float(position_offset[b])
        h = embed[tokens[b]]  # [T, d]
        if cfg.embed_scale:
            h = h * math.sqrt(d)
        s0 = _initial_fams(params, cfg, offset)  # [L, F, d]
        for l, lp in enumerate(params["layers"]):
            h, fams[l, b] = _layer_row(h, s0[l], lp, cfg, offset)
        hn = _norm(h, params["final_norm"], cfg)
        if cfg.tie_embeddings:
            logits[b] = hn @ embed.T
        else:
            logits[b] = hn @ np.asarray(params["lm_head"], np.float64)
        cap = float(getattr(cfg, "final_softcap", 0.0))
        if cap:
            logits[b] = cap * np.tanh(logits[b] / cap)
    return logits, fams


def reference_logits(params, cfg, tokens, position_offset=None):
    """Logits [batch, T, vocab] (float64) for int tokens [batch, T] in one pass from a fresh state."""
    return reference_forward(params, cfg, tokens, position_offset)[0]


def reference_fam_states(params, cfg, tokens, position_offset=None):
    """Final FAM per layer, [num_layers, batch, F, d] (float64); see reference_forward."""
    return reference_forward(params, cfg, tokens, position_offset)[1]


def random_params(cfg, seed=0):
    """Random float64 params in the layout of the spec/brief. fam_init has F = cfg.fam_len rows
    (0 rows if cfg has no fam_len). All other weights depend only on the seed and the shapes, not on
    fam_len or attention, so e.g. 'fam' and 'bswa' configs built from one seed share them."""
    rng = np.random.default_rng(seed)
    d, H, KV, hd, M, V = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.mlp_dim, cfg.vocab_size)
    F = int(getattr(cfg, "fam_len", 0) or 0)

    def n(*shape, scale):
        return rng.normal(size=shape) * scale

    offset = float(getattr(cfg, "norm_offset", 0.0))

    def norm_p():
        p = {"scale": 1.0 - offset + n(d, scale=0.1)}  # the norm multiplies by about 1 whatever the offset
        if cfg.norm == "layer":
            p["bias"] = n(d, scale=0.1)
        return p

    layers = []
    for _ in range(cfg.num_layers):
        mlp = {"up": n(d, M, scale=0.2), "down": n(M, d, scale=0.1)}
        if cfg.mlp_activation != "gelu":
            mlp["gate"] = n(d, M, scale=0.2)
        layers.append({
            "norm1": norm_p(),
            "q": n(d, H, hd, scale=0.2),
            "k": n(d, KV, hd, scale=0.2),
            "v": n(d, KV, hd, scale=0.2),
            "o": n(H, hd, d, scale=0.1),
            "norm2": norm_p(),
            "mlp": mlp,
        })
    params = {
        "embed": n(V, d, scale=0.2),
        "layers": layers,
        "final_norm": norm_p(),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = n(d, V, scale=0.2)
    # drawn last, so configs that differ only in fam_len/attention share all other weights
    params["fam_init"] = n(F, d, scale=0.2)
    # The options' extra weights come from their own generator, so the weights above do not depend on them.
    extra = np.random.default_rng([seed, 1])
    for lp in layers:
        if getattr(cfg, "qkv_bias", False):
            lp["q_bias"] = extra.normal(size=(H, hd)) * 0.3
            lp["k_bias"] = extra.normal(size=(KV, hd)) * 0.3
            lp["v_bias"] = extra.normal(size=(KV, hd)) * 0.3
        if getattr(cfg, "post_norms", False):
            for name in ("norm_post_attn", "norm_post_ffn"):
                lp[name] = {"scale": 1.0 - offset + extra.normal(size=d) * 0.1}
                if cfg.norm == "layer":
                    lp[name]["bias"] = extra.normal(size=d) * 0.1
    return params

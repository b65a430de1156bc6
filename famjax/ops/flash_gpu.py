"""A fused Pallas (GPU, Triton) kernel for ops.segment_attention: queries against key segments, one softmax.

The GPU counterpart of ops.flash (the TPU kernel), with the same contract, masks (None, CAUSAL, a bool per
[b, n] group) and custom_vjp structure: a forward kernel that walks every visible key tile of every segment with
float32 running max / sum and saves the logsumexp, then a dq kernel over the same walk and one dk/dv kernel per
segment. What differs is the GPU's programming model: a program owns one output tile and loops over the key (or
query) tiles itself (`lax.fori_loop`), keeping its accumulators in registers, so there is no scratch memory and
no sequential grid axis; a hidden segment, or a causal tile above the diagonal, is a shorter loop.

Layouts: q, k, v are read in place as [b n, T, heads, hd] (a reshape of the model's [b, n, T, heads, hd]; a tile
of one head is a strided [rows, hd] load), so no transpose either way. Triton's limits decide `supports`: every
tile and hd a power of two, at least 16 (its matrix units' smallest dot). interpret=True runs the kernels on CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from famjax.ops.attention import CAUSAL, MASKED
from famjax.ops.flash import _NT, _dot, _score_grad, _scores, _Segment, fits, segment_vjp, visibility

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
DEFAULT_BLOCK_BWD = 32  # query and key tile of the backward kernels (they hold two [tile, hd] accumulators)
_MIN_TILE = 16


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: the custom_vjp's non-differentiable argument)."""
    segments: tuple  # of _Segment, tiled for the forward pass
    bwd_segments: tuple  # the same, tiled for the backward pass
    q_len: int
    block_q: int
    block_q_bwd: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float
    interpret: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def _tile(size: int, block: int) -> int | None:
    """The tile of an axis of `size`: block, or the whole axis if shorter; None unless a power of two >= 16
    that divides the axis."""
    t = min(block, size)
    return t if size % t == 0 and t >= _MIN_TILE and t & (t - 1) == 0 else None


def supports(q, segments, *, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
             block_bwd: int = DEFAULT_BLOCK_BWD) -> bool:
    """Returns whether flash_segment_attention(q, segments) can run (else use ops.segment_attention).

    q: [b, n, Tq, H, hd] (an array or a ShapeDtypeStruct); segments: sequence of (k, v, mask), see ops.flash.
    """
    def tiles(length: int, query_axis: bool) -> bool:
        return (_tile(length, block_q if query_axis else block_k) is not None
                and _tile(length, block_bwd) is not None)
    hd_ok = len(q.shape) == 5 and _tile(q.shape[-1], q.shape[-1]) is not None  # a power of two >= 16
    return hd_ok and fits(q, segments, tiles)


def flash_segment_attention(q, segments, *, scale: float | None = None, softcap: float = 0.0,
                            block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                            block_bwd: int = DEFAULT_BLOCK_BWD, interpret: bool = False):
    """Returns softmax attention of q over the union of key segments, [b, n, Tq, H, hd] in q's dtype.

    Arguments as ops.flash.flash_segment_attention (q [b, n, Tq, H, hd]; segments of (k, v, mask), k, v
    [b, n, S, KV, hd]; scale, softcap); block_q, block_k: the forward kernel's query / key tile; block_bwd: the
    backward kernels' tile on both axes; interpret: run the kernels on CPU. Differentiable in q and every k, v.
    """
    if not supports(q, segments, block_q=block_q, block_k=block_k, block_bwd=block_bwd):
        raise ValueError("flash_gpu.flash_segment_attention: unsupported shapes or masks (masks must be None, "
                         "CAUSAL or bool broadcastable to [b, n, 1, 1]; every T a multiple of its tiles, tiles "
                         "and hd powers of two >= 16); use ops.segment_attention(q, segments)")
    b, n, tq, h, hd = q.shape
    plan = _Plan(
        segments=tuple(_Segment(k.shape[2], _tile(k.shape[2], block_k), mask is CAUSAL) for k, _, mask in segments),
        bwd_segments=tuple(_Segment(k.shape[2], _tile(k.shape[2], block_bwd), mask is CAUSAL)
                           for k, _, mask in segments),
        q_len=tq, block_q=_tile(tq, block_q), block_q_bwd=_tile(tq, block_bwd), heads=h,
        kv_heads=segments[0][0].shape[3], head_dim=hd, scale=float(hd ** -0.5 if scale is None else scale),
        softcap=float(softcap), interpret=bool(interpret))
    visible = visibility(segments, b, n)  # [segments, b n]

    def flat(x):
        return x.reshape(b * n, *x.shape[2:])
    out = _attend(plan, flat(q), tuple(flat(k) for k, _, _ in segments), tuple(flat(v) for _, v, _ in segments),
                  visible)
    return out.reshape(q.shape)


def _tiles_seen(seg: _Segment, shown, q_end):
    """Number of key tiles of seg that the query rows before q_end see: all (none if hidden), causally those up to
    the diagonal."""
    tiles = seg.tiles if not seg.causal else jnp.minimum(seg.tiles, lax.div(q_end - 1, seg.block) + 1)
    return jnp.where(shown != 0, tiles, 0)


def _params(plan: _Plan):
    return plgpu.CompilerParams(num_warps=4 if plan.head_dim <= 64 else 8, num_stages=2)


def _call(kernel, plan, grid, in_specs, out_specs, out_shape, name, cost):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          compiler_params=_params(plan), interpret=plan.interpret, name=name,
                          cost_estimate=cost)


# BlockSpecs on the (group, head, query tile) grid of the forward and dq kernels.
def _q_spec(rows: int, hd: int):
    return pl.BlockSpec((None, rows, None, hd), lambda g, h, i: (g, i, h, 0))


def _row_spec(rows: int):  # lse / delta [b n, H, Tq]
    return pl.BlockSpec((None, None, rows), lambda g, h, i: (g, h, i))


def _visible_spec(nseg: int):  # visible [segments, b n] -> this group's column
    return pl.BlockSpec((nseg, None), lambda g, *_: (0, g))


def _segment_specs(plan: _Plan):
    """k, v of every segment: a kv head's whole segment [S, hd], tiles loaded in the kernel's loop."""
    specs = []
    for seg in plan.segments:
        spec = pl.BlockSpec((None, seg.length, None, plan.head_dim), lambda g, h, i: (g, 0, h // plan.group, 0))
        specs += [spec, spec]
    return specs


def _cost(plan: _Plan, bn: int, flops_per_pair: int, arrays) -> pl.CostEstimate:
    pairs = bn * plan.heads * sum(plan.q_len * s.length * (0.5 if s.causal else 1.0) for s in plan.segments)
    return pl.CostEstimate(flops=int(flops_per_pair * pairs * plan.head_dim), transcendentals=int(pairs),
                           bytes_accessed=int(sum(x.size * x.dtype.itemsize for x in arrays)))


def _walk(plan: _Plan, segments, visible_ref, kv_refs, q_start, step, carry):
    """Runs step(seg, k, v, key_start, carry) -> carry over every key tile that query rows [q_start,
    q_start + tile) see, segment by segment."""
    rows = carry[0].shape[0]
    for s, seg in enumerate(segments):
        k_ref, v_ref = kv_refs[2 * s], kv_refs[2 * s + 1]

        def body(t, carry, k_ref=k_ref, v_ref=v_ref, seg=seg):
            keys = pl.ds(pl.multiple_of(t * seg.block, seg.block), seg.block)
            return step(seg, k_ref[keys, :], v_ref[keys, :], t * seg.block, carry)
        carry = lax.fori_loop(0, _tiles_seen(seg, visible_ref[s], q_start + rows), body, carry)
    return carry


# ---- forward ---------------------------------------------------------------------------------------------


def _forward_kernel(visible_ref, q_ref, *refs, plan: _Plan):
    """One (group, head, query tile): online softmax over the key tiles of all segments."""
    nseg = len(plan.segments)
    kv_refs, (o_ref, lse_ref) = refs[:2 * nseg], refs[2 * nseg:]
    q_start = pl.program_id(2) * plan.block_q
    q = q_ref[...]

    def step(seg, k, v, k_start, carry):
        acc, m_prev, l_prev = carry
        scores, _ = _scores(plan, q, k, q_start, k_start, seg.causal, True)
        m_next = jnp.maximum(m_prev, scores.max(axis=-1))
        # Rows whose keys so far are all masked carry m = MASKED and count them with weight 1 until their first
        # visible key rescales them by exp(MASKED - m) = 0 (as ops.flash and segment_attention).
        p = jnp.exp(scores - m_next[:, None])
        alpha = jnp.exp(m_prev - m_next)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l_prev + p.sum(axis=-1)

    init = (jnp.zeros((plan.block_q, plan.head_dim), jnp.float32), jnp.full((plan.block_q,), MASKED, jnp.float32),
            jnp.zeros((plan.block_q,), jnp.float32))
    acc, m, l = _walk(plan, plan.segments, visible_ref, kv_refs, q_start, step, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _forward(plan: _Plan, q, ks, vs, visible):
    """Returns (out like q, lse float32 [b n, H, Tq])."""
    bn, nseg = q.shape[0], len(plan.segments)
    return _call(
        functools.partial(_forward_kernel, plan=plan), plan, (bn, plan.heads, plan.q_len // plan.block_q),
        [_visible_spec(nseg), _q_spec(plan.block_q, plan.head_dim), *_segment_specs(plan)],
        [_q_spec(plan.block_q, plan.head_dim), _row_spec(plan.block_q)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((bn, plan.heads, plan.q_len), jnp.float32)],
        "flash_segment_attention_gpu_fwd", _cost(plan, bn, 4, (q, *ks, *vs, q)),
    )(visible, q, *[x for kv in zip(ks, vs) for x in kv])


# ---- backward: dq ----------------------------------------------------------------------------------------


def _dq_kernel(visible_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    """One (group, head, query tile): dq accumulated over the key tiles of all segments."""
    nseg = len(plan.segments)
    kv_refs, dq_ref = refs[:2 * nseg], refs[2 * nseg]
    q_start = pl.program_id(2) * plan.block_q_bwd
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def step(seg, k, v, k_start, carry):
        (acc,) = carry
        scores, tanh = _scores(plan, q, k, q_start, k_start, seg.causal, True)
        ds = _score_grad(plan, jnp.exp(scores - lse), _dot(do, v, _NT), delta, tanh)
        return (acc + _dot(ds.astype(k.dtype), k),)

    init = (jnp.zeros((plan.block_q_bwd, plan.head_dim), jnp.float32),)
    (acc,) = _walk(plan, plan.bwd_segments, visible_ref, kv_refs, q_start, step, init)
    dq_ref[...] = acc.astype(dq_ref.dtype)


def _dq(plan: _Plan, q, ks, vs, visible, do, lse, delta):
    bn, nseg, rows = q.shape[0], len(plan.segments), plan.block_q_bwd
    return _call(
        functools.partial(_dq_kernel, plan=plan), plan, (bn, plan.heads, plan.q_len // rows),
        [_visible_spec(nseg), _q_spec(rows, plan.head_dim), _q_spec(rows, plan.head_dim), _row_spec(rows),
         _row_spec(rows), *_segment_specs(plan)],
        _q_spec(rows, plan.head_dim), jax.ShapeDtypeStruct(q.shape, q.dtype),
        "flash_segment_attention_gpu_dq", _cost(plan, bn, 6, (q, q, q, *ks, *vs)),
    )(visible, q, do, lse, delta, *[x for kv in zip(ks, vs) for x in kv])


# ---- backward: dk, dv per segment ------------------------------------------------------------------------


def _dkv_kernel(visible_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, *, plan: _Plan,
                s: int):
    """One (group, kv head, key tile) of segment s: dk, dv over the query tiles of the kv head's query heads
    that see it, in the transposed orientation (keys on rows)."""
    seg, rows = plan.bwd_segments[s], plan.block_q_bwd
    k_start = pl.program_id(2) * seg.block
    k, v = k_ref[...], v_ref[...]
    first = lax.div(k_start, rows) if seg.causal else 0  # query tiles before it do not see this key tile
    last = jnp.where(visible_ref[s] != 0, plan.q_len // rows, first)
    carry = (jnp.zeros((seg.block, plan.head_dim), jnp.float32),) * 2
    for r in range(plan.group):
        def body(i, carry, r=r):
            dk, dv = carry
            queries = pl.ds(pl.multiple_of(i * rows, rows), rows)
            q, do = q_ref[queries, r, :], do_ref[queries, r, :]
            scores, tanh = _scores(plan, k, q, k_start, i * rows, seg.causal, False)
            p = jnp.exp(scores - lse_ref[r, queries][None, :])  # [keys, queries]
            ds = _score_grad(plan, p, _dot(v, do, _NT), delta_ref[r, queries][None, :], tanh)
            return dk + _dot(ds.astype(q.dtype), q), dv + _dot(p.astype(do.dtype), do)
        carry = lax.fori_loop(first, last, body, carry)
    dk_ref[...] = carry[0].astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _dkv(plan: _Plan, s: int, q, k, v, visible, do, lse, delta):
    seg, bn, hd, group = plan.bwd_segments[s], q.shape[0], plan.head_dim, plan.group
    heads = pl.BlockSpec((None, plan.q_len, group, hd), lambda g, kv, t: (g, 0, kv, 0))
    rows = pl.BlockSpec((None, group, plan.q_len), lambda g, kv, t: (g, kv, 0))
    tile = pl.BlockSpec((None, seg.block, None, hd), lambda g, kv, t: (g, t, kv, 0))
    one = dataclasses.replace(plan, segments=(seg,))
    return _call(
        functools.partial(_dkv_kernel, plan=plan, s=s), plan, (bn, plan.kv_heads, seg.tiles),
        [_visible_spec(len(plan.segments)), heads, heads, rows, rows, tile, tile], [tile, tile],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        f"flash_segment_attention_gpu_dkv{s}", _cost(one, bn, 8, (q, q, k, v, k, v)),
    )(visible, q, do, lse, delta, k, v)


# ---- custom_vjp ------------------------------------------------------------------------------------------


def _delta(plan: _Plan, do, out):
    """rowsum(dO * O) float32 [b n, H, Tq] from do, out [b n, Tq, H, hd]."""
    return (do.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1).transpose(0, 2, 1)


# q [b n, Tq, H, hd], ks, vs [b n, S, KV, hd]; visible int32 [segments, b n]. Returns out like q.
_attend = segment_vjp(_forward, _delta, _dq, _dkv)

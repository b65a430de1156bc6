"""A fused Pallas (TPU) kernel for ops.segment_attention: queries against key segments under one online softmax.

Same contract as ops.segment_attention, restricted to the segment masks the kernel evaluates itself, which are
the ones every training-time mode needs (docs/design.md, "Segment attention kernel"):
  None          every key of the segment is visible;
  bool array    broadcastable to [b, n, 1, 1]: the whole segment is visible or not for each group (BSWA memory
                blocks before a sequence's start, packed examples);
  CAUSAL        query i sees key j <= i (the own block / the chunk itself; needs Tq == S).
`supports` says whether a call fits; a caller falls back to ops.segment_attention, which takes the same segments
(CAUSAL included) and dense masks, for anything else (decode's compact chunks, a KV cache).

The forward pass walks the key tiles of all segments in turn with float32 running max / sum (flash attention),
so no [Tq, S] score array reaches HBM, and saves the logsumexp per query. The backward pass (custom_vjp) is two
kernels: dq over the same walk, and per segment dk/dv over (query heads of the KV group) x (query tiles), both
from p = exp(s - lse) and delta = rowsum(dO * O). Causal tiles above the diagonal are skipped (no compute, and
their blocks are not fetched), and so are the segments hidden from a group.

Layouts: with hd a multiple of 128 the kernels read q/k/v in place as [b n, T, heads hd] (a head is a 128-lane
column block, so no transpose); otherwise as [b n, heads, T, hd] (one transpose each way). Tiles: block_q rows of
queries, block_k keys per segment (the segment's length if shorter); T must be a multiple of its tile. On TPU the
tiles should be multiples of 128 (or the whole axis); interpret=True runs the same kernels on CPU. The kernels
are written for TPU (Mosaic); a GPU run needs the XLA path or cuDNN.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from famjax.ops.attention import CAUSAL, MASKED  # the marker and masked score of the XLA path

_NT = (((1,), (1,)), ((), ()))  # dot_general: a [m, d] . b [n, d] -> [m, n]


DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


@dataclasses.dataclass(frozen=True)
class _Segment:
    length: int  # S
    block: int  # key tile
    causal: bool

    @property
    def tiles(self) -> int:
        return self.length // self.block


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: the custom_vjp's non-differentiable argument)."""
    segments: tuple
    q_len: int
    block_q: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float
    flat: bool  # [bn, T, heads hd] layout (hd % 128 == 0) rather than [bn, heads, T, hd]
    interpret: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_tiles(self) -> int:
        return self.q_len // self.block_q

    @property
    def offsets(self) -> tuple:
        """First step of each segment on the kernels' key-tile axis (all segments' tiles in turn)."""
        out, total = [], 0
        for seg in self.segments:
            out.append(total)
            total += seg.tiles
        return tuple(out)

    @property
    def key_steps(self) -> int:
        return sum(seg.tiles for seg in self.segments)


def _tile(size: int, block: int) -> int | None:
    """Returns the tile of an axis of `size` (block, or the whole axis if shorter), None if it does not divide."""
    t = min(block, size)
    return t if size % t == 0 else None


def _mask_kind(mask):
    """Returns "none", "causal" or "block" for a supported mask, None otherwise."""
    if mask is None:
        return "none"
    if mask is CAUSAL:
        return "causal"
    shape = jnp.shape(mask)
    if jnp.result_type(mask) == jnp.bool_ and len(shape) <= 4 and tuple((1, 1, *shape)[-2:]) == (1, 1):
        return "block"
    return None


def supports(q, segments, *, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> bool:
    """Returns whether flash_segment_attention(q, segments) can run (else use ops.segment_attention).

    q: [b, n, Tq, H, hd] (an array or a ShapeDtypeStruct); segments: sequence of (k, v, mask), see the module.
    """
    return fits(q, segments, lambda length, query_axis: _tile(length, block_q if query_axis else block_k) is not None)


def fits(q, segments, tiles) -> bool:
    """Whether q [b, n, Tq, H, hd] and segments of (k, v, mask) take the form every segment kernel needs (the
    module's masks, k and v alike [b, n, S, KV, hd] with KV dividing H, causal only with S == Tq) and
    tiles(length, query_axis) holds for Tq (query_axis True) and every S: the kernels' `supports`."""
    if len(q.shape) != 5 or not segments:
        return False
    b, n, tq, h, hd = q.shape
    if not tiles(tq, True):
        return False
    for k, v, mask in segments:
        kind = _mask_kind(mask)
        if (kind is None or k.shape != v.shape or len(k.shape) != 5 or k.shape[-1] != hd
                or k.shape[3] != segments[0][0].shape[3] or h % k.shape[3] or not tiles(k.shape[2], False)):
            return False
        if kind == "causal" and k.shape[2] != tq:
            return False
        if kind == "block":
            try:
                if jnp.broadcast_shapes(jnp.shape(mask), (b, n, 1, 1)) != (b, n, 1, 1):
                    return False
            except ValueError:
                return False
    return True


def flash_segment_attention(q, segments, *, scale: float | None = None, softcap: float = 0.0,
                            block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                            interpret: bool = False):
    """Returns softmax attention of q over the union of key segments, [b, n, Tq, H, hd] in q's dtype.

    q: [b, n, Tq, H, hd]; segments: sequence of (k, v, mask), k, v: [b, n, S, KV, hd] with KV dividing H
        (GQA: query head h reads kv head h // (H // KV)), mask: None, CAUSAL or bool broadcastable to
        [b, n, 1, 1] (see the module; `supports` checks a call). Every query must see at least one key.
    scale: score scale, None = hd ** -0.5; softcap: c > 0 caps every scaled score s to c tanh(s / c), 0 = off.
    block_q, block_k: query / key tile (rows of one kernel step); interpret: run the kernels on CPU.
    Differentiable in q and every k, v (Pallas backward kernels).
    """
    if not supports(q, segments, block_q=block_q, block_k=block_k):
        raise ValueError("flash_segment_attention: unsupported shapes or masks (masks must be None, flash.CAUSAL "
                         "or bool broadcastable to [b, n, 1, 1]; every T a multiple of its tile); use "
                         "ops.segment_attention(q, segments), which takes every mask")
    b, n, tq, h, hd = q.shape
    kv = segments[0][0].shape[3]
    plan = _Plan(
        segments=tuple(_Segment(k.shape[2], _tile(k.shape[2], block_k), mask is CAUSAL) for k, _, mask in segments),
        q_len=tq, block_q=_tile(tq, block_q), heads=h, kv_heads=kv, head_dim=hd,
        scale=float(hd ** -0.5 if scale is None else scale), softcap=float(softcap), flat=hd % 128 == 0,
        interpret=bool(interpret))
    visible = visibility(segments, b, n)
    to = functools.partial(_to_layout, plan.flat)
    out = _attend(plan, to(q), tuple(to(k) for k, _, _ in segments), tuple(to(v) for _, v, _ in segments),
                  visible)
    return _from_layout(plan.flat, out, b, n, h)


def visibility(segments, b: int, n: int):
    """int32 [segments, b n]: 1 where a segment is visible to a group (its bool mask, else always)."""
    return jnp.stack([
        jnp.ones((b * n,), jnp.int32) if _mask_kind(mask) != "block"
        else jnp.broadcast_to(mask, (b, n, 1, 1)).reshape(b * n).astype(jnp.int32)
        for _, _, mask in segments])


def _to_layout(flat: bool, x):
    """[b, n, T, heads, hd] -> [b n, T, heads hd] (flat) or [b n, heads, T, hd]."""
    b, n, t, heads, hd = x.shape
    x = x.reshape(b * n, t, heads, hd)
    return x.reshape(b * n, t, heads * hd) if flat else x.transpose(0, 2, 1, 3)


def _from_layout(flat: bool, x, b: int, n: int, heads: int):
    """Inverse of _to_layout: -> [b, n, T, heads, hd]."""
    if flat:
        return x.reshape(b, n, x.shape[1], heads, x.shape[2] // heads)
    return x.transpose(0, 2, 1, 3).reshape(b, n, x.shape[2], heads, x.shape[3])


def _spec(plan: _Plan, rows: int, index):
    """BlockSpec of a [rows, hd] tile of a q/k/v-like array; index(*grid, visible) -> (bn, head, tile)."""
    if plan.flat:
        return pl.BlockSpec((None, rows, plan.head_dim), lambda *a: _flat_index(*index(*a)))
    return pl.BlockSpec((None, None, rows, plan.head_dim), lambda *a: (*index(*a), 0))


def _flat_index(g, head, tile):
    return g, tile, head


def _row_spec(plan: _Plan, index):
    """BlockSpec of a [1, block_q] tile of a per-query statistic [b n, H, 1, Tq]; index as in _spec."""
    return pl.BlockSpec((None, None, 1, plan.block_q), lambda *a: (lambda g, h, i: (g, h, 0, i))(*index(*a)))


def _key_tile(plan: _Plan, s: int, g, i, j, visible_ref):
    """Tile of segment s that key step j reads for group g, query tile i: clamped into the segment (and,
    causally, to the last tile query tile i sees; tile 0 if the segment is hidden) so that steps that skip it
    fetch nothing new."""
    seg = plan.segments[s]
    t = jnp.clip(j - plan.offsets[s], 0, seg.tiles - 1)
    if seg.causal:
        t = jnp.minimum(t, lax.div((i + 1) * plan.block_q - 1, seg.block))
    return jnp.where(visible_ref[s, g] != 0, t, 0)


def _runs(plan: _Plan, s: int, visible_ref, g, i, t):
    """Whether query tile i meets key tile t of segment s (t may be out of range)."""
    seg = plan.segments[s]
    run = (t >= 0) & (t < seg.tiles) & (visible_ref[s, g] != 0)
    if seg.causal:
        run &= t * seg.block <= (i + 1) * plan.block_q - 1
    return run


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    """Returns a . b in float32; float32 operands at full precision (as the XLA path in tests), others native
    (an explicit precision, since Mosaic rejects the fp32 passes a global "highest" would ask of bf16)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _scores(plan: _Plan, a, b, a_start, b_start, causal: bool, queries_first: bool):
    """Returns (scores, tanh or None): float32 [rows(a), rows(b)] scaled, capped and masked scores.

    queries_first: a holds queries and b keys (else transposed, for dk/dv); *_start: their first positions.
    """
    s = _dot(a, b, _NT) * plan.scale
    t = None
    if plan.softcap:
        t = jnp.tanh(s / plan.softcap)
        s = plan.softcap * t
    if causal:
        rows = a_start + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = b_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(rows >= cols if queries_first else rows <= cols, s, MASKED)
    return s, t


def _score_grad(plan: _Plan, p, dp, delta, tanh):
    """Returns d loss / d (q.k), from the softmax weights p, dp = dO.v and delta = rowsum(dO O) (either
    orientation: delta broadcasts along the key axis)."""
    ds = p * (dp - delta)
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    return ds * plan.scale


# ---- forward ---------------------------------------------------------------------------------------------


def _forward_kernel(visible_ref, q_ref, *refs, plan: _Plan):
    """One (group, head, query tile, key step): online softmax over the key tiles of all segments."""
    nseg = len(plan.segments)
    kv_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:2 * nseg], refs[2 * nseg:]
    g, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for s, seg in enumerate(plan.segments):
        t = j - plan.offsets[s]

        @pl.when(_runs(plan, s, visible_ref, g, i, t))
        def _step(k_ref=kv_refs[2 * s], v_ref=kv_refs[2 * s + 1], seg=seg, t=t):
            v = v_ref[...]
            scores, _ = _scores(plan, q_ref[...], k_ref[...], i * plan.block_q, t * seg.block, seg.causal, True)
            m_prev = m_ref[...]
            m_next = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))
            # A row whose scores so far are all masked has m = MASKED and weights exp(0) = 1 on them; its first
            # visible key rescales them by exp(MASKED - m) = 0, so they never count (as in segment_attention).
            p = jnp.exp(scores - m_next)
            alpha = jnp.exp(m_prev - m_next)
            l_ref[...] = alpha * l_ref[...] + p.sum(axis=-1, keepdims=True)
            acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v)
            m_ref[...] = m_next

    @pl.when(j == plan.key_steps - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
        lse_ref[...] = (m_ref[...] + jnp.log(l)).reshape(lse_ref.shape)


def _key_specs(plan: _Plan):
    """k, v BlockSpecs of every segment on the (group, head, query tile, key step) grid."""
    specs = []
    for s, seg in enumerate(plan.segments):
        spec = _spec(plan, seg.block,
                     lambda g, h, i, j, vis, s=s: (g, lax.div(h, plan.group), _key_tile(plan, s, g, i, j, vis)))
        specs += [spec, spec]
    return specs


def _q_grid(plan: _Plan, bn: int):
    return (bn, plan.heads, plan.q_tiles, plan.key_steps)


def _q_index(g, h, i, j, vis):
    return g, h, i


def _visited(plan: _Plan, bn: int) -> float:
    """Query-key pairs the kernels compute (causal tiles above the diagonal skipped), for cost estimates."""
    total = 0.0
    for seg in plan.segments:
        total += plan.q_len * seg.length * (0.5 if seg.causal else 1.0)
    return total * bn * plan.heads


def _forward(plan: _Plan, q, ks, vs, visible):
    """Returns (out like q, lse float32 [b n, H, 1, Tq])."""
    bn = q.shape[0]
    f32 = jnp.float32
    nbytes = sum(x.size * x.dtype.itemsize for x in (q, *ks, *vs)) + q.size * q.dtype.itemsize
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=_q_grid(plan, bn),
            in_specs=[_spec(plan, plan.block_q, _q_index), *_key_specs(plan)],
            out_specs=[_spec(plan, plan.block_q, _q_index), _row_spec(plan, _q_index)],
            scratch_shapes=[pltpu.VMEM((plan.block_q, 1), f32), pltpu.VMEM((plan.block_q, 1), f32),
                            pltpu.VMEM((plan.block_q, plan.head_dim), f32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((bn, plan.heads, 1, plan.q_len), f32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=int(4 * _visited(plan, bn) * plan.head_dim),
                                      transcendentals=int(_visited(plan, bn)), bytes_accessed=int(nbytes)),
        interpret=plan.interpret, name="flash_segment_attention_fwd",
    )(visible, q, *[x for kv in zip(ks, vs) for x in kv])
    return out, lse


# ---- backward: dq ----------------------------------------------------------------------------------------


def _dq_kernel(visible_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, plan: _Plan):
    """One (group, head, query tile, key step): dq accumulated over the key tiles of all segments."""
    nseg = len(plan.segments)
    kv_refs, (dq_ref, acc_ref) = refs[:2 * nseg], refs[2 * nseg:]
    g, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    for s, seg in enumerate(plan.segments):
        t = j - plan.offsets[s]

        @pl.when(_runs(plan, s, visible_ref, g, i, t))
        def _step(k_ref=kv_refs[2 * s], v_ref=kv_refs[2 * s + 1], seg=seg, t=t):
            k, do = k_ref[...], do_ref[...]
            scores, tanh = _scores(plan, q_ref[...], k, i * plan.block_q, t * seg.block, seg.causal, True)
            p = jnp.exp(scores - lse_ref[0][:, None])
            dp = _dot(do, v_ref[...], _NT)
            ds = _score_grad(plan, p, dp, delta_ref[0][:, None], tanh)
            acc_ref[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(j == plan.key_steps - 1)
    def _finish():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dq(plan: _Plan, q, ks, vs, visible, do, lse, delta):
    bn = q.shape[0]
    visited = _visited(plan, bn)
    return pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=_q_grid(plan, bn),
            in_specs=[_spec(plan, plan.block_q, _q_index), _spec(plan, plan.block_q, _q_index),
                      _row_spec(plan, _q_index), _row_spec(plan, _q_index), *_key_specs(plan)],
            out_specs=_spec(plan, plan.block_q, _q_index),
            scratch_shapes=[pltpu.VMEM((plan.block_q, plan.head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=int(6 * visited * plan.head_dim), transcendentals=int(visited),
                                      bytes_accessed=int(sum(x.size * x.dtype.itemsize
                                                             for x in (q, q, q, *ks, *vs)))),
        interpret=plan.interpret, name="flash_segment_attention_dq",
    )(visible, q, do, lse, delta, *[x for kv in zip(ks, vs) for x in kv])


# ---- backward: dk, dv per segment ------------------------------------------------------------------------


def _dkv_kernel(visible_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, dk_acc, dv_acc,
                *, plan: _Plan, s: int):
    """One (group, kv head, key tile, query head of the group, query tile) of segment s, in the transposed
    orientation (keys on rows), so lse and delta are read as the [1, block_q] rows they are stored as."""
    seg = plan.segments[s]
    g, t, r, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((r == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(_runs(plan, s, visible_ref, g, i, t))
    def _step():
        q, do, v = q_ref[...], do_ref[...], v_ref[...]
        scores, tanh = _scores(plan, k_ref[...], q, t * seg.block, i * plan.block_q, seg.causal, False)
        p = jnp.exp(scores - lse_ref[...])  # [bk, bq]
        dv_acc[...] += _dot(p.astype(do.dtype), do)
        dp = _dot(v, do, _NT)
        ds = _score_grad(plan, p, dp, delta_ref[...], tanh)
        dk_acc[...] += _dot(ds.astype(q.dtype), q)

    @pl.when((r == plan.group - 1) & (i == plan.q_tiles - 1))
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkv(plan: _Plan, s: int, q, k, v, visible, do, lse, delta):
    seg, bn = plan.segments[s], q.shape[0]

    def q_index(g, kv, t, r, i, vis):
        if seg.causal:  # query tiles before the first that sees key tile t are skipped: fetch that one
            i = jnp.maximum(i, lax.div(t * seg.block, plan.block_q))
        shown = vis[s, g] != 0  # a hidden segment fetches one query tile
        return g, kv * plan.group + jnp.where(shown, r, 0), jnp.where(shown, i, 0)

    def k_index(g, kv, t, r, i, vis):
        return g, kv, t

    visited = plan.q_len * seg.length * (0.5 if seg.causal else 1.0) * bn * plan.heads
    return pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan, s=s),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(bn, plan.kv_heads, seg.tiles, plan.group, plan.q_tiles),
            in_specs=[_spec(plan, plan.block_q, q_index), _spec(plan, plan.block_q, q_index),
                      _row_spec(plan, q_index), _row_spec(plan, q_index),
                      _spec(plan, seg.block, k_index), _spec(plan, seg.block, k_index)],
            out_specs=[_spec(plan, seg.block, k_index), _spec(plan, seg.block, k_index)],
            scratch_shapes=[pltpu.VMEM((seg.block, plan.head_dim), jnp.float32)] * 2),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=int(8 * visited * plan.head_dim), transcendentals=int(visited),
                                      bytes_accessed=int(sum(x.size * x.dtype.itemsize
                                                             for x in (q, q, k, v, k, v)))),
        interpret=plan.interpret, name=f"flash_segment_attention_dkv{s}",
    )(visible, q, do, lse, delta, k, v)


# ---- custom_vjp ------------------------------------------------------------------------------------------


def segment_vjp(forward, delta_of, dq, dkv):
    """Returns attend(plan, q, ks, vs, visible) -> out, differentiable in q, ks, vs through a kernel family's
    backward kernels (this module's, ops.flash_gpu's): forward(plan, q, ks, vs, visible) -> (out, lse);
    delta_of(plan, do, out) -> rowsum(dO * O) in the layout the backward kernels read; dq(plan, q, ks, vs, visible,
    do, lse, delta) -> dq; dkv(plan, s, q, k, v, visible, do, lse, delta) -> (dk, dv) of segment s."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attend(plan, q, ks, vs, visible):
        return forward(plan, q, ks, vs, visible)[0]

    def attend_fwd(plan, q, ks, vs, visible):
        out, lse = forward(plan, q, ks, vs, visible)
        return out, (q, ks, vs, visible, out, lse)

    def attend_bwd(plan, residuals, do):
        q, ks, vs, visible, out, lse = residuals
        delta = delta_of(plan, do, out)
        grads = [dkv(plan, s, q, k, v, visible, do, lse, delta) for s, (k, v) in enumerate(zip(ks, vs))]
        return (dq(plan, q, ks, vs, visible, do, lse, delta), tuple(dk for dk, _ in grads),
                tuple(dv for _, dv in grads), None)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend


def _delta(plan: _Plan, do, out):
    """rowsum(dO * O) float32 [b n, H, 1, Tq] from do, out in the kernel layout."""
    delta = do.astype(jnp.float32) * out.astype(jnp.float32)
    if plan.flat:  # [bn, T, H hd] -> [bn, H, 1, T]
        return delta.reshape(*delta.shape[:2], plan.heads, plan.head_dim).sum(-1).transpose(0, 2, 1)[:, :, None]
    return delta.sum(-1)[:, :, None]  # [bn, H, T, hd] -> [bn, H, 1, T]


# q, ks, vs in the kernel layout; visible int32 [segments, b n]. Returns out like q.
_attend = segment_vjp(_forward, _delta, _dq, _dkv)

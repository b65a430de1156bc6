"""famjax.ops.flash: the Pallas segment attention kernel against ops.segment_attention, and TPU compiles.

Interpret mode (CPU) checks values and gradients (q, every k and v) in float32 for every mode's segments: full
causal attention over several query and key tiles, BSWA with 0-2 memory blocks (some invisible), FAM with F
smaller and larger than the block, the FAM update (Tq = F != S), GQA, softcap, and the [b n, T, H hd] layout of
hd = 128. With libtpu, the kernels (and the shipped splash attention kernel) compile for a v5e target.
"""
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famjax import ops
from famjax.ops import flash

TOL = dict(rtol=1e-5, atol=1e-5)


def _jit(fn):
    # Interpret mode turns each kernel into a loop over its grid; compiling those loops is most of this file's
    # time, and LLVM's optimisations (a third of it) buy nothing for programs that run once.
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _normal(i, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(22), i), shape, jnp.float32)


def _segments(b, n, kv, hd, lengths_and_masks, seed=1):
    """Returns [(k, v, mask)] with random k, v [b, n, S, kv, hd] for each (S, mask)."""
    return [(_normal(seed + 2 * i, (b, n, s, kv, hd)), _normal(seed + 2 * i + 1, (b, n, s, kv, hd)), mask)
            for i, (s, mask) in enumerate(lengths_and_masks)]


def _check(q, segments, *, softcap=0.0, kernel=flash, interpret=True, **blocks):
    """Asserts kernel (ops.flash or ops.flash_gpu, with its tiles `blocks`) == segment_attention in values and in
    gradients of <out, w> for q and every k, v."""
    masks = [m for _, _, m in segments]
    ks, vs = [k for k, _, _ in segments], [v for _, v, _ in segments]
    w = _normal(99, q.shape)

    def flash_fn(q, ks, vs):
        return kernel.flash_segment_attention(q, list(zip(ks, vs, masks)), softcap=softcap, interpret=interpret,
                                              **blocks)

    def xla_fn(q, ks, vs):
        return ops.segment_attention(q, list(zip(ks, vs, masks)), softcap=softcap)

    def run(fn):
        def loss(q, ks, vs):
            out = fn(q, ks, vs)
            return (out * w).sum(), out
        return _jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, ks, vs)

    assert kernel.supports(q, segments, **blocks)
    (_, out), grads = run(flash_fn)
    (_, ref), ref_grads = run(xla_fn)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(out, ref, **TOL)
    names = ["dq"] + [f"dk{i}" for i in range(len(ks))] + [f"dv{i}" for i in range(len(vs))]
    for name, g, r in zip(names, jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert np.abs(r).max() > 1e-3, name  # every segment takes part
        np.testing.assert_allclose(g, r, err_msg=name, **TOL)


@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16)])
def test_full_causal_over_several_query_and_key_tiles(block_q, block_k):
    # One 64-key causal segment: 2-4 tiles each way, tiles above the diagonal skipped; GQA with one kv head.
    t, h, hd = 64, 2, 8
    q = _normal(0, (1, 1, t, h, hd), 2.0)
    _check(q, _segments(1, 1, 1, hd, [(t, flash.CAUSAL)]), block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("m,kv_heads", [(0, 4), (1, 2), (2, 1)])
def test_bswa_memory_blocks_with_block_visibility(m, kv_heads):
    # Each of 3 blocks (B = 16) of 2 rows sees [m memory blocks, itself causal]; memory window i of block j
    # exists iff j >= m - i, and row 1 starts a packed example at block 2 (it sees no memory there).
    b, nb, bs, h, hd = 2, 3, 16, 4, 8
    q = _normal(0, (b, nb, bs, h, hd))
    visible = [np.array([[j >= m - i for j in range(nb)]] * b) for i in range(m)]
    for v in visible:
        v[1, 2] = False
    segments = _segments(b, nb, kv_heads, hd, [(bs, jnp.asarray(v)[:, :, None, None]) for v in visible]
                         + [(bs, flash.CAUSAL)])
    _check(q, segments, block_q=8, block_k=8)


@pytest.mark.parametrize("fam_len,softcap", [(4, 0.0), (24, 1.5)])
def test_fam_memory_fam_and_own_block(fam_len, softcap):
    # [memory block (invisible for block 0), previous FAM (F keys, one tile of F < 8 or 3 tiles of 8), own block
    # causal]; the second case also caps the scores (Gemma 2 softcap, its backward included).
    b, nb, bs, h, hd = 1, 2, 16, 2, 8
    q = _normal(0, (b, nb, bs, h, hd), 2.0)
    visible = jnp.asarray([[False, True]])[:, :, None, None]
    segments = _segments(b, nb, h, hd, [(bs, visible), (fam_len, None), (bs, flash.CAUSAL)])
    _check(q, segments, block_q=8, block_k=8, softcap=softcap)


def test_fam_update_fam_rows_against_previous_fam_and_whole_block():
    # The FAM update: F = 8 queries over [previous FAM (F keys), whole block (S = 32, two key tiles)], with the
    # second row's block hidden (as a partial block's keys are masked upstream): its FAM reads only itself.
    b, fam_len, bs, h, hd = 2, 8, 32, 4, 8
    q = _normal(0, (b, 1, fam_len, h, hd))
    segments = _segments(b, 1, 2, hd, [(fam_len, None), (bs, jnp.asarray([True, False])[:, None, None, None])])
    _check(q, segments, block_q=8, block_k=16)


def test_head_dim_128_reads_heads_in_place():
    # hd = 128 uses the [b n, T, H hd] layout (a head is a 128-lane column block, no transpose), with GQA.
    b, nb, bs, h, hd = 1, 2, 16, 4, 128
    q = _normal(0, (b, nb, bs, h, hd))
    segments = _segments(b, nb, 2, hd, [(bs, jnp.asarray([[False, True]])[..., None, None]), (4, None),
                                        (bs, flash.CAUSAL)])
    _check(q, segments, block_q=8, block_k=8)


def test_bfloat16_matches_the_xla_path_at_bfloat16_precision():
    # bf16 operands, float32 statistics: the kernels cast the weights to v's dtype as segment_attention does.
    b, nb, bs, h, hd, bf16 = 1, 2, 16, 2, 8, jnp.bfloat16
    q = _normal(0, (b, nb, bs, h, hd)).astype(bf16)
    segments = [(k.astype(bf16), v.astype(bf16), m) for k, v, m in _segments(
        b, nb, 1, hd, [(bs, jnp.asarray([[False, True]])[..., None, None]), (8, None), (bs, flash.CAUSAL)])]

    def loss(fn, q, ks):
        out = fn(q, [(k, v, m) for k, (_, v, m) in zip(ks, segments)])
        return out.astype(jnp.float32).sum(), out

    def run(fn):
        return _jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1), has_aux=True))(
            q, [k for k, _, _ in segments])

    (_, out), grads = run(functools.partial(flash.flash_segment_attention, block_q=8, block_k=8, interpret=True))
    (_, ref), ref_grads = run(ops.segment_attention)
    assert out.dtype == bf16
    for a, r in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref, ref_grads))):
        np.testing.assert_allclose(np.float32(a), np.float32(r), rtol=2e-2, atol=2e-2)


def test_supports_only_structured_masks_and_tiled_lengths():
    q = jnp.zeros((1, 2, 16, 4, 8))
    k = jnp.zeros((1, 2, 16, 2, 8))
    assert flash.supports(q, [(k, k, None), (k, k, jnp.ones((1, 2, 1, 1), bool)), (k, k, flash.CAUSAL)])
    assert flash.supports(q, [(k, k, jnp.ones((2, 1, 1), bool))])  # broadcasts to [b, n, 1, 1]
    assert not flash.supports(q, [(k, k, ops.causal_mask(16)[None, None])])  # a dense mask: XLA path
    assert not flash.supports(q, [(k, k, jnp.ones((1, 2, 16, 1), bool))])  # per query
    assert not flash.supports(q, [(k, k, jnp.ones((3, 2, 1, 1), bool))])  # does not broadcast
    assert not flash.supports(q[:, :, :8], [(k, k, flash.CAUSAL)])  # causal needs Tq == S
    assert not flash.supports(q, [(k, k, None)], block_k=6)  # 16 keys in tiles of 6
    assert not flash.supports(q, [(jnp.zeros((1, 2, 16, 3, 8)),) * 2 + (None,)])  # 3 kv heads for 4 heads
    with pytest.raises(ValueError, match=r"ops.segment_attention\(q, segments\), which takes every mask"):
        flash.flash_segment_attention(q, [(k, k, jnp.ones((1, 2, 16, 16), bool))])
    # The XLA fallback reads the CAUSAL marker as the dense causal mask.
    qr, kr = _normal(1, q.shape), _normal(2, k.shape)
    np.testing.assert_array_equal(ops.segment_attention(qr, [(kr, kr, flash.CAUSAL)]),
                                  ops.segment_attention(qr, [(kr, kr, ops.causal_mask(16)[None, None])]))


# ---- TPU compiles (libtpu: compile-only devices of a v5e topology) ---------------------------------------

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")


def _tpu_compile(fn, *shapes):
    """Returns the compiled fn for one v5e device, arguments placed there; shapes: (shape, dtype) pairs."""
    from famjax.tools import aot
    device = aot.topology_devices("v5e:2x2")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in shapes]
    return jax.jit(fn).lower(*args).compile()


def _grad_of(fn, argnums):
    return jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=argnums)


@needs_libtpu
@pytest.mark.parametrize("kv_heads,hd", [(8, 128), (2, 64)])
def test_kernel_forward_and_backward_compile_for_tpu(kv_heads, hd):
    # The FAM pattern at one block of the 1B shape, bf16: [memory (per-block visibility), FAM (64), own causal].
    b, nb, bs, h, fam_len, bf16 = 1, 2, 1024, 8, 64, jnp.bfloat16

    def attend(q, mk, mv, visible, fk, fv, k, v):
        return flash.flash_segment_attention(q, [(mk, mv, visible), (fk, fv, None), (k, v, flash.CAUSAL)])

    kv = ((b, nb, bs, kv_heads, hd), bf16)
    fam = ((b, nb, fam_len, kv_heads, hd), bf16)
    shapes = [((b, nb, bs, h, hd), bf16), kv, kv, ((b, nb, 1, 1), jnp.bool_), fam, fam, kv, kv]
    for fn in (attend, _grad_of(attend, (0, 1, 2, 4, 5, 6, 7))):
        compiled = _tpu_compile(fn, *shapes)
        text = compiled.as_text()
        # forward: 1 kernel; backward: the forward again (residuals), dq and one dk/dv kernel per segment
        assert text.count('custom_call_target="tpu_custom_call"') == (1 if fn is attend else 5)
        assert compiled.memory_analysis().argument_size_in_bytes > 0
        assert compiled.cost_analysis()["flops"] > 0  # the kernels' cost estimates


@needs_libtpu
def test_full_attention_at_16k_compiles_without_dense_scores():
    # One causal segment of 16k keys (the 1B shape's heads): XLA's path needs > 16 GiB of [T, T] temporaries
    # for the backward pass on a v5e; the kernels' temporaries are a few copies of q/k/v (48 MiB each).
    t, h, hd, bf16 = 16384, 12, 128, jnp.bfloat16

    def attend(q, k, v):
        return flash.flash_segment_attention(q, [(k, v, flash.CAUSAL)])

    for fn in (attend, _grad_of(attend, (0, 1, 2))):
        memory = _tpu_compile(fn, *[((1, 1, t, h, hd), bf16)] * 3).memory_analysis()
        assert memory.temp_size_in_bytes < 256 << 20


@needs_libtpu
def test_shipped_splash_attention_compiles_for_tpu():
    # jax.experimental.pallas.ops.tpu.splash_attention, causal, forward and backward, one v5e device.
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    h, t, hd = 2, 1024, 128
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * h)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=splash.BlockSizes(
        block_q=512, block_kv=512, block_q_dkv=512, block_kv_dkv=512, block_q_dq=512, block_kv_dq=512))
    shapes = [((h, t, hd), jnp.bfloat16)] * 3
    # conftest.py's global "highest" matmul precision asks fp32 passes of bf16 dots, which Mosaic rejects in
    # splash's kernels ("Bad lhs type"); a model run has the default precision.
    with jax.default_matmul_precision("default"):
        for fn in (kernel, _grad_of(kernel, (0, 1, 2))):
            assert "tpu_custom_call" in _tpu_compile(fn, *shapes).as_text()

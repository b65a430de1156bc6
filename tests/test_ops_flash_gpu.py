"""famjax.ops.flash_gpu: the Pallas GPU (Triton) segment attention kernel against ops.segment_attention, and
its lowering for CUDA.

Interpret mode (CPU; on a GPU, the compiled kernels) checks values and gradients (q, every k and v) in float32
for every mode's segments, at Triton's smallest tiles (16): full causal attention over several query and key
tiles, BSWA with 0-2 memory blocks (some hidden, packed examples), FAM with F smaller and larger than the block,
the FAM update (Tq = F != S), GQA and softcap. Without a GPU, the forward and backward kernels at the 1B shape
lower to Triton for CUDA (jax's Triton lowering runs on any machine; compiling that to PTX needs the GPU's XLA).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ops_flash import _check, _jit, _normal, _segments

from famjax import ops
from famjax.ops import flash_gpu

INTERPRET = jax.default_backend() != "gpu"
check = functools.partial(_check, kernel=flash_gpu, interpret=INTERPRET)


@pytest.mark.parametrize("block_q,block_k,block_bwd", [(16, 32, 16), (32, 16, 32)])
def test_full_causal_over_several_query_and_key_tiles(block_q, block_k, block_bwd):
    # One 64-key causal segment: 2-4 tiles each way, tiles above the diagonal skipped; GQA with one kv head.
    t, h, hd = 64, 2, 16
    q = _normal(0, (1, 1, t, h, hd), 2.0)
    check(q, _segments(1, 1, 1, hd, [(t, ops.CAUSAL)]), block_q=block_q, block_k=block_k, block_bwd=block_bwd)


@pytest.mark.parametrize("m,kv_heads", [(0, 4), (1, 2), (2, 1)])
def test_bswa_memory_blocks_with_block_visibility(m, kv_heads):
    # Each of 3 blocks (B = 32) of 2 rows sees [m memory blocks, itself causal]; memory window i of block j
    # exists iff j >= m - i, and row 1 starts a packed example at block 2 (it sees no memory there).
    b, nb, bs, h, hd = 2, 3, 32, 4, 16
    q = _normal(0, (b, nb, bs, h, hd))
    visible = [np.array([[j >= m - i for j in range(nb)]] * b) for i in range(m)]
    for v in visible:
        v[1, 2] = False
    segments = _segments(b, nb, kv_heads, hd, [(bs, jnp.asarray(v)[:, :, None, None]) for v in visible]
                         + [(bs, ops.CAUSAL)])
    check(q, segments, block_q=16, block_k=16, block_bwd=16)


@pytest.mark.parametrize("fam_len,softcap", [(16, 0.0), (64, 1.5)])
def test_fam_memory_fam_and_own_block(fam_len, softcap):
    # [memory block (hidden for block 0), previous FAM (F < B: one tile; F > B: two tiles of 32), own block causal];
    # the second case also caps the scores (Gemma 2 softcap, its backward included).
    b, nb, bs, h, hd = 1, 2, 32, 2, 16
    q = _normal(0, (b, nb, bs, h, hd), 2.0)
    visible = jnp.asarray([[False, True]])[:, :, None, None]
    segments = _segments(b, nb, h, hd, [(bs, visible), (fam_len, None), (bs, ops.CAUSAL)])
    check(q, segments, block_q=16, block_k=32, block_bwd=16, softcap=softcap)


def test_fam_update_fam_rows_against_previous_fam_and_whole_block():
    # The FAM update: F = 16 queries over [previous FAM (F keys), whole block (S = 64, two key tiles)], with the
    # second row's block hidden (as a partial block's keys are masked upstream): its FAM reads only itself.
    b, fam_len, bs, h, hd = 2, 16, 64, 4, 16
    q = _normal(0, (b, 1, fam_len, h, hd))
    segments = _segments(b, 1, 2, hd, [(fam_len, None), (bs, jnp.asarray([True, False])[:, None, None, None])])
    check(q, segments, block_q=16, block_k=32, block_bwd=32)


def test_bfloat16_matches_the_xla_path_at_bfloat16_precision():
    b, nb, bs, h, hd, bf16 = 1, 2, 32, 2, 16, jnp.bfloat16
    q = _normal(0, (b, nb, bs, h, hd)).astype(bf16)
    segments = [(k.astype(bf16), v.astype(bf16), m) for k, v, m in _segments(
        b, nb, 1, hd, [(bs, jnp.asarray([[False, True]])[..., None, None]), (16, None), (bs, ops.CAUSAL)])]

    def run(fn):
        def loss(q, ks):
            out = fn(q, [(k, v, m) for k, (_, v, m) in zip(ks, segments)])
            return out.astype(jnp.float32).sum(), out
        return _jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(q, [k for k, _, _ in segments])

    (_, out), grads = run(functools.partial(flash_gpu.flash_segment_attention, block_q=16, block_k=16,
                                            block_bwd=16, interpret=INTERPRET))
    (_, ref), ref_grads = run(ops.segment_attention)
    assert out.dtype == bf16
    for a, r in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref, ref_grads))):
        np.testing.assert_allclose(np.float32(a), np.float32(r), rtol=2e-2, atol=2e-2)


def test_supports_only_triton_tiles_and_structured_masks():
    q = jnp.zeros((1, 2, 64, 4, 16))
    k = jnp.zeros((1, 2, 64, 2, 16))
    assert flash_gpu.supports(q, [(k, k, None), (k, k, jnp.ones((1, 2, 1, 1), bool)), (k, k, ops.CAUSAL)])
    assert flash_gpu.supports(q, [(k[:, :, :16], k[:, :, :16], None), (k, k, ops.CAUSAL)])  # F = 16 < tile
    assert not flash_gpu.supports(q, [(k[:, :, :8], k[:, :, :8], None)])  # 8 keys: below Triton's 16
    assert not flash_gpu.supports(q, [(k[:, :, :48], k[:, :, :48], None)], block_k=64)  # a 48-key tile
    assert not flash_gpu.supports(q[..., :8], [(k[..., :8], k[..., :8], None)])  # hd 8
    assert not flash_gpu.supports(jnp.zeros((1, 2, 64, 4, 96)), [(jnp.zeros((1, 2, 64, 2, 96)),) * 2 + (None,)])
    assert not flash_gpu.supports(q, [(k, k, ops.causal_mask(64)[None, None])])  # a dense mask: XLA path
    assert not flash_gpu.supports(q[:, :, :32], [(k, k, ops.CAUSAL)])  # causal needs Tq == S
    with pytest.raises(ValueError, match=r"use ops.segment_attention\(q, segments\)"):
        flash_gpu.flash_segment_attention(q, [(k, k, jnp.ones((1, 2, 64, 64), bool))])


@pytest.mark.parametrize("kv_heads", [12, 4])
def test_forward_and_backward_lower_to_triton_for_cuda(kv_heads):
    # The FAM pattern at one block of the 1B shape (hd 128), bf16: [memory (per-block visibility), FAM (64), own
    # causal], lowered for CUDA on this CPU: forward 1 Triton kernel; backward the forward again (residuals), dq
    # and one dk/dv kernel per segment.
    b, nb, bs, h, hd, fam_len, bf16 = 1, 2, 1024, 12, 128, 64, jnp.bfloat16
    sds = jax.ShapeDtypeStruct

    def attend(q, mk, mv, visible, fk, fv, k, v):
        return flash_gpu.flash_segment_attention(q, [(mk, mv, visible), (fk, fv, None), (k, v, ops.CAUSAL)])

    kv, fam = sds((b, nb, bs, kv_heads, hd), bf16), sds((b, nb, fam_len, kv_heads, hd), bf16)
    args = [sds((b, nb, bs, h, hd), bf16), kv, kv, sds((b, nb, 1, 1), jnp.bool_), fam, fam, kv, kv]
    grad = jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 4, 5, 6, 7))
    for fn, kernels in ((attend, ["fwd"]), (grad, ["fwd", "dq", "dkv0", "dkv1", "dkv2"])):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @__gpu$xla.gpu.triton") == len(kernels)
        names = re.findall(r'name = "flash_segment_attention_gpu_(\w+)"', text)
        assert sorted(names) == sorted(kernels)

"""ModelConfig.attention_impl: every kernel that runs on CPU gives the model of the loop reference.

"pallas" runs famjax.ops.flash in Pallas interpret mode here, and under target_platform("gpu") the GPU kernel
famjax.ops.flash_gpu (interpret mode too, at Triton's tiles: hd and blocks of 16); "cudnn" runs
jax.nn.dot_product_attention's XLA implementation (the same call that picks cuDNN on a GPU). Calls a kernel
cannot take fall back to "xla".
"""
import contextlib
from unittest import mock

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from model_utils import assert_reference_and_streams, jit_apply, make_model, random_tokens

from famjax.model.config import ModelConfig
from famjax.model.decoder import resolve_attention_impl, target_platform

CASES = {
    "fam": dict(block_size=4, memory_blocks=1, fam_len=3),
    "fam_F>B_m2_mqa": dict(block_size=2, memory_blocks=2, fam_len=3, num_kv_heads=1),
    "bswa": dict(attention="bswa", block_size=4, memory_blocks=2),
    "full": dict(attention="full", max_len=32),
}


@pytest.mark.parametrize("impl,case", [("pallas", c) for c in CASES] + [("cudnn", "full")])
def test_logits_match_reference_and_stream(impl, case):
    model, cfg, params = make_model(seed=2, attention_impl=impl, **CASES[case])
    # Chunks of whole blocks and partial ones (which go to the XLA path) stream like one call.
    with target_platform("cpu"):  # ops.flash interpreted, on a GPU machine too (which would pick ops.flash_gpu)
        assert_reference_and_streams(model, cfg, params, ([8, 3, 3],))

# The GPU kernel's cases: hd 16 (d_model 64, 4 heads), blocks and FAM of 16-32 rows.
GPU_CASES = {
    "fam": dict(d_model=64, block_size=16, memory_blocks=1, fam_len=16),
    "fam_F>B_m2_mqa": dict(d_model=64, block_size=16, memory_blocks=2, fam_len=32, num_kv_heads=1),
    "bswa": dict(d_model=64, attention="bswa", block_size=16, memory_blocks=2),
    "full": dict(d_model=64, attention="full", max_len=64),
}


@contextlib.contextmanager
def kernel_calls(platform):
    """Traces for `platform` and yields the list of the Pallas kernel's calls (query length, key segment lengths):
    ops.flash_gpu on "gpu" (interpreted on this CPU), else ops.flash. A test asserts the kernel ran, not only a
    fallback."""
    from famjax.ops import flash, flash_gpu
    module = flash_gpu if platform == "gpu" else flash
    calls, real = [], module.flash_segment_attention

    def spy(q, segments, **kw):
        calls.append((q.shape[2], tuple(k.shape[2] for k, _, _ in segments)))
        return real(q, segments, **kw)
    with target_platform(platform), mock.patch.object(module, "flash_segment_attention", spy):
        yield calls


@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_kernel_logits_match_reference_and_stream(case):
    model, cfg, params = make_model(seed=2, attention_impl="pallas", **GPU_CASES[case])
    length = 32 if case == "full" else 40  # full: the kernel takes a power-of-two length; else 2.5 blocks
    with kernel_calls("gpu") as calls:
        # At these sizes the XLA path too is up to 1.9e-5 from the float64 reference (float32 sums).
        assert_reference_and_streams(model, cfg, params, ([16, 16, 8] if length == 40 else [16, 16],),
                                     length=length, tol=4e-5)
    assert calls, "the GPU kernel never ran"


def _loss(model, tokens):
    logits, _ = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("case", ["fam", "full"])
def test_pallas_gradients_equal_xla(case):
    grads = []
    for impl in ("xla", "pallas"):
        model, cfg, _ = make_model(seed=4, attention_impl=impl, **CASES[case])
        tokens = random_tokens(2, 13, cfg.vocab_size, seed=5)
        with target_platform("cpu"):
            grads.append(nnx.to_flat_state(nnx.jit(nnx.grad(_loss))(model, tokens)))
    _assert_same_grads(*grads)


def _assert_same_grads(want, got, atol=1e-6):
    for (path, a), (_, b) in zip(want, got):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol * max(1.0, np.abs(a).max()), err_msg=str(path))


def test_gpu_kernel_gradients_equal_xla():
    grads = []
    for impl in ("xla", "pallas"):
        model, cfg, _ = make_model(seed=4, attention_impl=impl, **GPU_CASES["fam"])
        tokens = random_tokens(2, 41, cfg.vocab_size, seed=5)
        with kernel_calls("gpu") as calls:
            grads.append(nnx.to_flat_state(nnx.jit(nnx.grad(_loss))(model, tokens)))
        # the block rows ([memory, FAM, own block]) and the F rows' update ([FAM, whole block]) ran the kernel
        assert calls == [] if impl == "xla" else {(16, (16, 16, 16)), (16, (16, 16))} <= set(calls), calls
    _assert_same_grads(*grads, atol=3e-6)  # 2.5 blocks of 16 at d 64: float32 sums in another order


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_pallas_kernels_run_per_shard_under_the_trainers_mesh(target):
    """Under a (2, 2, 2) mesh with the trainer's rules (batch over data x fsdp, heads over tensor) a Pallas kernel
    runs on each device's rows and heads (jax.shard_map): loss and gradients equal the XLA path's on one device.
    "cpu": ops.flash, "gpu": ops.flash_gpu, both interpreted here."""
    import os

    import ml_collections

    from famjax.ops import flash, flash_gpu
    from famjax.train import mesh as meshlib
    from famjax.train.config import sibling_config

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    rules = sibling_config(os.path.join(configs, "x.py"), "default").get_config().mesh.rules
    mesh = meshlib.make_mesh(ml_collections.ConfigDict({"shape": (2, 2, 2)}), jax.devices()[:8])
    kernel = flash_gpu if target == "gpu" else flash
    tokens = random_tokens(4, 41, 37, seed=5)
    shapes, real = [], kernel.flash_segment_attention

    def spy(q, segments, **kw):
        shapes.append(q.shape)
        return real(q, segments, **kw)
    results = []
    for impl in ("xla", "pallas"):
        model, cfg, _ = make_model(seed=4, attention_impl=impl, **{**GPU_CASES["fam"], "num_kv_heads": 4})
        step = nnx.jit(nnx.value_and_grad(_loss))
        if impl == "xla":
            results.append(step(model, tokens))
            continue
        with target_platform(target), meshlib.activation_rules(mesh, rules), \
                mock.patch.object(kernel, "flash_segment_attention", spy):
            results.append(step(model, tokens))
    # every call saw one device's rows (batch 4 over 4 devices) and heads (MHA: 4 heads over 2; GQA's stay whole)
    assert shapes and {(s[0], s[3]) for s in shapes} == {(1, cfg.num_heads // 2)}, shapes
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    _assert_same_grads(*(nnx.to_flat_state(g) for _, g in results), atol=3e-6)


def test_pallas_runs_the_fam_rows_attention_too():
    """The F-row update's attention (F queries over the previous FAM and the whole block) goes through the kernel,
    in training's deferred scan too; the tests above then compare it with xla."""
    model, cfg, _ = make_model(seed=4, attention_impl="pallas", **CASES["fam"])
    with kernel_calls("cpu") as calls:
        nnx.jit(nnx.grad(_loss))(model, random_tokens(2, 13, cfg.vocab_size, seed=5))
    assert (cfg.num_fam, (cfg.num_fam, cfg.block_size)) in calls, calls


@pytest.mark.parametrize("impl", ["auto", "pallas"])
@pytest.mark.parametrize("kv_heads,fam_len,f_rows_in_kernel", [(2, 3, False), (1, 5, True)])
def test_on_tpu_the_fam_rows_attention_takes_the_path_that_moves_fewer_bytes(impl, kv_heads, fam_len,
                                                                            f_rows_in_kernel):
    """On TPU the kernel reads keys/values as [..., KV·hd], a layout the FAM loop would copy each block's into:
    the F rows take it only where those copies are smaller than the XLA path's float32 scores, 2·KV·hd·itemsize
    < H·F·4 bytes per row (here H 4, hd 8, float32: KV 2 and F 3 -> xla, KV 1 and F 5 -> the kernel). The
    block rows take the kernel either way. Traced for TPU, not compiled."""
    model, cfg, _ = make_model(seed=4, attention_impl=impl, num_kv_heads=kv_heads, fam_len=fam_len)
    tokens = random_tokens(2, 13, cfg.vocab_size, seed=5)
    with kernel_calls("tpu") as calls:
        jax.make_jaxpr(lambda t: _loss(model, t))(tokens)
    assert any(t == cfg.block_size for t, _ in calls), calls
    assert ((cfg.num_fam, (cfg.num_fam, cfg.block_size)) in calls) == f_rows_in_kernel, calls


def test_cudnn_path_in_bfloat16_tracks_xla():
    """bf16 is where the cudnn path applies (float32 stays on xla): jax.nn.dot_product_attention's XLA version
    on CPU against famjax's segment attention, within bf16 rounding."""
    outs = []
    for impl in ("xla", "cudnn"):
        model, cfg, _ = make_model(seed=6, attention_impl=impl, dtype="bfloat16", **CASES["full"])
        outs.append(np.asarray(jit_apply(model, random_tokens(2, 12, cfg.vocab_size, seed=7))[0]))
    assert np.abs(outs[1] - outs[0]).max() > 0  # a different kernel ran
    np.testing.assert_allclose(outs[1], outs[0], atol=5e-2, rtol=5e-2)


def test_auto_picks_by_platform_and_bad_values_fail():
    assert resolve_attention_impl("auto") == {"tpu": "pallas", "gpu": "cudnn"}.get(jax.default_backend(), "xla")
    for platform, impl in (("tpu", "pallas"), ("gpu", "cudnn"), ("cpu", "xla")):
        with target_platform(platform):
            assert resolve_attention_impl("auto") == impl
    assert resolve_attention_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        ModelConfig(attention_impl="flash")

"""One decoder layer serving full, BSWA and FAM attention from a single code path.

The layer works on the block-aligned grid of a chunk (famjax.ops.blocks). Per layer (docs/fam.md, "How the
code computes it"): project Q/K/V of every slot at once; run the FAM recurrence over blocks carrying only the
F rows; attend all blocks in parallel over [memory blocks, previous FAM, own block causal]; apply the FFN to
every slot at once.
Full attention is the same path with one block per chunk whose memory is a linear KV cache.
"""
import contextlib
import contextvars
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from famjax import ops
from famjax.model.config import ModelConfig
from famjax.model.modules import MLP, AttentionProjections, Norm, named_products, row_keys, sub_key
from famjax.model.sharding import constrain, per_shard
from famjax.model.state import LayerCache


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Where a chunk of T new tokens sits, shared by all layers of one call.

    phase: int [b] slot of the first new token in grid block 0, or the static 0 when rows are aligned;
    num_blocks: static grid blocks nb (full attention: 1 block of T slots);
    positions: int [b, nb * B] RoPE position of every grid slot (absolute + offset);
    offset: int [b] the position offset;
    block_index: int [b, nb] index of every grid block counted from its segment's start;
    memory_visible: bool [b, nb, m] memory block i of grid block j exists in the same segment;
    completes: bool [b, nb] the block's last token is in this chunk (a FAM update happens);
    next_block: int [b] grid block that holds the next token (or the static nb when aligned);
    all_complete: static, every grid block completes (training); fresh: static, state still empty;
    start: int [b] absolute position of the chunk's first token (full attention's cache slot);
    is_initial: bool [b] the row's FAM is the learned initial FAM (its first update gets no residual);
    resets: None or bool [b, nb], a new segment (packed example) starts at the grid block;
    collect: static, also return per-block diagnostics (model.inspect);
    compact: static, the chunk fits in one grid block (decode, short chunks): queries, projections and FFN
        run on the T new tokens only and only keys/values are placed on the block, so decoding one token
        costs one token, not a block;
    own_mask: which own-block keys each query sees: ops.CAUSAL, or for a compact chunk bool broadcastable to
        [b, nb, Tq, B] (key slot <= phase + i);
    state_grad: static, the state after the chunk is differentiated (False: ops.fam_scan's final_grad).
    """
    phase: object
    num_blocks: int
    positions: jax.Array
    offset: jax.Array
    block_index: jax.Array
    memory_visible: jax.Array
    completes: jax.Array
    next_block: object
    all_complete: bool
    fresh: bool
    start: jax.Array
    is_initial: jax.Array
    resets: object = None
    collect: bool = False
    compact: bool = False
    own_mask: object = None
    state_grad: bool = True


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: A = Attn(Norm1(X)) + X; out = FFN(Norm2(A)) + A; FAM rows share all weights.

    With cfg.post_norms (Gemma 2) the attention and FFN outputs are normed again before their residual:
    A = X + PostAttnNorm(Attn(Norm1(X))), out = A + PostFFNNorm(FFN(Norm2(A))), FAM rows included.

    `key` arguments are LoRA dropout keys (None: no dropout); every call site folds in its own id (SITE_*), the
    FAM recurrence also the block index, so no two uses of the adapters share a mask. The initial FAM's keys and
    values are one projection per layer (initial_fam_step), which every row that starts from it reads.
    """
    SITE_TOKENS, SITE_FAM_UPDATE, SITE_FAM_KV, SITE_INITIAL_FAM, SITE_STATE_FAM_KV = range(5)

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm1 = Norm(cfg, rngs)
        self.attn = AttentionProjections(cfg, rngs)
        self.norm2 = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        if cfg.post_norms:
            self.norm_post_attn = Norm(cfg, rngs)
            self.norm_post_ffn = Norm(cfg, rngs)
        if cfg.lora_rank:  # after every base weight: the base draws the same keys with or without LoRA
            self.attn.init_lora(cfg, rngs)
            self.mlp.init_lora(cfg, rngs)

    def attention(self, q, segments, return_probs: bool = False):
        """Attention of q over the key segments (ops.segment_attention's contract) with the model's score scale
        and softcap, by the kernel cfg.attention_impl picks; calls a fused kernel cannot take (a dense mask,
        return_probs) use the XLA path."""
        cfg = self.cfg
        impl = resolve_attention_impl(cfg.attention_impl)
        if impl == "pallas" and not return_probs:
            kernel, interpret = _pallas_kernel()
            if kernel.supports(q, segments):
                return _flash_per_shard(kernel, q, segments, scale=cfg.query_scale, softcap=cfg.attn_softcap,
                                        interpret=interpret)
        if impl == "cudnn" and not return_probs and _cudnn_expresses(q, segments, cfg.attn_softcap):
            return _dot_product_attention(q, segments[0], cfg.query_scale)
        return ops.segment_attention(q, segments, scale=cfg.query_scale, softcap=cfg.attn_softcap,
                                     return_probs=return_probs)

    def fam_rows_attention(self, q, segments):
        """The FAM update's attention (q [b, 1, F, H, hd] over [the FAM's, the block's] keys): self.attention,
        except on TPU where the XLA path moves fewer bytes than the Pallas kernel. The kernel reads keys/values as
        [..., KV·hd], and TPU tiles an array on its last two axes, so in the FAM loop each block's keys and values
        would be copied into that layout in every pass (forward, remat's rerun, backward); the XLA path reads
        them in place and writes the F rows' float32 scores instead. The XLA path is taken when the copies are
        the larger: 2·KV·hd·itemsize > H·F·4 bytes per batch row (docs/design.md, "The FAM update's attention on
        TPU")."""
        k = segments[-1][0]
        if (platform() == "tpu" and resolve_attention_impl(self.cfg.attention_impl) == "pallas"
                and 2 * k.shape[-2] * k.shape[-1] * k.dtype.itemsize > q.shape[-2] * q.shape[-3] * 4):
            return ops.segment_attention(q, segments, scale=self.cfg.query_scale, softcap=self.cfg.attn_softcap)
        return self.attention(q, segments)

    def attn_out(self, heads, key=None):
        """heads: [..., H, hd] -> the attention's contribution to the residual, [..., d] (PostAttnNorm(Wo h))."""
        out = self.attn.out(heads, key)
        return self.norm_post_attn(out, self.cfg.compute_dtype) if self.cfg.post_norms else out

    def ffn(self, a, key=None):
        """a: [..., d] -> FFN(Norm2(a)) [..., d] (PostFFNNorm(FFN(Norm2(a))) with post_norms)."""
        out = self.mlp(self.norm2(a, self.cfg.compute_dtype), key)
        return self.norm_post_ffn(out, self.cfg.compute_dtype) if self.cfg.post_norms else out

    def fam_positions(self, block_index, offset):
        """Positions int [..., F] of the FAM that compressed block block_index [...] (-1: the initial FAM), with
        the rows' position offset [...]; all 0 for the "zero" ablation."""
        cfg = self.cfg
        if cfg.fam_positions == "zero":
            return jnp.zeros(jnp.shape(block_index) + (cfg.num_fam,), jnp.int32)
        return ops.fam_positions(block_index, cfg.block_size, cfg.num_fam) + offset[..., None]

    def fam_rope(self, block_index, offset):
        """The RoPE rotation (sin, cos), float32 [..., F, 1, hd / 2] (ops.rope_rotation), of fam_positions(
        block_index [...], offset [b]) (the row offsets broadcast over block_index's further axes)."""
        offset = offset.reshape(offset.shape + (1,) * (jnp.ndim(block_index) - jnp.ndim(offset)))
        return ops.rope_rotation(self.fam_positions(block_index, offset), self.cfg.head_dim, self.cfg.rope_base)

    def fam_key_value(self, fam, block_index, offset, key=None, rope=None):
        """Keys/values [b, F, KV, hd] of a FAM [b, F, d] that compressed absolute block block_index [b];
        rope: fam_rope(block_index, offset) when computed already."""
        rope = self.fam_rope(block_index, offset) if rope is None else rope
        return self.attn.key_value(self.norm1(fam, self.cfg.compute_dtype), rope, key)

    def fam_query_key_value(self, fam, block_index, offset, q_key=None, kv_key=None, rope=None):
        """fam_key_value's keys/values of a FAM [b, F, d] that compressed block block_index [b], and the queries it
        gives when the next block reads it (the same positions), from one norm and one matmul: (q, k, v)."""
        rope = self.fam_rope(block_index, offset) if rope is None else rope
        return self.attn.query_key_value(self.norm1(fam, self.cfg.compute_dtype), rope, q_key, kv_key)

    def initial_fam_step(self, fam, key=None):
        """Returns (S_0 of the next layer [F, d], this S_0's keys before RoPE and its values, each [F, KV, hd])
        from this layer's S_0 [F, d]: the F rows alone, like a block with no tokens (full attention among
        themselves at positions -F..-1, normal residual, FFN). initial_fam_key_value rotates the keys to a row's
        positions: every row that starts from S_0 reads these keys and values, so they are projected once.

        Its weight products are tagged INITIAL_FAM_NAME, which FamLM's remat policy saves: they do not depend
        on the batch (F rows per layer), and the backward pass then runs none of them again."""
        key = sub_key(key, self.SITE_INITIAL_FAM)
        positions = self.fam_positions(jnp.asarray(-1), jnp.asarray(0))
        with named_products(INITIAL_FAM_NAME):
            h = self.norm1(fam, self.cfg.compute_dtype)
            q = self.attn.query(h, positions, key)
            k0, v = self.attn.unrotated_key_value(h, key)
            k = self.attn.rotate(k0, positions)
            heads = self.attention(q[None, None], [(k[None, None], v[None, None], None)])[0, 0]
            a = fam + self.attn_out(heads, key).astype(jnp.float32)
            return a + self.ffn(a, key).astype(jnp.float32), (k0, v)

    def initial_fam_key_value(self, initial_kv, block_index, offset):
        """Keys/values [b, F, KV, hd] of the initial FAM read as the FAM of block block_index [b] (-1 for a row
        that starts from it) at the rows' position offsets [b]; initial_kv: initial_fam_step's (keys before RoPE,
        values) [F, KV, hd]."""
        k, v = (jnp.broadcast_to(a, offset.shape + a.shape) for a in initial_kv)
        return self.attn.rotate(k, self.fam_rope(block_index, offset)), v

    def __call__(self, x, cache: LayerCache, chunk: Chunk, initial_fam=None, perturb=None, dropout_key=None):
        """Returns (layer output [b, G, d], (cache after the chunk, diagnostics or None)).

        x: grid input [b, G, d]; initial_fam: (this layer's initial FAM [F, d], its keys before RoPE and values
            [F, KV, hd], initial_fam_step's), needed for chunk.resets;
        perturb: None or this layer's ops.Perturbation of every new FAM (training only; see ops.fam_scan);
        dropout_key: None or this layer's LoRA dropout key (training only).
        """
        cfg = self.cfg
        key = sub_key(dropout_key, self.SITE_TOKENS)
        h = self.norm1(x, cfg.compute_dtype)
        q = constrain(self.attn.query(h, chunk.positions, key), "batch", None, "q_heads", "head_dim")
        k, v = (constrain(a, "batch", None, "kv_heads", "head_dim")
                for a in self.attn.key_value(h, chunk.positions, key))
        diagnostics = None
        if cfg.attention == "full":
            heads, cache = self._full_attention(q, k, v, cache, chunk)
        else:
            heads, cache, diagnostics = self._block_attention(q, k, v, cache, chunk, initial_fam, perturb,
                                                              dropout_key)
        a = x + self.attn_out(heads, key).astype(x.dtype)
        return constrain(a + self.ffn(a, key).astype(x.dtype), "batch", None, "embed"), (cache, diagnostics)

    def _full_attention(self, q, k, v, cache, chunk):
        """Causal attention over [KV cache, chunk]; writes the chunk's keys/values into the cache."""
        segments = []
        if not chunk.fresh:
            capacity = cache.mem_k.shape[2]
            visible = (jnp.arange(capacity)[None, :] < chunk.start[:, None])[:, None, None, :]
            segments.append((cache.mem_k, cache.mem_v, visible))
        segments.append((k[:, None], v[:, None], ops.CAUSAL))
        heads = self.attention(q[:, None], segments)[:, 0]

        def write(buffer, new):
            return jax.vmap(lambda row, val, s: jax.lax.dynamic_update_slice_in_dim(row, val, s, axis=1))(
                buffer, new[:, None].astype(buffer.dtype), chunk.start)
        return heads, cache.replace(mem_k=write(cache.mem_k, k), mem_v=write(cache.mem_v, v))

    def _block_attention(self, q, k, v, cache, chunk, initial_fam, perturb=None, dropout_key=None):
        """BSWA (+ FAM) attention of every grid block in parallel; returns (heads [b, G, H, hd], cache,
        diagnostics or None)."""
        cfg = self.cfg
        B, m, nb = cfg.block_size, cfg.memory_blocks, chunk.num_blocks
        if chunk.compact:  # queries stay [b, T]; keys/values go to their slots of the one grid block
            k, v = (ops.to_grid(a, chunk.phase, 1, B) for a in (k, v))
        if not (isinstance(chunk.phase, int) and chunk.phase == 0):
            # Slots before the phase belong to tokens read by earlier calls: take their keys from the state.
            seen = (jnp.arange(B)[None, :] < chunk.phase[:, None])[:, :, None, None]
            k = k.at[:, :B].set(jnp.where(seen, cache.cur_k, k[:, :B]))
            v = v.at[:, :B].set(jnp.where(seen, cache.cur_v, v[:, :B]))
        qb = q[:, None] if chunk.compact else ops.split_blocks(q, B)
        kb, vb = ops.split_blocks(k, B), ops.split_blocks(v, B)
        ext_k = jnp.concatenate([cache.mem_k, kb], axis=1)  # [b, m + nb, B, KV, hd]
        ext_v = jnp.concatenate([cache.mem_v, vb], axis=1)
        segments = [(wk, wv, chunk.memory_visible[:, :, i, None, None])
                    for i, (wk, wv) in enumerate(zip(ops.memory_windows(ext_k, m, nb),
                                                     ops.memory_windows(ext_v, m, nb)))]
        fam_state, diagnostics = (cache.fam, cache.fam_k, cache.fam_v), None
        if cfg.num_fam:
            fam_state, fam_read, fam_aux = self._fam_scan(cache, kb, vb, chunk, initial_fam, perturb, dropout_key)
            segments.append((*fam_read, None))
        segments.append((kb, vb, chunk.own_mask))
        heads = self.attention(qb, segments, return_probs=chunk.collect)
        if chunk.collect:
            heads, probs = heads
            fam_mass = probs[..., m * B:m * B + cfg.num_fam].sum(-1)  # [b, nb, H, B]
            diagnostics = dict(token_fam_mass=jnp.swapaxes(fam_mass, 2, 3), **(fam_aux if cfg.num_fam else {}))
        heads = heads.reshape(q.shape)

        if isinstance(chunk.next_block, int):  # aligned chunk of whole blocks: static slices
            mem_k, mem_v = ext_k[:, nb:nb + m], ext_v[:, nb:nb + m]
            cur_k, cur_v = cache.cur_k, cache.cur_v  # the new current block is empty
        else:
            mem_k, mem_v = (ops.take_blocks(e, chunk.next_block, m) for e in (ext_k, ext_v))
            cur = m + jnp.minimum(chunk.next_block, nb - 1)  # == nb only when the new block is empty
            cur_k, cur_v = (ops.take_blocks(e, cur, 1)[:, 0] for e in (ext_k, ext_v))
        fam, fam_k, fam_v = fam_state
        return heads, cache.replace(mem_k=mem_k, mem_v=mem_v, cur_k=cur_k, cur_v=cur_v,
                                    fam=fam, fam_k=fam_k, fam_v=fam_v), diagnostics

    def _fam_scan(self, cache, kb, vb, chunk, initial_fam, perturb=None, dropout_key=None):
        """FAM recurrence over the grid blocks; returns ((fam, fam_k, fam_v) after, FAM K/V each block read,
        diagnostics: ops.fam_scan's aux, {} unless chunk.collect).

        The layer's parameters enter the scan explicitly (nnx.split), so that in training the projection
        kernels' gradients are formed after the loop (ops.deferred_scan, cfg.fam_deferred_grads)."""
        cfg = self.cfg
        dtype, offset = cfg.compute_dtype, chunk.offset
        graphdef, state = nnx.split(self)
        params = (state, offset, dropout_key)  # all the steps read: ops.deferred_scan's steps close over nothing

        # What the functions below get of a block: its index and the RoPE angles of the FAM that compressed it,
        # computed for all blocks before the loop (ops.fam_scan's index_inputs).
        def index_inputs(index):
            return index, self.fam_rope(index, offset)

        def query_fn(params, fam, at):  # the queries of the FAM that block `index` reads
            (state, offset, dropout_key), (index, _) = params, at
            layer = nnx.merge(graphdef, state)
            key = row_keys(sub_key(dropout_key, self.SITE_FAM_UPDATE), index)
            return layer.attn.query(layer.norm1(fam, dtype), layer.fam_positions(index - 1, offset), key)

        def update_fn(params, fam, is_initial, fam_k, fam_v, k, v, at, queries=None):
            state, offset, dropout_key = params
            layer = nnx.merge(graphdef, state)
            key = row_keys(sub_key(dropout_key, self.SITE_FAM_UPDATE), at[0])
            return ops.fam_update(fam, is_initial, fam_k, fam_v, k, v, queries=queries,
                                  query_fn=functools.partial(query_fn, params, at=at),
                                  out_fn=functools.partial(layer.attn_out, key=key),
                                  ffn_fn=functools.partial(layer.ffn, key=key), return_probs=chunk.collect,
                                  zero_residual=cfg.fam_zero_residual, keep_norm=cfg.fam_keep_norm,
                                  scale=cfg.query_scale, softcap=cfg.attn_softcap,
                                  attend=layer.fam_rows_attention)

        def kv_fn(params, fam, at):
            (state, offset, dropout_key), (index, rope) = params, at
            key = row_keys(sub_key(dropout_key, self.SITE_FAM_KV), index)
            return nnx.merge(graphdef, state).fam_key_value(fam, index, offset, key, rope=rope)

        def qkv_fn(params, fam, at):  # query_fn's queries for block index + 1 and kv_fn's keys/values, together
            (state, offset, dropout_key), (index, rope) = params, at
            return nnx.merge(graphdef, state).fam_query_key_value(
                fam, index, offset, row_keys(sub_key(dropout_key, self.SITE_FAM_UPDATE), index + 1),
                row_keys(sub_key(dropout_key, self.SITE_FAM_KV), index), rope=rope)

        initial = None
        if chunk.resets is not None:
            fam0, initial_kv = initial_fam
            b = offset.shape[0]
            initial = (jnp.broadcast_to(fam0, (b,) + fam0.shape),
                       *self.initial_fam_key_value(initial_kv, jnp.full((b,), -1), offset))
        scan = None
        if cfg.fam_deferred_grads and chunk.all_complete and not chunk.collect:
            scan = functools.partial(_deferred_layer_scan, dtype=dtype, unroll=cfg.fam_unroll)
        carry = (cache.fam, chunk.is_initial, cache.fam_k, cache.fam_v)
        (fam, _, fam_k, fam_v), read, aux = ops.fam_scan(
            carry, kb, vb, chunk.completes, chunk.block_index, update_fn=update_fn, kv_fn=kv_fn, params=params,
            all_complete=chunk.all_complete, resets=chunk.resets, initial=initial, collect=chunk.collect,
            stop_gradient=cfg.fam_stop_gradient, perturb=perturb, unroll=cfg.fam_unroll, scan=scan,
            query_fn=query_fn, qkv_fn=qkv_fn, final_grad=chunk.state_grad, index_inputs=index_inputs)
        return (fam, fam_k, fam_v), read, aux


_TARGET = contextvars.ContextVar("famjax_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Traces inside pick the kernels of `platform` ("tpu", "gpu", "cpu") instead of the default backend's: for
    compiling ahead of time for another platform (famjax.tools.aot compiles TPU programs on a CPU host)."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def platform() -> str:
    """The platform the traced program is for: target_platform's, else jax's default backend."""
    return _TARGET.get() or jax.default_backend()


def resolve_attention_impl(impl: str) -> str:
    """The attention kernel of ModelConfig.attention_impl on the target platform: "auto" is "pallas" on TPU,
    "cudnn" on GPU and "xla" elsewhere."""
    if impl != "auto":
        return impl
    return {"tpu": "pallas", "gpu": "cudnn"}.get(platform(), "xla")


def _pallas_kernel():
    """(kernel module, interpret) of attention_impl="pallas" on the target platform: ops.flash_gpu (Triton) on
    GPU, ops.flash (Mosaic) on TPU, and on CPU ops.flash in interpret mode. Pallas is imported only when used.
    The GPU kernel interprets on a machine without a GPU (how tests run it under target_platform("gpu")); the
    TPU kernel compiles whenever the target is TPU (how tools.aot compiles it on a CPU)."""
    if platform() == "gpu":
        from famjax.ops import flash_gpu
        return flash_gpu, jax.default_backend() != "gpu"
    from famjax.ops import flash
    return flash, platform() != "tpu"


def _flash_per_shard(kernel, q, segments, **kwargs):
    """kernel.flash_segment_attention (ops.flash or ops.flash_gpu) on each device's rows (and heads, when query
    and key/value heads split alike, which keeps every query head with its key/value head); masks that are arrays
    go along."""
    arrays = [q] + [a for k, v, _ in segments for a in (k, v)]
    masks = [m for _, _, m in segments]
    mask_at = [i for i, m in enumerate(masks) if m is not None and m is not ops.CAUSAL]
    q_names, kv_names = ("batch", None, None, "q_heads", None), ("batch", None, None, "kv_heads", None)
    names = [q_names] + [kv_names] * (2 * len(segments)) + [("batch", None, None, None)] * len(mask_at)
    arrays += [jnp.broadcast_to(masks[i], (q.shape[0], q.shape[1], 1, 1)) for i in mask_at]

    def local(q, *rest):
        kv, local_masks = rest[:2 * len(segments)], dict(zip(mask_at, rest[2 * len(segments):]))
        segs = [(kv[2 * i], kv[2 * i + 1], local_masks.get(i, m)) for i, m in enumerate(masks)]
        return kernel.flash_segment_attention(q, segs, **kwargs)
    if q.shape[3] != segments[0][0].shape[3]:  # GQA: split heads only if the query heads of a group stay together
        names = [(*n[:3], None, *n[4:]) if len(n) == 5 else n for n in names]
    return per_shard(local, arrays, names)


def _cudnn_expresses(q, segments, softcap: float) -> bool:
    """cuDNN attention (jax.nn.dot_product_attention) takes one causal segment (full attention from a fresh
    state) in bf16/fp16 with a head dim up to 128 and a multiple of 8; BSWA/FAM blocks, a KV cache, float32 and
    softcap stay on the XLA path."""
    hd = q.shape[-1]
    return (len(segments) == 1 and segments[0][2] is ops.CAUSAL and not softcap
            and q.dtype in (jnp.bfloat16, jnp.float16) and hd <= 128 and hd % 8 == 0)


def _dot_product_attention(q, segment, scale):
    """Causal attention of q [b, n, T, H, hd] over one segment by jax.nn.dot_product_attention: cuDNN's fused
    kernel on GPU, its XLA implementation elsewhere (how the path is tested on CPU)."""
    k, v, _ = segment
    b, n, t, h, hd = q.shape
    flat = [a.reshape(b * n, *a.shape[2:]) for a in (q, k, v)]
    out = jax.nn.dot_product_attention(*flat, scale=scale, is_causal=True,
                                       implementation="cudnn" if platform() == "gpu" else None)
    return out.reshape(q.shape)


# What the FAM loop stacks for its backward pass is tagged with this name; FamLM's remat policy saves it under
# ModelConfig.fam_remat="keep" (or moves to host memory under "offload").
FAM_LOOP_NAME = "famjax_fam_loop"
# The initial FAM's weight products in DecoderLayer.initial_fam_step; FamLM's remat policy always saves them.
INITIAL_FAM_NAME = "famjax_initial_fam"
_KERNEL = re.compile(r"\['(attn|mlp)'\]\['(q|k|v|o|gate|up|down)'\]")


def _deferred_layer_scan(step, params, carry, xs, *, dtype, unroll: int):
    """ops.fam_scan's `scan` with deferred weight gradients: the layer's projection kernels found in params (not
    norms, biases or LoRA adapters) are ops.deferred_scan's weights, every other leaf goes with the others."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    is_kernel = [bool(_KERNEL.search(n)) for n in names]
    weights = {n: v for n, (_, v), k in zip(names, leaves, is_kernel) if k}
    rest = [v for (_, v), k in zip(leaves, is_kernel) if not k]

    def inner(weights, rest, c, x):
        it = iter(rest)
        return step(jax.tree.unflatten(treedef, [weights[n] if k else next(it) for n, k in zip(names, is_kernel)]),
                    c, x)
    return ops.deferred_scan(inner, weights, rest, carry, xs, dtype=dtype, unroll=unroll, save_name=FAM_LOOP_NAME)

"""FamLM: the decoder-only language model with an explicit state, `logits, state = model(tokens, state)`."""
import dataclasses
import operator

import jax
import jax.numpy as jnp
from flax import nnx

from famjax import ops
from famjax.model.config import ModelConfig
from famjax.model.decoder import FAM_LOOP_NAME, INITIAL_FAM_NAME, Chunk, DecoderLayer
from famjax.model.modules import Norm, normal, param, sub_key
from famjax.model.sharding import constrain
from famjax.model.state import FamState, LayerCache, reset_rows

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(cfg: ModelConfig):
    """The jax.checkpoint policy of one layer under cfg.remat (not "none"). With FAM it also saves the initial
    FAM's weight products (INITIAL_FAM_NAME: F rows per layer, whatever the batch), and with cfg.fam_remat="keep"
    what the layer's FAM loop stacks for its backward pass (ops.deferred_scan's save_name), so that the backward
    pass does not run the loop again; with "offload" it moves those arrays to host memory in the forward and
    back for the backward pass instead."""
    policy = _REMAT_POLICIES[cfg.remat]
    if not cfg.num_fam:
        return policy
    if cfg.fam_remat == "offload":
        fam = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[INITIAL_FAM_NAME], names_which_can_be_offloaded=[FAM_LOOP_NAME],
            offload_src="device", offload_dst="pinned_host")
    else:
        fam = jax.checkpoint_policies.save_only_these_names(
            INITIAL_FAM_NAME, *([FAM_LOOP_NAME] if cfg.fam_remat == "keep" else []))
    if policy is None:
        return fam

    def either(prim, *args, **params):  # save_from_both_policies takes boolean policies only, not offloading
        return True if policy(prim, *args, **params) else fam(prim, *args, **params)
    return either


class FamLM(nnx.Module):
    """Decoder-only LM; attention "full", "bswa" or "fam" (docs/fam.md).

    Parameters: token embedding, optional LM head, the layer stack (leading "layers" axis, so a scan over
    layers and an unrolled loop use the same checkpoint layout) and, for FAM, the learned initial-FAM table
    `fam_init` [F, d]: the only parameter FAM adds. With cfg.lora_rank > 0 the targeted projections of every
    layer also hold LoRA adapters (famjax.model.lora: add_lora, merge_lora, trainable_mask).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a famjax.ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d, pd = cfg.d_model, cfg.weight_dtype
        embed_std = 1.0 if cfg.embed_scale else d ** -0.5
        self.embed = param(rngs, normal(embed_std), (cfg.vocab_size, d), ("vocab", "embed"), pd)
        if cfg.num_fam:
            self.fam_init = param(rngs, normal(embed_std), (cfg.num_fam, d), ("fam", "embed"), pd)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return DecoderLayer(cfg, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(d ** -0.5), (d, cfg.vocab_size), ("embed", "vocab"), pd)

    # ---------------------------------------------------------------- state
    def init_state(self, batch_size: int, max_len: int | None = None, *, initial_fam: bool = True) -> FamState:
        """Returns the state of `batch_size` empty streams (fixed shapes: constant memory in stream length).

        max_len: KV-cache capacity for attention="full" (default cfg.max_len); ignored by bswa/fam, whose
        memory is m blocks + the current block + F FAM rows per layer.
        initial_fam: False leaves `layers.fam` zero instead of the initial FAM. The first call on the (fresh)
        state gives its rows flagged initial the initial FAM of the parameters it runs with anyway, so a state
        that goes straight into a call (a jitted train step) need not compute it twice: one F-row pass over the
        layers.
        """
        cfg = self.cfg
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be an integer > 0, got {batch_size!r}")
        L, b, kv, hd, dt = cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype
        if cfg.attention == "full":
            capacity = cfg.max_len if max_len is None else max_len
            if not (isinstance(capacity, int) and capacity > 0):
                raise ValueError(f"max_len must be an integer > 0, got {capacity!r}")
            mem_shape, cur_len = (L, b, 1, capacity, kv, hd), 0
        else:
            mem_shape, cur_len = (L, b, cfg.memory_blocks, cfg.block_size, kv, hd), cfg.block_size
        fam = jnp.zeros((L, b, cfg.num_fam, cfg.d_model), jnp.float32)
        if cfg.num_fam and initial_fam:
            fam = fam + self._initial_fam()[:, None]
        fam_kv_shape = (L, b, cfg.num_fam, kv, hd)  # keys/values are computed from fam on the first call
        layers = LayerCache(mem_k=jnp.zeros(mem_shape, dt), mem_v=jnp.zeros(mem_shape, dt),
                            cur_k=jnp.zeros((L, b, cur_len, kv, hd), dt),
                            cur_v=jnp.zeros((L, b, cur_len, kv, hd), dt), fam=fam,
                            fam_k=jnp.zeros(fam_kv_shape, dt), fam_v=jnp.zeros(fam_kv_shape, dt))
        return FamState(layers=layers, pos=jnp.zeros((b,), jnp.int32), is_initial=jnp.ones((b,), bool))

    def start_from_fam(self, batch_size: int, fam) -> FamState:
        """Returns empty streams whose FAM is `fam` [L, F, d] (not the initial FAM: it carries context).

        This is random state passing (RSP, docs/fam.md): a saved final FAM seeds the next sequences, with the normal
        residual on their first update. Positions still start at 0.
        """
        state = self.init_state(batch_size, initial_fam=False)  # every row's FAM is replaced
        fam = jnp.asarray(fam, jnp.float32)
        L, _, F, d = state.layers.fam.shape
        if fam.shape != (L, F, d):
            raise ValueError(f"fam must be [num_layers, fam_len, d_model]={(L, F, d)}, got {fam.shape}")
        fam = jnp.broadcast_to(fam[:, None], state.layers.fam.shape)
        return state.replace(layers=state.layers.replace(fam=fam), is_initial=jnp.zeros((batch_size,), bool))

    def _initial_fam(self, dropout_key=None):
        """Returns the initial FAM of every layer, float32 [L, F, d] (docs/fam.md, "The initial FAM").

        S_0^0 is the learned table; S_0^{l+1} is S_0^l through layer l on its own. It depends only on the
        parameters (its attention sees relative positions only), so it is computed once, unbatched.
        """
        def body(layer, s, index):
            return layer.initial_fam_step(s, self._layer_key(dropout_key, index))[0], s
        return self._scan_layers(body, self.fam_init[...].astype(jnp.float32), self._layer_ids(dropout_key))[1]

    def _restart_fam(self, layer, cache, initial, state, refresh, offset, key, carried: bool):
        """Returns one layer's cache whose initial rows hold the layer's initial FAM (initial: (S_0 [F, d], its
        keys before RoPE and values), DecoderLayer.initial_fam_step's), with fresh FAM keys/values (those of the
        FAM held before state.pos) where `refresh` [b] is set. Initial rows rotate the initial FAM's keys; only
        with `carried` (a fresh state given by the caller, whose rows may hold a FAM that carries context:
        start_from_fam, RSP) are the other rows' FAMs projected."""
        fam0, initial_kv = initial
        fam = jnp.where(state.is_initial[:, None, None], fam0, cache.fam)
        block = state.pos // self.cfg.block_size - 1
        fam_k, fam_v = layer.initial_fam_key_value(initial_kv, block, offset)
        if carried:
            own_k, own_v = layer.fam_key_value(fam, block, offset, sub_key(key, layer.SITE_STATE_FAM_KV))
            initial_rows = state.is_initial[:, None, None, None]
            fam_k, fam_v = jnp.where(initial_rows, fam_k, own_k), jnp.where(initial_rows, fam_v, own_v)
        sel = refresh[:, None, None, None]
        return cache.replace(fam=fam, fam_k=jnp.where(sel, fam_k, cache.fam_k),
                             fam_v=jnp.where(sel, fam_v, cache.fam_v))

    def _dropout_key(self, key):
        """Returns the LoRA dropout key of a call as a typed key, or None when it would change nothing."""
        if key is None or not (self.cfg.lora_rank and self.cfg.lora_dropout):
            return None
        key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        if key.shape != ():
            raise ValueError(f"dropout_key must be one PRNG key, got shape {key.shape}")
        return key

    def _layer_ids(self, dropout_key):
        """The layer indices scanned beside the layers when there is a dropout key (else None: nothing)."""
        return None if dropout_key is None else jnp.arange(self.cfg.num_layers)

    @staticmethod
    def _layer_key(dropout_key, index):
        return None if dropout_key is None else jax.random.fold_in(dropout_key, index)

    # ---------------------------------------------------------------- forward
    def __call__(self, tokens, state: FamState | None = None, *, segment_start=None, position_offset=None,
                 fam_perturb: ops.Perturbation | None = None, dropout_key=None, state_grad: bool = True):
        """Returns (logits float32 [b, T, vocab], state after the chunk).

        tokens: int [b, T], any T >= 1 (a whole sequence, a block, one token: one code path);
        state: from init_state or a previous call; None starts empty streams;
        segment_start: bool [b], restart those rows (a new document) before reading the chunk; or bool [b, T]
            for packed rows: a new example starts at token t (only at block boundaries, from an aligned
            state; attention "bswa"/"fam"): its tokens see nothing of the previous example, its FAM restarts
            from the initial FAM and its positions from 0;
        position_offset: int [b] added to every RoPE position of the row (training's random offset; pass the
            same value on every call of a stream);
        fam_perturb: None, or (training only, attention "fam", a chunk of whole blocks from an aligned state)
            an ops.Perturbation whose data leaves are [L, b, T / B, ...]: after each block's update, layer l's
            new FAM becomes fn(fam, data[l, :, block]) (e.g. famjax.train.perturb's state noise);
        dropout_key: None (inference, evaluation) or a PRNG key: the LoRA adapters' dropout is applied (training;
            layer l folds in l, every call site and projection its own id). Ignored without LoRA dropout;
        state_grad: False returns the state under stop_gradient (no gradient flows into it), for callers that do
            not differentiate it (training: the loss reads the logits). A chunk of whole blocks then runs each
            layer's last FAM update outside the differentiated loop, which skips its backward pass.
        """
        logits, state, _ = self._forward(tokens, state, segment_start, position_offset, collect=False,
                                         perturb=fam_perturb, dropout_key=dropout_key, state_grad=state_grad)
        return logits, state

    def inspect(self, tokens, state: FamState | None = None, *, position_offset=None):
        """Returns per-block FAM diagnostics of one call (whole blocks, aligned state), each stacked over layers:

        fam_probs: float32 [L, b, nb, H, F, F + B] attention of FAM queries over [previous FAM, whole block]
        token_fam_mass: float32 [L, b, nb, B, H] attention mass each block token puts on the previous FAM;
        fam_norm: float32 [L, b, nb, F] L2 norm of every FAM row after each block; plus logits and state.
        """
        cfg = self.cfg
        if cfg.attention != "fam" or not cfg.num_fam:
            raise ValueError(f"inspect needs attention='fam' with fam_len > 0, got {cfg.attention!r}")
        if jnp.shape(tokens)[-1] % cfg.block_size:
            raise ValueError(f"inspect needs whole blocks: T={jnp.shape(tokens)[-1]} is not a multiple of "
                             f"block_size={cfg.block_size}")
        logits, state, diagnostics = self._forward(tokens, state, None, position_offset, collect=True)
        return dict(diagnostics, logits=logits, state=state)

    def _forward(self, tokens, state, segment_start, position_offset, collect, perturb=None, dropout_key=None,
                 state_grad: bool = True):
        cfg = self.cfg
        dropout_key = self._dropout_key(dropout_key)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be int [batch, T] with T >= 1, got {tokens.dtype} {tokens.shape}")
        b, t = tokens.shape
        # Only a fresh state given by the caller may have rows that start from a FAM other than the initial FAM.
        carried = state is not None and state.fresh
        if state is None:
            cap = max(cfg.max_len, t) if cfg.attention == "full" else None
            state = self.init_state(b, max_len=cap, initial_fam=False)  # a fresh call installs it (below)
        if state.batch_size != b:
            raise ValueError(f"state holds {state.batch_size} rows but tokens have batch {b}")
        if collect and not state.aligned:
            raise ValueError("inspect needs an aligned state (every previous call read whole blocks)")
        offset = (jnp.zeros((b,), jnp.int32) if position_offset is None
                  else jnp.broadcast_to(jnp.asarray(position_offset, jnp.int32), (b,)))
        fresh = state.fresh
        inner_resets = None
        if segment_start is not None:
            segment_start = jnp.asarray(segment_start, bool)
            if segment_start.ndim == 2:
                inner_resets = self._check_packed(segment_start, state, t)
                segment_start = segment_start[:, 0]
            state = reset_rows(state, jnp.broadcast_to(segment_start, (b,)))
        cache = state.layers
        restart = bool(cfg.num_fam) and (fresh or segment_start is not None)
        # Rows flagged initial read the initial FAM of the current parameters (so it gets gradients); a fresh state
        # also gets its FAM keys here, at this call's position offset. Both happen layer by layer inside the layer
        # scan (below), not per decode step.
        refresh = (jnp.ones_like(state.is_initial) if fresh else state.is_initial) if restart else None

        chunk, new_pos, is_initial, aligned_after = self._chunk(state, t, offset, fresh, inner_resets, collect)
        chunk = dataclasses.replace(chunk, state_grad=state_grad)
        if perturb is not None:
            want = (cfg.num_layers, b, chunk.num_blocks)
            shapes = [tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(perturb.data)]
            if not cfg.num_fam or not chunk.all_complete or any(s[:3] != want for s in shapes):
                raise ValueError(f"fam_perturb needs attention 'fam', a chunk of whole blocks from an aligned state "
                                 f"and data leaves [layers, batch, blocks, ...] = {want} + ..., got {shapes}")
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model ** 0.5, cfg.compute_dtype)
        if not chunk.compact:
            x = ops.to_grid(x, chunk.phase, chunk.num_blocks, cfg.block_size)
        x = constrain(x, "batch", None, "embed")

        def body(layer, carry, layer_cache, layer_perturb, index):
            x, fam0 = carry  # fam0: this layer's initial FAM S_0^l [F, d] (None unless restart)
            key = self._layer_key(dropout_key, index)
            initial, next_fam0 = None, None
            if restart:
                next_fam0, initial_kv = layer.initial_fam_step(fam0, key)
                initial = (fam0, initial_kv)
                layer_cache = self._restart_fam(layer, layer_cache, initial, state, refresh, offset, key, carried)
            x, out = layer(x, layer_cache, chunk, initial if inner_resets is not None else None, layer_perturb, key)
            return (x, next_fam0), out
        fam0 = self.fam_init[...].astype(jnp.float32) if restart else None
        (x, _), (cache, diagnostics) = self._scan_layers(body, (x, fam0), cache, perturb,
                                                         self._layer_ids(dropout_key), remat=True)

        h = self.final_norm(x if chunk.compact else ops.from_grid(x, chunk.phase, t), cfg.compute_dtype)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.dot(h.reshape(b * t, -1), head.astype(cfg.compute_dtype),
                         preferred_element_type=jnp.float32).reshape(b, t, -1)
        if cfg.final_softcap:
            logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
        logits = constrain(logits, "batch", None, "vocab")
        new_state = FamState(layers=cache, pos=new_pos, is_initial=is_initial, aligned=aligned_after,
                             fresh=False)
        return logits, new_state if state_grad else jax.lax.stop_gradient(new_state), diagnostics

    def _check_packed(self, segment_start, state: FamState, t: int):
        """Returns the block-start columns [b, nb] of a [b, T] segment_start, checking it is block-aligned."""
        cfg = self.cfg
        B = cfg.block_size
        if cfg.attention == "full":
            raise ValueError("segment_start of shape [batch, T] (packed rows) needs attention 'bswa' or 'fam'")
        if segment_start.shape != (state.batch_size, t):
            raise ValueError(f"segment_start must be [batch] or [batch, T]={state.batch_size, t}, "
                             f"got {segment_start.shape}")
        if not state.aligned:
            raise ValueError("segment_start of shape [batch, T] needs an aligned state (whole blocks so far)")
        if not isinstance(segment_start, jax.core.Tracer):
            off_block = jnp.arange(t) % B != 0
            if bool(jnp.any(segment_start & off_block[None, :])):
                raise ValueError(f"segment_start may only be True at multiples of block_size={B}")
        resets = segment_start[:, ::B]
        return resets.at[:, 0].set(False)  # column 0 is a plain row reset

    def _chunk(self, state: FamState, t: int, offset, fresh: bool, resets, collect: bool):
        """Returns (Chunk for t new tokens, position after it, is_initial after it, static aligned after it)."""
        cfg = self.cfg
        pos = state.pos
        b = pos.shape[0]
        if cfg.attention == "full":
            capacity = state.layers.mem_k.shape[3]
            if t > capacity:
                raise ValueError(f"chunk of {t} tokens exceeds the full-attention cache (max_len={capacity})")
            if not isinstance(pos, jax.core.Tracer) and int(jnp.max(pos)) + t > capacity:
                raise ValueError(f"stream exceeds the full-attention cache: max_len={capacity}; "
                                 "pass a larger max_len to init_state")
            positions = pos[:, None] + jnp.arange(t)[None, :] + offset[:, None]
            none = jnp.zeros((b, 1), bool)
            chunk = Chunk(phase=0, num_blocks=1, positions=positions, offset=offset, block_index=none,
                          memory_visible=none, completes=none, next_block=1, all_complete=False, fresh=fresh,
                          start=pos, is_initial=state.is_initial, compact=True)
            return chunk, pos + t, state.is_initial, True
        B, m = cfg.block_size, cfg.memory_blocks
        aligned = state.aligned
        nb = ops.num_grid_blocks(t, B, aligned)
        phase = 0 if aligned else pos % B
        j = jnp.arange(nb)[None, :]
        first_block = pos // B
        completes = (j + 1) * B <= (jnp.asarray(phase) + t if aligned else phase[:, None] + t)
        completes = jnp.broadcast_to(completes, (b, nb))
        if resets is None:
            begin = jnp.zeros((b, nb), jnp.int32)
            is_initial = state.is_initial & ~jnp.any(completes, axis=1)
        else:
            begin = ops.segment_begin_blocks(first_block, resets)
            last_reset = jnp.max(jnp.where(resets, j, -1), axis=1)
            since = completes & (j >= last_reset[:, None])
            is_initial = (state.is_initial | (last_reset >= 0)) & ~jnp.any(since, axis=1)
        slot_begin = jnp.repeat(begin, B, axis=1) * B  # [b, nb * B] first position of each slot's segment
        positions = (pos - phase)[:, None] + jnp.arange(nb * B)[None, :] - slot_begin + offset[:, None]
        all_complete = aligned and t % B == 0
        next_block = nb if all_complete else (phase + t) // B + jnp.zeros_like(pos)
        # One grid block (decode, short chunks) and no diagnostics: compute only the T real query slots.
        compact = nb == 1 and t < B and not collect
        if compact:
            positions = positions[:, :t] if aligned else jnp.take_along_axis(
                positions, jnp.asarray(phase)[:, None] + jnp.arange(t)[None, :], axis=1)
            query_slot = jnp.asarray(phase)[..., None] + jnp.arange(t)  # [b, T] or [T]
            own_mask = jnp.arange(B) <= query_slot[..., None]
            own_mask = own_mask[:, None] if own_mask.ndim == 3 else own_mask[None, None]
        else:
            own_mask = ops.CAUSAL
        chunk = Chunk(phase=phase, num_blocks=nb, positions=positions, offset=offset, compact=compact,
                      own_mask=own_mask,
                      block_index=first_block[:, None] + j - begin,
                      memory_visible=ops.memory_visible(first_block, begin, m), completes=completes,
                      next_block=next_block, all_complete=all_complete, fresh=fresh, start=pos,
                      is_initial=state.is_initial, resets=resets, collect=collect)
        return chunk, pos + t - begin[:, -1] * B, is_initial, all_complete

    def _scan_layers(self, body, carry, *xs, remat: bool = False):
        """Applies body(layer, carry, *xs_l) -> (carry, ys_l) over the layer stack; ys stacked on axis 0.

        With cfg.scan_layers a lax.scan (compile time independent of depth), else an unrolled loop over the
        same stacked parameters.
        """
        graphdef, params = nnx.split(self.layers)

        def step(carry, inputs):
            layer_params, *rest = inputs
            return body(nnx.merge(graphdef, layer_params), carry, *rest)

        if remat and self.cfg.remat != "none":
            step = jax.checkpoint(step, policy=remat_policy(self.cfg))
        if self.cfg.scan_layers:
            return jax.lax.scan(step, carry, (params, *xs))
        outs = []
        for i in range(self.cfg.num_layers):
            carry, y = step(carry, jax.tree.map(operator.itemgetter(i), (params, *xs)))
            outs.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)

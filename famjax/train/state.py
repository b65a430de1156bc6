"""The train state (params, optimizer, step, RNG, RSP saved FAM, carried stream state) and its sharded init.

Init follows the four-line recipe: `jax.eval_shape(init)` -> logical PartitionSpecs of the parameters ->
NamedShardings from the mesh rules -> `jax.jit(init, out_shardings=...)`, so every array is created already
sharded and full parameters never exist on one device.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from famjax.model import FamLM, FamState
from famjax.model.lora import select
from famjax.train import mesh as meshlib
from famjax.train.config import model_config
from famjax.train.pretrained import trainable_mask


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; all of it is checkpointed (but the frozen base of a LoRA run).

    step: int32 []; params: pure dict of parameter arrays (nnx.merge(graphdef, params) gives the model), the
    frozen base included when train.trainable is not "all"; opt_state: optax state of the trainable leaves
    (`trainable_params`; all of params for "all"); rng: uint32 [2] base key (step keys are
    fold_in(rng, step), so a resumed run draws the same numbers); rsp_fam: float32 [L, F, d] final FAM of
    row 0 of the previous step (random state passing); rsp_valid: bool [] whether rsp_fam holds a real FAM
    yet; stream: FamState of every row carried across steps (document streams) or None; stream_offset:
    int32 [b] each stream's position offset or None.
    """
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    rsp_fam: jax.Array
    rsp_valid: jax.Array
    stream: FamState | None = None
    stream_offset: jax.Array | None = None


def trainable_params(cfg, params: dict) -> dict:
    """The sub-tree of params that trains (train.trainable): the whole tree for "all"."""
    mask = trainable_mask(cfg, params)
    return params if mask is None else select(params, mask)


def init_stream_state(model: FamLM, batch_size: int) -> FamState:
    """Returns an empty per-row stream state whose structure stays fixed across steps.

    `fresh=False`: every step passes segment_start, which re-reads the initial FAM for rows flagged initial,
    so the first step needs no special (differently traced) state.
    """
    return model.init_state(batch_size).replace(fresh=False)


def stream_logical_spec(stream: FamState):
    """Returns logical PartitionSpecs of a FamState: rows on "batch" (axis 1 of layer caches, 0 of pos)."""
    def layer_spec(x):
        return PartitionSpec(None, "batch", *([None] * (x.ndim - 2)))
    return stream.replace(layers=jax.tree.map(layer_spec, stream.layers), pos=PartitionSpec("batch"),
                          is_initial=PartitionSpec("batch"))


def abstract_model(cfg) -> tuple[nnx.GraphDef, dict, dict]:
    """Returns (graphdef, abstract params pure dict, logical PartitionSpecs pure dict) without allocating."""
    mcfg = model_config(cfg)
    model = nnx.eval_shape(lambda: FamLM(mcfg, rngs=nnx.Rngs(int(cfg.train.seed))))
    graphdef, state = nnx.split(model)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return graphdef, nnx.to_pure_dict(state), specs


def make_init_fn(cfg, tx: optax.GradientTransformation, *, stream: bool):
    """Returns init(params=None) -> TrainState (pure; call under jit or eval_shape): the parameters drawn from
    train.seed, or `params` (a pure dict of the model's parameters, e.g. a pretrained checkpoint's)."""
    mcfg = model_config(cfg)
    seed, rows = int(cfg.train.seed), int(cfg.data.batch_size)

    def init(params=None) -> TrainState:
        if params is None:
            model = FamLM(mcfg, rngs=nnx.Rngs(seed))
            _, state = nnx.split(model)
            params = nnx.to_pure_dict(state)
        else:
            graphdef, _, _ = abstract_model(cfg)
            model = nnx.merge(graphdef, params)
        L, F, d = mcfg.num_layers, mcfg.num_fam, mcfg.d_model
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable_params(cfg, params)),
            rng=jax.random.key_data(jax.random.PRNGKey(seed)), rsp_fam=jnp.zeros((L, F, d), jnp.float32),
            rsp_valid=jnp.zeros((), bool),
            stream=init_stream_state(model, rows) if stream else None,
            stream_offset=jnp.zeros((rows,), jnp.int32) if stream else None)
    return init


def state_shardings(cfg, abstract: TrainState, tx, mesh) -> TrainState:
    """Returns a TrainState of NamedShardings: params (and optimizer moments shaped like them) by the rules,
    stream state by rows, everything else replicated (Adafactor's factored row/column moments included)."""
    rules = cfg.mesh.rules
    _, _, specs = abstract_model(cfg)
    params = meshlib.tree_shardings(specs, abstract.params, rules, mesh)
    repl = meshlib.replicated(mesh)

    def moment(leaf, param, sharding):  # a factored moment has a lower rank than its parameter; it is small
        return sharding if leaf.shape == param.shape else repl
    opt = optax.tree_utils.tree_map_params(tx, moment, abstract.opt_state, trainable_params(cfg, abstract.params),
                                           trainable_params(cfg, params), transform_non_params=lambda _: repl)
    stream = stream_offset = None
    if abstract.stream is not None:
        stream = meshlib.tree_shardings(stream_logical_spec(abstract.stream), abstract.stream, rules, mesh)
        stream_offset = NamedSharding(mesh, meshlib.batch_spec(1, rules, mesh, 0, abstract.stream_offset.shape))
    return TrainState(step=repl, params=params, opt_state=opt, rng=repl, rsp_fam=repl, rsp_valid=repl,
                      stream=stream, stream_offset=stream_offset)


def create_train_state(cfg, tx, mesh, *, stream: bool, params: dict | None = None
                       ) -> tuple[TrainState, TrainState]:
    """Returns (state, shardings): a freshly initialised TrainState created sharded on `mesh`; with `params`
    (e.g. famjax.train.pretrained.load_base; donated) those parameters instead of train.seed's."""
    init = make_init_fn(cfg, tx, stream=stream)
    abstract = jax.eval_shape(init)
    shardings = state_shardings(cfg, abstract, tx, mesh)
    if params is None:
        return jax.jit(init, out_shardings=shardings)(), shardings
    params = jax.device_put(params, shardings.params)  # a no-op for leaves already placed by the rules
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params), shardings


def fresh_streams(cfg, ts: TrainState, shardings: TrainState) -> TrainState:
    """Returns ts with every row's document stream (state and position offset) as a new run starts it: for a
    checkpoint of a packed-rows run that continues as document streams (e.g. data.passkey.chain > 1)."""
    graphdef, _, _ = abstract_model(cfg)
    rows = int(cfg.data.batch_size)

    def make(params):
        return init_stream_state(nnx.merge(graphdef, params), rows), jnp.zeros((rows,), jnp.int32)

    stream, offset = jax.jit(make, out_shardings=(shardings.stream, shardings.stream_offset))(ts.params)
    return ts.replace(stream=stream, stream_offset=offset)


def abstract_train_state(cfg, tx, mesh, *, stream: bool) -> tuple[TrainState, TrainState]:
    """Returns (abstract state with shardings attached, shardings): the restore target of a checkpoint."""
    abstract = jax.eval_shape(make_init_fn(cfg, tx, stream=stream))
    shardings = state_shardings(cfg, abstract, tx, mesh)
    with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return with_sh, shardings

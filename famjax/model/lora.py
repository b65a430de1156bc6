"""LoRA on a FamLM: add adapters to a (pretrained) model, merge them back, and say which leaves train.

    model, tok = famjax.convert.load_pretrained("SmolLM2.gguf", attention="fam", block_size=64, fam_len=16)
    model = add_lora(model, rank=64)                    # base weights shared, adapters A ~ N(0, 1/in), B = 0
    mask = trainable_mask(model)                        # adapters + fam_init (norms=True: + every norm)
    ...train...
    merged = merge_lora(model)                          # W += (alpha / r) A B: a plain model for inference

The adapters live beside their kernels (`layers/attn/q_lora_a` [L, d, r], `layers/attn/q_lora_b` [L, r, H, hd];
`o_lora_a` [L, H, hd, r], `o_lora_b` [L, r, d]; `layers/mlp/{gate,up,down}_lora_{a,b}`), with the logical
axis "lora" for r. The forward computes y = x W + (alpha / r) (dropout(x) A) B and never forms W + A B.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict as _flatten
from flax.traverse_util import unflatten_dict as _unflatten

from famjax.model.config import LORA_TARGETS, ModelConfig
from famjax.model.lm import FamLM

__all__ = ["add_lora", "combine", "is_adapter", "lora_fields", "merge_lora", "select", "split", "trainable_mask"]

_LORA_DEFAULTS = {f: ModelConfig.__dataclass_fields__[f].default
                  for f in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}
_NORM_MODULES = ("final_norm",)  # plus every layer module whose name starts with "norm"


def lora_fields(cfg: ModelConfig) -> dict:
    """The LoRA fields of a ModelConfig, {name: value}."""
    return {f: getattr(cfg, f) for f in _LORA_DEFAULTS}


def is_adapter(path) -> bool:
    """Whether a parameter path (tuple of keys) names a LoRA adapter leaf (`<kernel>_lora_a` / `_lora_b`)."""
    return str(path[-1]).endswith(("_lora_a", "_lora_b"))


def _is_norm(path) -> bool:
    return any(str(k) in _NORM_MODULES or str(k).startswith("norm") for k in path[:-1])


def _pure(model_or_params) -> dict:
    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    return model_or_params


def trainable_mask(model_or_params, norms: bool = False) -> dict:
    """Returns a pure-dict bool tree shaped like the parameters: True for the LoRA adapters and the initial-FAM
    table `fam_init` (and, with norms=True, every norm's scale and bias), False for the frozen base weights."""
    flat = _flatten(_pure(model_or_params))
    return _unflatten({p: bool(is_adapter(p) or p == ("fam_init",) or (norms and _is_norm(p))) for p in flat})


def select(tree: Mapping, mask: Mapping, keep: bool = True) -> dict:
    """Returns the sub-tree of `tree` (nested dict) at the leaves where mask is `keep`; empty dicts dropped."""
    out = {}
    for k, v in tree.items():
        m = mask[k]
        if isinstance(v, Mapping):
            sub = select(v, m, keep)
            if sub:
                out[k] = sub
        elif bool(m) == keep:
            out[k] = v
    return out


def split(tree: Mapping, mask: Mapping) -> tuple[dict, dict]:
    """Returns (trainable, frozen): the sub-trees of `tree` where mask is True / False."""
    return select(tree, mask, True), select(tree, mask, False)


def combine(*trees: Mapping) -> dict:
    """Returns the union of disjoint nested dicts (inverse of split)."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, Mapping):
                out[k] = combine(out.get(k, {}), v)
            elif k in out:
                raise ValueError(f"combine: leaf {k!r} is in more than one tree")
            else:
                out[k] = v
    return out


def _abstract(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: FamLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, state


def _build(cfg: ModelConfig, flat: dict) -> FamLM:
    graphdef, state = _abstract(cfg)
    nnx.replace_by_pure_dict(state, _unflatten(flat))
    return nnx.merge(graphdef, state)


def adapter_init(key, path, shape, dtype):
    """The initial value of adapter leaf `path` [L, ...]: A ~ N(0, 1 / in) (in: the kernel's input size), B = 0."""
    if str(path[-1]).endswith("_lora_b"):
        return jnp.zeros(shape, dtype)
    fan_in = math.prod(shape[1:-1])
    return (jax.random.normal(key, shape, jnp.float32) * fan_in ** -0.5).astype(dtype)


def add_lora(model: FamLM, rank: int, alpha: float = 16.0, dropout: float = 0.0, targets=LORA_TARGETS,
             seed: int = 0, *, mesh=None, rules=None) -> FamLM:
    """Returns a new FamLM with LoRA adapters of `rank` on the `targets` projections of `model` (lora_alpha,
    lora_dropout and lora_targets set in its config). The base parameters are the same arrays (not copied);
    adapters start at A ~ N(0, 1 / in), B = 0, so the new model computes exactly what `model` does.

    seed: the adapters' random A (one key per leaf, folded from the seed); mesh, rules: create the adapters
    with their logical sharding (default: the placement jax gives, the default device).
    """
    cfg = model.cfg
    if cfg.lora_rank:
        raise ValueError(f"the model already has LoRA adapters (lora_rank={cfg.lora_rank}); merge_lora first")
    if not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"rank must be an integer > 0, got {rank!r}")
    new_cfg = cfg.replace(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout, lora_targets=tuple(targets))
    base = _flatten(_pure(model))
    _, abstract = _abstract(new_cfg)
    flat_abstract = _flatten(nnx.to_pure_dict(abstract))
    adapters = sorted(p for p in flat_abstract if p not in base)
    unexpected = [p for p in adapters if not is_adapter(p)]
    if unexpected or len(flat_abstract) - len(adapters) != len(base):
        missing = unexpected or sorted(set(base) - set(flat_abstract))
        raise ValueError(f"internal: add_lora cannot map parameters {missing}")
    shapes = {p: flat_abstract[p] for p in adapters}

    def init():
        root = jax.random.PRNGKey(seed)
        return {p: adapter_init(jax.random.fold_in(root, i), p, s.shape, s.dtype)
                for i, (p, s) in enumerate(shapes.items())}
    if mesh is not None:
        from jax.sharding import NamedSharding

        from famjax.model.sharding import logical_to_spec
        specs = _flatten(nnx.to_pure_dict(nnx.get_partition_spec(abstract)))
        shardings = {p: NamedSharding(mesh, logical_to_spec(tuple(specs[p]), rules or (), mesh.shape, s.shape))
                     for p, s in shapes.items()}
        new = jax.jit(init, out_shardings=shardings)()
    else:
        new = jax.jit(init)()
    return _build(new_cfg, {**base, **new})


def merge_lora(model: FamLM) -> FamLM:
    """Returns the model with every adapter folded into its kernel, W + (alpha / r) A B computed in float32 and
    cast to the kernel's dtype, and the LoRA fields of the config back at their defaults (lora_rank 0): a
    plain FamLM for inference and export. A model without LoRA is returned as it is."""
    cfg = model.cfg
    if not cfg.lora_rank:
        return model
    flat = _flatten(_pure(model))
    scale = cfg.lora_scale
    out = {}
    for path, w in flat.items():
        if is_adapter(path):
            continue
        a_path = path[:-1] + (f"{path[-1]}_lora_a",)
        if a_path in flat:
            a, b = flat[a_path], flat[path[:-1] + (f"{path[-1]}_lora_b",)]
            w = _merged(w, a, b, scale)
        out[path] = w
    return _build(cfg.replace(**_LORA_DEFAULTS), out)


@jax.jit
def _merge_kernel(w, a, b, scale):
    L, r = a.shape[0], a.shape[-1]
    delta = jnp.matmul(a.reshape(L, -1, r).astype(jnp.float32), b.reshape(L, r, -1).astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def _merged(w, a, b, scale: float):
    return _merge_kernel(w, a, b, np.float32(scale))
